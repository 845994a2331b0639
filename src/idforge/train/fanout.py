"""``idforge finetune --all``: every identity of a dataset as an independent Ray task, under one parent MLflow run.

Each identity runs ``finetune_identity`` in its own Ray task (``num_cpus`` = ``cpus_per_task``; one GPU per task
when CUDA is there, so a cluster spreads identities over its GPUs). A task never raises: a failed identity is
reported in the status table (``<output_dir>/status.json``) and the others go on. Identities whose artifact already
has ``DONE`` are skipped, so re-running redoes only the failed or missing ones.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from idforge.io.lock import holds_output_lock
from idforge.train.finetune_config import FinetuneConfig
from idforge.train.per_identity import FinetuneResult, artifact_dir, finetune_identity, is_done, list_identities

if TYPE_CHECKING:
    from idforge.config import TrackingConfig

log = logging.getLogger(__name__)

STATUS_TABLE = "status.json"


def _task(method: str, identity: str, dataset_dir: str, base_model: str, output_dir: str, cfg_json: dict[str, Any],
          parent_run_id: str | None, tracking_json: dict[str, Any] | None) -> dict[str, Any]:
    """One identity, inside a Ray worker: never raises (the failure is the returned status)."""
    import logging as _logging

    from idforge.config import TrackingConfig

    _logging.basicConfig(level=_logging.INFO)
    cfg = FinetuneConfig.model_validate(cfg_json)
    tracking = TrackingConfig.model_validate(tracking_json) if tracking_json is not None else None
    try:
        res = finetune_identity(method, identity, dataset_dir, base_model, output_dir, cfg,
                                parent_run_id=parent_run_id, tracking=tracking)
        return res.to_json()
    except BaseException as exc:  # noqa: BLE001 - the status table reports it; other identities must go on
        from idforge.train.per_identity import read_status

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


@holds_output_lock("finetune --all")  # the root; each identity's task also locks its own folder
def finetune_all(
    method: str,
    dataset_dir: str | os.PathLike[str],
    base_model: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    cfg: FinetuneConfig | None = None,
    identities: Sequence[str] | None = None,
    tracking: TrackingConfig | None = None,
) -> list[FinetuneResult]:
    """Fine-tune every identity (or ``identities``) as Ray tasks; returns one result per identity, sorted by id.

    Results with status "skipped" had a finished artifact already (``cfg.force`` re-trains them). The status table
    ``<output_dir>/status.json`` lists every identity's status, run id, timings and error, and the parent MLflow
    run (``finetune-<method>``) carries the counts. Raises only for problems that concern all identities (no
    dataset, unknown method); per-identity failures are in the results.
    """
    import ray

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
            gpus = cfg.gpus_per_task
            if gpus is None:
                import torch

                gpus = 1.0 if torch.cuda.is_available() else 0.0
            started = _ray_init(cfg.ray_address, None)
            try:
                remote = ray.remote(num_cpus=cfg.cpus_per_task, num_gpus=gpus, max_retries=0)(_task)
                refs = [remote.remote(method, i, str(dataset_dir), str(base_model), str(out),
                                      cfg.model_dump(mode="json"), parent_id, tracking.model_dump(mode="json"))
                        for i in todo]
                for identity, ref in zip(todo, refs, strict=True):
                    try:
                        results.append(FinetuneResult(**ray.get(ref)))
                    except Exception as exc:  # noqa: BLE001 - a crashed worker (OOM, killed) fails one identity
                        results.append(FinetuneResult(identity=identity, method=method, status="failed",
                                                      error=f"worker died: {type(exc).__name__}: {exc}"[:500]))
            finally:
                if started:
                    ray.shutdown()
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
