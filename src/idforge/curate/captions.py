"""Per-photo captions beside the input photos, carried into the manifest's ``caption`` column.

Two layouts (both may be used; a ``captions.csv`` entry wins over a sidecar):

- ``captions.csv`` at the input root: columns ``caption`` and one of ``source`` / ``file`` / ``path`` naming the
  photo by its path relative to the input root (or by its bare file name when that is unique);
- kohya-style sidecars: ``photo.txt`` next to ``photo.jpg``, holding the caption.

Caption files are not photos: they are kept out of the curation's inputs. A ``captions.csv`` row naming a photo
that is not in the input is an error (a typo would otherwise drop a caption silently).
"""

from __future__ import annotations

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
    """``{rel: caption}`` for the photos ``rels`` (paths relative to ``root``) that have a caption."""
    import pandas as pd

    out: dict[str, str] = {}
    if not root.is_dir():
        return out
    for rel in rels:
        side = (root / rel).with_suffix(SIDECAR_SUFFIX)
        if side.is_file() and side != root / rel:  # an orphan .txt is an input, not its own caption
            text = " ".join(side.read_text(encoding="utf-8", errors="replace").split())
            if text:
                out[rel] = text
    csv = root / CAPTIONS_CSV
    if not csv.is_file():
        return out
    table = pd.read_csv(csv, dtype=str, keep_default_na=False)
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


__all__ = ["CAPTIONS_CSV", "caption_files", "read_captions"]
