"""Face alignment: 5-point similarity transforms onto canonical templates, in numpy/OpenCV and in torch.

Affine matrices follow OpenCV's convention: a (2, 3) matrix ``M`` maps a source pixel (x, y) to the output pixel
``M @ [x, y, 1]``, with pixel centres at integer coordinates.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from idforge.errors import DataError

if TYPE_CHECKING:
    import torch

# insightface's ``arcface_dst``: where the five landmarks land in a 112x112 ArcFace crop.
ARCFACE_TEMPLATE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)
# The FFHQ-style 512x512 template used by GFPGAN/facexlib (head and some shoulders in frame).
FFHQ_TEMPLATE_512 = np.array(
    [[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935], [201.26117, 371.41043],
     [313.08905, 371.15118]],
    dtype=np.float64,
)


def template_for(size: int) -> np.ndarray:
    """The (5, 2) template for an output size: 112 -> ArcFace, 512 -> FFHQ; other sizes scale the closer one."""
    if size <= 0:
        raise DataError(f"crop size must be positive, got {size}")
    if size == 112:
        return ARCFACE_TEMPLATE_112.copy()
    if size == 512:
        return FFHQ_TEMPLATE_512.copy()
    base, base_size = (ARCFACE_TEMPLATE_112, 112) if size < 256 else (FFHQ_TEMPLATE_512, 512)
    return base * (size / base_size)


def estimate_similarity(src_kps: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform (rotation, uniform scale, translation; no reflection) from src to dst.

    Umeyama (1991), the same estimator as skimage's ``SimilarityTransform`` that insightface uses.

    Args:
        src_kps: (K, 2) source points, K >= 2.
        dst: (K, 2) destination points.
    Returns:
        (2, 3) float64 matrix M with ``dst ~= M @ [src, 1]``.
    """
    src = np.asarray(src_kps, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or src.shape[0] < 2:
        raise DataError(f"landmarks must be matching (K, 2) arrays with K >= 2, got {src.shape} and {dst.shape}")
    if not np.all(np.isfinite(src)):
        raise DataError("landmarks contain NaN or inf")
    n = src.shape[0]
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s0, d0 = src - mu_s, dst - mu_d
    cov = d0.T @ s0 / n
    u, sig, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[-1] = -1
    rot = u @ np.diag(d) @ vt
    var_s = (s0**2).sum() / n
    if var_s < 1e-12:
        raise DataError("landmarks are degenerate (all at one point); cannot align")
    scale = (sig * d).sum() / var_s
    m = np.zeros((2, 3), dtype=np.float64)
    m[:, :2] = scale * rot
    m[:, 2] = mu_d - scale * rot @ mu_s
    return m


def alignment_matrix(kps: np.ndarray, size: int = 112) -> np.ndarray:
    """(2, 3) matrix taking source pixels to a ``size`` x ``size`` aligned crop."""
    return estimate_similarity(np.asarray(kps, dtype=np.float64).reshape(5, 2), template_for(size))


def align_face(rgb: np.ndarray, kps: np.ndarray, size: int = 112, border: str = "constant") -> np.ndarray:
    """Warp an (H, W, C) image so the 5 landmarks land on the template for ``size``.

    Returns:
        (size, size, C) array of the input dtype. ``border`` "constant" fills outside pixels with 0 (what ArcFace
        was trained on); "reflect" mirrors them (nicer for the large FFHQ-style crops shown to generative models).
    """
    import cv2

    m = alignment_matrix(kps, size)
    mode = {"constant": cv2.BORDER_CONSTANT, "reflect": cv2.BORDER_REFLECT_101}.get(border)
    if mode is None:
        raise DataError(f"border must be 'constant' or 'reflect', got {border!r}")
    return cv2.warpAffine(rgb, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=mode, borderValue=0)


def transform_points(points: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Apply a (2, 3) affine matrix to (K, 2) points."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return (pts @ np.asarray(m, dtype=np.float64)[:, :2].T + np.asarray(m, dtype=np.float64)[:, 2]).astype(np.float32)


def invert_affine(m: np.ndarray) -> np.ndarray:
    """Inverse of a (2, 3) affine matrix (numpy)."""
    full = np.vstack([np.asarray(m, dtype=np.float64), [0.0, 0.0, 1.0]])
    return np.linalg.inv(full)[:2]


def warp_affine_torch(images: torch.Tensor, m: torch.Tensor, out_size: int | tuple[int, int]) -> torch.Tensor:
    """Differentiable ``cv2.warpAffine`` (bilinear, zero border) for batches.

    Args:
        images: (B, C, H, W) float tensor.
        m: (B, 2, 3) or (2, 3) OpenCV-convention matrices mapping source pixels to output pixels.
        out_size: output side (int) or (height, width).
    Returns:
        (B, C, out_h, out_w) tensor; gradients flow to ``images`` (and to ``m``).
    """
    import torch
    import torch.nn.functional as F

    if images.ndim != 4:
        raise DataError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    b, _, h, w = images.shape
    oh, ow = (out_size, out_size) if isinstance(out_size, int) else out_size
    m = m.to(dtype=images.dtype, device=images.device)
    if m.ndim == 2:
        m = m.expand(b, 2, 3)
    if m.shape != (b, 2, 3):
        raise DataError(f"affine matrices must be (B, 2, 3) with B={b}, got {tuple(m.shape)}")
    bottom = torch.tensor([0.0, 0.0, 1.0], dtype=m.dtype, device=m.device).expand(b, 1, 3)
    inv = torch.linalg.inv(torch.cat([m, bottom], dim=1))[:, :2]  # output pixel -> source pixel
    ys, xs = torch.meshgrid(
        torch.arange(oh, dtype=m.dtype, device=m.device), torch.arange(ow, dtype=m.dtype, device=m.device),
        indexing="ij",
    )
    grid_out = torch.stack([xs, ys, torch.ones_like(xs)], dim=-1).reshape(1, -1, 3)  # (1, oh*ow, 3)
    src = grid_out @ inv.transpose(1, 2)  # (B, oh*ow, 2) source pixel coordinates
    # align_corners=False: pixel i's centre sits at normalised (2i + 1) / size - 1.
    norm = torch.stack([(2 * src[..., 0] + 1) / w - 1, (2 * src[..., 1] + 1) / h - 1], dim=-1)
    return F.grid_sample(images, norm.reshape(b, oh, ow, 2), mode="bilinear", padding_mode="zeros",
                         align_corners=False)
