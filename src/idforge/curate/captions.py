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


def is_caption_file(rel: str) -> bool:
    """True for the files this module reads (never curated as photos)."""
    return rel == CAPTIONS_CSV or rel.lower().endswith(SIDECAR_SUFFIX)


def read_captions(root: Path, rels: list[str]) -> dict[str, str]:
    """``{rel: caption}`` for the photos ``rels`` (paths relative to ``root``) that have a caption."""
    import pandas as pd

    out: dict[str, str] = {}
    if not root.is_dir():
        return out
    for rel in rels:
        side = (root / rel).with_suffix(SIDECAR_SUFFIX)
        if side.is_file():
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


__all__ = ["CAPTIONS_CSV", "is_caption_file", "read_captions"]
