"""Tracking that a tracking outage cannot kill: ``ResilientLogger`` buffers a run's metrics, params and tags and
sends them when the server answers.

Training runs for hours; the MLflow server may restart, be redeployed or hang meanwhile. A failed ``log_batch`` must
not end (or, under Ray, restart) the training, and what it carried must not be lost:

- every entry goes into a bounded in-memory buffer first (the oldest is dropped, and counted, when it is full), with
  the time it was logged, so a metric delivered late still shows when it happened;
- the buffer is sent with ``MlflowClient.log_batch`` at most as often as an exponential backoff (with jitter) after a
  failure allows, each request failing fast (``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0``, a short
  ``MLFLOW_HTTP_REQUEST_TIMEOUT``): MLflow's own defaults (7 retries, 120 s timeout) would stall a training step for
  minutes against a hung server;
- ``close`` keeps trying for ``flush_timeout_s`` and then says, in one warning, what was delayed, dropped or not
  delivered.

A request MLflow refuses for what it contains (an HTTP 4xx other than 429: a changed param, an unknown run) is not
an outage: retrying would refuse again, so those entries are counted as rejected and named in the warning.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from idforge.errors import DataError

__all__ = ["HEARTBEAT_TAG", "DeliveryReport", "ResilientLogger", "fail_fast_requests"]

log = logging.getLogger(__name__)

#: the run tag each successful flush refreshes (seconds since the epoch): a run whose heartbeat is old is stale
HEARTBEAT_TAG = "idforge.heartbeat"

_MAX_METRICS = 1000  # mlflow.utils.validation.MAX_METRICS_PER_BATCH
_MAX_PARAMS_TAGS = 100  # mlflow.utils.validation.MAX_PARAMS_TAGS_PER_BATCH

# The variables MLflow's REST client reads on every request (mlflow.environment_variables): changed only around our
# own requests, under a lock, and put back, so the rest of the process keeps MLflow's (or the user's) settings.
_ENV_LOCK = threading.Lock()


@contextlib.contextmanager
def fail_fast_requests(timeout_s: int) -> Iterator[None]:
    """MLflow HTTP requests in this block try once and give up after ``timeout_s`` seconds (connect or read)."""
    values = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(int(timeout_s), 1)),
              "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0"}
    with _ENV_LOCK:
        old = {k: os.environ.get(k) for k in values}
        os.environ.update(values)
        try:
            yield
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


Kind = Literal["metric", "param", "tag"]


@dataclass
class DeliveryReport:
    """What happened to the entries of a ``ResilientLogger`` (one metric value at one step is one entry)."""

    logged: int = 0  # entries handed to the logger
    delivered: int = 0  # of which MLflow has
    delayed: int = 0  # delivered, but only after at least one failed attempt
    dropped: int = 0  # oldest entries dropped because the buffer was full
    rejected: int = 0  # refused by MLflow for their content (4xx): retrying would not help
    undelivered: int = 0  # still buffered when close gave up
    failures: int = 0  # failed attempts
    outage_s: float = 0.0  # from the first failure to the delivery that ended it (or to close)
    last_error: str = ""

    @property
    def clean(self) -> bool:
        return self.failures == 0 and self.dropped == 0 and self.rejected == 0 and self.undelivered == 0


def _permanent(exc: BaseException) -> bool:
    """MLflow refused the request for what it holds (4xx other than 429), as opposed to being unreachable or failing."""
    from mlflow.exceptions import MlflowException

    if not isinstance(exc, MlflowException):
        return False
    try:
        status = int(exc.get_http_status_code())
    except Exception:  # noqa: BLE001 - an unknown code counts as transient
        return False
    return 400 <= status < 500 and status != 429


class ResilientLogger:
    """Buffered, retried logging into one existing run; no method raises because of the tracking server.

    Args:
        run_id: the run (it must exist; it need not be the active run of this process).
        uri: its tracking URI (``http(s)://`` server, ``sqlite:///...``).
        max_buffered: entries kept while the server is away; beyond it the oldest are dropped (and counted).
        request_timeout_s: how long one request may take before it counts as failed (a hung server).
        backoff_s: (first, longest) wait after a failure before the next attempt; doubles per failure, with jitter.
        flush_timeout_s: how long ``close`` keeps trying to deliver what is buffered.
        heartbeat: refresh the run's ``idforge.heartbeat`` tag with each delivery (stale-run detection reads it).
        clock, sleep: injectable for tests.
    """

    def __init__(self, run_id: str, uri: str, *, max_buffered: int = 100_000, request_timeout_s: int = 2,
                 backoff_s: tuple[float, float] = (1.0, 30.0), flush_timeout_s: float = 60.0, heartbeat: bool = True,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                 rng: random.Random | None = None) -> None:
        if max_buffered < 1:
            raise DataError(f"max_buffered must be >= 1, got {max_buffered}")
        self.run_id, self.uri = run_id, uri
        self.max_buffered = max_buffered
        self.request_timeout_s = request_timeout_s
        self.backoff_s = backoff_s
        self.flush_timeout_s = flush_timeout_s
        self.heartbeat = heartbeat
        self._clock, self._sleep = clock, sleep
        self._rng = rng or random.Random()
        self._buffer: deque[tuple[Kind, Any]] = deque()
        self._next_attempt = 0.0
        self._streak = 0  # consecutive failures
        self._outage_start: float | None = None
        self._failed_before: set[int] = set()  # ids of entries buffered at or during a failure (delayed)
        self._client: Any = None
        self._closed = False
        self.report = DeliveryReport()

    # -- logging ------------------------------------------------------------------------------------------------

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Buffer scalar metrics at ``step`` (timestamped now) and send what is due.

        Raises:
            DataError: a value is not a real number (the key is named): a bug of the caller, not an outage.
        """
        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        for key, value in metrics.items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise DataError(f"metric {key!r} must be a number, got {type(value).__name__} {value!r}") from None
            if math.isinf(number):
                log.warning("metric %s is infinite at step %s", key, step)
            self._add("metric", Metric(key=key, value=number, timestamp=now_ms, step=int(step or 0)))
        self.flush()

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        for key, value in params.items():
            self._add("param", Param(key=key, value=str(value)))
        self.flush()

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        for key, value in tags.items():
            self._add("tag", RunTag(key=key, value=str(value)))
        self.flush()

    def _add(self, kind: Kind, entry: Any) -> None:
        if len(self._buffer) >= self.max_buffered:
            self._buffer.popleft()
            self.report.dropped += 1
        self._buffer.append((kind, entry))
        self.report.logged += 1
        if self._outage_start is not None:  # logged while the server is away: it arrives late
            self._failed_before.add(id(entry))

    # -- delivery -----------------------------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        return len(self._buffer)

    def flush(self, force: bool = False) -> bool:
        """Send the buffer if a send is due (or ``force``); True when it is empty afterwards. Never raises for
        the server's sake."""
        if not self._buffer:
            return True
        if not force and self._clock() < self._next_attempt:
            return False
        while self._buffer:
            chunk = self._chunk()
            try:
                self._send(chunk)
            except Exception as exc:  # noqa: BLE001 - any failure of the tracking side is survivable
                if _permanent(exc):
                    self._reject(chunk, exc)
                    continue
                self._failed(exc)
                return False
            self._delivered(chunk)
        return True

    def _chunk(self) -> list[tuple[Kind, Any]]:
        """The oldest entries that fit one ``log_batch`` (MLflow's per-request limits)."""
        out: list[tuple[Kind, Any]] = []
        metrics = params_tags = 0
        for kind, entry in self._buffer:
            if kind == "metric":
                if metrics == _MAX_METRICS or metrics + params_tags == _MAX_METRICS:
                    break
                metrics += 1
            else:
                if params_tags == _MAX_PARAMS_TAGS or metrics + params_tags == _MAX_METRICS:
                    break
                params_tags += 1
            out.append((kind, entry))
        return out

    def _send(self, chunk: list[tuple[Kind, Any]]) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import RunTag

        if self._client is None:
            self._client = MlflowClient(tracking_uri=self.uri)
        metrics = [e for k, e in chunk if k == "metric"]
        params = [e for k, e in chunk if k == "param"]
        tags = [e for k, e in chunk if k == "tag"]
        if self.heartbeat and len(params) + len(tags) < _MAX_PARAMS_TAGS and len(chunk) < _MAX_METRICS:
            tags.append(RunTag(HEARTBEAT_TAG, str(int(time.time()))))
        with fail_fast_requests(self.request_timeout_s):
            self._client.log_batch(self.run_id, metrics=metrics, params=params, tags=tags, synchronous=True)

    def _delivered(self, chunk: list[tuple[Kind, Any]]) -> None:
        for _ in chunk:
            self._buffer.popleft()
        late = sum(1 for _, e in chunk if id(e) in self._failed_before)
        self._failed_before.difference_update(id(e) for _, e in chunk)
        self.report.delivered += len(chunk)
        self.report.delayed += late
        if self._outage_start is not None and not self._buffer:
            outage = self._clock() - self._outage_start
            self.report.outage_s += outage
            log.info("MLflow at %s answers again after %.1f s: the buffered entries of run %s are delivered",
                     self.uri, outage, self.run_id)
            self._outage_start = None
        self._streak, self._next_attempt = 0, 0.0

    def _failed(self, exc: BaseException) -> None:
        now = self._clock()
        self.report.failures += 1
        self.report.last_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        self._failed_before.update(id(e) for _, e in self._buffer)
        if self._outage_start is None:
            self._outage_start = now
            log.info("MLflow at %s unreachable (%s): buffering run %s's metrics and retrying with backoff",
                     self.uri, self.report.last_error, self.run_id)
        first, longest = self.backoff_s
        wait = min(longest, first * 2 ** self._streak) * (0.5 + 0.5 * self._rng.random())
        self._streak += 1
        self._next_attempt = now + wait

    def _reject(self, chunk: list[tuple[Kind, Any]], exc: BaseException) -> None:
        for _ in chunk:
            self._buffer.popleft()
        self._failed_before.difference_update(id(e) for _, e in chunk)
        self.report.rejected += len(chunk)
        self.report.last_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]

    def close(self, timeout_s: float | None = None) -> DeliveryReport:
        """Deliver what is buffered, trying for ``timeout_s`` (default ``flush_timeout_s``); one warning when
        anything was delayed, dropped, rejected or is still undelivered. Returns the report (idempotent)."""
        if self._closed:
            return self.report
        self._closed = True
        deadline = self._clock() + (self.flush_timeout_s if timeout_s is None else timeout_s)
        done = self.flush(force=True)
        while not done and self._clock() < deadline:
            self._sleep(max(0.0, min(self._next_attempt, deadline) - self._clock()))
            done = self.flush(force=True)
        r = self.report
        r.undelivered = len(self._buffer)
        if self._outage_start is not None:
            r.outage_s += self._clock() - self._outage_start
            self._outage_start = None
        if not r.clean:
            log.warning("%s", self.summary())
        return r

    def summary(self) -> str:
        """One sentence: what was delayed, dropped, rejected or not delivered, and why."""
        r = self.report
        parts = [f"{r.delayed} delayed and delivered later"]
        if r.dropped:
            parts.append(f"{r.dropped} oldest dropped (buffer of {self.max_buffered} full)")
        if r.rejected:
            parts.append(f"{r.rejected} rejected by MLflow")
        if r.undelivered:
            parts.append(f"{r.undelivered} not delivered (still failing after the {self.flush_timeout_s:g} s flush)")
        return (f"MLflow tracking of run {self.run_id} at {self.uri} had {r.failures} failed attempt(s) over "
                f"{r.outage_s:.1f} s (last: {r.last_error}); of {r.logged} entries: " + ", ".join(parts) +
                "; training was not interrupted")
