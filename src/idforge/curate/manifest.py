"""The dataset's tables: ``manifest.parquet`` (one row per input file and face) and ``identities.parquet``.

Paths in the tables (``aligned``, ``aligned_ffhq``, ``mask``, ``person_mask``, ``matted``) are relative to the
dataset directory. ``bbox`` is (x0, y0, x1, y1) and ``landmarks5`` five (x, y) pairs, in source pixels of the
EXIF-upright image. ``embedding_row`` indexes ``embeddings.npy`` (-1: no embedding).
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


def read_manifest(dataset: str | os.PathLike[str]):
    """The manifest of a curated dataset directory as a pandas DataFrame (schema-checked)."""
    import pyarrow.parquet as pq

    path = Path(dataset) / MANIFEST
    if not path.is_file():
        raise DataError(f"{dataset} is not a curated dataset: {MANIFEST} is missing (run `idforge curate`)")
    table = pq.read_table(str(path))
    missing = set(manifest_schema().names) - set(table.schema.names)
    if missing:
        raise DataError(f"{path} lacks columns {sorted(missing)}; re-run `idforge curate` with this version")
    return table.to_pandas()


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
