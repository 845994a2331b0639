"""Per-photo captions beside the input photos, carried into the manifest's ``caption`` column.

Two layouts (both may be used; a ``captions.csv`` entry wins over a sidecar):

- ``captions.csv`` at the input root: columns ``caption`` and one of ``source`` / ``file`` / ``path`` naming the
  photo by its path relative to the input root (or by its bare file name when that is unique);
- kohya-style sidecars: ``photo.txt`` next to ``photo.jpg``, holding the caption.

Caption files are not photos: they are kept out of the curation's inputs. A ``captions.csv`` row naming a photo
that is not in the input is an error (a typo would otherwise drop a caption silently).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path, PurePosixPath

from idforge.errors import DataError

CAPTIONS_CSV = "captions.csv"
SIDECAR_SUFFIX = ".txt"


def caption_files(rels: list[str]) -> set[str]:
    """Which of the input files ``rels`` (relative paths) are captions rather than photos: ``captions.csv`` at the
    root, and a ``.txt`` beside a file of the same stem (its photo). Any other ``.txt`` is an input like every
    file, so it ends in the rejects with a reason instead of vanishing."""
    stems: dict[tuple[str, str], int] = {}
    for rel in rels:
        path = PurePosixPath(rel)
        if path.suffix.lower() != SIDECAR_SUFFIX:
            stems[(str(path.parent), path.stem)] = stems.get((str(path.parent), path.stem), 0) + 1
    out = set()
    for rel in rels:
        path = PurePosixPath(rel)
        if rel == CAPTIONS_CSV or (path.suffix.lower() == SIDECAR_SUFFIX and (str(path.parent), path.stem) in stems):
            out.add(rel)
    return out


def read_captions(root: Path, rels: list[str]) -> dict[str, str]:
    """``{rel: caption}`` for the photos ``rels`` (paths relative to the folder ``root``) that have a caption."""
    if not root.is_dir():
        return {}

    def read_text(rel: str) -> str | None:
        path = root / rel
        return path.read_text(encoding="utf-8", errors="replace") if path.is_file() else None

    return captions_from(read_text, rels, str(root))


def captions_from(read_text: Callable[[str], str | None], rels: list[str], where: str) -> dict[str, str]:
    """``{rel: caption}`` for the photos ``rels``, reading the caption files through ``read_text(rel)`` (their text,
    or None where there is no such file): one rule for a local folder and an object-store prefix (``where``, named
    in errors)."""
    import io

    import pandas as pd

    out: dict[str, str] = {}
    for rel in rels:
        side = str(PurePosixPath(rel).with_suffix(SIDECAR_SUFFIX))
        if side != rel:  # an orphan .txt is an input, not its own caption
            raw = read_text(side)
            text = " ".join((raw or "").split())
            if text:
                out[rel] = text
    raw_csv = read_text(CAPTIONS_CSV)
    if raw_csv is None:
        return out
    csv = f"{where.rstrip('/')}/{CAPTIONS_CSV}"
    table = pd.read_csv(io.StringIO(raw_csv), dtype=str, keep_default_na=False)
    col = next((c for c in ("source", "file", "path") if c in table.columns), None)
    if col is None or "caption" not in table.columns:
        raise DataError(f"{csv} needs a 'caption' column and one of 'source', 'file' or 'path' (got "
                        f"{list(table.columns)})")
    by_name: dict[str, list[str]] = {}
    for rel in rels:
        by_name.setdefault(PurePosixPath(rel).name, []).append(rel)
    known = set(rels)
    unknown = []
    for name, caption in zip(table[col], table["caption"], strict=True):
        key = PurePosixPath(str(name).strip().lstrip("./")).as_posix()
        rel = key if key in known else (by_name.get(key, [None])[0] if len(by_name.get(key, [])) == 1 else None)
        if rel is None:
            unknown.append(str(name))
            continue
        text = " ".join(str(caption).split())
        if text:
            out[rel] = text
    if unknown:
        raise DataError(f"{csv} names {len(unknown)} photo(s) not in the input (or ambiguous by file name): "
                        f"{unknown[:5]}; use paths relative to the input folder")
    return out


__all__ = ["CAPTIONS_CSV", "caption_files", "captions_from", "read_captions"]
