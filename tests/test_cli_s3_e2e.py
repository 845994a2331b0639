"""Every location on the local S3 server, as a user types it: curate -> prepare -> train -> finetune -> generate ->
evaluate through the installed ``idforge`` command, each reading its inputs from and writing its outputs to
``s3://`` URIs (which a ``Path``-typed option would have folded into ``s3:/``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from idforge.io.storage import open_storage
from tests.fixtures.s3 import S3Server

IDFORGE = Path(sys.executable).with_name("idforge")
PEOPLE = {"ardern": ["1.jpg", "2.jpg"], "macron": ["1.jpg", "2.jpg"], "obama": ["1.jpg", "2.jpg"]}


def _config(tmp_path: Path, repo_root: Path, sd15: Path, clip: Path) -> Path:
    smoke = str(repo_root / "configs/protocols/smoke.yaml")
    cfg = {
        "model": {"base": str(sd15), "clip": str(clip)},
        "curate": {"workers": 1, "min_images_per_identity": 2, "work_dir": str(tmp_path / "curate-work")},
        "train": {"method": "infinite-id", "steps": 2, "batch_size": 1, "checkpoint_every": 2, "report_every": 1},
        "finetune": {"steps": 2, "batch_size": 1, "sample_steps": 1, "sample_seeds": [0], "num_threads": 1},
        "generate": {"protocol": smoke},
        "evaluate": {"protocol": smoke, "clip_model": str(clip)},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlruns.db'}"},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
@pytest.mark.s3
def test_every_stage_reads_and_writes_s3_locations(s3_env: S3Server, s3_prefix: str, samples_dir, repo_root,
                                                   tiny_sd15_dir, tiny_clip_dir, tmp_path):
    store = open_storage(s3_prefix)
    for person, files in PEOPLE.items():
        for name in files:
            store.put_file(samples_dir / person / name, f"{s3_prefix}/raw/{person}/{name}")
    store.put_file(samples_dir / "labels.csv", f"{s3_prefix}/labels/labels.csv")
    config = _config(tmp_path, repo_root, tiny_sd15_dir, tiny_clip_dir)
    env = {**os.environ, "IDFORGE_CACHE": str(tmp_path / "cache"), "RAY_ADDRESS": ""}
    env.pop("MLFLOW_TRACKING_URI", None)
    loc = {k: f"{s3_prefix}/{k}" for k in ("dataset", "prepared", "train", "finetune", "generated", "eval")}

    def idforge(*args: str) -> str:
        proc = subprocess.run([str(IDFORGE), *args, "-c", str(config)], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=600)
        assert proc.returncode == 0, f"idforge {' '.join(args)}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        return proc.stdout

    def on_s3(location: str, *names: str) -> None:
        missing = [n for n in names if not store.exists(f"{location}/{n}")]
        assert not missing, f"{location} lacks {missing}: {store.list(location)[:20]}"

    idforge("curate", "-i", f"{s3_prefix}/raw", "-o", loc["dataset"], "--labels", f"{s3_prefix}/labels/labels.csv")
    on_s3(loc["dataset"], "manifest.parquet", "identities.parquet", "report.json")
    idforge("prepare", "--dataset", loc["dataset"], "-o", loc["prepared"])
    on_s3(loc["prepared"], "config.resolved.yaml")
    assert len(store.list(loc["prepared"])) > 3  # the cached shards went up too
    idforge("train", "--data", loc["prepared"], "-o", loc["train"], "--workers", "1")
    on_s3(loc["train"], "method.safetensors", "metrics.json", "config.resolved.yaml")
    assert any("/ray/train/checkpoint_" in u for u in store.list(f"{loc['train']}/ray"))  # Ray's, on the bucket
    idforge("finetune", "--method", "textual-inversion", "--dataset", loc["dataset"], "-o", loc["finetune"],
            "--identity", "macron")
    on_s3(loc["finetune"], "macron/DONE")
    idforge("generate", "--refs", loc["dataset"], "--artifact", f"{loc['train']}/method.safetensors",
            "-o", loc["generated"], "--seeds", "0", "--identity", "ardern")
    on_s3(loc["generated"], "index.parquet")
    idforge("evaluate", "--generated", loc["generated"], "--dataset", loc["dataset"], "-o", loc["eval"])
    on_s3(loc["eval"], "metrics.parquet", "report.html")
    # Nothing was written to a folded local path such as <cwd>/s3:/bucket/...
    assert not (tmp_path / "s3:").exists()
