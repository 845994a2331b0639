"""MLflow helpers used by every stage: runs (start, resume, nest), config as params, metrics, images, artifacts.

``mlflow`` is imported inside the functions, so importing this package stays instant. Logging helpers act on the
active run started with :func:`start_run`; outside a run they do nothing (tracking disabled), rather than letting
MLflow open a stray run in some default location.
"""

from idforge.track.artifacts import log_artifact, log_artifacts, log_html
from idforge.track.datasets import log_dataset
from idforge.track.images import log_image, log_image_grid, log_image_step, make_image_grid
from idforge.track.models import log_trained_model
from idforge.track.params import flatten_config, log_config
from idforge.track.runs import (
    absolute_tracking_uri,
    active_run_id,
    artifact_location,
    close_pipeline_runs,
    describe_pipeline_run,
    experiment_url,
    log_metrics,
    start_run,
    tracking_uri,
    ui_command,
)

__all__ = [
    "absolute_tracking_uri",
    "active_run_id",
    "artifact_location",
    "close_pipeline_runs",
    "flatten_config",
    "log_artifact",
    "log_artifacts",
    "log_config",
    "log_html",
    "log_image",
    "log_image_grid",
    "log_image_step",
    "log_dataset",
    "log_trained_model",
    "describe_pipeline_run",
    "experiment_url",
    "log_metrics",
    "make_image_grid",
    "start_run",
    "tracking_uri",
    "ui_command",
]
