"""Compile, run locally (kfp.local), submit to a Kubeflow Pipelines endpoint, and follow runs."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.images import Images
from idforge.errors import IdforgeError
from pipelines.platform import Platform, Target

log = logging.getLogger(__name__)

COMPILED_DIR = Path(__file__).resolve().parent / "compiled"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class PipelineError(IdforgeError):
    """A pipeline name, argument, endpoint or run is wrong."""


def registry() -> dict[str, Callable[[Target], Any]]:
    """Pipeline name -> builder(target) returning a ``@dsl.pipeline`` function."""
    from pipelines import definitions

    return dict(definitions.BUILDERS)


def build(name: str, images: Images | None = None, platform: Platform | None = None):
    """The ``@dsl.pipeline`` function of ``name`` for these images (default: the catalog's) and platform
    (default: the names k8s/ creates)."""
    builders = registry()
    if name not in builders:
        raise PipelineError(f"unknown pipeline {name!r}; available: {', '.join(sorted(builders))}")
    return builders[name](Target(images or Images.load(), platform or Platform()))


def compile_all(out_dir: str | os.PathLike[str] = COMPILED_DIR, images: Images | None = None,
                platform: Platform | None = None) -> list[Path]:
    """Write ``<name>.yaml`` for every pipeline (atomically) and return the paths."""
    from kfp import compiler

    from idforge.io.atomic import atomic_path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in sorted(registry()):
        target = out / f"{name}.yaml"
        with atomic_path(target) as tmp:
            compiler.Compiler().compile(build(name, images, platform), package_path=str(tmp.with_suffix(".yaml")))
            os.replace(tmp.with_suffix(".yaml"), tmp)
        paths.append(target)
        log.info("compiled %s -> %s", name, target)
    return paths


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise ValueError(text)


#: KFP parameter type -> parser of its command-line text (``--arg name=value`` always arrives as a string).
_PARSERS: dict[str, Callable[[str], Any]] = {"String": str, "Integer": int, "Float": float, "Boolean": _parse_bool}
_EXAMPLES = {"Integer": "an integer such as 2", "Float": "a number such as 0.5", "Boolean": "true or false"}


def typed_arguments(name: str, raw: Mapping[str, str], images: Images | None = None) -> dict[str, Any]:
    """``raw`` (name -> text from ``--arg``) converted to each parameter's declared type in pipeline ``name``.

    Raises:
        PipelineError: a parameter the pipeline does not declare, or a value that is not of its type (one line
            naming the parameter, its type and the value).
    """
    inputs = build(name, images).component_spec.inputs or {}
    out: dict[str, Any] = {}
    for key, text in raw.items():
        if key not in inputs:
            raise PipelineError(f"pipeline {name!r} has no parameter {key!r}; its parameters: {', '.join(inputs)}")
        kind = inputs[key].type
        parse = _PARSERS.get(kind)
        if parse is None:  # an artifact input: passed as given (kfp reports a mismatch itself)
            out[key] = text
            continue
        try:
            out[key] = parse(text)
        except ValueError:
            raise PipelineError(f"pipeline {name!r} parameter {key!r} is {kind}: got {text!r}, expected "
                                f"{_EXAMPLES.get(kind, kind)}") from None
    return out


@dataclass
class LocalRun:
    name: str
    pipeline_root: Path
    outputs: dict[str, Any]


def pipeline_config_yaml(cfg: Any, base_dir: str | os.PathLike[str]) -> str:
    """The resolved config as the pipelines' ``config_yaml`` argument, with every path a step reads made absolute.

    Steps run in other processes (subprocesses locally, pods on a cluster), so nothing may depend on the
    submitter's working directory: the tracking URI (``idforge.track.absolute_tracking_uri``) and the generate/evaluate
    protocol files (relative paths resolved against ``base_dir``) become absolute. ``cfg`` is not modified.
    """
    from idforge.config import dump_config
    from idforge.track import absolute_tracking_uri

    cfg = cfg.model_copy(deep=True)
    cfg.tracking.uri = absolute_tracking_uri(cfg.tracking)
    for section in (cfg.generate, cfg.evaluate):
        if "://" not in section.protocol:
            section.protocol = str((Path(base_dir) / section.protocol).resolve())
    return dump_config(cfg)


def _ignore_local_runner_notices() -> None:
    """Silence kfp.local's per-task notices that hold for every step of ours by design: the cluster settings
    (cpu/memory requests, accelerators) and the container images the pipelines carry for Kubeflow do not apply to
    the local subprocess runner. Our own warnings and every other one stay."""
    warnings.filterwarnings("ignore", message=r"Task '.*': settings \[.*\] have no effect in the current local "
                            r"runner", category=UserWarning)
    warnings.filterwarnings("ignore", message=r"You may be attemping to run a task that uses custom or non-Python "
                            r"base image", category=RuntimeWarning)


def run_local(
    name: str,
    arguments: Mapping[str, Any] | None = None,
    pipeline_root: str | os.PathLike[str] = "outputs/kfp",
    enable_caching: bool = True,
    log_file: str | os.PathLike[str] | None = None,
) -> LocalRun:
    """Run a pipeline in this Python environment with kfp's SubprocessRunner (no Docker, no pip at run time).

    Cached tasks (same component, image, command and inputs) are reused across runs when ``enable_caching``.
    With ``log_file`` the run is quiet (``pipelines.console``): one line per step on stdout, everything the runner
    and the steps print in that file; a failure's message carries the failing step's last lines and the file.
    """
    from kfp import local

    from pipelines.console import StepConsole

    root = Path(pipeline_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(root),
        raise_on_error=True,
        enable_caching=enable_caching,
    )
    pipeline = build(name)
    started = time.time()
    console = StepConsole(Path(log_file)) if log_file is not None else None
    try:
        with console.capture() if console else contextlib.nullcontext(), warnings.catch_warnings():
            _ignore_local_runner_notices()
            task = pipeline(**dict(arguments or {}))
    except TypeError as exc:
        raise PipelineError(f"bad arguments for pipeline {name!r}: {exc}") from None
    except RuntimeError as exc:
        # kfp.local raises RuntimeError naming the failed task; its log is above in the output (or in the file).
        where = ""
        if console is not None:
            tail = "\n".join(f"    {line}" for line in console.failure_tail())
            where = f"\n  last lines of the failing step:\n{tail}\n  full log: {console.log_path}"
        raise PipelineError(f"pipeline {name!r} failed: {_ANSI.sub('', str(exc))}{where}") from None
    log.info("pipeline %s finished in %.1f s", name, time.time() - started)
    outputs = dict(getattr(task, "outputs", {}) or {})
    return LocalRun(name=name, pipeline_root=root, outputs=outputs)


def _client(host: str):
    import kfp

    try:
        return kfp.Client(host=host)
    except Exception as exc:  # kfp raises a variety of connection/auth errors here
        raise PipelineError(f"cannot reach Kubeflow Pipelines at {host}: {exc}") from None


def submit(
    name: str,
    host: str,
    arguments: Mapping[str, Any] | None = None,
    experiment: str = "idforge",
    run_name: str | None = None,
    images: Images | None = None,
    service_account: str | None = None,
    pipeline_root: str | None = None,
    platform: Platform | None = None,
    namespace: str | None = None,
) -> str:
    """Compile ``name`` with ``images`` and ``platform`` and submit it to the KFP endpoint ``host``; return the
    run id. ``namespace``: the Kubeflow profile namespace the run executes in (multi-user Kubeflow), where
    k8s/ puts the Secrets and ConfigMaps its steps read."""
    from kfp import compiler

    client = _client(host)
    with tempfile.TemporaryDirectory() as tmp:
        package = Path(tmp) / f"{name}.yaml"
        compiler.Compiler().compile(build(name, images, platform), package_path=str(package))
        run = client.create_run_from_pipeline_package(
            str(package),
            arguments=dict(arguments or {}),
            run_name=run_name or f"{name}-{time.strftime('%Y%m%d-%H%M%S')}",
            experiment_name=experiment,
            service_account=service_account,
            pipeline_root=pipeline_root,
            namespace=namespace,
        )
    return run.run_id


def status(run_id: str, host: str, wait: bool = False, timeout_s: float = 3600.0) -> str:
    """The run's state (e.g. RUNNING, SUCCEEDED, FAILED); with ``wait`` block until it ends."""
    client = _client(host)
    if wait:
        run = client.wait_for_run_completion(run_id, timeout=timeout_s)
    else:
        run = client.get_run(run_id)
    return str(getattr(run, "state", None) or getattr(getattr(run, "run", None), "status", "UNKNOWN"))


def find_outputs(pipeline_root: str | os.PathLike[str]) -> dict[str, Path]:
    """The newest evaluation outputs under a local pipeline root: ``report`` (the paged report.html), ``table``
    (the directory with metrics.parquet) and ``report_single`` (the KFP HTML artifact: the report as one
    self-contained file).

    Cached steps point at the outputs of the run that computed them, so "newest on disk" is also right when the
    whole pipeline came from the cache.
    """
    root = Path(pipeline_root)
    tables = [p for p in root.rglob("metrics.parquet") if p.parent.name == "table"]
    if not tables:
        return {}
    table = max(tables, key=lambda p: p.stat().st_mtime).parent
    found = {"table": table}
    if (table / "report.html").is_file():
        found["report"] = table / "report.html"
    if (table.parent / "report").is_file():
        found["report_single"] = table.parent / "report"
    return found
