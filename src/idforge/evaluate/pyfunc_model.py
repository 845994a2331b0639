"""The registered model: an MLflow ``pyfunc.PythonModel`` that generates identity images from a prompt and photos.

What a version holds: the ``method`` artifact (the method checkpoint, or a directory of per-identity checkpoints),
idforge's own code (``code/``, so the requirements need no idforge release on an index) and a model config that
*references* the base pipeline (``base_model``) and the CLIP model (``clip_model``) by local directory, hub id or
``s3://`` URI: several GB per version are never copied. They are resolved when the model loads, with the usual
offline rules (a directory as is, a hub id from the local Hugging Face cache only, an ``s3://`` prefix downloaded
once into ``model_cache_dir``); a reference that does not resolve fails with one line saying how to point it at a
local copy: ``mlflow.pyfunc.load_model(uri, model_config={"base_model": DIR})``, or for ``mlflow models serve``
the environment variable ``SERVING_MODEL_CONFIG='{"base_model": "DIR"}'``. The method class is found through the
registry after importing ``method_module`` (so a method defined outside idforge loads too).

Input (a DataFrame, one request per row):
    prompt            str; a ``{}`` in it is replaced by the subject phrase ("a person" or the method's token)
    reference_images  list of base64-encoded image files (JPEG/PNG) of ONE person
    identity          str, optional: which per-identity checkpoint to use
    seed              int, optional: this row's seed (else the ``seed`` param)
Params (the signature's ``ParamSchema``; MLflow passes them through ``predict(..., params=...)`` and REST
``{"params": {...}}``):
    num_inference_steps, guidance_scale   default: the recipe the version was evaluated with
    seed                                  default 0; a row's own ``seed`` wins
    scheduler                             a diffusers scheduler class the base model's scheduler lists as
                                          compatible and that takes the seed's generator
                                          (:func:`usable_schedulers`: ``DDIMScheduler``,
                                          ``DPMSolverMultistepScheduler``, ``EulerAncestralDiscreteScheduler``,
                                          ...); "" = the base model's own
Output: a DataFrame with ``image`` (base64 PNG), ``seed``, ``prompt`` (as rendered).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import importlib
import io
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np

log = logging.getLogger(__name__)

# model-config keys of the referenced models, and the setting each one's loading error names
REFERENCES = {"base_model": "model.base", "clip_model": "model.clip"}
DEFAULT_MODEL_CACHE = Path("~/.cache/idforge/models")


def model_signature(sampling: dict[str, Any] | None = None) -> Any:
    """The ``ModelSignature``: the input/output columns above and the inference params, whose defaults are the
    version's recorded recipe (``sampling``), so a request without params reproduces the evaluation."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array

    from idforge.methods.sampling import SamplingConfig

    recipe = SamplingConfig.model_validate({k: v for k, v in (sampling or {}).items()
                                            if k in ("num_inference_steps", "guidance_scale")})
    inputs = Schema([
        ColSpec(DataType.string, "prompt"),
        ColSpec(Array(DataType.string), "reference_images", required=False),
        ColSpec(DataType.string, "identity", required=False),
        ColSpec(DataType.long, "seed", required=False),
    ])
    outputs = Schema([ColSpec(DataType.string, "image"), ColSpec(DataType.long, "seed"),
                      ColSpec(DataType.string, "prompt")])
    params = ParamSchema([
        ParamSpec("num_inference_steps", DataType.long, recipe.num_inference_steps),
        ParamSpec("guidance_scale", DataType.double, float(recipe.guidance_scale)),
        ParamSpec("seed", DataType.long, 0),
        ParamSpec("scheduler", DataType.string, ""),
    ])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def resolve_reference(key: str, ref: str, cfg: dict[str, Any]) -> str | Path:
    """Where to load the referenced model ``key`` (``base_model``/``clip_model``) from, by the offline rules.

    Raises:
        ModelNotFoundError: ``ref`` is not a directory here, not in the local Hugging Face cache, or not on the
            object store; the message says how to point the model at a local copy.
    """
    from idforge.diffusion.loading import resolve_model
    from idforge.errors import IdforgeError, ModelNotFoundError
    from idforge.io.uri import is_s3_uri

    try:
        if is_s3_uri(ref):
            from idforge.io.storage import localize

            cache = Path(cfg.get("model_cache_dir") or DEFAULT_MODEL_CACHE).expanduser()
            return localize(ref, cache / hashlib.sha256(ref.encode()).hexdigest()[:16])
        return resolve_model(ref, local_files_only=cfg.get("local_files_only", True), config_key=REFERENCES[key])
    except IdforgeError as exc:
        why = str(exc).split("; ")[0]
        raise ModelNotFoundError(
            f"the registered model's {key} {ref!r} is not available here ({why}); point it at a local copy: "
            f"mlflow.pyfunc.load_model(uri, model_config={{'{key}': '/path/to/dir'}}), or for `mlflow models "
            f"serve` set SERVING_MODEL_CONFIG='{{\"{key}\": \"/path/to/dir\"}}'"
        ) from None


def encode_image(image: Any, fmt: str = "PNG") -> str:
    """base64 text of an image file (PIL image or uint8 RGB array)."""
    from PIL import Image

    im = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_image(data: str | bytes) -> np.ndarray:
    """(H, W, 3) uint8 RGB from base64 text (or raw bytes) of an image file."""
    from PIL import Image

    from idforge.errors import DataError

    raw = data if isinstance(data, bytes) else base64.b64decode(data)
    try:
        with Image.open(io.BytesIO(raw)) as im:
            return np.asarray(im.convert("RGB"))
    except OSError as exc:
        raise DataError(f"reference image is not a readable image file: {exc}") from None


class IdentityGenerator(mlflow.pyfunc.PythonModel):
    """Loads base pipeline + method once (``load_context``); ``predict`` runs the method's own sampler."""

    def load_context(self, context: Any) -> None:
        from idforge.diffusion.loading import load_clip, load_pipeline
        from idforge.faces import load_analyzer

        cfg = dict(context.model_config or {})
        self.cfg = cfg
        arts = context.artifacts
        # Versions registered before references copied the models in as artifacts; they still load.
        base_ref = cfg.get("base_model") or cfg.get("base_model_id")
        if not arts.get("base_model") and not base_ref:
            from idforge.errors import ModelNotFoundError

            raise ModelNotFoundError("the registered model names no base model: load it with "
                                     "model_config={'base_model': '/path/to/dir'}")
        base = arts.get("base_model") or resolve_reference("base_model", str(base_ref), cfg)
        clip_ref = cfg.get("clip_model") or cfg.get("clip_model_id")
        clip_src = arts.get("clip") or (resolve_reference("clip_model", str(clip_ref), cfg) if clip_ref else None)
        device = cfg.get("device") or ("cuda" if _cuda() else "cpu")
        self.pipe = load_pipeline(base, kind=cfg.get("base_kind", "auto"), dtype=cfg.get("dtype", "float32"),
                                  device=device, local_files_only=cfg.get("local_files_only", True))
        if cfg.get("method_module"):
            importlib.import_module(cfg["method_module"])  # registers a method defined outside the registry
        self.artifact = arts.get("method")
        self.analyzer = load_analyzer(cfg.get("conditioning_backend", "insightface"))
        self.clip = load_clip(clip_src, local_files_only=cfg.get("local_files_only", True)) if clip_src else None
        self._method: Any = None
        self._method_path: Any = None

    def _method_for(self, identity: str | None) -> Any:
        from idforge.evaluate.generate import resolve_artifact
        from idforge.methods.checkpoint import load_method

        path = resolve_artifact(self.artifact, identity or "")
        if self._method is not None and path == self._method_path:
            return self._method
        if self._method is not None:
            self._method.detach(self.pipe)
        self._method = load_method(path, self.pipe, **self.cfg.get("method_overrides", {}))
        self._method.eval()
        self._method_path = path
        return self._method

    # no type hints on predict: MLflow would try to derive a signature from them
    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        import pandas as pd

        from idforge.errors import DataError
        from idforge.evaluate.generate import _subject
        from idforge.evaluate.refs import align_references, identity_refs

        df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "prompt" not in df.columns:
            raise DataError("model input needs a 'prompt' column (and 'reference_images': base64 photos)")
        params = dict(params or {})  # MLflow fills in the signature's defaults; a direct call may pass none
        sampling = dict(self.cfg.get("sampling", {}))
        sampling.update({k: params[k] for k in ("num_inference_steps", "guidance_scale")
                         if params.get(k) is not None})
        default_seed = int(params.get("seed") or 0)
        out = []
        for row in df.to_dict("records"):
            identity = row.get("identity") or None
            method = self._method_for(identity)
            subject = _subject(method, self.cfg.get("subject", "a person"), self.cfg.get("class_noun", "person"))
            prompt = str(row["prompt"])
            prompt = prompt.replace("{}", subject) if "{}" in prompt else prompt
            photos = row.get("reference_images")
            if photos is None or len(photos) == 0:
                raise DataError("model input row has no 'reference_images': give base64 photos of the person")
            faces = align_references(identity or "request", [decode_image(p) for p in photos], self.analyzer)
            refs = identity_refs(faces, self.analyzer, self.clip, clip_crop=self.cfg.get("clip_crop", "ffhq"),
                                 clip_hidden_layer=int(self.cfg.get("clip_hidden_layer", -2)),
                                 class_noun=self.cfg.get("class_noun", "person"))
            cond = method.identity_condition(refs.to(self.pipe.device), self.pipe)
            seed = _row_seed(row.get("seed"), default_seed)
            with self._scheduler(params.get("scheduler") or ""):
                (image,) = method.generate(self.pipe, [prompt], cond, seeds=[seed], **sampling)
            out.append({"image": encode_image(image), "seed": seed, "prompt": prompt})
        return pd.DataFrame(out)

    @contextlib.contextmanager
    def _scheduler(self, name: str) -> Iterator[None]:
        """The pipeline with scheduler class ``name`` (same config) for one request; "" = the base model's own."""
        from idforge.errors import DataError

        current = self.pipe.scheduler
        if not name or name == type(current).__name__:
            yield
            return
        choices = usable_schedulers(current)
        if name not in choices:
            raise DataError(f"params.scheduler={name!r} is not a scheduler this base model can use; one of: "
                            f"{', '.join(sorted(choices))}")
        self.pipe.scheduler = choices[name].from_config(current.config)
        try:
            yield
        finally:
            self.pipe.scheduler = current


def usable_schedulers(current: Any) -> dict[str, type]:
    """Scheduler classes a request may pick: those ``current`` lists as compatible (same noise schedule config)
    whose ``step`` takes a ``generator``, since the shared sampler feeds each step's noise from the seed's generator
    (the others would fail, or draw unseeded noise). Placeholders of schedulers whose optional backend is not
    installed (torchsde) are left out."""
    import inspect

    found: dict[str, type] = {type(current).__name__: type(current)}
    for cls in getattr(current, "compatibles", []):
        try:
            takes_generator = "generator" in inspect.signature(cls.step).parameters
        except (ImportError, AttributeError, TypeError, ValueError):
            continue
        if takes_generator:
            found[cls.__name__] = cls
    return found


def _row_seed(value: Any, default: int) -> int:
    """A row's seed; a missing one (absent, None, or NaN where other rows of the frame have one) is ``default``."""
    if value is None:
        return default
    with contextlib.suppress(TypeError):
        if math.isnan(value):
            return default
    return int(value)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
