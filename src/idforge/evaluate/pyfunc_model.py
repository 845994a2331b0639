"""The registered model: an MLflow ``pyfunc.PythonModel`` that generates identity images from a prompt and photos.

Artifacts: ``base_model`` (the base pipeline directory; a hub id in the model config instead when it is not a local
directory), ``method`` (the method checkpoint, or a directory of per-identity checkpoints) and optionally ``clip``
(the CLIP model the reference features are computed with). The method class is found through the registry after
importing ``method_module`` (so a method defined outside idforge loads too).

Input (a DataFrame, one request per row):
    prompt            str; a ``{}`` in it is replaced by the subject phrase ("a person" or the method's token)
    reference_images  list of base64-encoded image files (JPEG/PNG) of ONE person (optional for per-identity
                      artifacts when ``identity`` is given and the method needs no features)
    identity          str, optional: which per-identity checkpoint to use
    seed              int, optional (default 0)
Output: a DataFrame with ``image`` (base64 PNG), ``seed``, ``prompt`` (as rendered).
"""

from __future__ import annotations

import base64
import importlib
import io
import logging
from typing import Any

import mlflow.pyfunc
import numpy as np

log = logging.getLogger(__name__)


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
        base = arts.get("base_model") or cfg["base_model_id"]
        device = cfg.get("device") or ("cuda" if _cuda() else "cpu")
        self.pipe = load_pipeline(base, kind=cfg.get("base_kind", "auto"), dtype=cfg.get("dtype", "float32"),
                                  device=device, local_files_only=cfg.get("local_files_only", True))
        if cfg.get("method_module"):
            importlib.import_module(cfg["method_module"])  # registers a method defined outside the registry
        self.artifact = arts.get("method")
        self.analyzer = load_analyzer(cfg.get("conditioning_backend", "insightface"))
        clip_src = arts.get("clip") or cfg.get("clip_model_id")
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
        sampling = dict(self.cfg.get("sampling", {}))
        sampling.update({k: v for k, v in (params or {}).items() if k in ("num_inference_steps", "guidance_scale")})
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
            seed = int(row.get("seed", 0) or 0)
            (image,) = method.generate(self.pipe, [prompt], cond, seeds=[seed], **sampling)
            out.append({"image": encode_image(image), "seed": seed, "prompt": prompt})
        return pd.DataFrame(out)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
