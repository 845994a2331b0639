"""``finetune --all``: long-lived Ray actors, one artifact and nested MLflow run per identity; a failed identity
or a killed worker does not stop the others, is reported, and a re-run redoes only it."""

from __future__ import annotations

import json
import shutil

import pytest


@pytest.mark.slow
def test_all_identities_fan_out_failure_is_isolated_and_rerun_redoes_only_it(curated_tiny_dataset, tiny_sd15_dir,
                                                                              mlflow_uri, tmp_path):
    import pandas as pd

    from idforge.config import TrackingConfig
    from idforge.train.finetune_config import FinetuneConfig

    ds = tmp_path / "ds"
    shutil.copytree(curated_tiny_dataset, ds)
    manifest = pd.read_parquet(ds / "manifest.parquet")
    broken = ds / manifest.loc[manifest["identity"] == "id01", "aligned"].iloc[0]
    good_bytes = broken.read_bytes()
    broken.write_bytes(b"not a png")
    out = tmp_path / "out"
    cfg = FinetuneConfig(steps=2, batch_size=1, sample_steps=1, sample_seeds=[0], num_threads=1, gpus_per_task=0)
    tracking = TrackingConfig(uri=mlflow_uri)

    import ray

    # One local Ray for both passes (finetune_all joins a running instance and leaves it running).
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        _check_fanout(ds, broken, good_bytes, out, cfg, tracking, tiny_sd15_dir, mlflow_uri)
    finally:
        ray.shutdown()


def _check_fanout(ds, broken, good_bytes, out, cfg, tracking, tiny_sd15_dir, mlflow_uri):

    from mlflow import MlflowClient

    from idforge.train.fanout import finetune_all, format_status

    results = finetune_all("textual-inversion", ds, tiny_sd15_dir, out, cfg, tracking=tracking)
    assert [(r.identity, r.status) for r in results] == [("id00", "done"), ("id01", "failed"), ("id02", "done")], [
        r.error for r in results]
    assert "cannot be decoded" in results[1].error and str(broken.name) in results[1].error
    assert (out / "id00" / "DONE").is_file() and (out / "id02" / "DONE").is_file() and not (out / "id01").exists()
    table = json.loads((out / "status.json").read_text())
    assert table["counts"] == {"done": 2, "failed": 1, "skipped": 0}
    assert "failed" in format_status(results)

    client = MlflowClient(tracking_uri=mlflow_uri)
    parent = client.get_run(table["parent_run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_identity = {r.data.tags["idforge.identity"]: r.info.status for r in children}
    assert by_identity == {"id00": "FINISHED", "id01": "FAILED", "id02": "FINISHED"}

    done_mtime = (out / "id00" / "DONE").stat().st_mtime_ns
    broken.write_bytes(good_bytes)
    again = finetune_all("textual-inversion", ds, tiny_sd15_dir, out, cfg, tracking=tracking)
    assert [(r.identity, r.status) for r in again] == [("id00", "skipped"), ("id01", "done"), ("id02", "skipped")]
    assert (out / "id01" / "DONE").is_file()
    assert (out / "id00" / "DONE").stat().st_mtime_ns == done_mtime  # not re-trained
    assert json.loads((out / "status.json").read_text())["counts"] == {"done": 1, "failed": 0, "skipped": 2}


def test_unknown_identities_and_population_methods_are_refused(curated_tiny_dataset, tiny_sd15_dir, tmp_path):
    from idforge.config import TrackingConfig
    from idforge.errors import ConfigError
    from idforge.train.fanout import finetune_all

    off = TrackingConfig(enabled=False)
    with pytest.raises(ConfigError, match="not in"):
        finetune_all("textual-inversion", curated_tiny_dataset, tiny_sd15_dir, tmp_path, identities=["zz"],
                     tracking=off)
    with pytest.raises(ConfigError, match="population method"):
        finetune_all("id-adapter", curated_tiny_dataset, tiny_sd15_dir, tmp_path, tracking=off)


@pytest.mark.slow
def test_long_lived_workers_share_the_base_and_a_killed_worker_is_replaced(curated_tiny_dataset, tiny_sd15_dir,
                                                                          tmp_path):
    """Two actors for three identities: each loads the base once and trains several identities. A worker SIGKILLed
    while it holds id01 (first attempt only) is replaced and id01 retried; one SIGKILLed on every attempt at id02
    fails id02 after one retry; id00 is unaffected (the rerun is the test above's)."""
    import signal

    import ray

    from idforge.config import TrackingConfig
    from idforge.train.fanout import FinetuneActor, finetune_all
    from idforge.train.finetune_config import FinetuneConfig

    marks = tmp_path / "marks"
    marks.mkdir()

    class Drill(FinetuneActor):
        """Kills its own process with a real SIGKILL on the identities the marks directory says."""

        def run(self, method, identity, dataset_dir, output_dir, parent_run_id, tracking_json):
            import os as _os
            from pathlib import Path as _Path

            root = _Path(str(marks))
            (root / f"{identity}.{_os.getpid()}.started").touch()
            if (root / f"kill-{identity}").exists():
                if (root / f"kill-{identity}").read_text() == "once":
                    (root / f"kill-{identity}").unlink()
                _os.kill(_os.getpid(), signal.SIGKILL)
            return super().run(method, identity, dataset_dir, output_dir, parent_run_id, tracking_json)

    (marks / "kill-id01").write_text("once")
    (marks / "kill-id02").write_text("always")
    out = tmp_path / "out"
    cfg = FinetuneConfig(steps=2, batch_size=1, sample_steps=1, sample_seeds=[0], num_threads=1, gpus_per_task=0,
                         workers=2)
    off = TrackingConfig(enabled=False)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        results = finetune_all("textual-inversion", curated_tiny_dataset, tiny_sd15_dir, out, cfg, tracking=off,
                               actor_cls=Drill)
        assert [(r.identity, r.status) for r in results] == [("id00", "done"), ("id01", "done"),
                                                              ("id02", "failed")]
        assert "worker died twice" in results[2].error
        started = sorted(p.name for p in marks.glob("*.started"))
        by_identity = {i: [n for n in started if n.startswith(i)] for i in ("id00", "id01", "id02")}
        assert len(by_identity["id00"]) == 1 and len(by_identity["id01"]) == 2 and len(by_identity["id02"]) == 2
        assert len({n.split(".")[1] for n in by_identity["id02"]}) == 2  # retried on a fresh process
        table = json.loads((out / "status.json").read_text())
        assert table["counts"] == {"done": 2, "failed": 1, "skipped": 0}
        assert json.loads((out / "_status" / "id02.json").read_text())["status"] == "failed"
        assert (out / "id00" / "DONE").is_file() and (out / "id01" / "DONE").is_file() and not (out / "id02").exists()
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_one_worker_trains_every_identity_after_one_load(curated_tiny_dataset, tiny_sd15_dir, tmp_path):
    """workers=1: one process, one base load, three identities (the load is not repeated per identity)."""
    import ray

    from idforge.config import TrackingConfig
    from idforge.train.fanout import FinetuneActor, finetune_all
    from idforge.train.finetune_config import FinetuneConfig

    loads = tmp_path / "loads"
    loads.mkdir()

    class Counting(FinetuneActor):
        def __init__(self, base_model, cfg_json):
            import os as _os
            from pathlib import Path as _Path

            super().__init__(base_model, cfg_json)
            (_Path(str(loads)) / f"{_os.getpid()}").touch()

    cfg = FinetuneConfig(steps=1, batch_size=1, sample_steps=1, sample_seeds=[0], num_threads=1, gpus_per_task=0,
                         workers=1)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        results = finetune_all("textual-inversion", curated_tiny_dataset, tiny_sd15_dir, tmp_path / "out", cfg,
                               tracking=TrackingConfig(enabled=False), actor_cls=Counting)
    finally:
        ray.shutdown()
    assert [r.status for r in results] == ["done"] * 3
    assert len(list(loads.iterdir())) == 1
    assert all("restore" in r.timings for r in results)
