"""Generation on Ray actors (``generate.engine=ray``): the local engine's work units, spread over a pool of actors.

Each actor is one :class:`~idforge.evaluate.generate.IdentityGenerator`: it loads the pipeline, the conditioning
face model and CLIP once, then draws unit after unit (an identity's prompts for some of its seeds), writing PNGs and
sidecars straight into the output directory, which every actor must therefore see (a local or shared filesystem).
One actor per GPU when the cluster has GPUs (and ``generate.device`` is not ``cpu``), else ``generate.workers`` CPU
actors with ``generate.threads_per_worker`` torch threads each. The driver only plans units and collects counts; it
never holds an image. Resuming is the local engine's: an actor skips an image whose recipe hash is already there.

Units are whole identities when there are at least as many identities as actors (each identity's method is loaded
and its condition computed once, as locally); with fewer identities, an identity's seeds are split so every actor
has work. A unit's images are the same bytes on either engine: the batching inside a seed is the local engine's.
"""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Callable
from typing import Any

from idforge.evaluate.generate import GenerationPlan, IdentityGenerator, UnitOutcome, WorkUnit

log = logging.getLogger(__name__)


class GenerateActor:
    """The Ray actor around one ``IdentityGenerator`` (models loaded once in ``__init__``)."""

    def __init__(self, plan: GenerationPlan, modules: list[str], threads: int | None) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)
        # methods registered outside idforge (plugins, tests) register when their module imports
        for name in modules:
            importlib.import_module(name)
        self.worker = IdentityGenerator(plan)

    def run(self, unit: WorkUnit) -> UnitOutcome:
        return self.worker.run(unit)

    def close(self) -> None:
        self.worker.close()


def split_units(units: list[WorkUnit], workers: int) -> list[WorkUnit]:
    """Whole identities when they are at least ``workers``; else each identity's seeds cut into up to
    ``ceil(workers / identities)`` contiguous groups (never an empty one), identity-major order kept."""
    if not units or len(units) >= workers:
        return list(units)
    groups = math.ceil(workers / len(units))
    out = []
    for u in units:
        g = min(groups, len(u.seeds))
        size = math.ceil(len(u.seeds) / g)
        out += [WorkUnit(u.identity, u.references, u.seeds[i : i + size]) for i in range(0, len(u.seeds), size)]
    return out


def _method_modules(plan: GenerationPlan, units: list[WorkUnit]) -> list[str]:
    """Modules the actors import so the run's method resolves there: the class's own module when it is not one of
    idforge's (whose built-in and per-identity methods register themselves on first use)."""
    from idforge.evaluate.generate import ensure_method_registered, resolve_artifact
    from idforge.methods.checkpoint import read_method_metadata
    from idforge.methods.registry import method_class

    name = plan.method_name
    if name is None and units and plan.artifact is not None:
        name = read_method_metadata(resolve_artifact(plan.artifact, units[0].identity))["method"]
    if name is None:
        return []
    ensure_method_registered(name)
    module = method_class(name).__module__
    return [] if module.startswith("idforge.") else [module]


def _start_ray(address: str | None, num_cpus: int) -> bool:
    """Join ``address`` or start a local Ray; True when this call started it (and must stop it)."""
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    return True


def run_units_on_ray(plan: GenerationPlan, units: list[WorkUnit],
                     progress: Callable[[int], Any] | None = None) -> list[UnitOutcome]:
    """Draw ``units`` on an actor pool (see the module docstring); the outcomes in completion order.

    An error in a unit (a bad artifact, an identity without a face) stops the run and is raised as itself.
    """
    import ray
    from ray.util import ActorPool

    gcfg = plan.gcfg
    modules = _method_modules(plan, units)
    started = _start_ray(gcfg.ray_address, gcfg.workers * gcfg.threads_per_worker)
    actors: list[Any] = []
    try:
        gpus = int(ray.cluster_resources().get("GPU", 0)) if gcfg.device != "cpu" else 0
        if gpus >= 1:
            n, opts, threads = gpus, {"num_gpus": 1, "num_cpus": 1}, None
        else:
            n, opts, threads = gcfg.workers, {"num_cpus": gcfg.threads_per_worker}, gcfg.threads_per_worker
        work = split_units(units, n)
        n = max(1, min(n, len(work)))
        log.info("generating %d unit(s) on %d Ray actor(s) (%s)", len(work), n, "GPU" if gpus else "CPU")
        remote = ray.remote(max_restarts=0, **opts)(GenerateActor)
        actors = [remote.remote(plan, modules, threads) for _ in range(n)]
        pool = ActorPool(actors)
        outcomes = []
        try:
            for outcome in pool.map_unordered(lambda a, u: a.run.remote(u), work):
                outcomes.append(outcome)
                if progress is not None:
                    progress(outcome.generated + outcome.skipped)
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, Exception):
                raise cause from None  # the worker's own error (ConfigError, DataError...), not Ray's wrapper
            raise
        return outcomes
    finally:
        for a in actors:
            ray.kill(a)
        if started:
            ray.shutdown()
