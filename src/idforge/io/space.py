"""Free-space checks before the long part: a stage that writes large outputs compares the free space where they go
with an estimate (items x bytes per item) and fails at once, naming the path, the free space and the estimate,
instead of hours later with a full disk.

The per-item estimates are upper bounds of what each stage writes per item, from sizes known before any work (the
crop size, the model's latent size, the image size): a bound, because refusing a run that would have fitted costs a
config change while a run that fills the disk costs the hours it ran.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from idforge.errors import DataError, StorageError

__all__ = ["check_free_space", "curated_file_bytes", "prepared_item_bytes", "png_bytes", "count_files",
           "DISK_FULL", "disk_full_errno", "clear_disk_full"]

DISK_FULL = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})  # a full disk, a file size limit, a full quota
_OS_ERROR = re.compile(r"\(os error (\d+)\)")

_RECORD_BYTES = 4096  # a sidecar/metadata record, a safetensors header: small, but per item


def _existing(where: Path) -> Path:
    """``where`` or its nearest existing ancestor (outputs are often created only when the first file lands)."""
    p = Path(os.path.abspath(where))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_free_space(where: str | os.PathLike[str], items: int, bytes_per_item: int, what: str = "run", *,
                     unit: str = "files") -> None:
    """Fail when ``where`` (created or not) has less free space than ``items * bytes_per_item``.

    Raises:
        DataError: ``{what} output {where} has F MB free, the run needs about E MB (N units x K kB); ...``.
        ValueError: a negative count or size (a bug in the caller's estimate, not bad input).
    """
    if items < 0 or bytes_per_item < 0:
        raise ValueError(f"check_free_space: items ({items}) and bytes_per_item ({bytes_per_item}) must be >= 0")
    estimate = items * bytes_per_item
    if estimate == 0:
        return
    free = shutil.disk_usage(_existing(Path(where))).free
    if free < estimate:
        raise DataError(f"{what} output {where} has {free / 1e6:.0f} MB free, the run needs about "
                        f"{estimate / 1e6:.0f} MB ({items} {unit} x {bytes_per_item / 1e3:.0f} kB); free space "
                        "there or choose another output")


def curated_file_bytes(ffhq_size: int, photo_side: int = 0) -> int:
    """Per input file of ``curate``: one face's FFHQ-size crop, two masks and the matte as PNG, bounded by 4 bytes
    per pixel of the FFHQ-size crop (PNG of photos compresses below that), plus the 112 px ArcFace crop, plus the
    kept upright photo (JPEG q95 of at most ``photo_side`` = ``decode.max_side``: about half a byte per pixel of the
    square bound, as a 4:3 photo at q95 takes ~0.7 byte per pixel of its own area)."""
    return 4 * ffhq_size ** 2 + 3 * 112 ** 2 + photo_side ** 2 // 2


def prepared_item_bytes(resolution: int, *, latent_channels: int = 4, vae_scale: int = 8, dtype_bytes: int = 4,
                        flip: bool = False, clip_tokens: int = 0, clip_dim: int = 0, face_dim: int = 512) -> int:
    """Per item of ``prepare`` (one safetensors file): the latents at the model's latent size (twice with the flip
    augmentation), the face mask at that size, the CLIP pooled embedding and patch tokens, the face embedding, the
    112 px reference crop (uint8) and the landmarks."""
    side = max(resolution // vae_scale, 1)
    latents = latent_channels * side * side * dtype_bytes * (2 if flip else 1)
    mask = side * side * dtype_bytes
    clip = (clip_tokens + 1) * clip_dim * dtype_bytes
    return latents + mask + clip + face_dim * 4 + 3 * 112 * 112 + 5 * 2 * 4 + _RECORD_BYTES


def png_bytes(height: int, width: int, channels: int = 3) -> int:
    """Per generated image: an RGB PNG is at most its raw pixels (plus a little), and its JSON sidecar."""
    return channels * height * width + 2 * _RECORD_BYTES


def count_files(root: str | os.PathLike[str], pattern: str) -> int:
    """Files under ``root`` matching ``pattern`` (0 when ``root`` does not exist): what a resumed run has already."""
    root = Path(root)
    return sum(1 for _ in root.rglob(pattern)) if root.is_dir() else 0


def disk_full_errno(exc: BaseException) -> int | None:
    """The errno of ``exc`` when it says the disk (or a size limit, or a quota) is full, else None.

    Libraries written in Rust (safetensors) report I/O errors as text ("File too large (os error 27)"), not as
    OSError: the errno is read from that text.
    """
    code = exc.errno if isinstance(exc, OSError) else None
    if code is None:
        found = _OS_ERROR.search(str(exc))
        code = int(found.group(1)) if found else None
    return code if code in DISK_FULL else None


@contextlib.contextmanager
def clear_disk_full(path: str | os.PathLike[str], what: str, resume: str) -> Iterator[None]:
    """Turn a full-disk failure while writing ``path`` into one clear StorageError (path, cause, fix); ``resume``
    says what a rerun keeps. Other errors pass unchanged. Put it outside the atomic write, so the temp file is
    gone by the time the error is raised."""
    try:
        yield
    except Exception as exc:
        code = disk_full_errno(exc)
        if code is None:
            raise
        raise StorageError(f"{what}: writing {path} failed ({os.strerror(code)}): the disk or the file size limit "
                           f"is full; free space there (or choose another output) and rerun: {resume}") from exc
