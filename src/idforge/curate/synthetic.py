"""ArcFace-like synthetic identity embeddings, for the grouping benchmark and the large-N tests.

Person p has a random unit centre c_p; each photo is sqrt(s_p) c_p + sqrt(1 - s_p) u with u a fresh random unit
vector, so two photos of p have cosine ~ s_p, drawn per person in [within_lo, within_hi] (0.5-0.8 for ArcFace on
real photos), and photos of different people ~ 0 +/- 1/sqrt(D) (0.044 at D = 512).
"""

from __future__ import annotations

import numpy as np


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def synthetic_embeddings(n_faces: int, photos_per_identity: int = 20, dim: int = 512, within: tuple[float, float] =
                         (0.5, 0.8), seed: int = 0, block: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """((N, D) float32 L2-normalised embeddings, (N,) int64 person index), people in contiguous runs."""
    rng = np.random.default_rng(seed)
    n_ids = -(-n_faces // photos_per_identity)
    person = np.minimum(np.arange(n_faces) // photos_per_identity, n_ids - 1)
    centres = _unit(rng.standard_normal((n_ids, dim), dtype=np.float32))
    s = rng.uniform(within[0], within[1], size=n_ids).astype(np.float32)
    out = np.empty((n_faces, dim), dtype=np.float32)
    for start in range(0, n_faces, block):  # blocks: a million faces never hold a float64 copy
        p = person[start:start + block]
        noise = _unit(rng.standard_normal((len(p), dim), dtype=np.float32))
        out[start:start + len(p)] = _unit(np.sqrt(s[p])[:, None] * centres[p] + np.sqrt(1 - s[p])[:, None] * noise)
    return out, person
