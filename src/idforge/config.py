"""Typed configuration: pydantic models loaded from YAML, overridable with ``--set key.path=value``.

Every section forbids unknown keys, so a typo fails at load time with the key and the allowed names,
instead of being silently ignored by a stage that never reads it.

Stage sections live beside the stage that reads them (``idforge.curate.config`` and so on) and are
composed here; those modules import nothing heavier than pydantic, so loading a config stays instant.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, Field, ValidationError

from idforge.config_section import Section
from idforge.curate.config import CurateConfig
from idforge.errors import ConfigError
from idforge.evaluate.config import EvaluateConfig, GenerateConfig
from idforge.train.config import PrepareConfig, TrainConfig
from idforge.train.finetune_config import FinetuneConfig

__all__ = [
    "Section",
    "RunConfig",
    "StorageConfig",
    "TrackingConfig",
    "ModelConfig",
    "IdforgeConfig",
    "load_config",
    "load_config_text",
    "apply_overrides",
    "dump_config",
    "write_resolved_config",
]

M = TypeVar("M", bound=BaseModel)


class RunConfig(Section):
    name: str = "idforge"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Where stage outputs go when a command is not given an explicit --output.
    output_root: str = "outputs"


class StorageConfig(Section):
    """S3/MinIO connection. Credentials come from the environment, never from a config file."""

    endpoint: str | None = Field(default=None, description="host:port of the S3 API; None = AWS default / local only")
    secure: bool = Field(default=False, description="TLS for a bare host:port endpoint (https:// / http:// set it)")
    ca_bundle: str | None = Field(
        default=None, description="PEM file of the CA that signs the endpoint's certificate (a private CA); "
        "None = $SSL_CERT_FILE, else the certifi bundle. Every S3 client honours it (minio, pyarrow/Ray, s3fs, DVC)")
    region: str | None = None
    access_key_env: str = "AWS_ACCESS_KEY_ID"
    secret_key_env: str = "AWS_SECRET_ACCESS_KEY"
    retry_total_s: float = Field(
        default=60.0, ge=0, description="how long S3 calls keep retrying connection errors, 5xx and SlowDown "
        "(exponential backoff with full jitter) before failing: the default rides out ~60 s of outage")
    retry_base_s: float = Field(default=0.5, gt=0, description="first backoff wait; doubles per attempt")
    retry_max_wait_s: float = Field(default=8.0, gt=0, description="cap on one backoff wait")


class TrackingConfig(Section):
    """MLflow. ``uri`` None means: ``$MLFLOW_TRACKING_URI`` if set, else ``sqlite:///mlruns.db`` in the CWD."""

    uri: str | None = None
    experiment: str = "idforge"
    artifact_location: str | None = None
    enabled: bool = True


class ModelConfig(Section):
    """Base models. Each is a hub id or a local directory (see ``idforge.diffusion.loading``)."""

    base: str = "runwayml/stable-diffusion-v1-5"
    kind: Literal["auto", "sd15", "sd21", "sdxl"] = "auto"
    revision: str | None = None
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    clip: str = "openai/clip-vit-base-patch16"
    # Fail fast instead of trying a hub: the default, because no machine of ours reaches one.
    local_files_only: bool = True


class IdforgeConfig(Section):
    """The root config: one section per concern. Stage sections are defined beside their stage."""

    run: RunConfig = Field(default_factory=RunConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    curate: CurateConfig = Field(default_factory=CurateConfig)
    prepare: PrepareConfig = Field(default_factory=PrepareConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)


# ----------------------------------------------------------------------------------------------------------------
# loading, overriding, dumping


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top, got {type(data).__name__}")
    return data


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.path=value (e.g. --set train.lr=1e-4)")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {item!r} has an empty key")
    # YAML parsing gives ints, floats, bools, null and lists for free; `1e-4` is a str in YAML 1.1, so try float.
    value = yaml.safe_load(raw) if raw.strip() else ""
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") and value.lower() not in {"nan", "inf"} else value
        except ValueError:
            pass
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return ``data`` with each ``a.b.c=value`` override applied (values parsed as YAML scalars/lists)."""
    out = _deep_merge({}, data)
    for item in overrides:
        parts, value = _parse_override(item)
        node = out
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return out


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str] | None:
    """Field names of the section that ``loc`` (minus its last element) points into."""
    current: Any = model
    for part in loc[:-1]:
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return None
        current = fields[part].annotation
    fields = getattr(current, "model_fields", None)
    return sorted(fields) if fields else None


def format_validation_error(exc: ValidationError, model: type[BaseModel], source: str) -> str:
    """One line per problem, each naming the dotted key and what is allowed there."""
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        key = ".".join(str(p) for p in loc)
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, loc) or []
            hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            did_you_mean = f" (did you mean {'.'.join([*map(str, loc[:-1]), hint[0]])!r}?)" if hint else ""
            lines.append(f"unknown config key {key!r}{did_you_mean}; allowed here: {', '.join(allowed)}")
        else:
            lines.append(f"config key {key!r}: {err['msg']} (got {err.get('input')!r})")
    return f"invalid config from {source}: " + "; ".join(lines)


def validate_config(data: Mapping[str, Any], model: type[M] = IdforgeConfig, source: str = "<dict>") -> M:  # type: ignore[assignment]
    try:
        return model.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, model, source)) from None


def load_config(
    paths: Iterable[str | os.PathLike[str]] = (),
    overrides: Iterable[str] = (),
    model: type[M] = IdforgeConfig,  # type: ignore[assignment]
    preset: str | None = None,
) -> M:
    """Merge the ``preset`` (``idforge.presets``) first, then YAML files left to right, then ``--set`` overrides;
    validate.

    Raises:
        ConfigError: a file is missing or malformed, a key is unknown, a value has the wrong type, or the preset is
            unknown; the message names the key and the allowed names or values.
    """
    data: dict[str, Any] = {}
    sources = []
    if preset:
        from idforge.presets import read_preset

        data = read_preset(preset)
        sources.append(f"preset {preset}")
    for p in paths:
        data = _deep_merge(data, _read_yaml(Path(p)))
        sources.append(str(p))
    overrides = list(overrides)
    data = apply_overrides(data, overrides)
    if overrides:
        sources.append("--set " + " ".join(overrides))
    return validate_config(data, model, " + ".join(sources) or "defaults")


def load_config_text(text: str, overrides: Iterable[str] = (), source: str = "<yaml text>") -> IdforgeConfig:
    """Validate a config given as YAML text (how pipeline components receive it), then apply overrides."""
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config from {source} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config from {source} must hold a mapping at the top, got {type(data).__name__}")
    return validate_config(apply_overrides(data, overrides), IdforgeConfig, source)


def dump_config(cfg: BaseModel) -> str:
    """The fully resolved config as YAML (every default spelled out), with no URL keeping its password: this text
    is what resolved-config files, MLflow artifacts, pipeline parameters and Ray job environments hold."""
    from idforge.redact import redact

    return yaml.safe_dump(redact(cfg.model_dump(mode="json")), sort_keys=False)


def write_resolved_config(cfg: BaseModel, out_dir: str | os.PathLike[str], name: str = "config.resolved.yaml") -> Path:
    """Record the resolved config next to a run's outputs (atomically)."""
    from idforge.io.atomic import atomic_write_text

    path = Path(out_dir) / name
    atomic_write_text(path, dump_config(cfg))
    return path
