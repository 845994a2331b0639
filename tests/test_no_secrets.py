"""Canary: a recognisable fake S3 secret and a tracking URI with a password go into the pipeline's train-adapter
steps (config resolution, the parent MLflow run's params, a Ray job's runtime env on the local head); neither may
come out in any file the run wrote, the MLflow store, the job's runtime env or log, or this process's logs."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from idforge.train.config import TrainConfig
from tests.fixtures.dataset import prepare_synthetic

pytestmark = pytest.mark.usefixtures("no_ray_address_env")


def _files_holding(root: Path, needles: list[bytes]) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and any(n in p.read_bytes() for n in needles)]


@pytest.mark.slow
def test_no_secret_in_configs_params_runtime_env_logs_or_reports(ray_head, mlflow_server, tiny_sd15_dir,
                                                                  tiny_clip_dir, tmp_path, monkeypatch, caplog,
                                                                  capfd):
    import logging

    from kfp.dsl import Dataset, Metrics, Model
    from mlflow import MlflowClient
    from ray.job_submission import JobSubmissionClient

    from components.tracking import open_parent_run
    from components.train import train_adapter
    from idforge.config import IdforgeConfig, TrackingConfig
    from pipelines.runner import pipeline_config_yaml

    s3_secret, password = f"CANARYs3{secrets.token_hex(8)}", f"CANARYpw{secrets.token_hex(8)}"
    needles = [s3_secret.encode(), password.encode()]
    host = mlflow_server.uri.removeprefix("http://")
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):  # restored after the test, set or not
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "idforge-canary")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_secret)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://idforge:{password}@{host}")
    monkeypatch.setenv("IDFORGE_CHECKPOINTS", str(tmp_path / "checkpoints"))
    caplog.set_level(logging.DEBUG)

    prepared = prepare_synthetic(tmp_path / "data", tiny_sd15_dir, tiny_clip_dir, identities=2,
                                 images_per_identity=1, size=128, flip=False)
    train = TrainConfig(method="infinite-id", steps=1, batch_size=1, checkpoint_every=1, keep_checkpoints=1,
                        max_failures=0)
    cfg = IdforgeConfig(train=train, tracking=TrackingConfig(experiment="canary"))
    config_yaml = pipeline_config_yaml(cfg, tmp_path)  # what the runner passes every step
    dataset = Dataset(uri=str(prepared))
    parent_id = open_parent_run.python_func(config_yaml=config_yaml, pipeline_name="train-adapter", dataset=dataset)
    model, metrics = Model(uri=str(tmp_path / "task" / "model")), Metrics(uri=str(tmp_path / "task" / "metrics"))
    train_adapter.python_func(prepared=dataset, method="infinite-id", base_model=str(tiny_sd15_dir),
                              config_yaml=config_yaml, parent_run_id=parent_id, model=model, metrics=metrics,
                              workers=1, gpus_per_worker=0.0, ray_address=ray_head)

    # It ran, with the config logged and the tracking server as its store (minus the password).
    client = MlflowClient(mlflow_server.uri)
    params = client.get_run(parent_id).data.params
    assert params["tracking.uri"] == f"http://idforge@{host}" and params["train.method"] == "infinite-id"
    child = client.get_run(model.metadata["mlflow_run_id"])
    assert child.data.tags["mlflow.parentRunId"] == parent_id and child.data.params["train.steps"] == "1"

    # Every file written: configs, task outputs, checkpoints, job summary, the MLflow store and its artifacts.
    assert _files_holding(tmp_path, needles) == []
    jobs = JobSubmissionClient(ray_head)
    job_id = model.metadata["ray_job_id"]
    runtime_env = str(jobs.get_job_info(job_id).runtime_env)
    assert "tracking" in runtime_env and not any(n.decode() in runtime_env for n in needles)
    assert not any(n.decode() in jobs.get_job_logs(job_id) for n in needles)
    out, err = capfd.readouterr()
    assert not any(n.decode() in out + err + caplog.text for n in needles)
