"""Ray Train on local CPU workers: two DDP workers stay in sync, a killed run resumes from its checkpoint and ends
exactly where an uninterrupted run ends, and rank 0 logs to MLflow."""

from __future__ import annotations

import pytest

from idforge.config import TrackingConfig
from idforge.train.config import TrainConfig
from tests.fixtures.dataset import prepare_synthetic

pytestmark = pytest.mark.slow

# A small Infinite-ID on the tiny SD1.5: 4 optimizer steps of 2 samples per worker, a checkpoint every 2.
CFG = TrainConfig(
    method="infinite-id", steps=4, batch_size=2, lr=1e-3, checkpoint_every=2, report_every=2, max_failures=1,
    ema=True, ema_decay=0.9,
)


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory, tiny_sd15_dir, tiny_clip_dir):
    return prepare_synthetic(tmp_path_factory.mktemp("ray-data"), tiny_sd15_dir, tiny_clip_dir, identities=3,
                             images_per_identity=3, size=256)


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tracking(tmp_path_factory) -> TrackingConfig:
    root = tmp_path_factory.mktemp("mlflow")
    return TrackingConfig(uri=f"sqlite:///{root / 'mlruns.db'}", experiment="train-test")


@pytest.fixture(scope="module")
def uninterrupted(ray_local, prepared_dir, tiny_sd15_dir, tmp_path_factory, tracking):
    """One 2-worker run, logged to MLflow with a sample grid at its last step (after the last optimizer step, so
    the weights are those of a run without sampling)."""
    from idforge.train.population import train_population

    out = tmp_path_factory.mktemp("run-a")
    return train_population(CFG.model_copy(update={"sample_every": 4}), prepared_dir, str(tiny_sd15_dir), workers=2,
                            output_dir=out, tracking=tracking)


def test_two_workers_keep_identical_weights(uninterrupted, tiny_sd15_dir):
    import torch

    from idforge.methods.checkpoint import load_method
    from idforge.methods.testing import load_frozen_pipeline
    from idforge.train.loop import weight_checksum

    m = uninterrupted.metrics
    assert uninterrupted.steps == 4 and m["world_size"] == 2 and m["resumed_from"] == 0
    # each rank hashed its own live weights after the last step: DDP averaged the gradients, so they agree
    assert len(m["weight_checksums"]) == 2 and m["weight_checksums"][0] == m["weight_checksums"][1]
    assert torch.isfinite(torch.tensor(m["loss"]))
    # the exported file holds the EMA weights (ema=True, export_ema): different from the live ones
    pipe = load_frozen_pipeline(tiny_sd15_dir)
    method = load_method(uninterrupted.method_path, pipe)
    assert weight_checksum(method.trainable_parameters()) != m["weight_checksum"]
    assert (uninterrupted.output_dir / "config.resolved.yaml").is_file()
    assert (uninterrupted.output_dir / "metrics.json").is_file()


def test_killed_run_resumes_to_the_same_end(uninterrupted, ray_local, prepared_dir, tiny_sd15_dir, tmp_path):
    from idforge.train.population import train_population

    marker = tmp_path / "fault"
    result = train_population(CFG, prepared_dir, str(tiny_sd15_dir), workers=2, output_dir=tmp_path / "run",
                              fault_step=3, fault_marker=marker)
    # both ranks failed once after step 3 (markers written), the group restarted from the step-2 checkpoint
    assert (tmp_path / "fault.rank0").exists() and (tmp_path / "fault.rank1").exists()
    assert result.steps == 4 and result.metrics["resumed_from"] == 2
    # same data stream, restored optimizer/EMA/RNG state: bit-identical weights to the uninterrupted run
    assert result.metrics["weight_checksums"] == uninterrupted.metrics["weight_checksums"]
    assert result.metrics["loss"] == pytest.approx(uninterrupted.metrics["loss"], rel=1e-6)
    assert result.method_path.read_bytes() != b""


def test_rank0_logs_to_mlflow(uninterrupted, tracking):
    from mlflow import MlflowClient

    client = MlflowClient(tracking.uri)
    run = client.get_run(uninterrupted.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["method"] == "infinite-id" and run.data.params["steps"] == "4"
    history = client.get_metric_history(run.info.run_id, "loss")
    # one point per report, from rank 0 only; the logged model's link repeats the final point, at its step
    assert [h.step for h in history] == [2, 4, 4] and len({h.value for h in history if h.step == 4}) == 1
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"method.safetensors", "metrics.json", "samples", "config.resolved.yaml"} <= artifacts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "samples")] == ["samples/step_00000004.png"]
    # the sample grid is an image series too (key `samples`, by step)
    assert any("samples+step+4+" in a.path for a in client.list_artifacts(run.info.run_id, "images"))
    # the trained method is a logged model of the run, its final metrics linked to it, its weights inside
    models = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'")
    assert len(models) == 1 and models[0].name == "infinite-id" and models[0].status.to_int() == 2  # READY
    linked = {m.key: m.value for m in models[0].metrics}
    assert linked["step"] == 4 and "loss" in linked
    files = {a.path for a in client.list_logged_model_artifacts(models[0].model_id)}
    assert "method.safetensors" in files
