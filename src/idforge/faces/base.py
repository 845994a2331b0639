"""The face-analysis protocol every backend implements, and the detected-face record.

Coordinates are source-image pixels, x to the right, y down. Five-point landmarks are always in the ArcFace
order: left eye, right eye, nose tip, left mouth corner, right mouth corner, where "left" means the image left
(the subject's right eye), which is what both SCRFD and YuNet emit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class Face:
    """One detected face.

    Attributes:
        bbox: (x0, y0, x1, y1) float pixels in the source image.
        kps: (5, 2) float32 landmarks in the ArcFace order (see module docstring).
        det_score: detector confidence in [0, 1].
        landmarks106: optional (106, 2) float32 dense landmarks (insightface 2d106det), used for the face mask.
    """

    bbox: tuple[float, float, float, float]
    kps: np.ndarray
    det_score: float
    landmarks106: np.ndarray | None = field(default=None, compare=False)

    @property
    def width(self) -> float:
        return self.bbox[2] - self.bbox[0]

    @property
    def height(self) -> float:
        return self.bbox[3] - self.bbox[1]

    @property
    def size(self) -> float:
        """The shorter side of the box in pixels: what a minimum-face-size gate compares against."""
        return min(self.width, self.height)

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)


@runtime_checkable
class FaceAnalyzer(Protocol):
    """Detect faces with 5 landmarks and embed aligned crops. Implementations load their models once."""

    name: str
    embedding_dim: int

    def detect(self, rgb: np.ndarray) -> list[Face]:
        """Faces in an (H, W, 3) uint8 RGB image, largest first."""
        ...

    def embed_aligned(self, crops: np.ndarray) -> np.ndarray:
        """(N, 112, 112, 3) uint8 RGB ArcFace-aligned crops -> (N, D) float32, rows L2-normalised."""
        ...

    def describe(self) -> dict[str, object]:
        """Backend name, model files and their licence: recorded in a dataset's report."""
        ...


def l2_normalise(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows of ``x`` scaled to unit L2 norm (zero rows stay zero), as float32."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norm, eps)).astype(np.float32)


def check_rgb(rgb: np.ndarray, what: str = "image") -> np.ndarray:
    """Validate an (H, W, 3) uint8 array; raise DataError naming the problem otherwise."""
    from idforge.errors import DataError

    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        shape = getattr(rgb, "shape", None)
        dtype = getattr(rgb, "dtype", None)
        raise DataError(f"{what} must be an (H, W, 3) uint8 RGB array, got shape {shape} dtype {dtype}")
    return rgb


def check_crops(crops: np.ndarray, size: int = 112) -> np.ndarray:
    from idforge.errors import DataError

    crops = np.asarray(crops)
    if crops.ndim == 3:
        crops = crops[None]
    if crops.dtype != np.uint8 or crops.ndim != 4 or crops.shape[1:] != (size, size, 3):
        raise DataError(
            f"aligned crops must be (N, {size}, {size}, 3) uint8 RGB (use idforge.faces.align.align_face), "
            f"got shape {crops.shape} dtype {crops.dtype}"
        )
    return crops
