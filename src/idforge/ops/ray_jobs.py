"""Submit, follow and wait for jobs on a Ray cluster through the Ray Jobs API.

The Jobs API is the HTTP endpoint of the Ray dashboard on the head node: ``http://HOST:8265``. On Kubernetes that
is the KubeRay head service (``http://idforge-ray-head-svc.NAMESPACE.svc:8265``); locally it is the head started
with ``ray start --head --include-dashboard=true``. The train components use exactly these functions in both places.

The address is always the dashboard's HTTP address, never the GCS port (6379) or a ``ray://`` client address:
resolving those needs a Ray connection of its own, which hangs instead of failing when the head is unreachable.

Ray's own client silently replaces the address it is given with ``$RAY_API_SERVER_ADDRESS`` or ``$RAY_ADDRESS``
when set; we apply the same rule up front (with a warning when it differs) so the address we check is the one used.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from idforge.errors import ConfigError, IdforgeError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ray.job_submission import JobSubmissionClient

__all__ = [
    "JobStatus",
    "JobResult",
    "LogSink",
    "RayUnreachableError",
    "RayJobError",
    "RayJobTimeoutError",
    "normalize_address",
    "connect",
    "submit_ray_job",
    "job_status",
    "follow_job",
    "wait_for_job",
    "stop_ray_job",
    "run_ray_job",
    "logging_sink",
]

logger = logging.getLogger(__name__)

#: Receives log text as the job prints it, in chunks of one or more lines (each chunk ends where Ray flushed).
LogSink = Callable[[str], None]

_ENV_OVERRIDES = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")  # the order Ray's client reads them in


class JobStatus(str, Enum):
    """The states of a Ray job (same values as ``ray.job_submission.JobStatus``, without importing ray)."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    STOPPED = "STOPPED"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"

    @property
    def is_terminal(self) -> bool:
        return self in (JobStatus.STOPPED, JobStatus.SUCCEEDED, JobStatus.FAILED)

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class JobResult:
    """What became of a job: its id, final status, and Ray's one-line message about it."""

    job_id: str
    status: JobStatus
    message: str = ""


class RayUnreachableError(IdforgeError, ConnectionError):
    """The Ray Jobs API does not answer at the given address."""


class RayJobError(IdforgeError, RuntimeError):
    """Ray rejected a submission, does not know a job id, or a job ended without succeeding."""


class RayJobTimeoutError(RayJobError, TimeoutError):
    """A job did not reach a terminal state in the time allowed."""


# ----------------------------------------------------------------------------------------------------------------
# addresses and connections


def normalize_address(address: str | None) -> str:
    """The Jobs API base URL for ``address`` (``http(s)://host:port``, no trailing slash).

    ``host:port`` gets ``http://``; ``None`` or empty falls back to ``$RAY_API_SERVER_ADDRESS``/``$RAY_ADDRESS``.
    An environment override that differs from an explicit address wins, as it does inside Ray's client.
    """
    env_name, env_value = next(((n, os.environ[n]) for n in _ENV_OVERRIDES if os.environ.get(n)), (None, None))
    chosen = (address or "").strip()
    if env_value:
        if chosen and _with_scheme(chosen) != _with_scheme(env_value):
            logger.warning("$%s=%s overrides the Ray address %s (Ray's client does the same)", env_name, env_value,
                           chosen)
        chosen = env_value.strip()
    if not chosen:
        raise ConfigError("no Ray address given: pass the dashboard URL of the head, e.g. http://127.0.0.1:8265 "
                          "(KubeRay: http://idforge-ray-head-svc:8265), or set $RAY_API_SERVER_ADDRESS")
    url = _with_scheme(chosen)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        source = f" (from ${env_name})" if env_value else ""
        raise ConfigError(f"Ray address {chosen!r}{source}: the Jobs API needs the dashboard's http(s)://HOST:PORT "
                          f"(default port 8265), not a {parts.scheme}:// address")
    if not parts.hostname:
        raise ConfigError(f"Ray address {chosen!r} has no host: use http://HOST:8265")
    try:
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        raise ConfigError(f"Ray address {chosen!r} has a malformed port: use http://HOST:8265") from None
    return url.rstrip("/")


def _with_scheme(address: str) -> str:
    address = address.strip().rstrip("/")
    return address if "://" in address else f"http://{address}"


def _auth_headers() -> dict[str, str]:
    """The header Ray's own clients send to a cluster with token authentication (``RAY_AUTH_MODE=token``): the
    token from ``$RAY_AUTH_TOKEN``, else the file ``$RAY_AUTH_TOKEN_PATH``. Empty when auth is off."""
    if os.environ.get("RAY_AUTH_MODE", "").strip().lower() != "token":
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if not token and path:
        try:
            token = Path(path).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"RAY_AUTH_TOKEN_PATH={path} cannot be read ({exc.strerror}): point it at the token "
                              "file, or set RAY_AUTH_TOKEN") from None
    if not token:
        raise ConfigError("RAY_AUTH_MODE=token but no token: set RAY_AUTH_TOKEN (on Kubernetes from Secret "
                          "idforge-ray-auth) or RAY_AUTH_TOKEN_PATH")
    return {"Authorization": f"Bearer {token}"}


def _probe(url: str, timeout_s: float) -> str:
    """GET ``/api/version`` with a bounded timeout (and the Ray token when auth is on); returns the cluster's Ray
    version.

    Ray's client makes this request without a timeout, so an address that drops packets would hang for minutes.
    """
    import requests

    hint = ("start a head with `ray start --head --include-dashboard=true`, or on Kubernetes reach the KubeRay "
            "head service (in-cluster http://idforge-ray-head-svc:8265, from outside `kubectl port-forward "
            "svc/idforge-ray-head-svc 8265:8265`)")
    try:
        response = requests.get(f"{url}/api/version", timeout=timeout_s, headers=_auth_headers())
    except requests.exceptions.RequestException as exc:
        raise RayUnreachableError(f"Ray Jobs API at {url} is unreachable ({type(exc).__name__}): {hint}") from None
    if response.status_code in (401, 403):
        raise RayUnreachableError(f"Ray Jobs API at {url} refused the request (HTTP {response.status_code}: "
                                  f"{response.text.strip()[:100]}): it requires Ray's token; set RAY_AUTH_MODE=token "
                                  "and RAY_AUTH_TOKEN (on Kubernetes from Secret idforge-ray-auth)")
    if response.status_code != 200:
        raise RayUnreachableError(f"{url} answered HTTP {response.status_code} to /api/version, so it is not a Ray "
                                  f"dashboard: pass the dashboard port (8265), not the GCS port (6379)")
    try:
        return str(response.json()["ray_version"])
    except (ValueError, KeyError, TypeError):
        raise RayUnreachableError(f"{url} is not a Ray dashboard (no ray_version in /api/version): pass the "
                                  f"dashboard's http://HOST:8265") from None


def connect(address: str | None, *, connect_timeout_s: float = 10.0) -> JobSubmissionClient:
    """A ``JobSubmissionClient`` for the head at ``address``, after checking within ``connect_timeout_s`` that the
    Jobs API answers there. Raises :class:`RayUnreachableError` otherwise."""
    url = normalize_address(address)
    server_version = _probe(url, connect_timeout_s)
    from ray.job_submission import JobSubmissionClient

    try:
        client = JobSubmissionClient(url)
    except ConnectionError as exc:  # the head went away between the probe and the client's own check
        raise RayUnreachableError(f"Ray Jobs API at {url} is unreachable: {exc}") from None
    logger.debug("connected to Ray %s at %s", server_version, url)
    return client


# ----------------------------------------------------------------------------------------------------------------
# submitting and inspecting


def _check_runtime_env(runtime_env: Mapping[str, Any] | None) -> dict[str, Any]:
    if runtime_env is None:
        return {}
    if not isinstance(runtime_env, Mapping):
        raise ConfigError(f"runtime_env must be a mapping (e.g. {{'env_vars': {{...}}}}), got "
                          f"{type(runtime_env).__name__}")
    env = dict(runtime_env)
    working_dir = env.get("working_dir")
    # A local working_dir is zipped and uploaded by the client; a missing one fails deep inside Ray otherwise.
    if isinstance(working_dir, str) and "://" not in working_dir and not Path(working_dir).is_dir():
        raise ConfigError(f"runtime_env working_dir {working_dir!r} is not a directory: pass an existing local "
                          f"directory or a remote URI (s3://..., gs://..., https://...zip)")
    env_vars = env.get("env_vars")
    if env_vars is not None and not (
        isinstance(env_vars, Mapping) and all(isinstance(k, str) and isinstance(v, str) for k, v in env_vars.items())
    ):
        raise ConfigError("runtime_env env_vars must map str to str (quote numbers: {'SEED': '0'})")
    return env


def find_job_status(address: str | None, job_id: str, timeout_s: float = 10.0) -> JobStatus | None:
    """The status of ``job_id`` on the cluster, or None when the cluster does not know the id.

    Uses ``GET /api/jobs/{id}`` (the documented REST call behind ``get_job_info``), where 404 means unknown —
    the SDK call raises the same error for "unknown" as for other failures.
    """
    import requests

    url = normalize_address(address)
    try:
        response = requests.get(f"{url}/api/jobs/{job_id}", timeout=timeout_s)
    except requests.exceptions.RequestException as exc:
        raise RayUnreachableError(f"Ray Jobs API at {url} is unreachable ({type(exc).__name__})") from None
    if response.status_code == 404:
        return None
    if response.status_code != 200:
        raise RayJobError(f"Ray at {url} answered HTTP {response.status_code} about job {job_id}: {response.text}")
    return JobStatus(str(response.json()["status"]))


def submit_ray_job(
    address: str | None,
    entrypoint: str,
    runtime_env: Mapping[str, Any] | None = None,
    job_id: str | None = None,
    *,
    metadata: Mapping[str, str] | None = None,
    entrypoint_num_cpus: float | None = None,
    entrypoint_num_gpus: float | None = None,
    connect_timeout_s: float = 10.0,
) -> str:
    """Submit ``entrypoint`` (a shell command run on the head) and return the job id.

    With ``job_id`` given and already known to the cluster, nothing is submitted and the same id comes back: a
    retried pipeline step re-attaches to its running (or finished) job instead of training twice.
    ``runtime_env`` is Ray's runtime environment dict (``env_vars``, ``working_dir``, ``py_modules``...).
    """
    if not isinstance(entrypoint, str) or not entrypoint.strip():
        raise ConfigError("Ray job entrypoint must be a non-empty shell command, e.g. 'python -m idforge.train ...'")
    env = _check_runtime_env(runtime_env)
    client = connect(address, connect_timeout_s=connect_timeout_s)
    url = normalize_address(address)
    if job_id is not None:
        if not job_id.strip() or "/" in job_id:
            raise ConfigError(f"Ray job id {job_id!r} must be non-empty and contain no '/'")
        if find_job_status(url, job_id, connect_timeout_s) is not None:
            logger.info("Ray job %s already exists at %s: attaching instead of submitting again", job_id, url)
            return job_id
    try:
        submitted = client.submit_job(
            entrypoint=entrypoint,
            submission_id=job_id,
            runtime_env=env,
            metadata=dict(metadata or {}),
            entrypoint_num_cpus=entrypoint_num_cpus,
            entrypoint_num_gpus=entrypoint_num_gpus,
        )
    except (RuntimeError, ValueError, TypeError) as exc:
        raise RayJobError(f"Ray at {url} rejected the job {entrypoint!r}: {exc}") from None
    logger.info("submitted Ray job %s to %s: %s", submitted, url, entrypoint)
    return submitted


def _job_info(client: JobSubmissionClient, job_id: str):
    try:
        return client.get_job_info(job_id)
    except RuntimeError as exc:
        raise RayJobError(f"Ray does not know job {job_id!r}: {exc}") from None


def job_status(address: str | None, job_id: str, *, connect_timeout_s: float = 10.0) -> JobStatus:
    """The current status of ``job_id``."""
    client = connect(address, connect_timeout_s=connect_timeout_s)
    return JobStatus(str(_job_info(client, job_id).status))


def stop_ray_job(address: str | None, job_id: str, *, connect_timeout_s: float = 10.0) -> bool:
    """Ask Ray to stop ``job_id``; True if it was running and is now stopping."""
    client = connect(address, connect_timeout_s=connect_timeout_s)
    try:
        return bool(client.stop_job(job_id))
    except RuntimeError as exc:
        raise RayJobError(f"could not stop Ray job {job_id!r}: {exc}") from None


def logging_sink(job_id: str, level: int = logging.INFO) -> LogSink:
    """A sink that sends each log line of the job to this module's logger."""

    def sink(chunk: str) -> None:
        for line in chunk.splitlines():
            logger.log(level, "[ray job %s] %s", job_id, line)

    return sink


# ----------------------------------------------------------------------------------------------------------------
# following


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


async def _tail(client: JobSubmissionClient, job_id: str, sink: LogSink, deadline: float | None) -> int:
    """Stream the job's log over the dashboard's websocket until it closes (job terminal); returns chars sent."""
    sent = 0
    stream = client.tail_job_logs(job_id).__aiter__()
    try:
        while True:
            try:
                chunk = await asyncio.wait_for(stream.__anext__(), timeout=_remaining(deadline))
            except StopAsyncIteration:
                return sent
            sink(chunk)
            sent += len(chunk)
    finally:
        await stream.aclose()


def _run_coroutine(factory: Callable[[], Any]) -> Any:
    """``asyncio.run`` that also works when the caller is already inside an event loop (runs in a thread then)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(factory())
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(factory())
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="ray-job-log-tail", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")


def follow_job(
    address: str | None,
    job_id: str,
    log_sink: LogSink | None = None,
    *,
    timeout_s: float | None = None,
    poll_interval_s: float = 1.0,
    connect_timeout_s: float = 10.0,
) -> JobStatus:
    """Stream the job's logs into ``log_sink`` (default: this module's logger) until it ends; return its status.

    Logs come over the dashboard's websocket as the driver prints them; if that stream breaks, the rest is polled
    (``get_job_logs``, sending only what was not sent yet). ``timeout_s`` bounds the whole wait and raises
    :class:`RayJobTimeoutError`; the job itself keeps running (stop it with :func:`stop_ray_job`).
    """
    client = connect(address, connect_timeout_s=connect_timeout_s)
    _job_info(client, job_id)  # unknown id: a clear error now, not a websocket that never opens
    sink = log_sink or logging_sink(job_id)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    sent = 0
    try:
        sent = _run_coroutine(lambda: _tail(client, job_id, sink, deadline))
    except (asyncio.TimeoutError, TimeoutError):
        raise RayJobTimeoutError(f"Ray job {job_id} did not finish within {timeout_s:g} s") from None
    except Exception as exc:  # noqa: BLE001 - a broken stream is not a failed job: fall back to polling
        logger.warning("log stream of Ray job %s broke (%s); polling instead", job_id, exc)

    while True:
        status = JobStatus(str(_job_info(client, job_id).status))
        try:
            logs = client.get_job_logs(job_id)
        except RuntimeError:
            logs = ""
        if len(logs) > sent:
            sink(logs[sent:])
            sent = len(logs)
        if status.is_terminal:
            return status
        if deadline is not None and time.monotonic() >= deadline:
            raise RayJobTimeoutError(f"Ray job {job_id} did not finish within {timeout_s:g} s (last status {status})")
        time.sleep(poll_interval_s)


def wait_for_job(
    address: str | None,
    job_id: str,
    timeout_s: float,
    *,
    poll_interval_s: float = 1.0,
    stop_on_timeout: bool = False,
    connect_timeout_s: float = 10.0,
) -> JobStatus:
    """Poll until ``job_id`` reaches a terminal status (no logs); return it.

    Past ``timeout_s`` raises :class:`RayJobTimeoutError`, after asking Ray to stop the job if ``stop_on_timeout``.
    """
    if timeout_s <= 0:
        raise ConfigError(f"timeout_s must be > 0 seconds, got {timeout_s}")
    client = connect(address, connect_timeout_s=connect_timeout_s)
    deadline = time.monotonic() + timeout_s
    while True:
        status = JobStatus(str(_job_info(client, job_id).status))
        if status.is_terminal:
            return status
        if time.monotonic() >= deadline:
            if stop_on_timeout:
                client.stop_job(job_id)
            raise RayJobTimeoutError(f"Ray job {job_id} did not finish within {timeout_s:g} s (last status "
                                     f"{status}{'; asked Ray to stop it' if stop_on_timeout else ''})")
        time.sleep(min(poll_interval_s, _remaining(deadline) or poll_interval_s))


def run_ray_job(
    address: str | None,
    entrypoint: str,
    runtime_env: Mapping[str, Any] | None = None,
    *,
    job_id: str | None = None,
    log_sink: LogSink | None = None,
    timeout_s: float | None = None,
    stop_on_timeout: bool = True,
    metadata: Mapping[str, str] | None = None,
    entrypoint_num_cpus: float | None = None,
    entrypoint_num_gpus: float | None = None,
    connect_timeout_s: float = 10.0,
) -> JobResult:
    """Submit, stream logs until the end, and return the result; what a pipeline's train step calls.

    Raises :class:`RayJobError` (with Ray's message) unless the job SUCCEEDED, and :class:`RayJobTimeoutError`
    past ``timeout_s`` (stopping the job first when ``stop_on_timeout``).
    """
    submitted = submit_ray_job(address, entrypoint, runtime_env, job_id, metadata=metadata,
                               entrypoint_num_cpus=entrypoint_num_cpus, entrypoint_num_gpus=entrypoint_num_gpus,
                               connect_timeout_s=connect_timeout_s)
    try:
        status = follow_job(address, submitted, log_sink, timeout_s=timeout_s, connect_timeout_s=connect_timeout_s)
    except RayJobTimeoutError:
        if stop_on_timeout:
            stop_ray_job(address, submitted, connect_timeout_s=connect_timeout_s)
        raise
    client = connect(address, connect_timeout_s=connect_timeout_s)
    message = str(getattr(_job_info(client, submitted), "message", "") or "")
    if status is not JobStatus.SUCCEEDED:
        raise RayJobError(f"Ray job {submitted} ended {status}: {message or 'no message from Ray'} "
                          f"(full log: `ray job logs {submitted} --address {normalize_address(address)}`)")
    return JobResult(job_id=submitted, status=status, message=message)
