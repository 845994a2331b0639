"""evaluate_generated on real photos posing as generated images: each image is scored against ITS identity's
references (a right person scores above the backend's threshold, an impostor below), without MLflow."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from idforge.config import IdforgeConfig

REPO = Path(__file__).resolve().parents[1]

# (photo, identity it claims to be, is it really that person)
CASES = [("obama/2.jpg", "obama", True), ("biden/1.jpg", "obama", False), ("macron/2.jpg", "macron", True),
         ("ardern/1.jpg", "macron", False)]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, samples_dir):
    from idforge.evaluate.run import evaluate_generated

    root = tmp_path_factory.mktemp("evalrun")
    gen = root / "gen"
    rows = []
    for i, (photo, ident, _) in enumerate(CASES):
        rel = f"images/{ident}/plain/p00_s{i}.jpg"
        (gen / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(samples_dir / photo, gen / rel)
        rows.append({"image": rel, "identity": ident, "category": "plain", "prompt_index": 0, "seed": i,
                     "prompt": "a photo of a person", "prompt_eval": "a photo of a person",
                     "prompt_template": "a photo of {}", "method": "photos"})
    pd.DataFrame(rows).to_parquet(gen / "index.parquet")
    (gen / "generate.json").write_text(json.dumps({"conditioning_backend": "insightface", "base_model": "none"}))
    proto = yaml.safe_load((REPO / "configs/protocols/smoke.yaml").read_text())
    proto.update(prompt_set=str(REPO / "data/prompts/smoke.yaml"),
                 metrics={"identity": True, "clip_t": False, "clip_i": False, "lpips": False, "diversity": True})
    (root / "proto.yaml").write_text(yaml.safe_dump(proto))
    refs = root / "refs"  # the true photos of the two identities, minus the ones posing as generated
    for ident in ("obama", "macron"):
        shutil.copytree(samples_dir / ident, refs / ident)
        (refs / ident / "2.jpg").unlink()
    cfg = IdforgeConfig.model_validate({"tracking": {"enabled": False},
                                        "evaluate": {"protocol": str(root / "proto.yaml")}})
    return evaluate_generated(gen, refs, root / "eval", cfg), root


@pytest.mark.parametrize("backend", ["opencv", "insightface"])
def test_each_image_is_scored_against_its_own_identity(evaluated, backend):
    from idforge.evaluate.metrics import SAME_PERSON_THRESHOLD

    res, _ = evaluated
    m = res.metrics.set_index("image")
    assert m[f"face_detected_{backend}"].all()
    thr = SAME_PERSON_THRESHOLD[backend]
    for (photo, ident, same), sim in zip(CASES, m[f"id_sim_{backend}"], strict=True):
        assert (sim > thr) == same, (backend, photo, ident, sim)
    assert res.summary[f"face_det_rate_{backend}"] == 1.0


def test_headline_backend_is_not_the_conditioning_one(evaluated):
    res, _ = evaluated
    # conditioned on insightface -> the headline id_sim is opencv's
    assert res.metrics["id_sim"].tolist() == res.metrics["id_sim_opencv"].tolist()
    assert res.summary["id_sim"] == pytest.approx(res.summary["id_sim_opencv"])
    per_id = res.aggregates["identity"]
    assert per_id.loc["obama", "face_det_rate"] == 1.0


def test_switched_off_metrics_are_absent_and_no_mlflow(evaluated):
    res, root = evaluated
    assert res.run_id is None
    for col in ("clip_t", "clip_i", "lpips_shift_tolerant"):
        assert col not in res.metrics.columns
    assert "div_id" in res.metrics.columns  # diversity on: identity distance among the two images per identity
    assert (root / "eval" / "report.html").is_file()
    summary = json.loads((root / "eval" / "summary.json").read_text())
    assert summary["run_id"] is None and summary["metrics"]["num_images"] == 4


def test_missing_index_is_a_clear_error(tmp_path):
    from idforge.errors import DataError
    from idforge.evaluate.run import evaluate_generated

    with pytest.raises(DataError, match="has no index.parquet: run `idforge generate"):
        evaluate_generated(tmp_path, None, tmp_path / "out", IdforgeConfig())
