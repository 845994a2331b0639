"""A resolved config as MLflow params (flattened, dotted keys) plus the YAML itself as an artifact."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from idforge.errors import ConfigError
from idforge.redact import redact
from idforge.track.runs import active_run_id

__all__ = ["flatten_config", "log_config"]

log = logging.getLogger(__name__)

# mlflow.utils.validation.MAX_PARAM_VAL_LENGTH in the pinned MLflow; read from there when mlflow is importable.
_FALLBACK_MAX_PARAM_LEN = 6000
_ELLIPSIS = "..."


def _max_param_len() -> int:
    try:
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH
    except ImportError:  # tracking extras not installed: flattening still works
        return _FALLBACK_MAX_PARAM_LEN
    return int(MAX_PARAM_VAL_LENGTH)


def _as_param(value: Any) -> str:
    # Strings as they are; everything else in JSON, so params read like the YAML (true, null, [1, 2]).
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


def flatten_config(cfg: BaseModel | Mapping[str, Any], max_len: int | None = None) -> dict[str, str]:
    """``{"train.lr": "0.0001", ...}``: nested sections become dotted keys, leaves become strings.

    Lists stay one JSON value; empty sections become ``"{}"``. Values longer than MLflow's limit (``max_len``,
    default ``mlflow.utils.validation.MAX_PARAM_VAL_LENGTH``) are cut and end with ``...``.
    """
    # Params are visible to everyone who can read the experiment: no URL keeps its password here.
    data = redact(cfg.model_dump(mode="json") if isinstance(cfg, BaseModel) else dict(cfg))
    limit = _max_param_len() if max_len is None else max_len
    out: dict[str, str] = {}

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, Mapping) and value:
                walk(value, f"{name}.")
            else:
                text = _as_param(value)
                out[name] = text if len(text) <= limit else text[: limit - len(_ELLIPSIS)] + _ELLIPSIS

    walk(data, "")
    return out


def log_config(cfg: BaseModel | Mapping[str, Any], artifact_file: str = "config.resolved.yaml") -> dict[str, str]:
    """Log ``cfg`` to the active run as params and as a YAML artifact; returns the params (no run: logs nothing).

    Raises:
        ConfigError: the run (a resumed one) already holds a param with a different value; MLflow params are
            write-once, so a changed config needs a new run.
    """
    params = flatten_config(cfg)
    run_id = active_run_id()
    if run_id is None:
        log.debug("no active MLflow run: config not logged")
        return params
    import mlflow
    import yaml
    from mlflow.exceptions import MlflowException

    from idforge.config import dump_config

    text = dump_config(cfg) if isinstance(cfg, BaseModel) else yaml.safe_dump(redact(dict(cfg)), sort_keys=False)
    try:
        mlflow.log_params(params)
    except MlflowException as exc:
        raise ConfigError(
            f"MLflow run {run_id} already has params with other values ({str(exc.message).splitlines()[0][:300]}); "
            "start a new run for a changed config"
        ) from None
    mlflow.log_text(text, artifact_file)
    return params
