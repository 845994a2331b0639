"""Evaluation at scale: images are read one identity at a time (memory bounded by one identity), and the MLflow
table is capped to the lowest and highest rows while the full table stays an artifact."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from idforge.config import IdforgeConfig

REPO = Path(__file__).resolve().parents[1]


def test_capped_table_keeps_lowest_and_highest_rows():
    from idforge.evaluate.run import capped_table

    sims = [0.5, np.nan, 0.9, 0.1, 0.7, 0.3, 0.8]
    df = pd.DataFrame({"id_sim": sims, "image": [f"i{k}" for k in range(7)], "refs": [["a"]] * 7})
    out = capped_table(df, 4)
    # lowest two (NaN counts as lowest, then 0.1) and highest two (0.8, 0.9), in the table's own order
    assert out["image"].tolist() == ["i1", "i2", "i3", "i6"]
    assert out["refs"].tolist() == ["['a']"] * 4  # object columns as text for MLflow's table view
    assert len(capped_table(df, 100)) == 7 and capped_table(df, 5)["image"].tolist() == ["i1", "i2", "i3", "i4",
                                                                                       "i6"]
    assert capped_table(df.drop(columns="id_sim"), 3)["image"].tolist() == ["i0", "i1", "i2"]


def test_images_are_read_one_identity_at_a_time(tmp_path, samples_dir, monkeypatch):
    """Three identities x two photos posing as generated images: every read holds one identity's images only,
    every image is read once, and the report pages come out."""
    from idforge.evaluate import run as R

    gen = tmp_path / "gen"
    rows = []
    for ident in ("obama", "macron", "ardern"):
        for k, photo in enumerate(sorted((samples_dir / ident).glob("*.jpg"))[:2]):
            rel = f"images/{ident}/plain/p00_s{k}.jpg"
            (gen / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(photo, gen / rel)
            rows.append({"image": rel, "identity": ident, "category": "plain", "prompt_index": 0, "seed": k,
                         "prompt": "a photo of a person", "method": "photos"})
        shutil.copytree(samples_dir / ident, tmp_path / "refs" / ident)
    pd.DataFrame(rows).to_parquet(gen / "index.parquet")
    (gen / "generate.json").write_text(json.dumps({"conditioning_backend": "insightface"}))
    proto = yaml.safe_load((REPO / "configs/protocols/smoke.yaml").read_text())
    proto.update(prompt_set=str(REPO / "data/prompts/smoke.yaml"), face_backends=["opencv"],
                 metrics={"identity": True, "clip_t": False, "clip_i": False, "lpips": False, "diversity": False})
    (tmp_path / "proto.yaml").write_text(yaml.safe_dump(proto))
    reads: list[list[str]] = []
    real = R._read_images

    def spy(root, rel_paths):
        reads.append(list(rel_paths))
        return real(root, rel_paths)

    monkeypatch.setattr(R, "_read_images", spy)
    cfg = IdforgeConfig.model_validate({"tracking": {"enabled": False},
                                        "evaluate": {"protocol": str(tmp_path / "proto.yaml")}})
    res = R.evaluate_generated(gen, tmp_path / "refs", tmp_path / "eval", cfg)
    assert [sorted({r.split("/")[1] for r in batch}) for batch in reads] == [["ardern"], ["macron"], ["obama"]]
    assert sorted(sum(reads, [])) == sorted(r["image"] for r in rows)
    assert res.metrics["face_detected_opencv"].all() and len(res.metrics) == 6
    assert (res.metrics["id_sim_opencv"] > 0.363).all()  # each photo scored against its own person's references
    assert sorted(p.name for p in (tmp_path / "eval" / "identities").glob("*.html")) == [
        "ardern.html", "macron.html", "obama.html"]
