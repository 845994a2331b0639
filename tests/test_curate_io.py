"""Curation end to end over S3 (input and output on a real S3 server), and the several-faces policies."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from idforge.curate.config import CurateConfig
from idforge.curate.manifest import read_manifest
from idforge.curate.run import curate_dataset


def _thumb(path: Path, height: int = 360) -> Image.Image:
    with Image.open(path) as im:
        im = im.convert("RGB")
        return im.resize((round(im.width * height / im.height), height), Image.LANCZOS)


@pytest.fixture(scope="module")
def two_people(face_photos, tmp_path_factory) -> Path:
    """One photo holding two people side by side (the left one larger), plus one more photo of each."""
    root = tmp_path_factory.mktemp("two") / "in"
    root.mkdir()
    # obama/4 at 420 px high has a ~126 px face; ardern/1 at 300 px a ~92 px one: the left face is the largest.
    left, right = _thumb(face_photos.root / "obama/4.jpg", 420), _thumb(face_photos.root / "ardern/1.jpg", 300)
    canvas = Image.new("RGB", (left.width + right.width, 420), (90, 90, 90))
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width, 60))
    canvas.save(root / "pair.jpg", quality=92)
    _thumb(face_photos.root / "obama/1.jpg").save(root / "obama.jpg", quality=92)
    _thumb(face_photos.root / "ardern/2.jpg").save(root / "ardern.jpg", quality=92)
    return root


def _cfg(tmp: Path, multi: str) -> CurateConfig:
    return CurateConfig(progress=False, matte={"backend": "landmarks"}, work_dir=str(tmp / "work"),
                        gates={"multi_face": multi})


@pytest.mark.slow
def test_multi_face_policies(two_people, tmp_path):
    m = read_manifest(_run(two_people, tmp_path / "largest", _cfg(tmp_path, "largest")))
    pair = m[m["rel"] == "pair.jpg"].sort_values("face_index")
    assert list(pair["reason"]) == ["", "extra_face"] and pair.iloc[0]["bbox"][0] < pair.iloc[1]["bbox"][0]
    assert pair.iloc[0]["identity"] == m[m["rel"] == "obama.jpg"].iloc[0]["identity"]

    m = read_manifest(_run(two_people, tmp_path / "all", _cfg(tmp_path, "all")))
    pair = m[m["rel"] == "pair.jpg"].sort_values("face_index")
    assert list(pair["status"]) == ["accepted", "accepted"]
    by_rel = {r: m[m["rel"] == r].iloc[0]["identity"] for r in ("obama.jpg", "ardern.jpg")}
    assert list(pair["identity"]) == [by_rel["obama.jpg"], by_rel["ardern.jpg"]]  # each face joins its person

    m = read_manifest(_run(two_people, tmp_path / "reject", _cfg(tmp_path, "reject")))
    assert set(m[m["rel"] == "pair.jpg"]["reason"]) == {"too_many_faces"}
    assert set(m[m["rel"] != "pair.jpg"]["reason"]) == {"too_few_images"}  # alone, each person has one photo


def _run(src: Path, out: Path, cfg: CurateConfig) -> Path:
    curate_dataset(str(src), str(out), cfg=cfg)
    return out


@pytest.mark.s3
@pytest.mark.slow
def test_curate_from_s3_to_s3(two_people, s3_env, s3_prefix, tmp_path):
    from idforge.config import IdforgeConfig
    from idforge.io.storage import open_storage

    storage = open_storage(s3_prefix)
    storage.upload_dir(two_people, f"{s3_prefix}/raw")
    cfg = IdforgeConfig(curate=_cfg(tmp_path, "all"))
    report = curate_dataset(f"{s3_prefix}/raw", f"{s3_prefix}/dataset", cfg=cfg)
    assert report.faces_accepted == 4 and report.identities == 2
    local = tmp_path / "down"
    storage.download_dir(f"{s3_prefix}/dataset", local)
    m = read_manifest(local)
    assert sorted(m["source"].unique()) == [f"{s3_prefix}/raw/{n}" for n in ("ardern.jpg", "obama.jpg", "pair.jpg")]
    emb = np.load(local / "embeddings.npy")
    assert emb.shape == (4, 512)
    for path in m.loc[m["status"] == "accepted", "aligned"]:
        assert (local / path).is_file()
    storage.write_bytes(f"{s3_prefix}/labels.csv",
                        b"file,identity\nobama.jpg,obama\npair.jpg,obama\nardern.jpg,ardern\n")
    again = curate_dataset(f"{s3_prefix}/raw", f"{s3_prefix}/dataset", cfg=cfg, labels=f"{s3_prefix}/labels.csv")
    assert again.cached_files == 3  # the staging copy of the output keeps the cache between runs
    assert again.metrics["grouping_pairwise_precision"] == 1.0
    storage.download_dir(f"{s3_prefix}/dataset", local)
    assert sorted(read_manifest(local)["identity"].unique()) == ["ardern", "obama"]
