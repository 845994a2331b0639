"""``idforge finetune --all``: every identity of a dataset, fine-tuned by long-lived Ray actors under one parent
MLflow run.

A pool of ``FinetuneActor`` s (one per GPU of the cluster, or ``cfg.workers``; on CPU as many as the CPUs hold at
``cpus_per_task``) each loads the base model once (``identity_worker.BaseWorker``) and fine-tunes identity after
identity, restoring the base bit for bit in between. The driver hands out identities from one queue: each actor has
one identity in flight and gets the next as soon as it returns (``ray.wait`` over the actors' calls), so a slow
identity delays only its own actor (work stealing).

Failures stay with their identity:
- an identity that raises is ``failed`` in the status table with its error; its actor goes on with the next;
- an actor that dies (OOM-killed, node lost, a signal) is replaced by a fresh one, and the identity it held is
  retried once on a replacement; a second death fails it (``worker died ... twice``);
- an actor whose base could not be restored (``BaseRestoreError``) fails that identity and is replaced;
- when actors keep dying without finishing anything (a base model that cannot load, a node that cannot hold it),
  after ``2 * workers + 2`` such deaths in a row every identity left is failed with the last error instead of
  retrying forever.
The status table (``<output_dir>/status.json``) lists every identity; identities whose artifact already has
``DONE`` are skipped, so re-running redoes only the failed or missing ones.
"""

from __future__ import annotations

import json
import logging
import os
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from idforge.io.lock import holds_output_lock
from idforge.train.finetune_config import FinetuneConfig
from idforge.train.per_identity import FinetuneResult, artifact_dir, is_done, list_identities

if TYPE_CHECKING:
    from idforge.config import TrackingConfig

log = logging.getLogger(__name__)

STATUS_TABLE = "status.json"
ATTEMPTS = 2  # an identity whose actor died is tried once more on a fresh actor


class FinetuneActor:
    """One long-lived fan-out worker (a Ray actor): the base loaded once, identities trained one after another."""

    def __init__(self, base_model: str, cfg_json: dict[str, Any]) -> None:
        import logging as _logging

        from idforge.train.identity_worker import BaseWorker

        _logging.basicConfig(level=_logging.INFO)
        self.worker = BaseWorker(base_model, FinetuneConfig.model_validate(cfg_json))

    def info(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "load_s": self.worker.load_s, "identities_done": self.worker.identities_done}

    def run(self, method: str, identity: str, dataset_dir: str, output_dir: str, parent_run_id: str | None,
            tracking_json: dict[str, Any] | None) -> dict[str, Any]:
        """One identity; returns its status (a failure too). Raises only ``BaseRestoreError`` (replace me)."""
        from idforge.config import TrackingConfig
        from idforge.train.identity_worker import BaseRestoreError
        from idforge.train.per_identity import read_status

        tracking = TrackingConfig.model_validate(tracking_json) if tracking_json is not None else None
        try:
            res = self.worker.finetune(method, identity, dataset_dir, output_dir, parent_run_id=parent_run_id,
                                       tracking=tracking)
            return res.to_json()
        except BaseRestoreError:
            raise
        except Exception as exc:  # noqa: BLE001 - the status table reports it; other identities must go on
            status = read_status(output_dir, identity) or {}
            return FinetuneResult(identity=identity, method=method, status="failed", run_id=status.get("run_id"),
                                  error=status.get("error") or f"{type(exc).__name__}: {exc}"[:500]).to_json()


def _ray_init(address: str | None, num_cpus: int | None) -> bool:
    """Start or join Ray; returns True when this call started it (so we shut it down after)."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}})
    return True


def _pool_size(cfg: FinetuneConfig, gpus: float, todo: int) -> int:
    """How many actors: ``cfg.workers``, else one per GPU (at ``gpus`` each), else what the CPUs hold."""
    import ray

    if cfg.workers:
        n = cfg.workers
    elif gpus > 0:
        n = int(ray.cluster_resources().get("GPU", 0) // gpus)
    else:
        n = int(ray.cluster_resources().get("CPU", 1) // cfg.cpus_per_task)
    return max(1, min(n, todo))


def _died(identity: str, method: str, error: str, out: Path) -> FinetuneResult:
    from idforge.train.per_identity import _write_status

    result = FinetuneResult(identity=identity, method=method, status="failed", error=error[:500])
    _write_status(out, result)  # the actor could not write it: it is gone
    return result


def _fan_out(method: str, todo: list[str], dataset_dir: str, base_model: str, out: Path, cfg: FinetuneConfig,
             parent_id: str | None, tracking_json: dict[str, Any], actor_cls: type) -> list[FinetuneResult]:
    """Run ``todo`` on a pool of actors pulling from one queue; one result per identity, in completion order."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    gpus = cfg.gpus_per_task
    if gpus is None:
        import torch

        gpus = 1.0 if torch.cuda.is_available() else 0.0
    started = _ray_init(cfg.ray_address, None)
    try:
        remote_cls = ray.remote(num_cpus=cfg.cpus_per_task, num_gpus=gpus, max_restarts=0,
                                max_task_retries=0)(actor_cls)
        cfg_json = cfg.model_dump(mode="json")
        size = _pool_size(cfg, gpus, len(todo))
        actors = [remote_cls.remote(base_model, cfg_json) for _ in range(size)]
        queue = deque(todo)
        attempts: dict[str, int] = {}
        inflight: dict[Any, tuple[int, str]] = {}
        results: list[FinetuneResult] = []
        deaths_in_a_row, last_error = 0, ""
        log.info("fine-tuning %d identities of %s on %d workers", len(todo), method, size)

        def submit(slot: int) -> None:
            if queue:
                identity = queue.popleft()
                attempts[identity] = attempts.get(identity, 0) + 1
                ref = actors[slot].run.remote(method, identity, dataset_dir, str(out), parent_id, tracking_json)
                inflight[ref] = (slot, identity)

        def replace(slot: int) -> None:
            ray.kill(actors[slot], no_restart=True)
            actors[slot] = remote_cls.remote(base_model, cfg_json)

        for slot in range(size):
            submit(slot)
        while inflight:
            (ref,), _ = ray.wait(list(inflight), num_returns=1)
            slot, identity = inflight.pop(ref)
            try:
                results.append(FinetuneResult(**ray.get(ref)))
                deaths_in_a_row = 0
            except RayTaskError as exc:  # BaseRestoreError: this identity is lost, the actor must go
                results.append(_died(identity, method, f"worker could not restore the base: {exc}", out))
                replace(slot)
            except RayActorError as exc:  # the process is gone (killed, OOM, node lost, base did not load)
                deaths_in_a_row += 1
                last_error = f"{type(exc).__name__}: {exc}".splitlines()[0]
                log.warning("worker died while fine-tuning %s (attempt %d): %s", identity, attempts[identity],
                            last_error)
                if attempts[identity] < ATTEMPTS:
                    queue.appendleft(identity)
                else:
                    results.append(_died(identity, method, f"worker died twice on this identity: {last_error}",
                                         out))
                replace(slot)
                if deaths_in_a_row > 2 * size + 2:
                    # nothing finishes: stop starting workers, and say why for every identity left
                    for rest in [*queue, *(i for _, i in inflight.values())]:
                        results.append(_died(rest, method, f"workers keep dying ({deaths_in_a_row} in a row, "
                                                           f"nothing finished): {last_error}", out))
                    queue.clear()
                    inflight.clear()  # their actors are killed below
                    break
            submit(slot)
        for actor in actors:
            ray.kill(actor, no_restart=True)
        return results
    finally:
        if started:
            ray.shutdown()


@holds_output_lock("finetune --all")  # the root; each identity's task also locks its own folder
def finetune_all(
    method: str,
    dataset_dir: str | os.PathLike[str],
    base_model: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    cfg: FinetuneConfig | None = None,
    identities: Sequence[str] | None = None,
    tracking: TrackingConfig | None = None,
    actor_cls: type | None = None,
) -> list[FinetuneResult]:
    """Fine-tune every identity (or ``identities``) on a pool of long-lived Ray actors; returns one result per
    identity, sorted by id. ``actor_cls``: a ``FinetuneActor`` subclass (fault drills); None = ``FinetuneActor``.

    Results with status "skipped" had a finished artifact already (``cfg.force`` re-trains them). The status table
    ``<output_dir>/status.json`` lists every identity's status, run id, timings and error, and the parent MLflow
    run (``finetune-<method>``) carries the counts. Raises only for problems that concern all identities (no
    dataset, unknown method); per-identity failures are in the results.
    """
    from idforge.config import TrackingConfig
    from idforge.errors import ConfigError
    from idforge.io.atomic import atomic_write_text
    from idforge.methods.personalized import register_per_identity_methods
    from idforge.methods.registry import method_class
    from idforge.track import start_run
    from idforge.track.runs import log_metrics, tracking_uri

    cfg = cfg or FinetuneConfig()
    register_per_identity_methods()
    if getattr(method_class(method), "regime", None) != "per-identity":
        raise ConfigError(f"method {method!r} is a population method; train it with idforge train, not finetune")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    all_ids = list_identities(dataset_dir)
    wanted = list(identities) if identities is not None else all_ids
    unknown = sorted(set(wanted) - set(all_ids))
    if unknown:
        raise ConfigError(f"identities {unknown[:5]} are not in {dataset_dir}; known: {', '.join(all_ids[:10])}")
    todo = [i for i in wanted if cfg.force or not is_done(out, i)]
    skipped = [FinetuneResult(identity=i, method=method, status="skipped", artifact_dir=str(artifact_dir(out, i)))
               for i in wanted if i not in todo]
    # Workers get the resolved URI: their environment is not the driver's.
    tracking = tracking or TrackingConfig()
    if tracking.enabled:
        tracking = tracking.model_copy(update={"uri": tracking_uri(tracking)})
    results: list[FinetuneResult] = list(skipped)
    with start_run(tracking, run_name=f"finetune-{method}", tags={"idforge.stage": "finetune-all",
                                                                  "idforge.method": method}) as parent:
        parent_id = parent.info.run_id if parent is not None else None
        if todo:
            results.extend(_fan_out(method, todo, str(dataset_dir), str(base_model), out, cfg, parent_id,
                                    tracking.model_dump(mode="json"), actor_cls or FinetuneActor))
        counts = {s: sum(r.status == s for r in results) for s in ("done", "failed", "skipped")}
        log_metrics({f"identities_{k}": v for k, v in counts.items()})
        results.sort(key=lambda r: r.identity)
        table = {"method": method, "dataset": str(dataset_dir), "parent_run_id": parent_id, "counts": counts,
                 "identities": [r.to_json() for r in results]}
        atomic_write_text(out / STATUS_TABLE, json.dumps(table, indent=2, sort_keys=True))
        if parent is not None:
            from idforge.track import log_artifact

            log_artifact(out / STATUS_TABLE)
    for r in results:
        log.info("%-20s %-8s %s", r.identity, r.status, r.error or r.artifact_dir or "")
    return results


def format_status(results: Sequence[FinetuneResult]) -> str:
    """A plain-text status table (identity, status, seconds, final loss, error) for the CLI."""
    lines = [f"{'identity':<24} {'status':<8} {'total_s':>8} {'loss':>8}  error"]
    for r in results:
        total = f"{r.timings.get('total', 0):.1f}" if r.timings else "-"
        loss = f"{r.final_loss:.4f}" if r.final_loss is not None else "-"
        lines.append(f"{r.identity:<24} {r.status:<8} {total:>8} {loss:>8}  {r.error or ''}")
    return "\n".join(lines)
