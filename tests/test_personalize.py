"""`idforge personalize`: one person's photos -> curated -> fine-tuned -> images, grid and report; unusable photo
sets stop with a message that names the photos and what to do."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from idforge.errors import ConfigError, DataError
from idforge.personalize import check_one_person

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "samples"


def _manifest(rows):
    return pd.DataFrame(rows, columns=["source", "status", "reason", "identity"])


def test_one_person_is_accepted_and_named():
    m = _manifest([("a.jpg", "accepted", None, "id-1"), ("b.jpg", "accepted", None, "id-1"),
                   ("c.jpg", "rejected", "blurry", None)])
    assert check_one_person(m, Path("photos"), "id-ea") == "id-1"


def test_no_face_in_any_photo_names_each_photo_and_its_reason():
    m = _manifest([("x/a.jpg", "rejected", "no_face", None), ("x/b.png", "rejected", "too_small", None)])
    with pytest.raises(DataError, match=r"no usable face in any photo of photos \(a.jpg: no_face; b.png: too_small\)"):
        check_one_person(m, Path("photos"), "id-ea")


def test_several_people_are_refused_with_who_is_in_which_photos():
    m = _manifest([("a.jpg", "accepted", None, "id-1"), ("b.jpg", "accepted", None, "id-2"),
                   ("c.jpg", "accepted", None, "id-1")])
    with pytest.raises(DataError, match=r"show 2 different people \(a.jpg, c.jpg \| b.jpg\).*only one person"):
        check_one_person(m, Path("photos"), "id-ea")


def test_too_few_photos_for_the_method():
    m = _manifest([("a.jpg", "accepted", None, "id-1"), ("b.jpg", "rejected", "blurry", None)])
    assert check_one_person(m, Path("p"), "sefi-ide") == "id-1"  # one image is the paper's setting
    with pytest.raises(DataError, match=r"textual-inversion needs at least 3 usable photos.*gave 1.*b.jpg: blurry"):
        check_one_person(m, Path("p"), "textual-inversion")


def test_a_population_method_needs_a_trained_adapter(tmp_path):
    from idforge.config import load_config
    from idforge.personalize import personalize

    with pytest.raises(ConfigError, match="population adapter: pass --model"):
        personalize(tmp_path, "infinite-id", ["a photo of {}"], tmp_path / "out", load_config([], []))


@pytest.mark.slow
def test_photos_to_images_from_the_cli(tmp_path, tiny_sd15_dir, tiny_clip_dir):
    photos = tmp_path / "me"
    shutil.copytree(SAMPLES / "obama", photos)
    Image.new("RGB", (200, 200), "grey").save(photos / "no-face.png")
    out = tmp_path / "out"
    res = subprocess.run(
        [sys.executable, "-m", "idforge.cli", "personalize", "--photos", str(photos), "--method", "textual-inversion",
         "--prompt", "a photo of {} at the beach", "--prompt", "a painting", "--seeds", "0,1", "-o", str(out),
         "--set", f"model.base={tiny_sd15_dir}", "--set", f"model.clip={tiny_clip_dir}",
         "--set", "finetune.steps=2", "--set", "finetune.sample_steps=1", "--set", "generate.num_inference_steps=2",
         "--set", f"tracking.uri=sqlite:///{tmp_path}/mlruns.db"],
        capture_output=True, text=True, timeout=600, cwd=SAMPLES.parents[1])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "grid   :" in res.stdout and "report :" in res.stdout
    grid = Image.open(out / "grid.png")
    assert grid.size == (2 * 256, 2 * 256)  # 2 prompts (rows) x 2 seeds (columns)
    index = pd.read_parquet(out / "generated" / "index.parquet")
    assert len(index) == 4 and index["identity"].nunique() == 1
    assert "at the beach" in index["prompt"].iloc[0] or "at the beach" in " ".join(index["prompt"])
    html = (out / "report.html").read_text()
    assert "grid.png" in html and "a painting" in html and html.count("<img") >= 2
    # the grey frame with no face is in the rejects, never in the references
    manifest = pd.read_parquet(out / "dataset" / "manifest.parquet")
    row = manifest[manifest["source"].str.endswith("no-face.png")]
    assert (row["status"] == "rejected").all() and len(row) == 1
