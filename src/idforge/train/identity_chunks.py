"""Identity chunks for the KFP ``personalize`` fan-out: plan them, give each pod only its chunk's data, and gather
an index of the artifacts instead of copying them.

- ``chunk_identities``: the sorted identities cut into chunks of ``identities_per_task`` (one pod each, one base
  load per pod: ``identity_worker.BaseWorker``).
- ``localize_subset``: a curated dataset (a local directory or an ``s3://`` prefix) reduced to some identities:
  their accepted manifest rows, the files those rows name, their embedding rows (renumbered) and their
  ``identities.parquet`` rows, written as a curated dataset of its own. Only the metadata (manifest, identities
  table, embeddings: O(N) small rows) is read whole; image files are fetched for the chunk's rows alone.
- ``write_index`` / ``read_index`` / ``materialize_index``: the gathered model is ``artifacts.index.json`` mapping
  each identity to its artifact's URI (``<chunk model uri>/<identity>``); a consumer fetches the artifacts it
  needs from there, so no pod ever holds every identity's artifact just to pass them on.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from idforge.errors import DataError
from idforge.io.identity import check_identity, identity_path

if TYPE_CHECKING:
    from idforge.io.storage import Storage

INDEX_FILE = "artifacts.index.json"
# manifest columns that name a file of the dataset (relative paths); the rest is metadata
FILE_COLUMNS = ("aligned", "aligned_112", "aligned_ffhq", "mask", "person_mask", "matted")
METADATA = ("identities.parquet", "embeddings.npy")


def chunk_identities(identities: Sequence[str], identities_per_task: int) -> list[list[str]]:
    """``identities`` in order, cut into consecutive chunks of ``identities_per_task`` (the last may be shorter).

    Raises ``ValueError`` when ``identities_per_task`` < 1.
    """
    if identities_per_task < 1:
        raise ValueError(f"identities_per_task={identities_per_task} must be >= 1 (identities per fine-tune pod)")
    ids = list(identities)
    return [ids[i:i + identities_per_task] for i in range(0, len(ids), identities_per_task)]


def _join(root: str, rel: str) -> str:
    from idforge.io.uri import is_s3_uri, join_uri

    return join_uri(root, rel) if is_s3_uri(root) else str(Path(root) / rel)


def _metadata(storage: Storage, dataset_uri: str, work: Path) -> Path:
    """The dataset's metadata (manifest, identities table, embeddings) as local files under ``work``."""
    from idforge.io.storage import LocalStorage

    if isinstance(storage, LocalStorage):
        from idforge.io.uri import local_path

        return local_path(dataset_uri)
    work.mkdir(parents=True, exist_ok=True)
    manifest = _join(dataset_uri, "manifest.parquet")
    if storage.exists(manifest) and not storage.list(manifest):  # a single parquet file
        storage.get_file(manifest, work / "manifest.parquet")
    else:
        storage.download_dir(manifest, work / "manifest.parquet")
    for name in METADATA:
        if storage.exists(_join(dataset_uri, name)):
            storage.get_file(_join(dataset_uri, name), work / name)
    return work


def plan_chunks(dataset_uri: str, identities_per_task: int, first: int = 0, max_identities: int = 0,
                storage_cfg: Any = None) -> list[list[str]]:
    """The sorted identities of ``dataset_uri`` from ``first`` (``max_identities`` of them; 0 = all), in chunks.

    Raises ``ValueError`` for negative ``first``/``max_identities``; ``DataError`` when it is not curated.
    """
    from idforge.io.storage import open_storage
    from idforge.train.per_identity import list_identities

    if first < 0 or max_identities < 0:
        raise ValueError(f"first={first} and max_identities={max_identities} must be >= 0")
    with tempfile.TemporaryDirectory(prefix="idforge-plan-") as td:
        root = _metadata(open_storage(dataset_uri, storage_cfg), dataset_uri, Path(td) / "meta")
        ids = list_identities(root)[first:]
    return chunk_identities(ids[:max_identities] if max_identities > 0 else ids, identities_per_task)


def localize_subset(dataset_uri: str, identities: Sequence[str], dest: str | os.PathLike[str],
                    storage_cfg: Any = None) -> Path:
    """Write the curated dataset made of ``identities`` of ``dataset_uri`` at ``dest`` (replaced atomically).

    Raises ``DataError`` naming the identities the dataset lacks, or the dataset when it is not curated.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    from idforge.curate.manifest import is_curated, manifest_path
    from idforge.io.atomic import atomic_path
    from idforge.io.storage import LocalStorage, open_storage

    wanted = sorted({check_identity(i, "identity chunk") for i in identities})
    if not wanted:
        raise DataError("localize_subset: no identities given; pass the chunk's identity ids")
    storage = open_storage(dataset_uri, storage_cfg)
    out = Path(dest)
    with tempfile.TemporaryDirectory(prefix="idforge-subset-") as td:
        meta = _metadata(storage, dataset_uri, Path(td) / "meta")
        if not is_curated(meta):
            raise DataError(f"{dataset_uri} is not a curated dataset (no manifest.parquet); run idforge curate")
        ds = pads.dataset(str(manifest_path(meta)), format="parquet")
        expr = pads.field("identity").isin(wanted) & (pads.field("status") == "accepted")
        table = ds.to_table(filter=expr)
        have = set(table.column("identity").to_pylist())
        missing = [i for i in wanted if i not in have]
        if missing:
            raise DataError(f"identities {missing[:5]} have no accepted rows in {dataset_uri}; plan the chunks from "
                            "this dataset's own identities")
        files = sorted({v for c in FILE_COLUMNS if c in table.column_names
                        for v in table.column(c).to_pylist() if isinstance(v, str) and v})
        with atomic_path(out) as tmp:
            tmp.mkdir(parents=True)
            for rel in files:  # only this chunk's images leave storage
                if Path(rel).is_absolute() or ".." in Path(rel).parts:
                    raise DataError(f"manifest of {dataset_uri} names {rel!r}, outside the dataset; re-curate it")
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                if isinstance(storage, LocalStorage):
                    shutil.copyfile(meta / rel, target)
                else:
                    storage.get_file(_join(dataset_uri, rel), target)
            if "embedding_row" in table.column_names and (meta / "embeddings.npy").is_file():
                rows = np.asarray(table.column("embedding_row").to_pylist())
                embeddings = np.load(meta / "embeddings.npy", mmap_mode="r")
                np.save(tmp / "embeddings.npy", np.ascontiguousarray(embeddings[rows]))
                table = table.set_column(table.column_names.index("embedding_row"), "embedding_row",
                                         pa.array(np.arange(len(rows)), type=table.schema.field("embedding_row").type))
            pq.write_table(table, str(tmp / "manifest.parquet"))
            if (meta / "identities.parquet").is_file():
                ids = pq.read_table(meta / "identities.parquet")
                pq.write_table(ids.filter(pads.field("identity").isin(wanted)), str(tmp / "identities.parquet"))
    return out


# ----------------------------------------------------------------------------------------------------------------
# the gathered index


def write_index(entries: dict[str, str], out_dir: str | os.PathLike[str], method: str) -> Path:
    """``<out_dir>/artifacts.index.json``: ``{"method", "artifacts": {identity: artifact uri}}``, sorted."""
    from idforge.io.atomic import atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / INDEX_FILE
    atomic_write_text(path, json.dumps({"method": method, "artifacts": dict(sorted(entries.items()))}, indent=2))
    return path


def merge_indexes(parts: Sequence[dict[str, str]]) -> dict[str, str]:
    """One ``{identity: uri}`` from the chunks' indexes; ``DataError`` if two chunks name one identity."""
    merged: dict[str, str] = {}
    for part in parts:
        for identity, uri in part.items():
            check_identity(identity, "artifact index")
            if identity in merged and merged[identity] != uri:
                raise DataError(f"identity {identity!r} was trained by two chunks ({merged[identity]} and {uri}); "
                                "plan chunks that do not overlap")
            merged[identity] = uri
    return merged


def read_index(model_dir: str | os.PathLike[str]) -> dict[str, str] | None:
    """The ``{identity: uri}`` of a gathered model directory, or None when it holds no index."""
    path = Path(model_dir) / INDEX_FILE
    if not path.is_file():
        return None
    try:
        return dict(json.loads(path.read_text())["artifacts"])
    except (ValueError, KeyError, TypeError):
        raise DataError(f"{path} is not an artifact index (needs an 'artifacts' mapping); re-run the gather step"
                        ) from None


def materialize_index(model_dir: str | os.PathLike[str], dest: str | os.PathLike[str],
                      storage_cfg: Any = None, identities: Sequence[str] | None = None) -> Path:
    """``dest/<identity>/`` for every identity of the index in ``model_dir`` (or ``identities`` of it), fetched
    from each artifact's URI: the per-identity directory layout ``generate`` reads. Returns ``dest``.

    Raises ``DataError`` when ``model_dir`` has no index or lacks a requested identity.
    """
    from idforge.io.storage import LocalStorage, open_storage

    index = read_index(model_dir)
    if index is None:
        raise DataError(f"{model_dir} has no {INDEX_FILE}; pass the gather step's model")
    want = list(identities) if identities is not None else sorted(index)
    missing = [i for i in want if i not in index]
    if missing:
        raise DataError(f"the artifact index in {model_dir} has no identities {missing[:5]}")
    root = Path(dest)
    root.mkdir(parents=True, exist_ok=True)
    for identity in want:
        target = identity_path(root, identity)
        if (target / "DONE").is_file():
            continue
        uri = index[identity]
        storage = open_storage(uri, storage_cfg)
        if isinstance(storage, LocalStorage):
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(uri, target)
        else:
            storage.download_dir(uri, target)
    return root
