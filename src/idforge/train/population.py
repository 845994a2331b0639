"""Population training with Ray Train: ``train_population`` (driver) and ``train_fn`` (each worker).

The driver starts (or joins) Ray, opens the MLflow run, builds a ``TorchTrainer`` (Train V2) with
``ScalingConfig(num_workers=N, use_gpu=...)`` and ``FailureConfig(max_failures=...)``, and after training copies
the final ``method.safetensors`` out of the last checkpoint next to the resolved config and a metrics JSON.
Workers run ``idforge.train.loop.run_loop``; a failed worker group restarts from the latest checkpoint.

Re-running with the same output directory resumes that run (Ray restores its checkpoint history from
``storage_path``); ``resume=False`` starts over.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from idforge.errors import ConfigError, DataError
from idforge.io.atomic import atomic_path, atomic_write_text
from idforge.io.lock import holds_output_lock
from idforge.io.s3_clients import ray_storage
from idforge.io.uri import join_uri
from idforge.train.config import TrainConfig
from idforge.train.loop import LocalEnv, LoopSpec, local_data, run_loop

log = logging.getLogger(__name__)

RUN_NAME = "train"


@dataclass
class TrainResult:
    """What a training run produced."""

    output_dir: Path
    method_path: Path  # method.safetensors (load with idforge.methods.checkpoint.load_method)
    steps: int
    metrics: dict[str, Any]  # last reported metrics of rank 0 (loss, lr, samples_per_s, weight_checksums, ...)
    checkpoint: Path | None = None  # the last training checkpoint (full state)
    mlflow_run_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class _FatalBox:
    """A named Ray actor holding the error that stopped the workers without a restart (see ``loop._give_up``).

    Ray Train restarts a worker group that raises (``FailureConfig.max_failures``) and keeps only checkpointed
    reports, so an error that a restart cannot fix travels to the driver this way instead.
    """

    def __init__(self) -> None:
        self.error: str | None = None

    def set(self, error: str) -> None:
        self.error = self.error or error

    def get(self) -> str | None:
        return self.error


class _RayEnv:
    """``LoopEnv`` over Ray Train's worker context."""

    def __init__(self, spec: LoopSpec, fatal_box: str | None = None) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.limit_threads = True
        self.run_state = spec.run_state
        self.storage = spec.storage
        self._fatal_box = fatal_box

    def give_up(self, error: str) -> None:
        """Hand ``error`` to the driver (which raises it once); the workers then return instead of raising."""
        import ray

        if self._fatal_box is None:
            raise DataError(error)
        ray.get(ray.get_actor(self._fatal_box).set.remote(error))

    def checkpoint_candidates(self) -> Iterator[contextlib.AbstractContextManager[Path]]:
        """Ray's latest checkpoint, then every ``checkpoint_*`` under the run's storage, newest first.

        Ray restores its checkpoint history only from the run state its controller wrote; a job whose driver was
        SIGKILLed can leave checkpoints on storage that Ray then does not offer (``get_checkpoint()`` is None), and
        Ray's latest can itself be unreadable. Both fall back to what is on storage.
        """
        import ray.train

        latest = ray.train.get_checkpoint()
        seen: set[str] = set()
        if latest is not None:
            seen.add(latest.path.rstrip("/").rsplit("/", 1)[-1])
            yield _as_path(latest)
        for checkpoint in stored_checkpoints(self.run_state, self.storage):
            if checkpoint.path.rstrip("/").rsplit("/", 1)[-1] not in seen:
                yield _as_path(checkpoint)

    def report(self, metrics: dict[str, Any], write: Any) -> None:
        import tempfile

        import ray.train

        if write is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="idforge-ckpt-") as d:
            write(Path(d))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


@contextlib.contextmanager
def _as_path(checkpoint: Any) -> Iterator[Path]:
    with checkpoint.as_directory() as d:
        yield Path(d)


def stored_checkpoints(run_state: str | None, storage: dict[str, Any] | None) -> list[Any]:
    """The Ray ``Checkpoint``s under ``run_state`` (local or s3://) that hold a ``train_state.pt``, newest first.

    Ray names them ``checkpoint_<timestamp>``, so the name orders them in time.
    """
    if not run_state:
        return []
    import pyarrow.fs as pafs
    import ray.train

    from idforge.config import StorageConfig
    from idforge.train.checkpoint import STATE_FILE

    path, fs = ray_storage(run_state, StorageConfig.model_validate(storage) if storage else None)
    fs = fs or pafs.LocalFileSystem()
    try:
        entries = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError as exc:
        log.warning("cannot list the stored checkpoints under %s: %s", run_state, exc)
        return []
    dirs = sorted((e.path for e in entries if e.type == pafs.FileType.Directory
                   and e.base_name.startswith("checkpoint_")), reverse=True)
    found = []
    for d in dirs:
        if fs.get_file_info(f"{d}/{STATE_FILE}").type == pafs.FileType.File:
            found.append(ray.train.Checkpoint(d, filesystem=fs))
    return found


def train_fn(config: dict[str, Any]) -> None:
    """The Ray Train worker entry point: a pure function of ``config`` (a ``LoopSpec`` as a dict, plus the name of
    the driver's ``_FatalBox``)."""
    config = dict(config)
    box = config.pop(FATAL_BOX_KEY, None)
    spec = LoopSpec.model_validate(config)
    run_loop(spec, _RayEnv(spec, box))


FATAL_BOX_KEY = "fatal_box"


# ----------------------------------------------------------------------------------------------------------------
# driver


def _split_config(cfg: Any) -> tuple[TrainConfig, Any, Any]:
    """(train section, tracking section or None, root config or None) from a root config or a TrainConfig."""
    if isinstance(cfg, TrainConfig):
        return cfg, None, None
    train = getattr(cfg, "train", None)
    if not isinstance(train, TrainConfig):
        raise ConfigError("train_population needs a TrainConfig or a root config with a `train:` section")
    return train, getattr(cfg, "tracking", None), cfg


def _resolved_tracking(tracking: Any) -> dict[str, Any] | None:
    """The tracking section with its URI made absolute here, so workers (other CWDs, other nodes) log to it."""
    if tracking is None or not getattr(tracking, "enabled", True):
        return None
    from idforge.track import tracking_uri

    return tracking.model_copy(update={"uri": tracking_uri(tracking)}).model_dump(mode="json")


@contextlib.contextmanager
def _mlflow_run(tracking: dict[str, Any] | None, output_dir: Path, run_name: str, train_cfg: TrainConfig,
                root_cfg: Any, resume: bool, data: str) -> Iterator[str | None]:
    """The driver's MLflow run (resumed when the output directory recorded one), with ``data`` as its training
    input; yields its id or None."""
    if tracking is None:
        yield None
        return
    from idforge.config import TrackingConfig
    from idforge.track import log_config, log_dataset, start_run

    id_file = output_dir / "mlflow_run_id"
    run_id = id_file.read_text().strip() if (resume and id_file.is_file()) else None
    with start_run(TrackingConfig.model_validate(tracking), run_name=run_name, run_id=run_id,
                   tags={"idforge.stage": "train", "idforge.method": train_cfg.method}) as run:
        if run is None:
            yield None
            return
        if run_id is None:
            log_config(root_cfg if root_cfg is not None else train_cfg)
            log_dataset(data, context="training", name="prepared")
            atomic_write_text(id_file, run.info.run_id)
        yield run.info.run_id


@contextlib.contextmanager
def _ray_session(address: str | None, num_cpus: int, num_gpus: int) -> Iterator[None]:
    """Use a running Ray, connect to ``address``, or start a local one (stopped again afterwards)."""
    import ray

    if ray.is_initialized():
        yield
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus or None, include_dashboard=False)
    try:
        yield
    finally:
        ray.shutdown()


def _forget_run(run_state: str, out: Path, storage_cfg: Any) -> None:
    """``resume=False``: remove Ray's state of the previous run (its checkpoints, locally or on S3) and the MLflow
    run it recorded, so the new run starts from step 0 instead of restoring them."""
    from idforge.io.storage import open_storage

    store = open_storage(run_state, storage_cfg)
    if store.exists(run_state):
        log.warning("resume=False: removing the previous run state at %s", run_state)
        store.delete(run_state, recursive=True)
    (out / "mlflow_run_id").unlink(missing_ok=True)


def _drop_unkept_checkpoints(run_state: str, storage_cfg: Any, result: Any) -> None:
    """Remove the checkpoints under ``run_state`` that this run's Ray did not keep: those of a killed earlier run
    that it resumed from through :func:`stored_checkpoints` (Ray's ``num_to_keep`` rotation never saw them)."""
    from idforge.io.storage import open_storage

    def name(c: Any) -> str:  # compared by name: paths may differ in form (symlinks, a scheme), names never
        return c.path.rstrip("/").rsplit("/", 1)[-1]

    kept = {name(c) for c, _ in (result.best_checkpoints or [])} | {name(result.checkpoint)}
    stale = [c for c in stored_checkpoints(run_state, storage_cfg.model_dump(mode="json") if storage_cfg else None)
             if name(c) not in kept]
    if not stale:
        return
    store = open_storage(run_state, storage_cfg)
    prefix = run_state.split("://", 1)[0] + "://" if "://" in run_state else ""
    for c in stale:
        uri = f"{prefix}{c.path}"
        log.info("removing the checkpoint %s of an earlier, killed run (resumed from; not kept by this one)", uri)
        store.delete(uri, recursive=True)


def resolve_gpus_per_worker(requested: float, workers: int, ray_address: str | None) -> float:
    """The GPUs each worker gets: ``requested``, checked against what exists, or chosen when ``requested < 0`` (auto).

    A local Ray started here believes whatever GPU count it is given, so a GPU request on a machine without CUDA
    devices would fail deep in Ray (``Distributed package doesn't have NCCL built in``): it is refused here. A
    connected cluster may add GPU nodes through its autoscaler, so there a shortfall is only a warning.
    Auto: one GPU per worker where there are GPUs (CUDA devices here, or any ``GPU`` resource on the cluster), else
    CPU workers.

    Raises:
        ConfigError: GPUs requested for a local Ray on a machine that has fewer than the workers need.
    """
    import ray

    connected = ray.is_initialized() or bool(ray_address)
    if connected:
        if not ray.is_initialized():  # resources are only known once connected: decided inside the session
            return requested
        available = float(ray.cluster_resources().get("GPU", 0))
        where = "the Ray cluster"
    else:
        import torch

        available = float(torch.cuda.device_count())
        where = "this machine"
    if requested < 0:
        chosen = 1.0 if available >= 1 else 0.0
        log.info("gpus_per_worker=auto: %s has %g GPU(s) -> %g per worker", where, available, chosen)
        return chosen
    needed = requested * workers
    if needed > available:
        fix = ("pass gpus_per_worker=0 (`--gpus-per-worker 0`, `--arg gpus_per_worker=0`) for CPU workers, or -1 to "
               "use GPUs only where there are any")
        if connected:
            log.warning("gpus_per_worker=%g x %d worker(s) needs %g GPU(s) but %s has %g now: training waits for "
                        "the autoscaler to add GPU nodes; if it has none, %s", requested, workers, needed, where,
                        available, fix)
        else:
            raise ConfigError(f"gpus_per_worker={requested:g} x {workers} worker(s) needs {needed:g} GPU(s), but "
                              f"{where} has {available:g} (torch sees no CUDA device): {fix}")
    return requested


def _check_data(data_dir: Path) -> dict[str, Any]:
    """prepared.json of ``data_dir``, after checking every item file is whole (DataError naming the damaged ones)."""
    from idforge.train.dataset import read_prepared, verify_prepared

    _, info = read_prepared(data_dir)
    verify_prepared(data_dir)
    return info


@holds_output_lock("train")  # one writer per run directory: two trainings would mix checkpoints
def train_population(
    cfg: Any,
    data_dir: str | os.PathLike[str],
    model: str,
    workers: int = 1,
    gpus_per_worker: float = 0,
    *,
    output_dir: str | os.PathLike[str],
    resume: bool = True,
    ray_address: str | None = None,
    run_name: str | None = None,
    model_kind: str = "auto",
    local_files_only: bool = True,
    tracking: Any = None,
    fault_step: int | None = None,
    fault_marker: str | os.PathLike[str] | None = None,
) -> TrainResult:
    """Train a population method with Ray Train ``TorchTrainer`` on ``workers`` workers.

    Args:
        cfg: a ``TrainConfig``, or the root config (its ``train`` and ``tracking`` sections are used).
        data_dir: a ``prepare`` output directory, or its ``s3://`` copy (every worker localizes it).
        model: base model id or directory (the one the data was prepared with).
        workers: Ray Train workers (DDP ranks); gloo on CPU, NCCL on GPU.
        gpus_per_worker: 0 = CPU workers; 1 = one GPU each (fractions share a GPU); < 0 = auto (one each where
            there are GPUs, else CPU). GPUs asked of a local machine that has none are refused at once.
        output_dir: where ``method.safetensors``, ``config.resolved.yaml`` and ``metrics.json`` go.
        resume: continue the run recorded in ``output_dir`` (if any) from its latest checkpoint.
        ray_address: a Ray cluster address ("ray://host:10001", "auto"); None starts a local Ray.
        tracking: a ``TrackingConfig`` overriding the root config's (with a bare ``TrainConfig``: None = no MLflow).
        fault_step, fault_marker: inject one failure per rank after that step (tests and recovery drills).
    Raises:
        DataError: ``data_dir`` is not a prepared dataset. ConfigError: bad settings.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    train_cfg, tracking_cfg, root = _split_config(cfg)
    tracking_cfg = tracking if tracking is not None else tracking_cfg
    storage_cfg = getattr(root, "storage", None)
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    remote_data = "://" in str(data_dir)
    data_arg = str(data_dir) if remote_data else str(Path(data_dir).resolve())
    if train_cfg.input == "stream":  # the driver reads the metadata only; workers stream their shards
        from idforge.train.stream import StreamInput

        info = StreamInput(data_arg, storage_cfg.model_dump() if storage_cfg else None, train_cfg, rank=-1).info
    else:
        info = _check_data(local_data(data_arg, storage_cfg.model_dump() if storage_cfg else None))
    if ray_address and not train_cfg.storage_path:
        log.warning("training on the Ray cluster %s with checkpoints under the local %s: on several nodes set "
                    "train.storage_path to shared storage (s3://bucket/prefix or NFS)", ray_address, output_dir)
    out = Path(output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    storage = train_cfg.storage_path or str(out / "ray")
    name = run_name or RUN_NAME
    run_state = join_uri(storage, name)
    if not resume:
        _forget_run(run_state, out, storage_cfg)
    ray_path, ray_fs = ray_storage(storage, storage_cfg)  # s3:// -> the configured endpoint, not AWS
    # Checked before anything starts where the machine decides (local Ray), again once connected to a cluster.
    gpus_per_worker = resolve_gpus_per_worker(gpus_per_worker, workers, ray_address)
    tracking = _resolved_tracking(tracking_cfg)
    model_arg = str(Path(model).resolve()) if Path(model).exists() else model
    with _mlflow_run(tracking, out, f"train-{train_cfg.method}", train_cfg, root, resume,
                     data_arg) as mlflow_run_id:
        spec = LoopSpec(
            train=train_cfg.model_dump(mode="json"), data_dir=data_arg, model=model_arg, model_kind=model_kind,
            storage=storage_cfg.model_dump(mode="json") if storage_cfg is not None else None,
            local_files_only=local_files_only, tracking=tracking, mlflow_run_id=mlflow_run_id, run_state=run_state,
            fault_step=fault_step, fault_marker=str(fault_marker) if fault_marker else None,
        )
        with _ray_session(ray_address, num_cpus=max(workers * train_cfg.cpus_per_worker, 1),
                          num_gpus=int(workers * gpus_per_worker + 0.999) if gpus_per_worker > 0 else 0):
            gpus_per_worker = resolve_gpus_per_worker(gpus_per_worker, workers, ray_address)
            use_gpu = gpus_per_worker > 0
            resources = {"CPU": train_cfg.cpus_per_worker}
            if use_gpu:
                resources["GPU"] = gpus_per_worker
            import uuid

            import ray

            box_name = f"idforge-fatal-{uuid.uuid4().hex[:12]}"
            box = ray.remote(num_cpus=0)(_FatalBox).options(name=box_name).remote()
            trainer = TorchTrainer(
                train_fn,
                train_loop_config={**spec.model_dump(mode="json"), FATAL_BOX_KEY: box_name},
                torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
                scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
                run_config=RunConfig(
                    name=name, storage_path=ray_path, storage_filesystem=ray_fs,
                    failure_config=FailureConfig(max_failures=train_cfg.max_failures),
                    checkpoint_config=CheckpointConfig(num_to_keep=train_cfg.keep_checkpoints),
                ),
            )
            try:
                result = trainer.fit()
                fatal = ray.get(box.get.remote())
            finally:
                ray.kill(box)
        if fatal:  # broken data: handed over once by the workers, not retried
            raise DataError(fatal)
        if result.error is not None:
            raise result.error
        if result.checkpoint is None:
            raise DataError(f"training at {run_state} ended without a checkpoint")
        _drop_unkept_checkpoints(run_state, storage_cfg, result)
        with result.checkpoint.as_directory() as d:
            final = _export(Path(d), out, train_cfg, root, result.metrics, info)
        if mlflow_run_id is not None:
            from idforge.track import log_artifact, log_trained_model

            for f in ("method.safetensors", "metrics.json"):
                log_artifact(out / f)
            # the driver's run is the active one here (``_mlflow_run``): the model is linked to it
            log_trained_model([out / "method.safetensors", out / "config.resolved.yaml"], train_cfg.method,
                              result.metrics, params={"steps": result.metrics.get("step"), "base_model": model_arg})
    return TrainResult(output_dir=out, method_path=out / "method.safetensors", steps=int(result.metrics["step"]),
                       metrics=dict(result.metrics), checkpoint=Path(result.checkpoint.path),
                       mlflow_run_id=mlflow_run_id, extra=final)


def train_local(
    cfg: TrainConfig,
    data_dir: str | os.PathLike[str],
    model: str,
    *,
    output_dir: str | os.PathLike[str],
    device: str = "cpu",
    local_files_only: bool = True,
    fault_step: int | None = None,
    fault_marker: str | os.PathLike[str] | None = None,
) -> TrainResult:
    """The same loop in this process on one device (no Ray, no DDP): quick experiments, tests, benchmarks.

    Checkpoints go to ``<output_dir>/checkpoints``; calling it again on the same output resumes from the latest.
    """
    out = Path(output_dir).resolve()
    info = _check_data(Path(data_dir))
    env = LocalEnv(out / "checkpoints", device=device, keep=cfg.keep_checkpoints)
    spec = LoopSpec(train=cfg.model_dump(mode="json"), data_dir=str(Path(data_dir).resolve()), model=str(model),
                    local_files_only=local_files_only, fault_step=fault_step,
                    fault_marker=str(fault_marker) if fault_marker else None)
    metrics = run_loop(spec, env)
    with env.latest_checkpoint() as d:
        assert d is not None
        final = _export(d, out, cfg, None, metrics, info)
        ckpt_dir = d
    return TrainResult(output_dir=out, method_path=out / "method.safetensors", steps=int(metrics["step"]),
                       metrics=metrics, checkpoint=ckpt_dir, extra=final)


def _export(checkpoint_dir: Path, out: Path, cfg: TrainConfig, root: Any, metrics: dict[str, Any],
            info: dict[str, Any]) -> dict[str, Any]:
    """Copy the final method out of the checkpoint; write the resolved config and metrics (all atomically)."""
    from idforge.config import write_resolved_config
    from idforge.train.checkpoint import METHOD_FILE
    from idforge.train.clip_features import write_beside

    src = checkpoint_dir / METHOD_FILE
    if not src.is_file():
        raise DataError(f"checkpoint {checkpoint_dir} has no {METHOD_FILE}")
    with atomic_path(out / METHOD_FILE) as tmp:
        shutil.copyfile(src, tmp)
    write_resolved_config(root if root is not None else cfg, out)
    write_beside(out, info)  # the CLIP features generation must compute as prepare did
    summary = {
        "method": cfg.method,
        "steps": int(metrics.get("step", 0)),
        "metrics": {k: v for k, v in metrics.items()},
        "data": {"dir": info.get("dataset"), "fingerprint": info.get("fingerprint"), "model": info.get("model")},
    }
    atomic_write_text(out / "metrics.json", json.dumps(summary, indent=2, sort_keys=True, default=str))
    return summary
