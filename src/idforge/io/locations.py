"""Stage locations: a local path or an ``s3://`` URI, through one type from the command line to the stage's edge.

:func:`parse_location` is the CLI's type for every location option (a ``Path`` would fold ``s3://b/k`` into
``s3:/b/k``). Stages compute on local files, so at their edges :func:`local_input` gives a local copy of an S3 input
(:func:`~idforge.io.storage.localize`: downloaded once per content) and :func:`local_output` a local directory whose
content is uploaded to the S3 location when the stage succeeds. That directory is stable per URI and starts with
what the location already holds, so stages that resume or reuse their outputs (prepare's cache, generate) still do.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from idforge.errors import StorageError
from idforge.io.uri import is_local, is_s3_uri, local_path, parse_s3_uri

if TYPE_CHECKING:
    from idforge.config import StorageConfig

__all__ = ["parse_location", "cache_root", "local_input", "local_output", "local_output_file"]

log = logging.getLogger(__name__)


def parse_location(value: str) -> str:
    """``value`` as given if it is a local path, a ``file://`` URI or a well-formed ``s3://`` URI.

    Raises:
        StorageError (a ValueError for the CLI's parser too): empty, another scheme, or a malformed s3:// URI.
    """
    text = str(value).strip()
    if not text:
        raise _LocationError("a location is empty: give a local path or s3://bucket/prefix")
    try:
        if is_s3_uri(text):
            parse_s3_uri(text)
        elif is_local(text):
            local_path(text)
        else:
            raise StorageError(f"{text!r} is neither a local path nor an s3:// URI: use a path or s3://bucket/prefix")
    except StorageError as exc:
        raise _LocationError(str(exc)) from None
    return text


class _LocationError(StorageError, ValueError):
    """Both kinds: click turns a parser's ValueError into a usage error naming the option (exit code 2)."""


def cache_root() -> Path:
    """``$IDFORGE_CACHE``, else ``~/.cache/idforge``: where S3 inputs and outputs have their local copies."""
    return Path(os.environ.get("IDFORGE_CACHE") or Path.home() / ".cache" / "idforge")


def local_input(location: str | None, storage: StorageConfig | None = None) -> Path | None:
    """The local path of an input location (None stays None); an ``s3://`` one is downloaded (once per content)."""
    if location is None:
        return None
    if not is_s3_uri(location):
        return local_path(location)
    from idforge.io.storage import localize

    return localize(location, cache_root() / "inputs", storage)


@contextlib.contextmanager
def local_output(location: str, storage: StorageConfig | None = None, *, what: str = "run",
                 prune: bool = False) -> Iterator[Path]:
    """A local directory for an output location: the path itself, or for ``s3://`` a per-URI working copy that is
    first synced from the location and, when the block exits without an exception, uploaded to it (files whose
    content already matches are skipped both ways; the manifest/index goes last, see ``Storage.upload_dir``).

    For ``s3://`` the whole block holds the location's lease (``idforge.io.lock``, ``what`` names the stage in the
    message another run gets), so two runs never share the working copy or interleave uploads. ``prune`` deletes
    the objects the stage removed from the working copy, after the upload: only for stages that own every object
    under the location (not train, whose Ray checkpoints are written straight to ``<location>/ray``).
    """
    if not is_s3_uri(location):
        yield local_path(location)
        return
    from idforge.io.lock import output_lock
    from idforge.io.storage import open_storage

    with output_lock(location, what, storage):
        store = open_storage(location, storage)
        work = cache_root() / "outputs" / hashlib.sha256(location.rstrip("/").encode()).hexdigest()[:16]
        work.mkdir(parents=True, exist_ok=True)
        if store.exists(location):
            store.download_dir(location, work)
        yield work
        synced = store.upload_dir(work, location, prune=prune)
        log.info("uploaded %d file(s) to %s (%d unchanged, %d stale deleted)", len(synced.copied), location,
                 len(synced.skipped), len(synced.deleted))


@contextlib.contextmanager
def local_output_file(location: str, storage: StorageConfig | None = None) -> Iterator[Path]:
    """A local path for a one-file output: the path itself, or for ``s3://`` a temporary file that is uploaded to
    the object when the block exits without an exception (nothing is uploaded otherwise)."""
    if not is_s3_uri(location):
        yield local_path(location)
        return
    import tempfile

    from idforge.io.storage import open_storage

    store = open_storage(location, storage)
    with tempfile.TemporaryDirectory(prefix="idforge-out-") as tmp:
        path = Path(tmp) / location.rstrip("/").rsplit("/", 1)[-1]
        yield path
        store.put_file(path, location)

