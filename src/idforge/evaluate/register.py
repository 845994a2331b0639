"""Registry gates: register an evaluated method as an MLflow model; promote it only when every gate passes.

``register_run(run_id, gates_path)`` reads the evaluation run's metrics, checks each gate of ``configs/gates.yaml``,
logs an ``IdentityGenerator`` pyfunc model into that run (the method artifact and idforge's code; the base and CLIP
models by reference, see ``pyfunc_model``; a signature with the inference params), registers it as a new version,
and moves the alias (``champion``) to it only when all gates pass. A failing gate leaves the alias where it was and
the result names every failed gate with the measured value.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from idforge.errors import ConfigError, DataError
from idforge.io.identity import identity_path

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


DEFAULT_GATES = "configs/gates.yaml"


def load_gates(path_or_text: str | os.PathLike[str]) -> Gates:
    """Read gates from a file path, or from YAML text (how pipelines pass them; "" = ``configs/gates.yaml``).

    Raises:
        ConfigError: missing file, bad YAML, unknown key or bad value (naming the source and the key).
    """
    from idforge.config import format_validation_error

    if isinstance(path_or_text, str) and not path_or_text.strip():
        path_or_text = Path(DEFAULT_GATES)
    text_given = isinstance(path_or_text, str) and ("\n" in path_or_text or path_or_text.lstrip().startswith(
        ("gates:", "alias:", "model_name:", "{")))
    source = "gates YAML text" if text_given else f"gates file {path_or_text}"
    try:
        text = str(path_or_text) if text_given else Path(path_or_text).read_text()
    except FileNotFoundError:
        raise ConfigError(f"{source} does not exist (see configs/gates.yaml)") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source} is not valid YAML: {exc}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must hold a mapping with a 'gates' list")
    try:
        return Gates.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, Gates, source)) from None


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
    # with compare_to_champion: gate metrics where the candidate is worse than the current champion
    worse_than_champion: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[GateResult]:
        return [g for g in self.gates if not g.passed]

    def summary(self) -> str:
        head = f"registered {self.model_name} version {self.version} ({self.model_uri})"
        if self.promoted:
            return f"{head}; all {len(self.gates)} gates passed: alias {self.alias!r} -> version {self.version}"
        why = []
        if self.failed:
            why.append("failed gates: " + "; ".join(str(g) for g in self.failed))
        if self.worse_than_champion:
            why.append("worse than the champion on: " + "; ".join(self.worse_than_champion))
        return f"{head}; alias {self.alias!r} left unchanged, " + "; ".join(why)


def check_gates(metrics: dict[str, float], gates: Gates) -> list[GateResult]:
    return [GateResult(g, metrics.get(g.metric), g.check(metrics.get(g.metric))) for g in gates.gates]


def register_run(run_id: str, gates_path: str | os.PathLike[str], cfg: Any = None,
                 *, model_name: str | None = None, artifact: str | os.PathLike[str] | None = None,
                 method: str | None = None, base_model: str | None = None,
                 compare_to_champion: bool = False) -> RegistrationResult:
    """Register the method evaluated in MLflow run ``run_id`` and set the alias when every gate passes.

    ``gates_path``: a gates file, or its YAML text. What to package comes from the run's ``generate.json``
    (method, artifact, base model, sampling); ``artifact``/``method``/``base_model`` override it (pipelines pass
    them, since the generation step's local paths do not exist in the registering container).
    ``compare_to_champion``: additionally require the candidate to be no worse than the current alias holder on
    every gate metric (the retrain pipeline's rule); without a champion only the gates apply.

    Raises:
        ConfigError: unknown run, bad gates. DataError: no generation record and no overrides, or the method
            artifact / base model no longer exists.
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
    gen = _generation_record(client, run_id, required=artifact is None)
    if method:
        gen["method"] = method
    if base_model:
        gen["base_model"] = base_model
    if artifact is not None:
        gen["artifacts"] = {"*": {"path": str(artifact)}}
    gen.setdefault("base_model", getattr(getattr(cfg, "model", None), "base", None))
    method_name = gen.get("method")
    if not method_name:
        raise DataError(f"run {run_id}: no method named (generate.json has none): pass method=")
    name = model_name or gates.model_name or f"idforge-{method_name}"
    worse = _worse_than_champion(client, name, gates, dict(run.data.metrics)) if compare_to_champion else []

    with tempfile.TemporaryDirectory(prefix="idforge-register-") as tmp:
        artifacts, model_config = _model_parts(gen, Path(tmp), cfg)
        import idforge
        from idforge.evaluate.pyfunc_model import IdentityGenerator, model_signature

        with track.start_run(tcfg, run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=IdentityGenerator(),
                artifacts=artifacts,
                model_config=model_config,
                signature=model_signature(model_config["sampling"]),
                # idforge is on no package index: the version carries the code it runs (code/idforge)
                code_paths=[str(Path(idforge.__file__).parent)],
                pip_requirements=serving_requirements(),
            )
            mv = mlflow.register_model(info.model_uri, name)
    version = str(mv.version)
    passed = all(r.passed for r in results) and not worse
    gate_text = "; ".join(str(r) for r in results)
    client.set_model_version_tag(name, version, "idforge.gates", gate_text[:5000])
    client.set_model_version_tag(name, version, "idforge.gates_passed", str(passed).lower())
    client.set_model_version_tag(name, version, "idforge.evaluation_run", run_id)
    if passed:
        client.set_registered_model_alias(name, gates.alias, version)
    result = RegistrationResult(name, version, gates.alias, passed, results, info.model_uri, worse)
    (log.info if passed else log.warning)("%s", result.summary())
    return result


def _generation_record(client: Any, run_id: str, required: bool = True) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="idforge-gen-") as tmp:
        try:
            path = client.download_artifacts(run_id, "generate.json", tmp)
        except Exception:  # noqa: BLE001 - MLflow raises several types for a missing artifact
            if not required:
                return {}
            raise DataError(f"run {run_id} has no generate.json artifact: register an evaluation run "
                            "(idforge evaluate logs the generation record)") from None
        return json.loads(Path(path).read_text())


def _worse_than_champion(client: Any, name: str, gates: Gates, metrics: dict[str, float]) -> list[str]:
    """Gate metrics on which the candidate is worse than the evaluation run of the current alias holder."""
    from mlflow.exceptions import MlflowException

    try:
        champ = client.get_model_version_by_alias(name, gates.alias)
        champ_run = champ.tags.get("idforge.evaluation_run") or champ.run_id
        theirs = client.get_run(champ_run).data.metrics
    except MlflowException:
        return []  # no champion yet: the gates alone decide
    worse = []
    for g in gates.gates:
        ours, best = metrics.get(g.metric), theirs.get(g.metric)
        if best is None or math.isnan(best):
            continue
        higher_is_better = g.op in (">=", ">")
        if ours is None or math.isnan(ours) or (ours < best if higher_is_better else ours > best):
            got = "not logged" if ours is None else f"{ours:.4f}"
            worse.append(f"{g.metric} {got} vs champion {best:.4f}")
    return worse


def download_champion(method: str, cfg: Any = None, dest: str | os.PathLike[str] = ".",
                      *, model_name: str | None = None, alias: str = "champion") -> Path | None:
    """Download the method checkpoint (file or per-identity directory) of ``idforge-<method>@champion`` into
    ``dest``; None when no version holds the alias yet. Only the method artifact is fetched, not the base model."""
    import yaml as _yaml
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    from idforge import track

    uri = track.tracking_uri(getattr(cfg, "tracking", None))
    client = MlflowClient(tracking_uri=uri)
    name = model_name or f"idforge-{method}"
    try:
        mv = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None
    # The version's own storage location, resolved by the client bound to this store: a `models:/` URI would be
    # resolved against MLflow's process-wide registry instead (another store when the config names its own).
    source = client.get_model_version_download_uri(name, mv.version).rstrip("/")
    dest = Path(dest)
    mlmodel = Path(download_artifacts(artifact_uri=f"{source}/MLmodel", dst_path=str(dest / ".mlmodel"),
                                      tracking_uri=uri))
    spec = _yaml.safe_load(mlmodel.read_text())
    rel = spec["flavors"]["python_function"]["artifacts"]["method"]["path"]
    return Path(download_artifacts(artifact_uri=f"{source}/{rel}", dst_path=str(dest), tracking_uri=uri))


def _model_parts(gen: dict[str, Any], tmp: Path, cfg: Any) -> tuple[dict[str, str], dict[str, Any]]:
    """The pyfunc model's artifacts (local files MLflow copies) and its config."""
    from idforge.evaluate.generate import ensure_method_registered
    from idforge.methods.registry import method_class

    ensure_method_registered(gen["method"])
    artifacts: dict[str, str] = {}
    config: dict[str, Any] = {
        "method": gen["method"],
        "method_module": method_class(gen["method"]).__module__,
        "method_overrides": gen.get("method_overrides", {}),
        "sampling": {k: v for k, v in gen.get("sampling", {}).items() if v is not None},
        "conditioning_backend": gen.get("conditioning_backend", "insightface"),
    }
    if not config["sampling"] and getattr(cfg, "generate", None) is not None:
        from idforge.evaluate.protocol import load_protocol

        try:
            s = load_protocol(cfg.generate.protocol).sampling
            config["sampling"] = {k: v for k, v in s.model_dump().items() if v is not None}
        except ConfigError:
            config["sampling"] = {}
    gcfg = dict((gen.get("config") or {}).get("generate") or {})
    if not gcfg and getattr(cfg, "generate", None) is not None:
        gcfg = cfg.generate.model_dump(mode="json")
    for key in ("subject", "class_noun", "clip_crop", "clip_hidden_layer"):
        if key in gcfg:
            config[key] = gcfg[key]
    model_cfg = dict((gen.get("config") or {}).get("model") or {})
    if not model_cfg and getattr(cfg, "model", None) is not None:
        model_cfg = cfg.model.model_dump(mode="json")
    config["dtype"] = model_cfg.get("dtype", "float32")
    config["base_kind"] = model_cfg.get("kind", "auto")
    config["local_files_only"] = model_cfg.get("local_files_only", True)

    # By reference, never copied (an SDXL base is ~7 GB per version): resolved when the model loads. MLflow lets a
    # loader override only the keys logged here, so each one is present even when empty.
    config["base_model"] = _reference(str(gen["base_model"]))
    clip = gcfg.get("clip_model") or model_cfg.get("clip")
    use_clip = bool(clip) and gcfg.get("clip_features", "auto") != "off"
    config["clip_model"] = _reference(str(clip)) if use_clip else ""
    config["model_cache_dir"] = ""  # where s3:// references are downloaded; "" = ~/.cache/idforge/models
    config["device"] = ""  # "" = cuda when available

    paths = {ident: a.get("path") for ident, a in (gen.get("artifacts") or {}).items()}
    unique = {p for p in paths.values() if p}
    if len(unique) == 1:
        p = Path(unique.pop())
        if not p.exists():
            raise DataError(f"method artifact {p} does not exist (anymore)")
        artifacts["method"] = str(p)  # a checkpoint file, or a directory of per-identity checkpoints
    elif unique:
        # per-identity checkpoints: one directory <identity>/<file> (+ artifact.json) that resolve_artifact reads
        d = tmp / "method"
        for ident, p in paths.items():
            if not p or not Path(p).is_file():
                raise DataError(f"method artifact for identity {ident!r} ({p}) does not exist anymore")
            slot = identity_path(d, ident)  # the generation record's names become folders: checked first
            slot.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, slot / Path(p).name)
            meta = Path(p).parent / "artifact.json"
            if meta.is_file():
                shutil.copy2(meta, slot / "artifact.json")
            elif Path(p).name != "method.safetensors":
                (slot / "artifact.json").write_text(json.dumps({"file": Path(p).name}))
        artifacts["method"] = str(d)
    else:
        raise DataError("the generation record names no method artifact (an untrained method cannot be registered)")
    return artifacts, config


def _reference(model: str) -> str:
    """A local directory as an absolute path (the loading process may run elsewhere); ids and URIs as given."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.is_dir() else model


# What serving imports: idforge's core, its face analysers (curate) and diffusion stack (train), torch, mlflow, and
# minio for s3:// references. Not kfp, dvc or ray: serving never orchestrates.
SERVING_EXTRAS = ("curate", "train")
_ALWAYS = ("torch", "mlflow", "minio")


def serving_requirements() -> list[str]:
    """Pinned requirements of the serving environment, as installed here (explicit: inferring them would load the
    model twice). idforge itself is not among them: the model carries its code. Local version labels (``+cpu``)
    are dropped, since ``torch==2.13.0`` matches the CPU and CUDA builds on their indexes alike."""
    from importlib.metadata import PackageNotFoundError, requires, version

    from packaging.requirements import Requirement
    from packaging.version import Version

    try:
        declared = [Requirement(r) for r in requires("idforge") or []]
    except PackageNotFoundError:
        declared = []
    names = list(_ALWAYS)
    for req in declared:
        extras = [e for e in SERVING_EXTRAS if req.marker is not None and req.marker.evaluate({"extra": e})]
        if req.marker is None or extras:
            names.append(req.name)
    reqs: list[str] = []
    for name in dict.fromkeys(names):
        try:
            reqs.append(f"{name}=={Version(version(name)).public}")
        except PackageNotFoundError:
            log.warning("serving requirement %s is not installed here: left out of the model's requirements", name)
    return reqs
