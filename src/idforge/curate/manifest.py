"""The dataset's tables: ``manifest.parquet`` (one row per input file and face) and ``identities.parquet``.

Paths in the tables (``aligned``, ``aligned_ffhq``, ``mask``, ``person_mask``, ``matted``, ``photo``) are relative
to the dataset directory. ``photo`` is the EXIF-upright image as decoded (possibly downscaled to
``decode.max_side``): its pixels are ``width / photo width`` source pixels. ``bbox`` is (x0, y0, x1, y1) and
``landmarks5`` five (x, y) pairs, in source pixels of the EXIF-upright image. ``embedding_row`` indexes
``embeddings.npy`` (-1: no embedding).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from idforge.errors import DataError

MANIFEST = "manifest.parquet"
IDENTITIES = "identities.parquet"
EMBEDDINGS = "embeddings.npy"
REPORT = "report.json"
# Rows per manifest part: ~50 MB parts at a million faces, one part for any small dataset.
ROWS_PER_PART = 100_000

STATUSES = ("accepted", "rejected")
# Every reason code a row can carry (file-level, face-level, then dataset-level).
REASONS = (
    "empty_file", "too_large", "not_an_image", "unsupported_format", "animated", "decode_error", "image_too_small",
    "no_face", "too_many_faces", "extra_face", "face_too_small", "low_score", "extreme_pose", "blurry",
    "duplicate", "too_few_images",
)


def _schemas():
    import pyarrow as pa

    manifest = pa.schema([
        ("source", pa.string()),
        ("rel", pa.string()),
        ("sha256", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("face_index", pa.int32()),
        ("bbox", pa.list_(pa.float64())),  # 4 values, null on file rows
        ("landmarks5", pa.list_(pa.list_(pa.float64()))),  # 5 x (x, y)
        ("det_score", pa.float64()),
        ("size_px", pa.float64()),
        ("sharpness", pa.float64()),
        ("yaw_deg", pa.float64()),
        ("roll_deg", pa.float64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("format", pa.string()),
        ("identity", pa.string()),
        ("label", pa.string()),
        ("duplicate_of", pa.string()),
        ("aligned", pa.string()),
        ("aligned_ffhq", pa.string()),
        ("mask", pa.string()),
        ("person_mask", pa.string()),
        ("matted", pa.string()),
        ("embedding_row", pa.int64()),
        ("caption", pa.string()),  # the photo's own caption (captions.csv / sidecar .txt), "" when none
        ("photo", pa.string()),  # the upright photo of an accepted face (JPEG, <= decode.max_side), "" otherwise
    ])
    identities = pa.schema([
        ("identity", pa.string()),
        ("members", pa.int32()),
        ("centroid_row", pa.int64()),
        ("label", pa.string()),
        ("embedding_dim", pa.int32()),
    ])
    return manifest, identities


def manifest_schema():
    return _schemas()[0]


def identities_schema():
    return _schemas()[1]


def write_table(rows: list[dict], schema, path: str | os.PathLike[str]) -> Path:
    """Write ``rows`` (dicts with exactly the schema's columns) as parquet; raises DataError on a schema mismatch."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = set(schema.names)
    for row in rows:
        if set(row) != names:
            raise DataError(f"manifest row has columns {sorted(set(row) ^ names)} that differ from the schema")
    table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, str(path))
    return Path(path)


def manifest_path(dataset: str | os.PathLike[str]) -> Path:
    """Where a dataset's manifest lives: ``manifest.parquet``, a parquet dataset directory (``part-*.parquet``) or,
    as older datasets and small fixtures write it, a single parquet file."""
    return Path(dataset) / MANIFEST


def is_curated(dataset: str | os.PathLike[str]) -> bool:
    """True when ``dataset`` holds a manifest (directory or file)."""
    path = manifest_path(dataset)
    return path.is_file() or (path.is_dir() and any(path.glob("*.parquet")))


def manifest_columns(dataset: str | os.PathLike[str]) -> list[str]:
    """The manifest's column names, from its parquet footers (no rows read)."""
    import pyarrow.dataset as pads

    if not is_curated(dataset):
        raise DataError(f"{dataset} is not a curated dataset: {MANIFEST} is missing (run `idforge curate`)")
    return list(pads.dataset(str(manifest_path(dataset)), format="parquet").schema.names)


def write_manifest(rows: list[dict], dataset: str | os.PathLike[str], rows_per_part: int = ROWS_PER_PART) -> Path:
    """Write the manifest rows (in the order given) as a parquet dataset directory of ``rows_per_part``-row parts
    (``part-00000.parquet`` ...), atomically: readers see the old manifest or the whole new one."""
    from idforge.io.atomic import atomic_path

    final = manifest_path(dataset)
    with atomic_path(final) as tmp:
        tmp.mkdir()
        for part, start in enumerate(range(0, max(len(rows), 1), rows_per_part)):
            write_table(rows[start:start + rows_per_part], manifest_schema(), tmp / f"part-{part:05d}.parquet")
    return final


def read_manifest(dataset: str | os.PathLike[str], columns: list[str] | None = None, filters=None,
                  accepted_only: bool = False):
    """The manifest of a curated dataset as a pandas DataFrame, read lazily: only ``columns`` (None: all) and the
    rows passing ``filters`` (a pyarrow expression or DNF list such as ``[("identity", "=", "ann")]``) are
    materialised. ``accepted_only`` adds ``status == "accepted"``. Rows come in manifest order.

    Raises:
        DataError: no manifest, or it lacks the columns asked for (re-run ``idforge curate``).
    """
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    path = manifest_path(dataset)
    if not is_curated(dataset):
        raise DataError(f"{dataset} is not a curated dataset: {MANIFEST} is missing (run `idforge curate`)")
    ds = pads.dataset(str(path), format="parquet")
    want = list(columns) if columns is not None else list(manifest_schema().names)
    missing = sorted(set(want) - set(ds.schema.names))
    if missing:
        raise DataError(f"{path} lacks columns {missing}; re-run `idforge curate` with this version")
    expr = pq.filters_to_expression(filters) if isinstance(filters, list) else filters
    if accepted_only:
        status = pads.field("status") == "accepted"
        expr = status if expr is None else expr & status
    # a dataset's parts are listed in name order, and rows keep their order within each part
    return ds.to_table(columns=want if columns is not None else None, filter=expr).to_pandas()


def read_identities(dataset: str | os.PathLike[str]):
    import pyarrow.parquet as pq

    path = Path(dataset) / IDENTITIES
    if not path.is_file():
        raise DataError(f"{dataset} is not a curated dataset: {IDENTITIES} is missing (run `idforge curate`)")
    return pq.read_table(str(path)).to_pandas()


def load_embeddings(dataset: str | os.PathLike[str]) -> np.ndarray:
    """(N, D) float32 L2-normalised embeddings, rows referenced by the manifest's ``embedding_row``."""
    path = Path(dataset) / EMBEDDINGS
    if not path.is_file():
        raise DataError(f"{dataset} is not a curated dataset: {EMBEDDINGS} is missing (run `idforge curate`)")
    return np.load(path)
