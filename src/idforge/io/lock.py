"""One writer per output: a lock file beside a local output, taken with ``O_CREAT | O_EXCL`` (atomic on a local
filesystem), holding the holder's host, pid and start time.

A second run on the same output fails at once naming the holder and the exact file to delete if that run is gone.
A lock whose pid is dead on this same host is stale (a SIGKILLed run) and is taken over with a warning; a lock from
another host cannot be checked from here, so it is only ever removed by hand.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from idforge.errors import DataError

log = logging.getLogger(__name__)


def lock_path(output: str | os.PathLike[str]) -> Path:
    """The lock file of ``output``: ``.<name>.lock`` beside it (not inside: the output is replaced as a whole)."""
    out = Path(output).expanduser()
    return out.with_name(f".{out.name}.lock")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


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
def output_lock(output: str | os.PathLike[str], what: str = "run") -> Iterator[Path]:
    """Hold the one-writer lock of local ``output`` for the block; yields the lock file's path.

    Raises:
        DataError: another live run holds it (the message names host, pid, start time and the file to delete).
    """
    path = lock_path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    me = {"host": host, "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
          "what": what}
    if not _try_create(path, me):
        held = _holder(path)
        if held.get("host") == host and isinstance(held.get("pid"), int) and not _alive(held["pid"]):
            log.warning("%s: taking over the stale lock %s of pid %d (no longer running on %s)", what, path,
                        held["pid"], host)
            path.unlink(missing_ok=True)
        if not _try_create(path, me):
            held = _holder(path) or held
            raise DataError(
                f"{output} is being written by another {held.get('what', 'run')} (host {held.get('host', '?')}, "
                f"pid {held.get('pid', '?')}, started {held.get('started', '?')}); wait for it, or if that run is "
                f"gone delete the lock file {path}")
    try:
        yield path
    finally:
        if _holder(path).get("pid") == me["pid"]:
            path.unlink(missing_ok=True)
