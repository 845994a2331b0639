"""Population training as a Ray job: submitted through the Ray Jobs API, run on the cluster, fetched back.

Two halves, one module:

- :func:`train_on_ray_cluster` (the submitting side: a pipeline step, a laptop) builds the job's entrypoint, submits
  it to the head's Jobs API (``http://HOST:8265``; on Kubernetes the KubeRay head service) with
  :func:`idforge.ops.ray_jobs.run_ray_job`, streams its log, and on success copies ``method.safetensors``,
  ``metrics.json`` and ``config.resolved.yaml`` from the output location into a local directory.
- :func:`main` (``python -m idforge.train.remote ...``, the job's entrypoint on the head) reads the resolved config
  from an environment variable of the job's ``runtime_env``, passes the data URI on to the workers (each reads an
  ``s3://`` prefix itself, wherever Ray places it), runs
  :func:`idforge.train.population.train_population` on the cluster's Ray, and puts the outputs at the output URI.

Data and output locations are URIs the cluster can read: local paths on one machine (or a volume every node mounts
at the same path), ``s3://`` on a cluster. With an ``s3://`` output, Ray Train's checkpoints go to ``<output>/ray``
(persistent storage every node reaches, written through the configured endpoint: see
:mod:`idforge.io.s3_clients`; ``train.storage_path`` overrides it) and the exported files are uploaded
next to it; with a local output everything lands under that directory, checkpoints in ``<output>/ray``.

The job id is a hash of everything that defines the run (config, data, model, output, workers): a retried pipeline
step re-attaches to the job it already submitted instead of training twice. A job of that id that FAILED or was
STOPPED is not re-attached to; the retry submits ``<id>-r1`` (``-r2``...), which resumes from the checkpoints the
failed attempt left at the same output.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import json
import logging
import os
import shlex
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from idforge.errors import ConfigError, DataError, IdforgeError
from idforge.io.storage import is_local, is_s3_uri, join_uri, local_path, open_storage
from idforge.ops.ray_jobs import (
    JobStatus,
    LogSink,
    RayJobError,
    RayJobTimeoutError,
    find_job_status,
    normalize_address,
    run_ray_job,
)

__all__ = [
    "CONFIG_ENV",
    "OUTPUT_FILES",
    "RemoteTrainError",
    "RemoteTrainResult",
    "build_entrypoint",
    "default_output_uri",
    "derive_job_id",
    "main",
    "train_on_ray_cluster",
]

log = logging.getLogger(__name__)

#: The job's environment variable holding the resolved root config as YAML (set through ``runtime_env``).
CONFIG_ENV = "IDFORGE_TRAIN_CONFIG_YAML"
#: What the submitting side fetches from the output location after a successful job.
OUTPUT_FILES = ("method.safetensors", "metrics.json", "config.resolved.yaml")
#: Written by the job next to them: steps, MLflow run id and the last checkpoint's URI.
JOB_SUMMARY = "train_job.json"
#: Where checkpoints go on a cluster (k8s/base/bucket-layout.yaml sets it for every pod).
CHECKPOINTS_ENV = "IDFORGE_CHECKPOINTS"
LOG_TAIL_LINES = 40
MAX_RETRY_IDS = 20
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


class RemoteTrainError(RayJobError):
    """The training job ended without succeeding; the message ends with the job's last log lines."""


@dataclass
class RemoteTrainResult:
    """What a training job produced, with its outputs copied to ``local_dir``."""

    job_id: str
    status: JobStatus
    attached: bool  # True: the job already existed (a retried step), nothing was submitted
    output_uri: str  # where the job wrote (method.safetensors, metrics.json, config.resolved.yaml, ray/)
    local_dir: Path
    method_path: Path  # local_dir/method.safetensors (load with idforge.methods.checkpoint.load_method)
    steps: int
    metrics: dict[str, Any]  # last reported metrics of rank 0 (loss, lr, world_size, ...)
    checkpoint_uri: str | None = None  # the last full-state Ray Train checkpoint
    mlflow_run_id: str | None = None
    log_tail: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------------
# the submitting side


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _absolute(uri: str) -> str:
    """Local paths made absolute (the job runs in another working directory); URIs unchanged."""
    return str(local_path(uri).resolve()) if is_local(uri) else uri


def _check_uri(name: str, uri: str) -> str:
    if not isinstance(uri, str) or not uri.strip():
        raise ConfigError(f"{name} must be a local path or an s3:// URI the Ray cluster can read, got {uri!r}")
    if not (is_local(uri) or is_s3_uri(uri)):
        raise ConfigError(f"{name} {uri!r}: use a local path (one machine or a shared volume) or s3://bucket/prefix")
    return _absolute(uri.strip())


def default_output_uri(key: str, method: str, fallback_dir: str | os.PathLike[str]) -> str:
    """``$IDFORGE_CHECKPOINTS/train/<method>/<hash of key>``, or the same under ``fallback_dir`` when unset.

    ``key`` names one training step (a pipeline task's output artifact URI): stable across retries of the step,
    different for every new run.
    """
    base = os.environ.get(CHECKPOINTS_ENV) or str(fallback_dir)
    return join_uri(base, "train", method, _digest(key)[:16])


def derive_job_id(method: str, config_yaml: str, data_uri: str, model: str, output_uri: str, workers: int,
                  gpus_per_worker: float, resume: bool = True) -> str:
    """``idforge-train-<method>-<16 hex>``: the same run definition always gives the same id (a run started over
    with ``resume=False`` is another one: it must not re-attach to the job that trained the old one)."""
    parts: tuple[Any, ...] = (method, config_yaml, data_uri, model, output_uri, workers, float(gpus_per_worker))
    digest = _digest(*parts) if resume else _digest(*parts, "no-resume")
    return f"idforge-train-{method}-{digest[:16]}"


def build_entrypoint(data_uri: str, output_uri: str, model: str, method: str, workers: int, gpus_per_worker: float,
                     *, python: str = "python", parent_run_id: str | None = None, resume: bool = True) -> str:
    """The shell command the job runs on the head (the config travels in ``$IDFORGE_TRAIN_CONFIG_YAML``)."""
    args = [python, "-m", "idforge.train.remote", "--config-env", CONFIG_ENV, "--data", data_uri, "--output",
            output_uri, "--model", model, "--method", method, "--workers", str(workers), "--gpus-per-worker",
            f"{gpus_per_worker:g}"]
    if parent_run_id:
        args += ["--parent-run-id", parent_run_id]
    if not resume:
        args.append("--no-resume")
    return shlex.join(args)


def _pick_job_id(address: str, base: str, timeout_s: float) -> tuple[str, bool]:
    """(id to use, whether it already exists): ``base`` unless its job failed or stopped, then ``base-rN``."""
    for attempt in range(MAX_RETRY_IDS + 1):
        candidate = base if attempt == 0 else f"{base}-r{attempt}"
        status = find_job_status(address, candidate, timeout_s)
        if status is None:
            return candidate, False
        if status not in (JobStatus.FAILED, JobStatus.STOPPED):
            return candidate, True
        log.info("Ray job %s ended %s: the retry gets a new id", candidate, status)
    raise RayJobError(f"Ray job {base} failed {MAX_RETRY_IDS + 1} times: fix the cause (see `ray job logs "
                      f"{base}-r{MAX_RETRY_IDS}`) or pass another job_id")


def _tail_sink(log_sink: LogSink | None, job_id: str, tail: collections.deque[str]) -> LogSink:
    """Forward chunks to ``log_sink`` (default: this module's logger) and keep the last lines for errors."""
    partial = [""]

    def sink(chunk: str) -> None:
        if log_sink is not None:
            log_sink(chunk)
        else:
            for line in chunk.splitlines():
                log.info("[ray job %s] %s", job_id, line)
        lines = (partial[0] + chunk).split("\n")
        partial[0] = lines.pop()
        tail.extend(lines)

    sink.flush = lambda: tail.append(partial[0]) if partial[0] else None  # type: ignore[attr-defined]
    return sink


def _resolved_config_yaml(cfg: Any, method: str) -> tuple[Any, str]:
    """(root config with ``train.method`` set and the tracking URI made absolute, its YAML)."""
    from idforge.config import IdforgeConfig, dump_config

    if not isinstance(cfg, IdforgeConfig):
        raise ConfigError(f"train_on_ray_cluster needs the root config (IdforgeConfig), got {type(cfg).__name__}")
    if not method:
        raise ConfigError("method is empty: name a population method, e.g. infinite-id or id-adapter")
    update: dict[str, Any] = {"train": cfg.train.model_copy(update={"method": method})}
    if cfg.tracking.enabled:
        from idforge.track import tracking_uri

        # A relative SQLite store or one taken from this process's environment must mean the same on the head.
        update["tracking"] = cfg.tracking.model_copy(update={"uri": tracking_uri(cfg.tracking)})
    resolved = cfg.model_copy(update=update)
    return resolved, dump_config(resolved)


def _fetch_outputs(output_uri: str, local_dir: Path, storage_cfg: Any) -> dict[str, Any]:
    """Copy the job's exported files into ``local_dir``; returns the job summary (``train_job.json``)."""
    storage = open_storage(output_uri, storage_cfg)
    local_dir.mkdir(parents=True, exist_ok=True)
    missing = [n for n in (*OUTPUT_FILES, JOB_SUMMARY) if not storage.exists(join_uri(output_uri, n))]
    if missing:
        raise DataError(f"the training job succeeded but {output_uri} lacks {missing}: is the output location "
                        f"the same for the cluster and this machine (a shared volume or s3://)?")
    for name in OUTPUT_FILES:
        src = join_uri(output_uri, name)
        dest = local_dir / name
        if is_local(output_uri) and dest.resolve() == local_path(src).resolve():
            continue
        storage.get_file(src, dest)
    return json.loads(storage.read_text(join_uri(output_uri, JOB_SUMMARY)))


def train_on_ray_cluster(
    cfg: Any,
    data_uri: str,
    model: str,
    method: str,
    output_uri: str,
    address: str | None,
    workers: int = 1,
    gpus_per_worker: float = 0.0,
    job_id: str | None = None,
    log_sink: LogSink | None = None,
    timeout_s: float | None = None,
    *,
    local_dir: str | os.PathLike[str] | None = None,
    parent_run_id: str | None = None,
    resume: bool = True,
    python: str | None = None,
    env_vars: Mapping[str, str] | None = None,
    connect_timeout_s: float = 10.0,
) -> RemoteTrainResult:
    """Train ``method`` on a Ray cluster through its Jobs API and fetch the result.

    Args:
        cfg: the root config (``IdforgeConfig``); sent resolved to the job, ``train.method`` set to ``method``.
        data_uri: a ``prepare`` output (local path or ``s3://``) the cluster can read.
        model: base model id or directory (as the cluster sees it).
        output_uri: where the job writes (local path or ``s3://``); re-using it resumes that run.
        address: the Jobs API, ``http://HOST:8265`` (``$RAY_API_SERVER_ADDRESS`` wins, as in Ray's client).
        job_id: default :func:`derive_job_id`; an existing job of that id is re-attached to, not re-run.
        log_sink: receives the job's log as it streams (default: this module's logger).
        timeout_s: bound on the whole wait; past it the job is stopped and ``RayJobTimeoutError`` raised.
        local_dir: where the outputs are copied (default: a new temporary directory).
        parent_run_id: the MLflow run the job's training run nests under.
        python: the interpreter on the head that has idforge installed; default ``python`` (the cluster image's),
            or this interpreter when the head is on this machine (127.0.0.1/localhost).
        env_vars: more environment for the job (e.g. an S3 endpoint). Not for secrets: the dashboard shows a
            job's runtime_env; credentials belong in the cluster's own environment (Secret idforge-s3).
            Not part of the derived job id.
    Raises:
        RemoteTrainError: the job FAILED or was STOPPED (message ends with its last log lines).
        RayUnreachableError, RayJobTimeoutError, ConfigError, DataError (outputs missing after success).
    """
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    if gpus_per_worker < 0 and gpus_per_worker != -1:
        raise ConfigError(f"gpus_per_worker must be >= 0, or -1 for auto; got {gpus_per_worker}")
    if not isinstance(model, str) or not model.strip():
        raise ConfigError("model is empty: pass the base model id or directory the data was prepared with")
    address = normalize_address(address)
    if python is None:
        python = sys.executable if urlsplit(address).hostname in _LOOPBACK else "python"
    data_uri = _check_uri("data_uri", data_uri)
    output_uri = _check_uri("output_uri", output_uri)
    model = str(Path(model).resolve()) if Path(model).exists() else model
    resolved, config_yaml = _resolved_config_yaml(cfg, method)
    base_id = job_id or derive_job_id(method, config_yaml, data_uri, model, output_uri, workers, gpus_per_worker,
                                       resume)
    chosen, attached = _pick_job_id(address, base_id, connect_timeout_s)
    entrypoint = build_entrypoint(data_uri, output_uri, model, method, workers, gpus_per_worker, python=python,
                                  parent_run_id=parent_run_id, resume=resume)
    tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
    sink = _tail_sink(log_sink, chosen, tail)
    log.info("%s Ray job %s at %s: %s", "attaching to" if attached else "submitting", chosen, address, entrypoint)
    runtime_env = {"env_vars": {**dict(env_vars or {}), CONFIG_ENV: config_yaml}}
    try:
        result = run_ray_job(
            address, entrypoint, runtime_env, job_id=chosen, log_sink=sink, timeout_s=timeout_s,
            metadata={"idforge.stage": "train", "idforge.method": method}, connect_timeout_s=connect_timeout_s,
        )  # fmt: skip
    except RayJobTimeoutError:
        raise
    except RayJobError as exc:
        sink.flush()  # type: ignore[attr-defined]
        last = "\n".join(f"  | {line}" for line in tail) or "  (no log output)"
        raise RemoteTrainError(f"{exc}\nlast {len(tail)} log lines:\n{last}") from None
    sink.flush()  # type: ignore[attr-defined]
    out_dir = Path(local_dir) if local_dir is not None else Path(tempfile.mkdtemp(prefix="idforge-train-"))
    summary = _fetch_outputs(output_uri, out_dir, resolved.storage)
    metrics = json.loads((out_dir / "metrics.json").read_text())
    return RemoteTrainResult(
        job_id=result.job_id, status=result.status, attached=attached, output_uri=output_uri, local_dir=out_dir,
        method_path=out_dir / "method.safetensors", steps=int(summary["steps"]), metrics=metrics.get("metrics", {}),
        checkpoint_uri=summary.get("checkpoint"), mlflow_run_id=summary.get("mlflow_run_id"), log_tail=list(tail),
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# the job side (runs on the head: `python -m idforge.train.remote ...`)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m idforge.train.remote",
                                     description="The Ray job of idforge population training "
                                                 "(submitted by idforge.train.remote.train_on_ray_cluster).")
    parser.add_argument("--data", required=True, help="prepared data: local path or s3:// URI")
    parser.add_argument("--output", "-o", required=True, help="output location: local path or s3:// URI")
    parser.add_argument("--model", required=True, help="base model id or directory")
    parser.add_argument("--method", help="population method (default: the config's train.method)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--gpus-per-worker", type=float, default=0.0)
    parser.add_argument("--config-env", help="environment variable holding the config YAML")
    parser.add_argument("--config", "-c", action="append", default=[], help="config YAML file (repeatable)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="override key=value")
    parser.add_argument("--parent-run-id", help="MLflow run to nest the training run under")
    parser.add_argument("--no-resume", dest="resume", action="store_false")
    parser.add_argument("--ray-address", default="auto", help="Ray inside the job (default: the job's cluster)")
    parser.add_argument("--fault-step", type=int, help="recovery drills: every rank fails once after this step")
    parser.add_argument("--fault-marker", help="recovery drills: path prefix of the files that say a rank failed")
    return parser.parse_args(argv)


def _load_job_config(args: argparse.Namespace) -> Any:
    from idforge.config import load_config, load_config_text

    overrides = list(args.overrides) + ([f"train.method={args.method}"] if args.method else [])
    if args.config_env:
        text = os.environ.get(args.config_env)
        if text is None:
            raise ConfigError(f"${args.config_env} is not set in the job: submit with runtime_env={{'env_vars': "
                              f"{{{args.config_env!r}: <config YAML>}}}} (train_on_ray_cluster does)")
        if args.config:
            raise ConfigError("give the config either with --config-env or with --config, not both")
        return load_config_text(text, overrides, source=f"${args.config_env}")
    return load_config(args.config, overrides)


def _scratch_dir(output_uri: str) -> Path:
    """A per-output working directory on the head (same one when a job for this output runs again)."""
    base = Path(os.environ.get("IDFORGE_JOB_SCRATCH") or Path(tempfile.gettempdir()) / "idforge-ray-jobs")
    return base / _digest(output_uri)[:16]


def run_job(argv: list[str] | None = None) -> dict[str, Any]:
    """The job's work: train, export, put the outputs at ``--output``; returns the job summary."""
    args = _parse_args(argv)
    cfg = _load_job_config(args)  # before the heavy imports: a bad config fails in a blink

    import ray

    from idforge.track import start_run
    from idforge.train.population import train_population

    output = _absolute(args.output)
    scratch = _scratch_dir(output)
    remote_output = not is_local(output)
    if remote_output and cfg.train.storage_path is None:
        # Ray Train's persistent storage must be reachable from every node: the bucket, next to the outputs.
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"storage_path": join_uri(output, "ray")})})
    out_dir = scratch / "output" if remote_output else local_path(output)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address=args.ray_address, log_to_driver=True)
    try:
        # An s3:// data URI goes to the workers as it is: each localizes it wherever Ray places it (autoscaled
        # nodes included), instead of copies staged on the nodes alive at submit time.
        data = _absolute(args.data)
        # the pipeline's parent run: only its exit task closes it (track.close_pipeline_runs), never a step
        parent = (start_run(cfg.tracking, run_id=args.parent_run_id, leave_open=True) if args.parent_run_id
                  else contextlib.nullcontext())
        with parent:
            result = train_population(
                cfg, data, args.model, workers=args.workers, gpus_per_worker=args.gpus_per_worker,
                output_dir=out_dir, resume=args.resume, local_files_only=cfg.model.local_files_only,
                fault_step=args.fault_step, fault_marker=args.fault_marker,
            )  # fmt: skip
    finally:
        ray.shutdown()
    checkpoint = str(result.checkpoint) if result.checkpoint is not None else None
    storage_path = cfg.train.storage_path or ""
    if checkpoint is not None and "://" in storage_path and "://" not in checkpoint:
        # pyarrow's paths drop the scheme of a remote storage_path (s3://b/k -> b/k)
        checkpoint = f"{storage_path.split('://', 1)[0]}://{checkpoint.lstrip('/')}"
    summary = {"steps": result.steps, "mlflow_run_id": result.mlflow_run_id, "checkpoint": checkpoint,
               "method": cfg.train.method, "output": output}
    from idforge.io.atomic import atomic_write_text

    atomic_write_text(out_dir / JOB_SUMMARY, json.dumps(summary, indent=2, sort_keys=True))
    if remote_output:
        synced = open_storage(output, cfg.storage).upload_dir(out_dir, output)
        log.info("uploaded %d file(s) to %s (%d unchanged)", len(synced.copied), output, len(synced.skipped))
    return summary


def main(argv: list[str] | None = None) -> int:
    """Entry point of the job; bad input exits 2 with a one-line message, as the CLI does."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout)
    try:
        summary = run_job(argv)
    except IdforgeError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    print(f"idforge train job: {summary['method']} trained for {summary['steps']} steps -> {summary['output']}",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
