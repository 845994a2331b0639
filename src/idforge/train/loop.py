"""The population training loop, written once and run by Ray Train workers (``population.train_fn``) or in-process.

One flat loop: load the frozen base pipeline, attach the method, wrap ``TrainingModule`` in DDP when there is more
than one worker, AdamW on the method's parameters, gradient accumulation, optional EMA, bf16 autocast on GPU.
Every random draw is reproducible: the data stream is a pure function of (seed, position) and each rank's noise
comes from its own generator, checkpointed with the rest, so a resumed run continues bit-for-bit (on CPU).

The environment (``LoopEnv``) supplies rank, world size, device, the checkpoint to resume from and ``report``;
the loop never imports Ray itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel, ConfigDict

from idforge.errors import ConfigError, DataError
from idforge.train import checkpoint as ckpt
from idforge.train.config import TrainConfig
from idforge.train.optim import make_optimizer, peak_memory_gib, reset_peak_memory

if TYPE_CHECKING:
    from idforge.methods.base import Method

log = logging.getLogger(__name__)

VALIDATION_PAIRS = 64  # identity-gap pairs per check: a fixed cost whatever the dataset size
# Noise of the identity-gap check: apart from the training streams (seeded cfg.seed * 1_000_003 + rank), the same
# draws at every check, so the metric moves only with the weights.
VALIDATION_SEED = 10_000
class LoopSpec(BaseModel):
    """Everything a worker needs, as plain data (it crosses process boundaries)."""

    model_config = ConfigDict(extra="forbid")

    train: dict[str, Any]
    data_dir: str  # a local directory, or an s3:// prefix each worker localizes (cluster nodes share no disk)
    storage: dict[str, Any] | None = None  # StorageConfig for s3:// data
    model: str
    model_kind: str = "auto"
    local_files_only: bool = True
    tracking: dict[str, Any] | None = None  # TrackingConfig with the URI resolved by the driver
    mlflow_run_id: str | None = None
    # where the run's checkpoints live (``<storage_path>/<run name>``, local or s3://): the fallback when Ray's own
    # record of them is missing (a driver SIGKILLed before writing it) or names an unreadable one
    run_state: str | None = None
    fault_step: int | None = None  # tests/drills: raise once after this optimizer step ...
    fault_marker: str | None = None  # ... on each rank whose marker file (suffixed .rank<r>) does not exist yet

    def train_config(self) -> TrainConfig:
        return TrainConfig.model_validate(self.train)


class LoopEnv(Protocol):
    rank: int
    world_size: int
    device: Any
    limit_threads: bool  # CPU: use only ``cpus_per_worker`` threads (workers share the node)

    def checkpoint_candidates(self) -> Iterator[contextlib.AbstractContextManager[Path]]:
        """The checkpoints to resume from, newest first, each a context manager that makes it a local directory
        (lazily: an older one is fetched only when every newer one was unreadable)."""
        ...

    def report(self, metrics: dict[str, Any], write: Callable[[Path], None] | None) -> None: ...


class LocalEnv:
    """Single-process environment: checkpoints in ``<dir>/checkpoint_<step>``, the newest ``keep`` kept."""

    def __init__(self, checkpoint_root: str | Path, device: str = "cpu", keep: int = 2) -> None:
        import torch

        self.rank, self.world_size = 0, 1
        self.limit_threads = False
        self.device = torch.device(device)
        self.root = Path(checkpoint_root)
        self.keep = keep
        self.reports: list[dict[str, Any]] = []

    def _dirs(self) -> list[Path]:
        return sorted(self.root.glob("checkpoint_*"), key=lambda p: int(p.name.split("_")[1]))

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        dirs = self._dirs()
        yield dirs[-1] if dirs else None

    def checkpoint_candidates(self) -> Iterator[contextlib.AbstractContextManager[Path]]:
        for d in reversed(self._dirs()):
            yield contextlib.nullcontext(d)

    def report(self, metrics: dict[str, Any], write: Callable[[Path], None] | None) -> None:
        self.reports.append(dict(metrics))
        if write is None:
            return
        from idforge.io.atomic import atomic_path

        with atomic_path(self.root / f"checkpoint_{int(metrics['step']):08d}") as tmp:
            tmp.mkdir(parents=True)
            write(tmp)
        for old in self._dirs()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)


def local_data(data_dir: str, storage: dict[str, Any] | None = None) -> Path:
    """``data_dir`` itself, or for an ``s3://`` prefix its local copy (downloaded once per content, cached)."""
    if "://" not in data_dir:
        return Path(data_dir)
    from idforge.config import StorageConfig
    from idforge.io.locations import cache_root
    from idforge.io.storage import localize

    cache = cache_root() / "prepared"
    return localize(data_dir, cache, StorageConfig.model_validate(storage) if storage else None)


def sampling_defaults(method: Method, cfg: TrainConfig) -> tuple[int, bool]:
    """(refs per item, may the target be a reference): the config's, else the method's own."""
    include = method.ref_includes_target if cfg.ref_includes_target is None else cfg.ref_includes_target
    return cfg.refs_per_item or int(method.refs_per_item), include


def method_config_for_data(name: str, user: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    """The user's method config plus the feature sizes of the prepared data for fields the user left unset
    (the method's config decides which: ``MethodConfig.for_data``)."""
    from idforge.methods.registry import method_class

    return method_class(name).Config.for_data(user, info.get("shapes", {}))


def weight_checksum(params: list[Any]) -> str:
    """sha256 of the parameters' float32 bytes, in order: equal on two ranks iff their weights are identical."""
    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _precision(cfg: TrainConfig, device: Any) -> tuple[Any, str]:
    """(autocast dtype or None, frozen weights dtype name). CPU always computes in float32."""
    import torch

    if device.type != "cuda" or cfg.mixed_precision == "no":
        return None, "float32" if cfg.frozen_dtype == "auto" else cfg.frozen_dtype
    amp = torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float16
    frozen = {torch.bfloat16: "bfloat16", torch.float16: "float16"}[amp] if cfg.frozen_dtype == "auto" \
        else cfg.frozen_dtype
    return amp, frozen


def load_frozen_pipeline(model: str, kind: str, dtype: str, device: Any, local_files_only: bool,
                         cfg: TrainConfig) -> Any:
    """The base pipeline with every base weight frozen (before the method attaches its own modules)."""
    import torch

    from idforge.diffusion.loading import freeze_pipeline, load_pipeline

    pipe = freeze_pipeline(load_pipeline(model, kind=kind, dtype=dtype, device=str(device),
                                         local_files_only=local_files_only))
    if device.type == "cuda":
        if cfg.channels_last:
            pipe.unet.to(memory_format=torch.channels_last)
        torch.backends.cuda.matmul.allow_tf32 = cfg.allow_tf32
        torch.backends.cudnn.allow_tf32 = cfg.allow_tf32
    pipe.set_progress_bar_config(disable=True)
    return pipe


class _Tracker:
    """Rank 0's MLflow logging into the driver's run (no-op without one); all MLflow calls of the loop go here.

    Metrics go through a ``ResilientLogger``: a tracking outage delays them (buffered, retried, one warning at the
    end) but never fails the step, so it can neither kill the training nor use up Ray's ``max_failures``. Sample
    grids are artifacts, too large to buffer: one that cannot be uploaded is skipped with a warning.
    """

    def __init__(self, spec: LoopSpec, rank: int) -> None:
        self.enabled = rank == 0 and spec.mlflow_run_id is not None and spec.tracking is not None
        self._stack = contextlib.ExitStack()
        self.buffer: Any = None
        if self.enabled:
            from idforge.config import TrackingConfig
            from idforge.track import start_run, tracking_uri
            from idforge.track.buffer import ResilientLogger

            tracking = TrackingConfig.model_validate(spec.tracking)
            assert spec.mlflow_run_id is not None
            self.buffer = ResilientLogger(spec.mlflow_run_id, tracking_uri(tracking))
            self._stack.enter_context(start_run(tracking, run_id=spec.mlflow_run_id, owner=False))

    def metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.enabled:
            self.buffer.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def grid(self, images: list[Any], step: int) -> None:
        if self.enabled and images:
            from idforge.track import log_image_grid, log_image_step

            cols = min(len(images), 4)
            try:
                grid = log_image_grid(images, rows=math.ceil(len(images) / cols), cols=cols,
                                      artifact_file=f"samples/step_{step:08d}.png")
                log_image_step(grid, key="samples", step=step)
            except Exception as exc:  # noqa: BLE001 - a tracking outage must not end the training
                log.warning("sample grid of step %d not logged to MLflow (%s: %s); training goes on", step,
                            type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")

    def close(self, exc: BaseException | None = None) -> None:
        if self.buffer is not None:
            self.buffer.close()  # delivers what an outage held back before the run is ended
        try:
            if exc is None:
                self._stack.close()
            else:
                self._stack.__exit__(type(exc), exc, exc.__traceback__)
        except Exception as end_exc:  # noqa: BLE001 - the training's own result (or error) matters more
            log.warning("could not end MLflow run %s (%s: %s); its status stays RUNNING until the next start marks "
                        "it", getattr(self.buffer, "run_id", "?"), type(end_exc).__name__,
                        str(end_exc).splitlines()[0][:200] if str(end_exc) else "")


class TrainStep:
    """One optimizer step of a method: micro-batches -> forward/backward (DDP no_sync until the last), gradient
    clipping, the ``train.optimizer``, LR schedule, EMA, the step's peak memory. The loop and
    ``bench/train_throughput.py`` both use it.

    Calling it returns the mean of each loss part over the micro-batches plus ``grad_norm`` (floats).
    """

    def __init__(self, method: Method, pipe: Any, cfg: TrainConfig, amp_dtype: Any = None) -> None:
        import torch

        from idforge.methods.base import TrainingModule

        self.method, self.cfg, self.amp_dtype = method, cfg, amp_dtype
        self.params = method.trainable_parameters()
        if not self.params:
            raise ValueError(f"method {method.name!r} has no trainable parameters")
        self.device = self.params[0].device
        self.device_type = self.device.type
        self.optimizer = make_optimizer(self.params, cfg)
        warmup = cfg.warmup_steps
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
        self.scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
        self.ema = [p.detach().clone() for p in self.params] if cfg.ema else None
        self.module = TrainingModule(method, pipe)
        self.model: Any = self.module
        self.distributed = False

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs of the optimisation: optimizer, LR schedule, loss scaler, EMA."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "lr_schedule": self.lr_schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "ema": [e.detach().cpu() for e in self.ema] if self.ema is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema") is not None:
            for e, saved in zip(self.ema, state["ema"], strict=True):
                e.copy_(saved.to(e.device))

    def export_weights(self) -> dict[str, Any] | None:
        """The method's state dict with the EMA in place of the live weights (``train.export_ema``), else None."""
        if self.ema is None or not self.cfg.export_ema:
            return None
        names = [n for n, p in self.method.modules.named_parameters() if p.requires_grad]
        return {**self.method.state_dict(), **{n: e.detach() for n, e in zip(names, self.ema, strict=True)}}

    def wrap_ddp(self, device: Any) -> None:
        """Wrap in DistributedDataParallel (the process group must exist): only the method's weights are synced."""
        from torch.nn.parallel import DistributedDataParallel

        self.model = DistributedDataParallel(self.module,
                                             device_ids=[device.index] if device.type == "cuda" else None,
                                             find_unused_parameters=self.cfg.find_unused_parameters)
        self.distributed = True

    def __call__(self, micro_batches: list[Any], generator: Any = None) -> dict[str, float]:
        import torch

        parts: dict[str, float] = {}
        n = len(micro_batches)
        reset_peak_memory(self.device)
        autocast = (torch.autocast(device_type=self.device_type, dtype=self.amp_dtype)
                    if self.amp_dtype is not None else contextlib.nullcontext())
        for i, batch in enumerate(micro_batches):
            no_sync = self.model.no_sync() if (self.distributed and i < n - 1) else contextlib.nullcontext()
            with no_sync:
                with autocast:
                    out = self.model(batch, generator=generator)
                loss = out["loss"] / n
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                else:
                    loss.backward()
            for k, v in out.items():
                parts[k] = parts.get(k, 0.0) + float(v.detach()) / n
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.max_grad_norm
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm) if max_norm else torch.zeros(())
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.lr_schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            with torch.no_grad():
                torch._foreach_lerp_(self.ema, [p.detach() for p in self.params], 1.0 - self.cfg.ema_decay)
        parts["grad_norm"] = float(grad_norm)
        parts["peak_memory_gib"] = peak_memory_gib(self.device)  # this step's (CPU: the process's) peak
        return parts


def run_loop(spec: LoopSpec, env: LoopEnv) -> dict[str, Any]:
    """Train ``spec.train.method`` on ``spec.data_dir``; returns the last reported metrics."""
    tracker = _Tracker(spec, env.rank)
    try:
        result = _run(spec, env, tracker)
    except BaseException as exc:
        tracker.close(exc)
        raise
    # a run stopped by broken data ends FAILED in MLflow, even where the worker returns instead of raising
    tracker.close(DataError(result[FATAL_KEY]) if FATAL_KEY in result else None)
    return result


def _run(spec: LoopSpec, env: LoopEnv, tracker: _Tracker) -> dict[str, Any]:
    import numpy as np
    import torch
    import torch.distributed as dist

    from idforge.methods.registry import get_method
    from idforge.methods.types import TrainBatch
    from idforge.train.dataset import PreparedDataset, make_loader, read_prepared
    from idforge.train.validation import identity_gap, split_holdout

    cfg = spec.train_config()
    stream = None  # train.input=stream: this rank reads only its shards, nothing is copied whole
    if cfg.input == "stream":
        from idforge.train.stream import StreamInput

        stream = StreamInput(spec.data_dir, spec.storage, cfg, env.rank)
    else:
        spec = spec.model_copy(update={"data_dir": str(local_data(spec.data_dir, spec.storage))})
    if cfg.init_from:  # an s3:// checkpoint (the champion's, a bucket's) is read from its local copy
        cfg = cfg.model_copy(update={"init_from": str(local_data(cfg.init_from, spec.storage))})
    rank, world, device = env.rank, env.world_size, env.device
    distributed = world > 1 and dist.is_available() and dist.is_initialized()
    if device.type == "cpu" and getattr(env, "limit_threads", False):
        # Ray packs several workers on a node: each uses the CPUs it reserved, not all of them.
        torch.set_num_threads(cfg.cpus_per_worker)
    # Same seed on every rank for the method's initial weights (DDP broadcasts rank 0's anyway); a per-rank
    # generator for the noise and timesteps, so ranks draw different noise.
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    generator = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + rank)

    amp_dtype, frozen_dtype = _precision(cfg, device)
    pipe = load_frozen_pipeline(spec.model, spec.model_kind, frozen_dtype, device, spec.local_files_only, cfg)
    index, info = (stream.index(), stream.info) if stream is not None else read_prepared(spec.data_dir)
    method: Method = get_method(cfg.method, method_config_for_data(cfg.method, cfg.method_config, info))
    method.attach(pipe)
    method.train()
    if cfg.gradient_checkpointing:  # the frozen UNet's activations are recomputed in backward
        pipe.unet.enable_gradient_checkpointing()
    if cfg.compile_unet and device.type == "cuda":
        pipe.unet = torch.compile(pipe.unet)

    stepper = TrainStep(method, pipe, cfg, amp_dtype)
    step = resume(env, stepper, generator, cfg)
    resumed_from = step  # 0 for a fresh start; reported so a recovery is visible in the metrics
    if distributed:
        stepper.wrap_ddp(device)

    refs, include_target = sampling_defaults(method, cfg)
    train_keys, heldout_keys = split_holdout(index, cfg.holdout_per_identity, cfg.seed)
    error = None
    validation = None  # (matched, mismatched) batches of the identity-gap check, built once
    sampling = dict(refs_per_item=refs, ref_includes_target=include_target, flip_prob=cfg.flip_prob, seed=cfg.seed)
    try:
        if stream is not None:
            dataset = stream.dataset(rank, world, keys=train_keys if heldout_keys else None, **sampling)
        else:
            dataset = PreparedDataset(spec.data_dir, keys=train_keys, **sampling)
        if cfg.validate_every and rank == 0:
            heldout = (stream.dataset(0, 1, keys=heldout_keys, ref_includes_target=True)
                       if stream is not None and heldout_keys else None)
            validation = validation_batches(spec.data_dir, dataset, heldout_keys, refs, cfg.seed, device, heldout)
    except DataError as exc:
        error = str(exc)
    error = agree_on_data_error(error, distributed, device)
    if error is not None:
        return _give_up(env, error, step, step, world)
    per_step = cfg.batch_size * cfg.grad_accum
    if stream is not None:
        loader = stream.loader(dataset, cfg.batch_size, step * per_step, rank, world)
    else:
        loader = make_loader(dataset, cfg.batch_size, rank, world, cfg.seed, start_sample=step * per_step,
                             num_workers=cfg.loader_workers)
    batches = iter(loader)
    if rank == 0:
        log.info("training %s (%d trainable parameters) on %d items, %d worker(s), from step %d to %d",
                 cfg.method, sum(p.numel() for p in stepper.params), len(dataset), world, step, cfg.steps)

    window: dict[str, float] = {}
    window_steps, window_start = 0, time.perf_counter()
    last: dict[str, Any] = {}
    if step >= cfg.steps:  # resumed a finished run: nothing to train; say so through the usual channel
        last = {"step": step, "resumed_from": step, "world_size": world}
        env.report(last, None)
    while step < cfg.steps:
        try:
            micro = [TrainBatch.from_dict(next(batches)).to(device) for _ in range(cfg.grad_accum)]
        except DataError as exc:
            error = str(exc)
        error = agree_on_data_error(error, distributed, device)
        if error is not None:
            return _give_up(env, error, step, resumed_from, world)
        parts = stepper(micro, generator)
        for k, v in parts.items():
            window[k] = window.get(k, 0.0) + v
        step += 1
        window_steps += 1
        _maybe_inject_fault(spec, step, rank)

        checkpoint_now = step % cfg.checkpoint_every == 0 or step == cfg.steps
        if step % cfg.report_every == 0 or checkpoint_now:
            elapsed = time.perf_counter() - window_start
            metrics = reduce_metrics({k: v / window_steps for k, v in window.items()}, distributed, device)
            checksum, checksums = _checksums(stepper.params, distributed, world)
            metrics.update(step=step, resumed_from=resumed_from, lr=stepper.lr_schedule.get_last_lr()[0],
                           world_size=world, samples_per_s=window_steps * per_step * world / max(elapsed, 1e-9),
                           weight_checksum=checksum, weight_checksums=checksums)
            if validation is not None and (step % cfg.validate_every == 0 or step == cfg.steps):
                gap = identity_gap(method, pipe, *validation, repeats=8, seed=VALIDATION_SEED)
                metrics.update(val_matched=gap.match, val_mismatched=gap.mismatch, val_identity_gap=gap.gap)
            writer = None
            if checkpoint_now:
                state = checkpoint_state(stepper, step, per_step, world, spec.train) if rank == 0 else None
                export = stepper.export_weights()

                def writer(d: Path, state=state, export=export) -> None:
                    ckpt.write_rank_files(d, rank, generator, state, method if rank == 0 else None, export)

            env.report(metrics, writer)
            tracker.metrics({k: v for k, v in metrics.items() if k not in ("weight_checksum", "weight_checksums")},
                            step)
            if rank == 0:
                log.info("step %d/%d loss %.4f (%.2f samples/s, peak memory %.2f GiB)", step, cfg.steps,
                         metrics.get("loss", float("nan")), metrics["samples_per_s"],
                         metrics.get("peak_memory_gib", float("nan")))
            last = metrics
            window, window_steps, window_start = {}, 0, time.perf_counter()

        if cfg.sample_every and step % cfg.sample_every == 0 and tracker.enabled:
            tracker.grid(_sample_grid(method, pipe, dataset, cfg, refs), step)
    return last


#: the metric a worker reports instead of raising when the data itself is broken (see ``_give_up``)
FATAL_KEY = "fatal_error"


def agree_on_data_error(error: str | None, distributed: bool, device: Any) -> str | None:
    """The data error of any rank, on every rank (all ranks call this at the same point of the loop), else None.

    One rank alone cannot stop: the others would wait for it in the next gradient all-reduce. A flag is summed
    first (one scalar per step); the messages are gathered only when some rank has one.
    """
    if not distributed:
        return error
    import torch
    import torch.distributed as dist

    flag = torch.tensor([1.0 if error else 0.0], device=device)
    dist.all_reduce(flag)
    if float(flag) == 0:
        return None
    errors: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return next(e for e in errors if e)


def _give_up(env: LoopEnv, error: str, step: int, resumed_from: int, world: int) -> dict[str, Any]:
    """A damaged prepared item fails the same way after every restart (the data stream is deterministic), so it
    must not use up Ray's ``max_failures`` restarting from the checkpoint. An env that restarts failed workers
    offers ``give_up(error)`` (it hands the error to the driver, which raises it once): rank 0 calls it and every
    rank returns normally. Elsewhere the error is raised here."""
    give_up = getattr(env, "give_up", None)
    if give_up is None:
        raise DataError(error)
    if env.rank == 0:
        log.error("stopping at step %d without a restart: %s", step, error)
        give_up(error)
    return {"step": step, "resumed_from": resumed_from, "world_size": world, FATAL_KEY: error}


def resume(env: LoopEnv, stepper: TrainStep, generator: Any, cfg: TrainConfig) -> int:
    """Restore the newest readable checkpoint ``env`` offers into the method, the optimisation state and this rank's
    noise generator; returns its step (0 and ``train.init_from``'s weights, if given, when there is none).

    A checkpoint whose ``train_state.pt`` cannot be read (truncated by a kill mid-upload, a damaged disk) is skipped
    with a warning naming it, and the next older one is tried: every rank reads the same shared state file, so all
    ranks make the same choice. An unreadable per-rank RNG file only costs that rank its exact noise stream.

    Raises:
        ConfigError: the checkpoint holds another method config's weights.
        DataError: checkpoints exist but none of them can be read.
    """
    method, rank = stepper.method, env.rank
    unreadable: list[str] = []
    for candidate in env.checkpoint_candidates():
        with candidate as resume_dir:
            try:
                state = ckpt.read_state(resume_dir)
            except Exception as exc:  # noqa: BLE001 - any unreadable state file: fall back to an older checkpoint
                unreadable.append(f"{resume_dir} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})")
                log.warning("rank %d: checkpoint %s is unreadable (%s); trying the next older one", rank,
                            resume_dir, exc)
                continue
            try:
                method.load_state_dict(state["method"])
            except ValueError as exc:
                raise ConfigError(f"cannot resume from {resume_dir}: {exc}. The checkpoint was written by a run "
                                  "with another method config; train into a new output directory, or delete that "
                                  "one to start over") from None
            stepper.load_state_dict(state)
            step = int(state["step"])
            try:
                rng = ckpt.read_rng(resume_dir, rank)
            except Exception as exc:  # noqa: BLE001 - a damaged RNG file: the deterministic fresh stream below
                log.warning("rank %d: the RNG state in %s is unreadable (%s); continuing with a fresh seeded stream",
                            rank, resume_dir, exc)
                rng = None
            if rng is not None:
                ckpt.restore_rng(rng, generator)
            else:  # the world size changed: a fresh but deterministic stream for this rank
                generator.manual_seed(cfg.seed * 1_000_003 + rank + 7919 * step)
            if unreadable:
                log.warning("rank %d resumed from the older checkpoint %s at step %d; skipped unreadable: %s", rank,
                            resume_dir, step, "; ".join(unreadable))
            else:
                log.info("rank %d resumed from %s at step %d", rank, resume_dir, step)
            return step
    if unreadable:
        raise DataError(f"no readable checkpoint to resume from: {'; '.join(unreadable)}. Delete them (or train "
                        "with resume=False / --no-resume) to start over")
    if cfg.init_from:
        _init_from(method, cfg.init_from)
    return 0


def checkpoint_state(stepper: TrainStep, step: int, per_step: int, world: int, train: dict[str, Any]
                     ) -> dict[str, Any]:
    """Rank 0's ``train_state.pt``: the method's weights, the optimisation state and where the data stream is."""
    return {
        "method": {k: v.detach().cpu() for k, v in stepper.method.state_dict().items()},
        **stepper.state_dict(),
        "step": step,
        "samples_per_rank": step * per_step,
        "world_size": world,
        "config": json.dumps(train, sort_keys=True, default=str),
    }


def reduce_metrics(metrics: dict[str, float], distributed: bool, device: Any) -> dict[str, float]:
    """The mean of each metric over the ranks (every rank gets the same dict); itself on one worker."""
    if not distributed:
        return metrics
    import torch
    import torch.distributed as dist

    keys = sorted(metrics)
    t = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, (t / dist.get_world_size()).tolist(), strict=True))


def _checksums(params: list[Any], distributed: bool, world: int) -> tuple[str, list[Any]]:
    """(this rank's weight checksum, every rank's): equal on all ranks iff DDP kept the replicas identical."""
    checksum = weight_checksum(params)
    if not distributed:
        return checksum, [checksum]
    import torch.distributed as dist

    checksums: list[Any] = [None] * world
    dist.all_gather_object(checksums, checksum)
    return checksum, checksums


def validation_batches(data_dir: str, dataset: Any, heldout_keys: list[str], refs: int, seed: int, device: Any,
                       heldout: Any = None) -> tuple[Any, Any] | None:
    """(matched, mismatched) batches of the identity-gap check on ``device``: held-out photos conditioned on the
    training set's references when photos were held out, else across photos of the training set; None (and a
    warning) when the data cannot form a pair. ``heldout``: the held-out dataset when the caller built it (the
    streamed input), else a ``PreparedDataset`` of ``heldout_keys``."""
    from idforge.train.dataset import PreparedDataset
    from idforge.train.validation import cross_photo_batches, heldout_batches

    try:
        if heldout_keys:
            if heldout is None:
                heldout = PreparedDataset(data_dir, keys=heldout_keys, ref_includes_target=True)
            pair = heldout_batches(heldout, dataset, refs, VALIDATION_PAIRS, seed)
        else:  # nothing held out: across photos of the training set instead
            pair = cross_photo_batches(dataset, refs, VALIDATION_PAIRS, seed)
    except ValueError as exc:
        log.warning("no identity-gap validation: %s", exc)
        return None
    # one batch each, or one per aspect bucket (prepare.target: photo)
    to = lambda b: [x.to(device) for x in b] if isinstance(b, list) else b.to(device)  # noqa: E731
    return to(pair[0]), to(pair[1])


def _maybe_inject_fault(spec: LoopSpec, step: int, rank: int) -> None:
    """Tests and drills: fail once after ``spec.fault_step`` on each rank that has not failed there yet."""
    if spec.fault_step is None or step != spec.fault_step or not spec.fault_marker:
        return
    marker = Path(f"{spec.fault_marker}.rank{rank}")
    if not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        raise RuntimeError(f"injected fault at step {step} on rank {rank}")


def _init_from(method: Method, path: str) -> None:
    """Load a previous ``method.safetensors`` of the same method (strict keys) as the starting weights."""
    from safetensors.torch import load_file

    from idforge.errors import ConfigError
    from idforge.methods.checkpoint import read_method_metadata

    if not Path(path).is_file():
        raise ConfigError(f"train.init_from={path} does not exist: give the method.safetensors of an earlier run")
    meta = read_method_metadata(path)
    if meta["method"] != method.name:
        raise ConfigError(f"train.init_from={path} holds method {meta['method']!r}, not {method.name!r}")
    method.load_state_dict(load_file(path))
    log.info("initialised %s from %s", method.name, path)


def _sample_grid(method: Method, pipe: Any, dataset: Any, cfg: TrainConfig, refs: int) -> list[Any]:
    """Images of the first identity for each sample prompt (one seed), generated with the live weights."""
    identity = sorted(dataset.members)[0]
    id_refs = dataset.identity_refs(identity, n=refs)
    prompts = [p.format(class_noun=id_refs.class_noun) for p in cfg.sample_prompts]
    size = {}
    if dataset.info.get("target") == "photo":  # photo targets: draw the training set's most common bucket
        from collections import Counter

        (h, w), _ = Counter(dataset.target_buckets()).most_common(1)[0]
        size = {"height": h, "width": w}
    try:
        cond = method.identity_condition(id_refs.to(pipe.unet.device), pipe)
        return method.generate(pipe, prompts, cond, seeds=[cfg.seed], num_inference_steps=cfg.sample_steps, **size)
    finally:
        method.train()
