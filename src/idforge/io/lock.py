"""One writer per output: a lock file beside a local output, a lease object beside an ``s3://`` one.

:func:`output_lock` picks the kind from the output. Both record the holder's host, pid and start time, and a second
run on the same output fails at once naming the holder and how to clear a stale lock.

- Local: ``.<name>.lock`` beside the output, taken with ``O_CREAT | O_EXCL`` (atomic on a local filesystem). A lock
  whose pid is dead on this same host is stale (a SIGKILLed run) and is taken over with a warning; a lock from
  another host cannot be checked from here, so it is only ever removed by hand.
- S3: the object ``<prefix>.lock`` (beside the prefix, so it is never part of the dataset's listing), created with
  a conditional PUT (``If-None-Match: *``: of two racing creators the server lets exactly one win; SeaweedFS, MinIO
  and AWS S3 implement it). The holder's lease runs ``lease_s`` seconds from the object's last write and a heartbeat
  thread renews it every ``lease_s / 3`` with ``If-Match: <etag>`` (so a renewal never overwrites a lock someone
  else took). A run that dies stops renewing; once the lease has expired, judged on the server's clock (its
  ``Date`` and ``Last-Modified``, so clock skew between machines does not matter), the next run takes it over with a
  warning, again conditionally on the etag it read. A lock of a dead pid on this same host is taken over at once.
  A holder whose lease was taken over (it could not renew for a whole lease) fails when its block ends instead of
  reporting success.

:func:`holds_output_lock` wraps a stage function so that it runs under the lock of one of its arguments.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from idforge.errors import DataError

if TYPE_CHECKING:
    from idforge.config import StorageConfig
    from idforge.io.storage import S3Storage

log = logging.getLogger(__name__)

LEASE_S = 300.0  # S3 lease: long enough to ride out a storage outage of retry_total_s (60 s) between renewals
_F = TypeVar("_F", bound=Callable[..., Any])


def _now_utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _me(what: str) -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": _now_utc(), "what": what,
            "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv[:3]))}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _dead_here(held: Mapping[str, Any]) -> bool:
    """True when the holder ran on this host and its pid is gone: a killed run, safe to take over."""
    return (held.get("host") == socket.gethostname() and isinstance(held.get("pid"), int)
            and not _alive(held["pid"]))


def _refusal(output: Any, held: Mapping[str, Any], fix: str) -> DataError:
    return DataError(
        f"{output} is being written by another {held.get('what', 'run')} (host {held.get('host', '?')}, "
        f"pid {held.get('pid', '?')}, started {held.get('started', '?')}); wait for it, or if that run is gone {fix}")


# ----------------------------------------------------------------------------------------------------------------
# local


def lock_path(output: str | os.PathLike[str]) -> Path:
    """The lock file of ``output``: ``.<name>.lock`` beside it (not inside: the output is replaced as a whole).

    The path is made absolute lexically (``..`` folded, symlinks not followed), so ``out``, ``./out/`` and
    ``/abs/out`` share one lock, and an output that is a symlink keeps its lock whatever it points at.
    """
    out = Path(os.path.abspath(Path(output).expanduser()))
    if not out.name:
        raise DataError(f"output {output!r} has no name to lock (a filesystem root): choose a folder inside it")
    return out.with_name(f".{out.name}.lock")


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # being written this instant, or damaged: treated as held, never silently taken


def _try_create(path: Path, me: dict) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        json.dump(me, fh)
        fh.flush()
        os.fsync(fh.fileno())
    return True


@contextlib.contextmanager
def _local_lock(output: str | os.PathLike[str], what: str) -> Iterator[Path]:
    path = lock_path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    me = _me(what)
    if not _try_create(path, me):
        held = _holder(path)
        if _dead_here(held):
            log.warning("%s: taking over the stale lock %s of pid %d (no longer running on %s)", what, path,
                        held["pid"], held["host"])
            path.unlink(missing_ok=True)
        if not _try_create(path, me):
            raise _refusal(output, _holder(path) or held, f"delete the lock file {path}")
    try:
        yield path
    finally:
        if _holder(path).get("pid") == me["pid"]:
            path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------------------
# S3


def lease_uri(output: str) -> str:
    """The lease object of the ``s3://`` output ``output``: ``<prefix>.lock`` beside it."""
    from idforge.io.uri import parse_s3_uri

    loc = parse_s3_uri(output)
    if not loc.key.strip("/"):
        raise DataError(f"output {output} is a whole bucket: give a prefix inside it (s3://bucket/name) to lock")
    return f"s3://{loc.bucket}/{loc.key.rstrip('/')}.lock"


class S3Lease:
    """A held lease on ``uri`` (see the module docstring); created by :func:`output_lock`.

    Attributes:
        uri: the lease object. lost: set when a renewal found the lease taken over by another run.
    """

    def __init__(self, storage: S3Storage, uri: str, what: str, lease_s: float) -> None:
        from idforge.io.uri import parse_s3_uri

        self.storage, self.uri, self.what, self.lease_s = storage, uri, what, lease_s
        self.loc = parse_s3_uri(uri)
        self.me = {**_me(what), "token": uuid.uuid4().hex, "lease_s": lease_s}
        self.etag: str | None = None
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # one conditional request each; PreconditionFailed -> False, everything else through S3Storage._call's retries

    def _put(self, headers: dict[str, str]) -> bool:
        body = json.dumps({**self.me, "renewed": _now_utc()}).encode()
        client = self.storage.client

        def put() -> str | None:
            from minio.error import S3Error

            try:
                # minio's public put_object turns unknown headers into x-amz-meta-*: the plain PUT takes them as is
                result = client._put_object(self.loc.bucket, self.loc.key, body,
                                            {**headers, "Content-Type": "application/json"})
            except S3Error as exc:
                if exc.code in {"PreconditionFailed", "ConditionalRequestConflict"}:
                    return None
                raise
            return result.etag

        etag = self.storage._call(self.uri, self.loc, put)
        if etag is None:
            return False
        self.etag = etag
        return True

    def read(self) -> tuple[dict[str, Any], str | None, float | None]:
        """(holder record, etag, seconds the lease has left by the server's clock; None when unknown).
        An absent lease object reads as ({}, None, None)."""
        client = self.storage.client

        def get() -> tuple[bytes, Any] | None:
            from minio.error import S3Error

            try:
                response = client.get_object(self.loc.bucket, self.loc.key)
            except S3Error as exc:
                if exc.code in {"NoSuchKey", "NotFound"}:
                    return None
                raise
            try:
                return response.read(), response.headers  # case-insensitive
            finally:
                response.close()
                response.release_conn()

        got = self.storage._call(self.uri, self.loc, get)
        if got is None:
            return {}, None, None
        data, headers = got
        try:
            held = json.loads(data)
        except ValueError:
            held = {}  # damaged: treated as held until it expires, never silently taken
        etag = (headers.get("ETag") or headers.get("etag") or "").strip('"') or None
        left = None
        try:
            written = parsedate_to_datetime(headers["Last-Modified"]).timestamp()
            now = parsedate_to_datetime(headers["Date"]).timestamp()
            left = written + float(held.get("lease_s", LEASE_S)) - now
        except (KeyError, TypeError, ValueError):
            pass
        return held, etag, left

    def acquire(self) -> None:
        if self._put({"If-None-Match": "*"}):
            return self._hold()
        held, etag, left = self.read()
        if etag is None:  # released between our PUT and our GET: try once more
            if self._put({"If-None-Match": "*"}):
                return self._hold()
            held, etag, left = self.read()
        expired = left is not None and left <= 0
        if etag is not None and (expired or _dead_here(held)):
            why = (f"expired {-left:.0f} s ago" if expired and left is not None
                   else f"pid {held.get('pid')} no longer runs on {held.get('host')}")
            if self._put({"If-Match": f'"{etag}"'}):
                log.warning("%s: took over the lease %s of %s (host %s, pid %s, started %s): %s", self.what,
                            self.uri, held.get("what", "a run"), held.get("host", "?"), held.get("pid", "?"),
                            held.get("started", "?"), why)
                return self._hold()
            held, _, left = self.read()  # someone else took it over first
        until = f"expires in {left:.0f} s" if left is not None else "expiry unknown"
        raise _refusal(self.uri.removesuffix(".lock"), held,
                       f"wait for its lease to expire ({until}; leases last {held.get('lease_s', LEASE_S):.0f} s "
                       f"after the last renewal), or delete the lock object {self.uri}")

    def _hold(self) -> None:
        """Read the lease back (a server that ignored the condition would show another writer's token here), then
        start renewing it."""
        held, _, _ = self.read()
        if held.get("token") != self.me["token"]:
            raise _refusal(self.uri.removesuffix(".lock"), held, f"delete the lock object {self.uri}")
        self._thread = threading.Thread(target=self._heartbeat, name=f"lease {self.uri}", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        interval = self.lease_s / 3
        while not self._stop.wait(interval):
            try:
                if not self._put({"If-Match": f'"{self.etag}"'}):
                    log.error("%s: lost the lease %s: another run took it over after this one failed to renew "
                              "for %.0f s; this run's output must not be trusted", self.what, self.uri, self.lease_s)
                    self.lost.set()
                    return
            except Exception as exc:  # noqa: BLE001 - keep renewing: the lease outlives a few failed renewals
                log.warning("%s: renewing the lease %s failed (%s); retrying in %.0f s", self.what, self.uri, exc,
                            interval)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.lost.is_set() or self.etag is None:
            return
        client = self.storage.client

        def delete() -> None:
            from minio.error import S3Error

            try:
                client._execute("DELETE", self.loc.bucket, self.loc.key, headers={"If-Match": f'"{self.etag}"'})
            except S3Error as exc:
                if exc.code not in {"PreconditionFailed", "NoSuchKey", "NotFound"}:
                    raise

        try:
            self.storage._call(self.uri, self.loc, delete)
        except Exception as exc:  # noqa: BLE001 - the work is done; the lease expires on its own
            log.warning("%s: could not remove the lease %s (%s); it expires %.0f s after its last renewal",
                        self.what, self.uri, exc, self.lease_s)


@contextlib.contextmanager
def _s3_lock(output: str, what: str, storage_cfg: StorageConfig | None, lease_s: float) -> Iterator[str]:
    from idforge.io.storage import S3Storage

    lease = S3Lease(S3Storage(storage_cfg), lease_uri(output), what, lease_s)
    lease.acquire()
    try:
        yield lease.uri
    finally:
        lease.release()
    if lease.lost.is_set():
        raise DataError(f"{what} on {output} lost its lease {lease.uri} to another run while writing (it could not "
                        f"renew for {lease_s:.0f} s): rerun it once the other run is done")


# ----------------------------------------------------------------------------------------------------------------
# entry points


@contextlib.contextmanager
def output_lock(output: str | os.PathLike[str], what: str = "run", storage: StorageConfig | None = None, *,
                lease_s: float = LEASE_S) -> Iterator[Any]:
    """Hold the one-writer lock of ``output`` (a local path, or an ``s3://`` prefix) for the block.

    Yields the lock file's path (local) or the lease object's URI (S3).

    Args:
        what: the stage, named in the message another run gets.
        storage: endpoint and credentials for an ``s3://`` output.
        lease_s: S3 only: how long the lease outlives its last renewal (renewed every ``lease_s / 3``).
    Raises:
        DataError: another live run holds it (the message names host, pid, start time and how to clear it), or
        (S3, when the block ends) this run's lease was taken over while it was writing.
    """
    from idforge.io.uri import is_s3_uri

    if isinstance(output, str) and is_s3_uri(output):
        if lease_s <= 0:
            raise DataError(f"lease_s must be > 0 seconds, got {lease_s}")
        with _s3_lock(output, what, storage, lease_s) as uri:
            yield uri
    else:
        with _local_lock(output, what) as path:
            yield path


def holds_output_lock(what: str, output: str | Callable[[Mapping[str, Any]], Any] = "output_dir") -> Callable[[_F], _F]:
    """Decorate a stage function so that its whole call runs under :func:`output_lock`.

    ``output`` names the argument holding the output (default ``output_dir``), or is a function of the bound
    arguments returning it (e.g. one identity's folder inside the output). A decorator rather than a ``with`` block
    inside the function: the stage's body stays as it is.
    """

    def wrap(fn: _F) -> _F:
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def locked(*args: Any, **kwargs: Any) -> Any:
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            target = output(bound.arguments) if callable(output) else bound.arguments[output]
            with output_lock(target, what):
                return fn(*args, **kwargs)

        return locked  # type: ignore[return-value]

    return wrap
