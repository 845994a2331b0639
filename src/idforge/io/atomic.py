"""Atomic local writes: write to a temporary sibling, fsync, then rename, so readers never see half a file; directories
are swapped in with no moment where the target is missing (:func:`replace_dir`)."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

RENAME_EXCHANGE = 2  # linux/fs.h: swap the two names atomically (both must exist)
_AT_FDCWD = -100
_SYS_RENAMEAT2 = {"x86_64": 316, "aarch64": 276, "arm64": 276, "ppc64le": 357, "s390x": 347}


def _exchange(a: Path, b: Path) -> bool:
    """Swap the directories ``a`` and ``b`` in one step with Linux's ``renameat2(RENAME_EXCHANGE)``.

    Returns False (nothing changed) where that is unavailable: not Linux, a libc without the call and an unknown
    syscall number, or a filesystem that does not implement it (EINVAL/ENOSYS/EOPNOTSUPP: NFS, some FUSE); other
    errors raise OSError.
    """
    import ctypes
    import errno
    import platform

    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    args = (_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE)
    fn = getattr(libc, "renameat2", None)  # glibc >= 2.28
    if fn is not None:
        rc = fn(ctypes.c_int(args[0]), ctypes.c_char_p(args[1]), ctypes.c_int(args[2]), ctypes.c_char_p(args[3]),
                ctypes.c_uint(args[4]))
    elif platform.machine() in _SYS_RENAMEAT2:
        rc = libc.syscall(ctypes.c_long(_SYS_RENAMEAT2[platform.machine()]), ctypes.c_int(args[0]),
                          ctypes.c_char_p(args[1]), ctypes.c_int(args[2]), ctypes.c_char_p(args[3]),
                          ctypes.c_uint(args[4]))
    else:
        return False
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def stale_old_dirs(dst: str | os.PathLike[str]) -> list[Path]:
    """The ``.<name>.old-*`` siblings of ``dst`` a run killed inside :func:`replace_dir` left behind."""
    dst = Path(dst)
    return sorted(dst.parent.glob(f".{dst.name}.old-*"))


def replace_dir(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Move directory ``src`` onto ``dst``, replacing any existing ``dst`` with no moment where ``dst`` is missing.

    ``os.replace`` cannot replace a non-empty directory, and moving the old one aside first leaves a window where
    a reader (a training job opening ``dst/manifest.parquet``) finds nothing. On Linux the two names are instead
    exchanged in one ``renameat2(RENAME_EXCHANGE)``: every path lookup resolves to the old or to the new directory.
    The old content then sits at ``.<name>.old-<pid>`` until it is removed (a kill in between leaves that directory;
    :func:`stale_old_dirs` finds it for the next run to remove). Where the exchange is unavailable (another OS, NFS)
    it falls back to the two renames, with their short gap.
    """
    src, dst = Path(src), Path(dst)
    if not (dst.is_dir() and not dst.is_symlink()):
        os.replace(src, dst)  # nothing to swap with (or a file/symlink): one atomic rename
        return
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    if old.exists():
        shutil.rmtree(old)
    if _exchange(src, dst):
        os.replace(src, old)  # src now holds the previous content: out of the caller's way under the .old- name
    else:
        os.replace(dst, old)
        os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``, on error removed.

    Works for files and for directories (the caller creates whichever it needs at the yielded path).
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()  # the caller decides whether it becomes a file or a directory
    try:
        yield tmp
        if tmp.is_dir():
            replace_dir(tmp, final)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    return atomic_write_bytes(path, text.encode(encoding))
