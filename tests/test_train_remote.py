"""Population training submitted through the Ray Jobs API to a real local Ray head (the ``ray_head`` fixture):
the job trains, its log streams back, the exported method loads, a checkpoint sits under the output, and a
retried step re-attaches to the job instead of training twice."""

from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from idforge.config import IdforgeConfig, TrackingConfig
from idforge.errors import ConfigError
from idforge.ops.ray_jobs import JobStatus, RayUnreachableError
from idforge.train import remote
from idforge.train.config import TrainConfig
from idforge.train.remote import RemoteTrainError, train_on_ray_cluster
from tests.fixtures.dataset import prepare_synthetic
from tests.fixtures.process import free_ports

pytestmark = pytest.mark.usefixtures("no_ray_address_env")

# Infinite-ID on the tiny SD1.5: 2 optimizer steps of 1 sample, a checkpoint after each.
TRAIN = TrainConfig(method="infinite-id", steps=2, batch_size=1, lr=1e-3, checkpoint_every=1, report_every=1,
                    keep_checkpoints=1, max_failures=0)


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory, tiny_sd15_dir, tiny_clip_dir):
    return prepare_synthetic(tmp_path_factory.mktemp("remote-data"), tiny_sd15_dir, tiny_clip_dir, identities=2,
                             images_per_identity=2, size=128, flip=False)


@dataclass
class S3Run:
    """The prepared data uploaded to the test S3 server, and where a run's output and checkpoints go there."""

    env: dict[str, str]
    store: Any
    data: str
    out: str

    def checkpoints(self) -> list[str]:
        return [u.rsplit("/", 1)[0] for u in self.store.list(f"{self.out}/ray/train")
                if u.endswith("/train_state.pt")]


@pytest.fixture
def s3_run(s3_server, prepared_dir, tmp_path, monkeypatch) -> S3Run:
    from idforge.io.storage import open_storage

    env = dict(s3_server.env)  # the test head has no S3 settings of its own (a cluster's pods do)
    for k, v in env.items():  # this process reads the same server
        monkeypatch.setenv(k, v)
    base = f"s3://{s3_server.bucket}/run-{tmp_path.name}"
    store = open_storage(base)
    store.upload_dir(prepared_dir, f"{base}/prepared")
    return S3Run(env=env, store=store, data=f"{base}/prepared", out=f"{base}/out")


def _cfg(tracking_uri: str | None) -> IdforgeConfig:
    tracking = TrackingConfig(uri=tracking_uri, experiment="remote") if tracking_uri else TrackingConfig(enabled=False)
    return IdforgeConfig(train=TRAIN, tracking=tracking)


def _jobs(address: str) -> list:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address).list_jobs()


@pytest.mark.slow
def test_job_trains_streams_and_reattaches(ray_head, prepared_dir, tiny_sd15_dir, mlflow_uri, tmp_path, monkeypatch):
    from kfp.dsl import Dataset, Metrics, Model
    from mlflow import MlflowClient

    from components.train import train_adapter
    from idforge.config import dump_config, load_config_text
    from idforge.methods.checkpoint import load_method
    from idforge.methods.testing import load_frozen_pipeline
    from idforge.track import start_run
    from idforge.train.checkpoint import METHOD_FILE

    monkeypatch.setenv("IDFORGE_CHECKPOINTS", str(tmp_path / "checkpoints"))
    config_yaml = dump_config(_cfg(mlflow_uri))
    cfg = load_config_text(config_yaml)
    with start_run(cfg.tracking, run_name="pipeline", leave_open=True) as parent:  # as the pipeline opens it
        parent_id = parent.info.run_id

    # The pipeline's train step, as KFP calls it: the Jobs API address sends the training to the cluster.
    model, metrics = Model(uri=str(tmp_path / "task" / "model")), Metrics(uri=str(tmp_path / "task" / "metrics"))
    start = time.monotonic()
    train_adapter.python_func(prepared=Dataset(uri=str(prepared_dir)), method="infinite-id",
                              base_model=str(tiny_sd15_dir), config_yaml=config_yaml, parent_run_id=parent_id,
                              model=model, metrics=metrics, workers=1, gpus_per_worker=0.0, ray_address=ray_head)
    first_s = time.monotonic() - start
    job_id = model.metadata["ray_job_id"]
    assert job_id.startswith("idforge-train-infinite-id-") and model.metadata["steps"] == 2
    output = model.metadata["checkpoints"]
    assert output == remote.default_output_uri(model.uri, "infinite-id", tmp_path / "task")
    assert output.startswith(str(tmp_path / "checkpoints" / "train" / "infinite-id"))
    assert sorted(p.name for p in Path(model.path).iterdir()) == sorted(remote.OUTPUT_FILES)
    assert metrics.metadata["step"] == 2 and metrics.metadata["world_size"] == 1

    # A retried step (same arguments): re-attaches to the finished job, submits nothing, trains nothing, and
    # still streams the job's log and fetches its outputs.
    chunks: list[str] = []
    start = time.monotonic()
    result = train_on_ray_cluster(cfg, str(prepared_dir), str(tiny_sd15_dir), "infinite-id", output, ray_head,
                                  log_sink=chunks.append, local_dir=tmp_path / "again", parent_run_id=parent_id)
    assert result.attached and result.job_id == job_id and result.status is JobStatus.SUCCEEDED
    assert time.monotonic() - start < first_s / 2
    assert [j.submission_id for j in _jobs(ray_head)].count(job_id) == 1
    assert not any(j.submission_id.startswith(f"{job_id}-r") for j in _jobs(ray_head))
    logs = "".join(chunks)
    assert logs.count("idforge train job: infinite-id trained for 2 steps") == 1  # the job's last line
    assert logs.index("step 1/2") < logs.index("step 2/2")
    assert result.log_tail[-1].startswith("idforge train job:")

    assert result.steps == 2 and result.metrics["step"] == 2
    assert result.method_path.read_bytes() == (Path(model.path) / METHOD_FILE).read_bytes()
    method = load_method(result.method_path, load_frozen_pipeline(tiny_sd15_dir))  # strict key/shape check
    assert method.name == "infinite-id"
    # the full-state Ray Train checkpoint of the last step lies under the output location
    ckpt = result.checkpoint_uri
    assert ckpt is not None and ckpt.startswith(str(Path(output, "ray"))) and Path(ckpt, METHOD_FILE).is_file()
    # the training run nested under the pipeline's parent run, in the same store
    run = MlflowClient(mlflow_uri).get_run(result.mlflow_run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent_id and run.info.status == "FINISHED"
    assert model.metadata["mlflow_run_id"] == result.mlflow_run_id
    # the job resumed the parent run to nest under it, and left it open: only the pipeline's exit task closes it
    assert MlflowClient(mlflow_uri).get_run(parent_id).info.status == "RUNNING"


@pytest.mark.slow
def test_s3_checkpoints_outlive_a_dead_run_and_no_resume_starts_over(ray_head, s3_run, tiny_sd15_dir, tmp_path):
    from idforge.ops.ray_jobs import RayJobError, run_ray_job

    storage_env, store, data, out, checkpoints = s3_run.env, s3_run.store, s3_run.data, s3_run.out, s3_run.checkpoints
    cfg, model = _cfg(None), str(tiny_sd15_dir)

    # 1. The run dies after its second step, before that step's checkpoint: step 1's lies on the bucket
    # (written by Ray Train through the configured endpoint; AWS would refuse these credentials).
    _, config_yaml = remote._resolved_config_yaml(cfg, "infinite-id")
    entrypoint = remote.build_entrypoint(data, out, model, "infinite-id", 1, 0.0, python=sys.executable)
    entrypoint += f" --fault-step 2 --fault-marker {shlex.quote(str(tmp_path / 'fault'))}"
    with pytest.raises(RayJobError, match="FAILED"):
        run_ray_job(ray_head, entrypoint, {"env_vars": {**storage_env, remote.CONFIG_ENV: config_yaml}},
                    job_id=f"idforge-test-dies-{tmp_path.name}"[:60], log_sink=lambda _c: None, timeout_s=240)
    assert (tmp_path / "fault.rank0").is_file()  # it died where it was told to
    (dead_ckpt,) = checkpoints()
    assert dead_ckpt.startswith(f"{out}/ray/train/checkpoint_")
    assert not store.exists(f"{out}/method.safetensors")  # nothing exported by the dead run

    # 2. The retried step (a new job, as on another node) resumes from the S3 checkpoint and finishes.
    result = train_on_ray_cluster(cfg, data, model, "infinite-id", out, ray_head, log_sink=lambda _c: None,
                                  timeout_s=240, local_dir=tmp_path / "local", env_vars=storage_env)
    assert result.status is JobStatus.SUCCEEDED and result.steps == 2
    assert result.metrics["resumed_from"] == 1
    assert result.checkpoint_uri.startswith(f"{out}/ray/train/checkpoint_")
    assert checkpoints() == [result.checkpoint_uri]  # keep_checkpoints=1: step 1's is gone
    assert sorted(p.name for p in result.local_dir.iterdir()) == sorted(remote.OUTPUT_FILES)
    assert store.read_bytes(f"{out}/method.safetensors") == result.method_path.read_bytes()
    assert json.loads(store.read_text(f"{out}/train_job.json"))["output"] == out

    # 3. resume=False on the same S3 output: a new job (not a re-attach to the finished one) from step 0.
    fresh = train_on_ray_cluster(cfg, data, model, "infinite-id", out, ray_head, log_sink=lambda _c: None,
                                 timeout_s=240, local_dir=tmp_path / "fresh", env_vars=storage_env,
                                 resume=False)
    assert not fresh.attached and fresh.job_id != result.job_id
    assert fresh.metrics["resumed_from"] == 0 and fresh.steps == 2
    assert checkpoints() == [fresh.checkpoint_uri] and fresh.checkpoint_uri != result.checkpoint_uri


@pytest.mark.slow
def test_a_job_sigkilled_after_its_first_s3_checkpoint_resumes_from_it(ray_head, s3_run, tiny_sd15_dir, tmp_path):
    """A real SIGKILL of the job's driver (as an OOM kill or a lost head pod), landing before Ray recorded the
    checkpoint its worker had uploaded: the retried step still resumes from the newest checkpoint on the bucket (not
    from step 0), and the dead run's checkpoints are cleaned up once the new run keeps its own."""
    import os
    import signal

    from idforge.ops.ray_jobs import follow_job, submit_ray_job

    steps = 12
    cfg = IdforgeConfig(train=TRAIN.model_copy(update={"steps": steps}), tracking=TrackingConfig(enabled=False))
    storage_env, store, data, out, checkpoints = s3_run.env, s3_run.store, s3_run.data, s3_run.out, s3_run.checkpoints
    model = str(tiny_sd15_dir)

    _, config_yaml = remote._resolved_config_yaml(cfg, "infinite-id")
    pid_file = tmp_path / "driver.pid"
    entrypoint = remote.build_entrypoint(data, out, model, "infinite-id", 1, 0.0, python=sys.executable)
    job = submit_ray_job(ray_head, f"echo $$ > {shlex.quote(str(pid_file))} && exec {entrypoint}",
                         {"env_vars": {**storage_env, remote.CONFIG_ENV: config_yaml}},
                         job_id=f"idforge-test-sigkill-{tmp_path.name}"[:60])
    deadline = time.monotonic() + 180
    while not checkpoints():
        assert time.monotonic() < deadline, "the job wrote no checkpoint within 180 s"
        time.sleep(0.2)
    os.kill(int(pid_file.read_text()), signal.SIGKILL)
    assert follow_job(ray_head, job, lambda _c: None, timeout_s=120) is JobStatus.FAILED
    dead = checkpoints()
    assert dead and not store.exists(f"{out}/method.safetensors")
    # Ray's controller records each checkpoint in this snapshot only after the worker uploaded it; a kill between
    # the two (here made certain) leaves checkpoints Ray itself would not resume from.
    snapshot = f"{out}/ray/train/checkpoint_manager_snapshot.json"
    if store.exists(snapshot):
        store.delete(snapshot)

    result = train_on_ray_cluster(cfg, data, model, "infinite-id", out, ray_head, log_sink=lambda _c: None,
                                  timeout_s=240, local_dir=tmp_path / "local", env_vars=storage_env)
    assert result.status is JobStatus.SUCCEEDED and result.steps == steps
    assert 1 <= result.metrics["resumed_from"] < steps  # from the dead run's checkpoint, not from step 0
    assert checkpoints() == [result.checkpoint_uri] and result.checkpoint_uri not in dead


@pytest.mark.slow
def test_failed_job_raises_with_its_last_log_lines_and_a_retry_gets_a_new_id(ray_head, tiny_sd15_dir, tmp_path):
    not_prepared = tmp_path / "empty"
    not_prepared.mkdir()
    with pytest.raises(RemoteTrainError, match="ended FAILED") as info:
        train_on_ray_cluster(_cfg(None), str(not_prepared), str(tiny_sd15_dir), "infinite-id", str(tmp_path / "o"),
                             ray_head, log_sink=lambda _c: None, timeout_s=120, python=sys.executable,
                             job_id="idforge-test-fail")
    message = str(info.value)
    assert "last " in message and "| error: " in message and str(not_prepared) in message  # the job's own error
    # the failed job is not re-attached to: a retry of the step would submit idforge-test-fail-r1
    assert remote._pick_job_id(ray_head, "idforge-test-fail", 5) == ("idforge-test-fail-r1", False)


def test_unreachable_head_fails_fast(tmp_path):
    (port,) = free_ports(1)
    start = time.monotonic()
    with pytest.raises(RayUnreachableError, match=f"127.0.0.1:{port} is unreachable"):
        train_on_ray_cluster(_cfg(None), str(tmp_path), "model", "infinite-id", str(tmp_path / "out"),
                             f"http://127.0.0.1:{port}", connect_timeout_s=2)
    assert time.monotonic() - start < 10
    assert not (tmp_path / "out").exists()


def test_bad_input_is_named(tmp_path):
    call = dict(cfg=_cfg(None), data_uri=str(tmp_path), model="m", method="infinite-id", output_uri=str(tmp_path),
                address="http://127.0.0.1:1")
    with pytest.raises(ConfigError, match="workers must be >= 1"):
        train_on_ray_cluster(**call, workers=0)
    with pytest.raises(ConfigError, match=r"data_uri 'gs://b/x'.*s3://"):
        train_on_ray_cluster(**{**call, "data_uri": "gs://b/x"})
    with pytest.raises(ConfigError, match="model is empty"):
        train_on_ray_cluster(**{**call, "model": " "})
    with pytest.raises(ConfigError, match="needs the root config"):
        train_on_ray_cluster(**{**call, "cfg": TRAIN})
    with pytest.raises(ConfigError, match="not a ray:// address"):
        train_on_ray_cluster(**{**call, "address": "ray://head:10001"})


def test_rayjob_manifest_runs_the_same_entrypoint():
    # k8s/jobs/train-adapter/rayjob.yaml must stay a valid invocation of the job side, with a valid config.
    import yaml

    from idforge.config import load_config_text

    spec = yaml.safe_load(Path("k8s/jobs/train-adapter/rayjob.yaml").read_text())["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "idforge.train.remote"]
    args = remote._parse_args(argv[3:])
    assert args.data.startswith("s3://") and args.output.startswith("s3://idforge/checkpoints/")
    env = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    assert load_config_text(env[args.config_env], [f"train.method={args.method}"]).train.method == "id-adapter"


def test_entrypoint_and_job_id(tmp_path, monkeypatch):
    entry = remote.build_entrypoint("s3://b/prepared v1", str(tmp_path / "o"), "runwayml/stable-diffusion-v1-5",
                                    "id-adapter", 4, 1.0, python="/opt/venv/bin/python", parent_run_id="abc")
    argv = shlex.split(entry)
    assert argv[:3] == ["/opt/venv/bin/python", "-m", "idforge.train.remote"]
    parsed = remote._parse_args(argv[3:])
    assert (parsed.data, parsed.output, parsed.method, parsed.workers, parsed.gpus_per_worker) == (
        "s3://b/prepared v1", str(tmp_path / "o"), "id-adapter", 4, 1.0)
    assert parsed.config_env == remote.CONFIG_ENV and parsed.parent_run_id == "abc" and parsed.resume

    key = ("infinite-id", "train: {}", "/d", "m", "/o", 2, 0.0)
    assert remote.derive_job_id(*key) == remote.derive_job_id(*key)
    assert remote.derive_job_id(*key) != remote.derive_job_id(*key[:4], "/other", 2, 0.0)
    assert remote.derive_job_id(*key) != remote.derive_job_id(*key[:5], 4, 0.0)
    # starting over is another run: it must not re-attach to the job that trained the old one
    assert remote.derive_job_id(*key, resume=False) != remote.derive_job_id(*key)

    monkeypatch.setenv("IDFORGE_CHECKPOINTS", "s3://idforge/checkpoints")
    uri = remote.default_output_uri("s3://idforge/kfp/run-1/train/model", "id-adapter", tmp_path)
    assert uri.startswith("s3://idforge/checkpoints/train/id-adapter/") and len(uri.rsplit("/", 1)[1]) == 16
    assert uri != remote.default_output_uri("s3://idforge/kfp/run-2/train/model", "id-adapter", tmp_path)
    monkeypatch.delenv("IDFORGE_CHECKPOINTS")
    assert remote.default_output_uri("k", "id-adapter", tmp_path).startswith(f"{tmp_path}/train/id-adapter/")


def test_job_side_needs_its_config(monkeypatch, capsys):
    monkeypatch.delenv(remote.CONFIG_ENV, raising=False)
    code = remote.main(["--config-env", remote.CONFIG_ENV, "--data", "/d", "--output", "/o", "--model", "m"])
    assert code == 2
    assert f"${remote.CONFIG_ENV} is not set in the job" in capsys.readouterr().err
