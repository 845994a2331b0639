"""The papers' metrics, vectorised over batches.

Images are (H, W, 3) uint8 RGB arrays throughout. Every function returns one value per image (or per pair) so
``evaluate.run`` can write per-image rows and aggregate them any way it likes.

- Identity similarity: detect + align the largest face with ``idforge.faces`` (the same code curation uses), embed it,
  cosine with the identity's reference embedding. Missing faces are NaN here; aggregates report them scored 0 and
  excluded, plus the detection rate.
- CLIP-T: cosine of CLIP image and text features. CLIP-I: cosine of CLIP image features of the generated face and
  the reference face.
- LPIPS (reference vs generated) and diversity (pairwise LPIPS, pairwise ID-embedding distance within a group).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from idforge.errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from idforge.evaluate.lpips import LpipsModel
    from idforge.faces import FaceAnalyzer

log = logging.getLogger(__name__)

# Cosine similarity above which a backend calls two faces the same person (the models' published operating points:
# OpenCV Zoo's SFace 0.363; InsightFace's recognition examples use ~0.28-0.30 for the w600k ArcFace models).
SAME_PERSON_THRESHOLD = {"opencv": 0.363, "insightface": 0.30}


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _batches(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def to_tensor(images: Sequence[np.ndarray], size: int | None = None, device: str = "cpu") -> "torch.Tensor":
    """Stack uint8 RGB images into (N, 3, S, S) float32 in [0, 1], resized (bilinear, antialiased) to ``size``."""
    import torch
    from torch.nn import functional as F

    out = []
    for img in images:
        t = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1)[None].float().div(255.0)
        if size is not None and t.shape[-2:] != (size, size):
            t = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out.append(t)
    if not out:
        return torch.zeros(0, 3, size or 1, size or 1, device=device)
    return torch.cat(out).clamp_(0, 1).to(device)


# ----------------------------------------------------------------------------------------------------------------
# identity


@dataclass
class FaceScan:
    """What one backend found in N images.

    Attributes:
        detected: (N,) bool, a face was found.
        embeddings: (N, D) float32 L2-normalised; rows of images without a face are NaN.
        kps: (N, 5, 2) float32 landmarks of the largest face; NaN where none.
        det_score: (N,) float32, NaN where none.
    """

    backend: str
    detected: np.ndarray
    embeddings: np.ndarray
    kps: np.ndarray
    det_score: np.ndarray

    @property
    def detection_rate(self) -> float:
        return float(self.detected.mean()) if len(self.detected) else float("nan")


def scan_faces(analyzer: "FaceAnalyzer", images: Sequence[np.ndarray], batch_size: int = 32) -> FaceScan:
    """Detect the largest face in each image, align it to the ArcFace 112 template, embed all crops in batches."""
    from idforge.faces.align import align_face

    n = len(images)
    d = int(analyzer.embedding_dim)
    detected = np.zeros(n, dtype=bool)
    kps = np.full((n, 5, 2), np.nan, dtype=np.float32)
    scores = np.full(n, np.nan, dtype=np.float32)
    crops: list[np.ndarray] = []
    for i, img in enumerate(images):
        faces = analyzer.detect(img)
        if not faces:
            continue
        face = max(faces, key=lambda f: f.area)  # the subject, not a face in the background
        detected[i] = True
        kps[i] = face.kps
        scores[i] = face.det_score
        crops.append(align_face(img, face.kps, size=112))
    emb = np.full((n, d), np.nan, dtype=np.float32)
    if crops:
        stacked = np.stack(crops)
        vecs = np.concatenate([analyzer.embed_aligned(stacked[s]) for s in _batches(len(stacked), batch_size)])
        emb[detected] = vecs
    return FaceScan(analyzer.name, detected, emb, kps, scores)


def reference_embedding(embeddings: np.ndarray) -> np.ndarray:
    """The identity's reference: mean of its (K, D) normalised embeddings (NaN rows ignored), renormalised -> (D,)."""
    e = np.asarray(embeddings, dtype=np.float32)
    e = e[~np.isnan(e).any(axis=1)]
    if len(e) == 0:
        raise DataError("reference embedding: none of the reference images has a detectable face")
    m = e.mean(axis=0)
    return (m / max(float(np.linalg.norm(m)), 1e-12)).astype(np.float32)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of (N, D) and (N, D) or (D,) -> (N,); NaN where a row of ``a`` is NaN."""
    a = np.asarray(a, dtype=np.float64)
    b = np.broadcast_to(np.asarray(b, dtype=np.float64), a.shape)
    num = (a * b).sum(axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (num / np.maximum(den, 1e-12)).astype(np.float32)


def identity_similarity(scan: FaceScan, ref: np.ndarray) -> np.ndarray:
    """Cosine of each generated face with its reference embedding(s): ``ref`` (D,) or (N, D) -> (N,), NaN = no face."""
    return cosine_rows(scan.embeddings, ref)


def summarize_identity(sim: np.ndarray) -> dict[str, float]:
    """The three numbers the papers need: detection rate, mean with misses scored 0, mean over detected faces."""
    sim = np.asarray(sim, dtype=np.float64)
    found = ~np.isnan(sim)
    return {
        "face_det_rate": float(found.mean()) if len(sim) else float("nan"),
        "id_sim": float(np.where(found, sim, 0.0).mean()) if len(sim) else float("nan"),
        "id_sim_excl_missing": float(sim[found].mean()) if found.any() else float("nan"),
    }


# ----------------------------------------------------------------------------------------------------------------
# CLIP


class ClipScorer:
    """CLIP image/text features in batches; features are L2-normalised (N, projection_dim) float32."""

    def __init__(self, model_id: str, device: str = "cpu", batch_size: int = 32) -> None:
        import torch

        self.model_id = model_id
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.model, self.tokenizer, self.processor = _load_clip(model_id)
        self.model = self.model.to(self.device).eval()
        self._torch = torch

    def image_features(self, images: Sequence[np.ndarray]) -> "torch.Tensor":
        torch = self._torch
        feats = []
        for s in _batches(len(images), self.batch_size):
            pixels = self.processor(images=list(images[s]), return_tensors="pt")["pixel_values"].to(self.device)
            with torch.inference_mode():
                f = _as_tensor(self.model.get_image_features(pixel_values=pixels))
            feats.append(torch.nn.functional.normalize(f.float(), dim=-1))
        return torch.cat(feats) if feats else torch.zeros(0, self.model.config.projection_dim)

    def text_features(self, texts: Sequence[str]) -> "torch.Tensor":
        torch = self._torch
        feats = []
        # Pad every prompt to the model's full length: a fixed shape makes the numbers independent of which other
        # prompts share the batch (CLIP pools at the EOS token, so padding itself does not change the feature).
        max_len = int(getattr(self.tokenizer, "model_max_length", 77) or 77)
        max_len = min(max_len, int(self.model.config.text_config.max_position_embeddings))
        for s in _batches(len(texts), self.batch_size):
            tok = self.tokenizer(
                list(texts[s]), padding="max_length", truncation=True, max_length=max_len, return_tensors="pt"
            ).to(self.device)
            with torch.inference_mode():
                out = self.model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
                f = _as_tensor(out)
            feats.append(torch.nn.functional.normalize(f.float(), dim=-1))
        return torch.cat(feats) if feats else torch.zeros(0, self.model.config.projection_dim)


def _as_tensor(out: Any) -> "torch.Tensor":
    # transformers 5 may return a model output instead of a bare tensor from get_*_features
    if hasattr(out, "pooler_output") and not hasattr(out, "shape"):
        return out.pooler_output
    return out


def _load_clip(model_id: str) -> tuple[Any, Any, Any]:
    from idforge.diffusion.loading import load_clip

    bundle = load_clip(model_id)
    if isinstance(bundle, tuple):
        return bundle[0], bundle[1], bundle[2]
    return bundle.model, bundle.tokenizer, bundle.image_processor


def clip_t(scorer: ClipScorer, images: Sequence[np.ndarray], prompts: Sequence[str]) -> np.ndarray:
    """CLIP-T: cosine of each image with its prompt -> (N,) float32."""
    if len(images) != len(prompts):
        raise DataError(f"clip_t: {len(images)} images but {len(prompts)} prompts")
    # each distinct prompt is encoded once
    uniq = list(dict.fromkeys(prompts))
    t = scorer.text_features(uniq)
    idx = [uniq.index(p) for p in prompts]
    i = scorer.image_features(images)
    return (i * t[idx]).sum(-1).cpu().numpy().astype(np.float32)


def clip_i(scorer: ClipScorer, images: Sequence[np.ndarray], ref_features: "torch.Tensor") -> np.ndarray:
    """CLIP-I: cosine of each image with its reference feature(s): ``ref_features`` (P,) or (N, P) -> (N,)."""
    i = scorer.image_features(images)
    r = ref_features.to(i.device)
    return (i * r).sum(-1).cpu().numpy().astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# LPIPS and diversity


def lpips_pairs(model: "LpipsModel", a: "torch.Tensor", b: "torch.Tensor", batch_size: int = 16) -> np.ndarray:
    """LPIPS of row pairs (N, 3, S, S) x (N, 3, S, S) in [0, 1] -> (N,) float32."""
    if a.shape != b.shape:
        raise DataError(f"lpips: shapes differ {tuple(a.shape)} vs {tuple(b.shape)}; resize both to one size")
    out = [model(a[s], b[s]).cpu().numpy() for s in _batches(a.shape[0], batch_size)]
    return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)


def lpips_to_references(
    model: "LpipsModel", gen: "torch.Tensor", refs: "torch.Tensor", batch_size: int = 16
) -> np.ndarray:
    """Mean LPIPS of each generated image (N, 3, S, S) to every reference image (K, 3, S, S) -> (N,)."""
    n, k = gen.shape[0], refs.shape[0]
    if k == 0:
        return np.full(n, np.nan, np.float32)
    a = gen.repeat_interleave(k, dim=0)
    b = refs.repeat(n, 1, 1, 1)
    return lpips_pairs(model, a, b, batch_size).reshape(n, k).mean(axis=1)


def pairwise_lpips(model: "LpipsModel", images: "torch.Tensor", batch_size: int = 16) -> np.ndarray:
    """Per image, the mean LPIPS to the other images of its group: (K, 3, S, S) -> (K,); NaN when K < 2.

    The mean of the result equals the mean over all unordered pairs (each pair counts once for each member).
    """
    k = images.shape[0]
    if k < 2:
        return np.full(k, np.nan, np.float32)
    ii, jj = np.triu_indices(k, 1)
    d = lpips_pairs(model, images[ii], images[jj], batch_size)
    m = np.zeros((k, k), np.float64)
    m[ii, jj] = d
    m[jj, ii] = d
    return (m.sum(axis=1) / (k - 1)).astype(np.float32)


def pairwise_embedding_distance(embeddings: np.ndarray) -> np.ndarray:
    """Per image, mean (1 - cosine) to the other images of its group with a face: (K, D) -> (K,).

    NaN rows (no face) get NaN and are left out of the others' means; NaN everywhere when fewer than 2 faces.
    """
    e = np.asarray(embeddings, dtype=np.float64)
    ok = ~np.isnan(e).any(axis=1)
    out = np.full(len(e), np.nan, np.float32)
    if ok.sum() < 2:
        return out
    x = e[ok] / np.maximum(np.linalg.norm(e[ok], axis=1, keepdims=True), 1e-12)
    dist = 1.0 - x @ x.T
    np.fill_diagonal(dist, 0.0)
    out[ok] = (dist.sum(axis=1) / (ok.sum() - 1)).astype(np.float32)
    return out
