"""The pipeline's MLflow parent run tells the truth: open (RUNNING) while the pipeline runs, whatever its steps
do under it, and ended FINISHED or FAILED by the exit task from KFP's final status, with the KFP run id.
Real MLflow store (SQLite); the components' own Python functions, as the pods run them."""

from __future__ import annotations

import json

import pytest
from kfp.dsl import Dataset, PipelineTaskFinalStatus

from components.tracking import close_parent_run, open_parent_run
from idforge.config import TrackingConfig, dump_config, load_config_text
from idforge.errors import ConfigError
from idforge.track import close_pipeline_runs, start_run


def _client(uri):  # noqa: ANN001, ANN202
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _open(tmp_path, uri: str, kfp_run_id: str) -> str:
    """open_parent_run as its pod runs it, on a dataset artifact like curation's."""
    data = tmp_path / f"dataset-{kfp_run_id}"
    data.mkdir()
    (data / "report.json").write_text(json.dumps({"faces_accepted": 3}))
    dataset = Dataset(uri=str(data), metadata={"identities": 3})
    config = dump_config(load_config_text(f"tracking: {{uri: '{uri}'}}"))
    return open_parent_run.python_func(config_yaml=config, pipeline_name="end-to-end", dataset=dataset,
                                       kfp_run_id=kfp_run_id)


def _status(state: str, message: str | None = None) -> PipelineTaskFinalStatus:
    return PipelineTaskFinalStatus(state=state, pipeline_job_resource_name="runs/x",
                                   pipeline_task_name="exit-handler-1",
                                   error_code=None if state == "SUCCEEDED" else 2, error_message=message)


@pytest.mark.parametrize("state, message, status", [
    ("SUCCEEDED", None, "FINISHED"),
    ("FAILED", "task train-adapter failed: CUDA out of memory", "FAILED"),
])
def test_exit_task_ends_the_parent_run_with_the_pipelines_outcome(tmp_path, mlflow_uri, state, message, status):
    client = _client(mlflow_uri)
    parent = _open(tmp_path, mlflow_uri, "kfp-run-1")
    other = _open(tmp_path, mlflow_uri, "kfp-run-2")  # another pipeline run, still going
    assert client.get_run(parent).info.status == "RUNNING"  # open while the pipeline runs
    assert client.get_run(parent).data.tags["idforge.kfp_run_id"] == "kfp-run-1"
    assert client.get_run(parent).data.metrics["dataset_identities"] == 3
    # a step that resumes the parent to nest its own run under it (the train step) leaves it open
    with start_run(TrackingConfig(uri=mlflow_uri), run_id=parent, leave_open=True):
        with start_run(TrackingConfig(uri=mlflow_uri), run_name="train"):
            pass
    assert client.get_run(parent).info.status == "RUNNING"
    # ... also when that step fails (its retry, or the exit task, decides the parent's status)
    with pytest.raises(RuntimeError), start_run(TrackingConfig(uri=mlflow_uri), run_id=parent, leave_open=True):
        raise RuntimeError("step failed")
    assert client.get_run(parent).info.status == "RUNNING"

    config = dump_config(load_config_text(f"tracking: {{uri: '{mlflow_uri}'}}"))
    assert close_parent_run.python_func(status=_status(state, message), config_yaml=config,
                                        kfp_run_id="kfp-run-1") == state
    run = client.get_run(parent)
    assert run.info.status == status and run.info.end_time is not None
    assert run.data.tags["idforge.kfp_state"] == state
    assert run.data.tags.get("idforge.kfp_error") == message
    assert client.get_run(other).info.status == "RUNNING"  # only this pipeline run's parent is closed


def test_close_is_clear_about_nothing_to_close_and_bad_ids(mlflow_uri, caplog):
    cfg = TrackingConfig(uri=mlflow_uri)
    with start_run(cfg, run_name="unrelated"):
        pass
    # the pipeline failed before its parent run opened (e.g. in curation): nothing closed, said so
    with caplog.at_level("WARNING"):
        assert close_pipeline_runs(cfg, "kfp-run-9", "FAILED") == []
    assert "has no parent MLflow run" in caplog.text
    assert close_pipeline_runs(TrackingConfig(uri=mlflow_uri, enabled=False), "kfp-run-9", "FAILED") == []
    for bad in ("", "x' OR '1'='1"):
        with pytest.raises(ConfigError, match="kfp_run_id"):
            close_pipeline_runs(cfg, bad, "SUCCEEDED")


def test_cancelled_and_unknown_states(tmp_path, mlflow_uri):
    client = _client(mlflow_uri)
    cfg = TrackingConfig(uri=mlflow_uri)
    cancelled, broken = _open(tmp_path, mlflow_uri, "r-cancel"), _open(tmp_path, mlflow_uri, "r-error")
    assert close_pipeline_runs(cfg, "r-cancel", "CANCELLED") == [cancelled]
    assert close_pipeline_runs(cfg, "r-error", "SYSTEM_ERROR") == [broken]
    assert client.get_run(cancelled).info.status == "KILLED"
    assert client.get_run(broken).info.status == "FAILED"  # anything but success is not FINISHED
