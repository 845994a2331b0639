"""MLflow runs: where tracking goes, and a context manager that starts, resumes or nests a run."""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

from idforge.errors import ConfigError, DataError

if TYPE_CHECKING:
    import mlflow

    from idforge.config import TrackingConfig

__all__ = [
    "absolute_tracking_uri",
    "active_run_id",
    "close_pipeline_runs",
    "artifact_location",
    "fail_stale_runs",
    "log_metrics",
    "start_run",
    "tracking_uri",
    "ui_command",
]

log = logging.getLogger(__name__)

HOST_TAG, PID_TAG, STARTED_TAG = "idforge.host", "idforge.pid", "idforge.started"
STALE_TAG = "idforge.failed_reason"
#: a RUNNING run that beats (``idforge.heartbeat``, refreshed by ``ResilientLogger``) and has not for this long is dead
STALE_AFTER_S = 30 * 60.0


ENV_URI = "MLFLOW_TRACKING_URI"
DEFAULT_DB = "mlruns.db"
DEFAULT_ARTIFACTS = "mlartifacts"
DEFAULT_EXPERIMENT = "idforge"


def tracking_uri(cfg: TrackingConfig | None = None) -> str:
    """``cfg.uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlruns.db`` (an absolute path).

    A URI with a password (``https://user:pw@host``) comes back without it, its credentials moved to
    ``$MLFLOW_TRACKING_USERNAME``/``$MLFLOW_TRACKING_PASSWORD`` (where MLflow's client reads them, and this process's
    children inherit them): the URI is passed on to workers, configs and logs, the password must not be.
    """
    from idforge.redact import export_url_credentials

    if cfg is not None and cfg.uri:
        return export_url_credentials(cfg.uri)
    env = os.environ.get(ENV_URI)
    if env:
        return export_url_credentials(env)
    return f"sqlite:///{(Path.cwd() / DEFAULT_DB).as_posix()}"


def absolute_tracking_uri(cfg: TrackingConfig | None = None) -> str:
    """``tracking_uri(cfg)`` with a relative SQLite store (``sqlite:///rel.db``) resolved against the CWD, as MLflow
    itself would here, so processes started elsewhere log to the same store. Other URIs are returned as they are."""
    uri = tracking_uri(cfg)
    db = _sqlite_path(uri)
    if db is not None:
        query = uri.split("?", 1)[1] if "?" in uri else ""
        return f"sqlite:///{db.as_posix()}" + (f"?{query}" if query else "")
    return uri


def experiment_url(cfg: TrackingConfig | None = None, base_url: str | None = None) -> str:
    """The UI link of ``cfg``'s experiment in MLflow's model-training view (the runs table).

    MLflow 3's UI opens every experiment in its GenAI view unless the link asks for ``workflowType=machine_learning``.
    ``base_url``: where the UI runs (default: the tracking server, or ``mlflow ui``'s http://127.0.0.1:5000).
    """
    uri = tracking_uri(cfg)
    base = base_url or (uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000")
    experiment = cfg.experiment if cfg is not None else DEFAULT_EXPERIMENT
    exp_id = _experiment_id(uri, experiment, artifact_location(cfg, uri))
    return f"{base}/#/experiments/{exp_id}?workflowType=machine_learning"


def ui_command(cfg: TrackingConfig | None = None) -> str:
    """What to run (or open) to browse the runs: ``mlflow ui`` on a local store, the URL of a server."""
    uri = tracking_uri(cfg)
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///path`` URI (relative paths are relative to the CWD), else None."""
    if not uri.startswith("sqlite:///"):
        return None
    raw = unquote(uri[len("sqlite:///") :]).split("?", 1)[0]
    return Path(raw).resolve() if raw and raw != ":memory:" else None


def artifact_location(cfg: TrackingConfig | None, uri: str) -> str | None:
    """Artifact root for a new experiment: ``cfg.artifact_location``, else ``mlartifacts/`` beside a SQLite DB.

    None for servers (``http(s)://``): the server's own ``--artifacts-destination``/``--default-artifact-root``
    decides, and clients must not impose a path that only exists on their machine.
    """
    if cfg is not None and cfg.artifact_location:
        loc = cfg.artifact_location
        # A bare path is made absolute, so the experiment does not depend on the CWD of whoever created it.
        return Path(loc).resolve().as_uri() if not urlparse(loc).scheme else loc
    db = _sqlite_path(uri)
    if db is not None:
        return (db.parent / DEFAULT_ARTIFACTS).as_uri()
    return None


@contextlib.contextmanager
def _using_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's process-wide tracking URI at ``uri`` for the block, then put back what was there.

    ``mlflow.set_tracking_uri`` also writes (or, given None, deletes) ``$MLFLOW_TRACKING_URI``, so the
    variable is restored by hand: a caller's environment must come out as it went in.
    """
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    if mlflow.get_tracking_uri() == uri:
        yield
        return
    old_uri = getattr(tracking_utils, "_tracking_uri", None)
    old_env = os.environ.get(ENV_URI)
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(old_uri)  # type: ignore[arg-type]
        if old_env is None:
            os.environ.pop(ENV_URI, None)
        else:
            os.environ[ENV_URI] = old_env


#: MLflow 3's experiment-kind tag and the value of its model-training view
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def _experiment_id(uri: str, name: str, location: str | None) -> str:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            # The kind makes MLflow's UI open the experiment on its training runs, not on the GenAI traces view.
            return client.create_experiment(name, artifact_location=location,
                                            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException:
            exp = client.get_experiment_by_name(name)  # created by a concurrent process in the meantime
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    if exp.tags.get(EXPERIMENT_KIND_TAG) is None:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


@contextlib.contextmanager
def start_run(
    cfg: TrackingConfig | None = None,
    run_name: str | None = None,
    run_id: str | None = None,
    parent_run_id: str | None = None,
    tags: Mapping[str, Any] | None = None,
    leave_open: bool = False,
    stale_after_s: float = STALE_AFTER_S,
    owner: bool = True,
) -> Iterator[mlflow.ActiveRun | None]:
    """Start (or resume) an MLflow run for the block; yields the ``ActiveRun`` (None when tracking is disabled).

    - The experiment ``cfg.experiment`` is created on first use with :func:`artifact_location`.
    - ``run_id`` resumes that run (new metrics append; params must keep their values).
    - ``parent_run_id`` nests the new run under it (tag ``mlflow.parentRunId``), also across processes; a run
      started while another is active nests under the active one.
    - The run ends FINISHED, or FAILED when the block raises (KILLED on Ctrl-C), and the exception propagates.
    - ``leave_open`` keeps it RUNNING when the block exits, raising or not: a pipeline's parent run, which only the
      pipeline's exit task closes (:func:`close_pipeline_runs`), so a step that logs under it cannot end it.
    - The run is tagged with its owner (``idforge.host``, ``idforge.pid``, ``idforge.started``; not with
      ``leave_open``, whose owner is the pipeline). Before a new named run starts, the RUNNING runs of the same
      stage that nobody runs any more are marked FAILED (:func:`fail_stale_runs`): a SIGKILLed stage cannot end its
      own run. ``owner=False``: log into ``run_id`` without taking it over (a training worker writing into its
      driver's run: the worker's exit must not make the driver's run look dead).

    Raises:
        ConfigError: ``run_id``/``parent_run_id`` does not exist at the tracking URI, or MLflow refuses the run.
    """
    if cfg is not None and not cfg.enabled:
        yield None
        return
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = tracking_uri(cfg)
    db = _sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    experiment = cfg.experiment if cfg is not None else DEFAULT_EXPERIMENT
    str_tags = {k: str(v) for k, v in (tags or {}).items()}
    # A run left open belongs to whoever closes it (a pipeline's exit task), not to this process: no owner tags,
    # so its exit does not make it look dead to the next start.
    owner_tag = {} if (leave_open or not owner) else owner_tags()
    with _using_tracking_uri(uri):
        nested = mlflow.active_run() is not None
        try:
            if run_id is not None:
                run = mlflow.start_run(run_id=run_id, run_name=run_name, nested=nested,
                                       tags={**str_tags, **owner_tag} or None)
            else:
                exp_id = _experiment_id(uri, experiment, artifact_location(cfg, uri))
                if run_name is not None and not leave_open:
                    parent = parent_run_id or (mlflow.active_run().info.run_id if nested else None)  # type: ignore[union-attr]
                    fail_stale_runs(uri, exp_id, run_name, str_tags, parent, stale_after_s)
                str_tags = {**str_tags, **owner_tag}
                run = mlflow.start_run(
                    experiment_id=exp_id, run_name=run_name, nested=nested, parent_run_id=parent_run_id,
                    tags=str_tags or None,
                )  # fmt: skip
        except MlflowException as exc:
            if run_id is not None:
                which = f"run {run_id!r} (to resume)"
            elif parent_run_id is not None:
                which = f"a run under parent run {parent_run_id!r}"
            else:
                which = f"a run in experiment {experiment!r}"
            first_line = str(exc.message).splitlines()[0] if exc.message else type(exc).__name__
            raise ConfigError(f"cannot start MLflow {which} at {uri}: {first_line}") from None
        log.info("MLflow run %s (experiment %s) at %s", run.info.run_id, experiment, uri)
        try:
            yield run
        except BaseException as exc:
            # end_run also pops MLflow's active-run stack; RUNNING as the "end" status leaves the run open.
            mlflow.end_run(status="RUNNING" if leave_open else
                           "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            raise
        else:
            mlflow.end_run(status="RUNNING" if leave_open else "FINISHED")


def owner_tags() -> dict[str, str]:
    """Who runs a run: this host, this pid, now (UTC)."""
    import socket
    import time

    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()),
            STARTED_TAG: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def stale_reason(tags: Mapping[str, str], now_s: float, stale_after_s: float = STALE_AFTER_S) -> str | None:
    """Why a RUNNING run with these tags is dead, or None while it may be alive.

    Dead: its owner pid is gone on this same host (a SIGKILL, an OOM kill), or it has a heartbeat older than
    ``stale_after_s`` (its host is gone or hung). A run from another host without heartbeats cannot be judged from
    here and is left alone: a long evaluation elsewhere must not be failed for being quiet.
    """
    import socket

    from idforge.track.buffer import HEARTBEAT_TAG

    host, pid = tags.get(HOST_TAG), tags.get(PID_TAG, "")
    if host == socket.gethostname() and pid.isdigit():
        if int(pid) == os.getpid():
            return None
        if not _pid_alive(int(pid)):
            return f"its process (pid {pid} on host {host}) is gone"
        return None
    beat = tags.get(HEARTBEAT_TAG, "")
    try:
        age = now_s - float(beat)
    except ValueError:
        return None
    if age > stale_after_s:
        return f"no heartbeat for {age / 60:.0f} min (host {host or '?'}, pid {pid or '?'})"
    return None


def fail_stale_runs(uri: str, experiment_id: str, run_name: str, tags: Mapping[str, str], parent_run_id: str | None,
                    stale_after_s: float = STALE_AFTER_S) -> list[str]:
    """Mark FAILED (tag ``idforge.failed_reason`` says why) the RUNNING runs of ``experiment_id`` that are this
    stage's (same run name, same parent, same ``idforge.*`` tags as ``tags``) and whose owner is dead
    (:func:`stale_reason`). Returns their ids. Never raises: a tracking hiccup must not stop the new start."""
    import time

    from mlflow import MlflowClient

    from idforge.track.buffer import fail_fast_requests

    client = MlflowClient(tracking_uri=uri)
    mine = {k: v for k, v in tags.items() if k.startswith("idforge.")}
    now = time.time()
    failed = []
    try:
        # best effort: a slow server must not hold the start for MLflow's default retries (minutes)
        with fail_fast_requests(10):
            # filtered by status only: run names may hold quotes that MLflow's filter grammar cannot escape
            running = client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'",
                                         max_results=1000)
            for run in running:
                rtags = run.data.tags
                if rtags.get("mlflow.runName") != run_name or rtags.get("mlflow.parentRunId") != parent_run_id:
                    continue
                if any(rtags.get(k) != v for k, v in mine.items()):
                    continue
                reason = stale_reason(rtags, now, stale_after_s)
                if reason is None:
                    continue
                why = f"{reason}; marked FAILED by the next start of {run_name!r} (pid {os.getpid()})"
                client.set_tag(run.info.run_id, STALE_TAG, why)
                client.set_terminated(run.info.run_id, status="FAILED")
                log.warning("MLflow run %s (%s) was left RUNNING: %s", run.info.run_id, run_name, why)
                failed.append(run.info.run_id)
    except Exception as exc:  # noqa: BLE001 - best effort, the new run matters more
        log.warning("could not check for stale MLflow runs of %r at %s: %s", run_name, uri, exc)
    return failed


def active_run_id() -> str | None:
    """The id of the innermost active run, or None (without importing mlflow when nothing could be active)."""
    import sys

    if "mlflow" not in sys.modules:
        return None
    import mlflow

    run = mlflow.active_run()
    return run.info.run_id if run is not None else None


def log_metrics(metrics: Mapping[str, Any], step: int | None = None) -> None:
    """Log scalar metrics at ``step`` to the active run (no-op without one). Values: anything ``float()`` takes.

    Raises:
        DataError: a value is not a real number (the key is named).
    """
    if active_run_id() is None:
        log.debug("no active MLflow run: metrics %s not logged", sorted(metrics))
        return
    import mlflow

    values: dict[str, float] = {}
    for key, value in metrics.items():
        try:
            values[key] = float(value)
        except (TypeError, ValueError):
            raise DataError(f"metric {key!r} must be a number, got {type(value).__name__} {value!r}") from None
        if math.isinf(values[key]):
            log.warning("metric %s is infinite at step %s", key, step)
    mlflow.log_metrics(values, step=step)


def describe_pipeline_run(pipeline: str, dataset_uri: str, counts: Mapping[str, Any], cfg: Any) -> str:
    """The parent run's description (MLflow's ``mlflow.note.content``, shown atop the run page): what ran on what.

    ``counts``: the curated dataset's metadata (``identities``, ``faces_accepted``... where present); ``cfg``: the
    root config (method and base model).
    """
    numbers = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in counts.items() if isinstance(v, (int, float)))
    return (f"**{pipeline}** pipeline on `{dataset_uri}`" + (f" ({numbers})" if numbers else "") +
            f": method `{cfg.train.method}`, base model `{cfg.model.base}`. Each step is a child run below.")


KFP_RUN_TAG = "idforge.kfp_run_id"
# KFP's final task states (PipelineTaskFinalStatus.state) -> MLflow run statuses; anything else counts as FAILED.
_KFP_TO_MLFLOW = {"SUCCEEDED": "FINISHED", "CANCELED": "KILLED", "CANCELLED": "KILLED"}


def close_pipeline_runs(cfg: TrackingConfig | None, kfp_run_id: str, state: str, error: str = "") -> list[str]:
    """End the parent run(s) a pipeline run opened (tag ``idforge.kfp_run_id`` = ``kfp_run_id``) with the status
    its final state says: SUCCEEDED -> FINISHED, CANCELED -> KILLED, anything else (FAILED, SYSTEM_ERROR...) ->
    FAILED. Tags ``idforge.kfp_state`` (and ``idforge.kfp_error`` when given). Returns the ids it closed; none
    when the pipeline failed before its parent run opened, or tracking is disabled.

    Raises:
        ConfigError: ``kfp_run_id`` is empty (nothing would identify the runs to close) or holds quotes.
    """
    if not kfp_run_id.strip() or any(c in kfp_run_id for c in "'\"`"):
        raise ConfigError(f"kfp_run_id {kfp_run_id!r} is empty or quoted: pass the pipeline run's id "
                          "(dsl.PIPELINE_JOB_ID_PLACEHOLDER)")
    if cfg is not None and not cfg.enabled:
        return []
    from mlflow import MlflowClient

    uri = tracking_uri(cfg)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(cfg.experiment if cfg is not None else DEFAULT_EXPERIMENT)
    if experiment is None:
        log.warning("no MLflow experiment at %s: pipeline run %s opened no parent run", uri, kfp_run_id)
        return []
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{KFP_RUN_TAG}` = '{kfp_run_id}'")
    status = _KFP_TO_MLFLOW.get(state.upper(), "FAILED")
    closed = []
    for run in runs:
        client.set_tag(run.info.run_id, "idforge.kfp_state", state)
        if error:
            client.set_tag(run.info.run_id, "idforge.kfp_error", error[:5000])
        client.set_terminated(run.info.run_id, status=status)
        closed.append(run.info.run_id)
    if not closed:
        log.warning("pipeline run %s (%s) has no parent MLflow run at %s to close", kfp_run_id, state, uri)
    return closed
