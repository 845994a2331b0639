"""Files and folders as MLflow artifacts of the active run (reports, checkpoints, generated images)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from idforge.errors import DataError
from idforge.track.runs import active_run_id

__all__ = ["log_artifact", "log_artifacts", "log_html"]

log = logging.getLogger(__name__)


def log_artifact(path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
    """Log one file under ``artifact_path`` (a folder inside the run's artifacts; None = the root)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"artifact {p} is not a file; pass the path of an existing file")
    if active_run_id() is None:
        log.debug("no active MLflow run: %s not logged", p)
        return
    import mlflow

    mlflow.log_artifact(str(p), artifact_path=artifact_path)


def log_artifacts(local_dir: str | os.PathLike[str], artifact_path: str | None = None) -> None:
    """Log every file under ``local_dir`` (recursively, keeping the layout) under ``artifact_path``."""
    p = Path(local_dir)
    if not p.is_dir():
        raise DataError(f"artifact folder {p} is not a directory; pass an existing folder")
    if active_run_id() is None:
        log.debug("no active MLflow run: %s not logged", p)
        return
    import mlflow

    mlflow.log_artifacts(str(p), artifact_path=artifact_path)


def log_html(path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
    """Log an HTML report (the MLflow UI renders ``.html`` artifacts inline)."""
    p = Path(path)
    if p.suffix.lower() not in {".html", ".htm"}:
        raise DataError(f"{p} is not an .html file; log other files with log_artifact")
    log_artifact(p, artifact_path)
