"""The trained method as an MLflow logged model, linked to its run and its metrics.

MLflow 3 lists a run's logged models on the run page and in the experiment's Models tab; metrics logged with the
model's id appear on the model. The weights are the method's own file (``method.safetensors`` + its config), not a
servable pyfunc: serving goes through the registry (``idforge register``), which builds one from an evaluation.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from idforge.track.runs import active_run_id

log = logging.getLogger(__name__)

#: the LoggedModel's model_type, so our models are found by a filter
MODEL_TYPE = "idforge-method"


def log_trained_model(files: list[str | os.PathLike[str]], name: str, metrics: Mapping[str, Any],
                      params: Mapping[str, Any] | None = None) -> str | None:
    """Log ``files`` (the method checkpoint and what describes it) as a logged model of the active run named
    ``name``, with the finite numeric ``metrics`` linked to it; returns its model id (None without an active run)."""
    run_id = active_run_id()
    if run_id is None:
        return None
    import mlflow
    from mlflow import MlflowClient

    model = mlflow.initialize_logged_model(name=name, source_run_id=run_id, model_type=MODEL_TYPE,
                                           params={k: str(v) for k, v in (params or {}).items()})
    client = MlflowClient()
    try:
        for f in files:
            if Path(f).is_file():
                client.log_model_artifact(model.model_id, str(f))
        numbers = {k: float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}
        if numbers:
            # A model's metrics are also run metrics: logged at the final step with the final values, so the run's
            # curves gain no point of their own (a step-0 entry would wrap them round to the start).
            mlflow.log_metrics(numbers, step=int(numbers.get("step", 0)), model_id=model.model_id)
    except BaseException:
        mlflow.finalize_logged_model(model.model_id, "FAILED")
        raise
    mlflow.finalize_logged_model(model.model_id, "READY")
    log.debug("logged model %s (%s) of run %s", model.model_id, name, run_id)
    return model.model_id
