"""Datasets as MLflow run inputs: which curated (or prepared) dataset a run read, by location and content digest.

MLflow shows a run's inputs in the runs table and on the run page; logging them lets a reviewer see at a glance that
two runs trained on the same data (same digest) or not. Only metadata is logged (``MetaDataset``): never the data.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

#: files whose bytes define a dataset's content, by kind (curated: the manifest; prepared: its index)
_CONTENT_FILES = ("manifest.parquet", "identities.parquet", "embeddings.npy", "index.json")


def dataset_digest(location: str | os.PathLike[str]) -> str:
    """A short content digest of a local dataset directory: sha256 over its manifest/index files (a manifest
    directory's parts in sorted order), first 16 hex digits. Same content -> same digest, wherever it lies."""
    root = Path(location)
    h = hashlib.sha256()
    for name in _CONTENT_FILES:
        path = root / name
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            if f.is_file():
                h.update(f.relative_to(root).as_posix().encode())
                with open(f, "rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 20), b""):
                        h.update(chunk)
    return h.hexdigest()[:16]


def log_dataset(location: str | os.PathLike[str], context: str, name: str | None = None) -> None:
    """Log ``location`` as an input of the active run (``context``: training | evaluation | pipeline).

    A remote location (``s3://``) is logged by its URI, digested by its URI alone; nothing is logged without an
    active run.
    """
    import mlflow

    if mlflow.active_run() is None:
        return
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    uri = str(location)
    remote = "://" in uri
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16] if remote else dataset_digest(uri)
    if not remote:
        uri = str(Path(uri).resolve())
    with warnings.catch_warnings():  # resolve_dataset_source warns that it guesses the source type: we know it
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(uri)
    dataset = MetaDataset(source, name=name or Path(uri.rstrip("/")).name, digest=digest)
    for attempt in range(3):
        try:
            mlflow.log_input(dataset, context=context)
            break
        except mlflow.exceptions.MlflowException as exc:
            # Runs started at once (per-identity workers) insert the same dataset row: the losers hit the store's
            # unique constraint, and a retry finds the row and links it. Never fatal: it is an input annotation.
            if attempt == 2:
                log.warning("could not log dataset %s as an input of the run: %s", uri, exc)
                return
            time.sleep(0.2 * (attempt + 1))
    log.debug("logged dataset %s (%s) as %s input", uri, digest, context)
