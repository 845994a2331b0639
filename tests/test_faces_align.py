"""Alignment maths: the similarity estimator, crops, the torch warp matching OpenCV, masks."""

from __future__ import annotations

import numpy as np
import pytest

from idforge.errors import DataError
from idforge.faces.align import (
    ARCFACE_TEMPLATE_112,
    FFHQ_TEMPLATE_512,
    align_face,
    alignment_matrix,
    estimate_similarity,
    invert_affine,
    transform_points,
    warp_affine_torch,
)
from idforge.faces.masks import ellipse_mask, hull_mask


def _similarity(scale: float, angle_deg: float, tx: float, ty: float) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    r = scale * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return np.hstack([r, [[tx], [ty]]])


def test_estimate_similarity_recovers_a_known_transform():
    m_true = _similarity(2.5, 17.0, 31.0, -4.0)
    src = ARCFACE_TEMPLATE_112
    dst = src @ m_true[:, :2].T + m_true[:, 2]
    m = estimate_similarity(src, dst)
    assert m.shape == (2, 3) and m.dtype == np.float64
    np.testing.assert_allclose(m, m_true, atol=1e-9)


def test_estimate_similarity_never_reflects():
    mirrored = ARCFACE_TEMPLATE_112 * np.array([-1.0, 1.0])
    m = estimate_similarity(ARCFACE_TEMPLATE_112, mirrored)
    assert np.linalg.det(m[:, :2]) > 0


@pytest.mark.parametrize("bad", [np.zeros((5, 2)), np.full((5, 2), np.nan), np.zeros((5, 3))])
def test_estimate_similarity_rejects_degenerate_landmarks(bad):
    with pytest.raises(DataError):
        estimate_similarity(bad, ARCFACE_TEMPLATE_112 if bad.shape == (5, 2) else np.zeros((5, 3)))


@pytest.mark.parametrize("size,template", [(112, ARCFACE_TEMPLATE_112), (512, FFHQ_TEMPLATE_512)])
def test_align_face_puts_landmarks_on_the_template(size, template):
    # Draw five dots where a rotated, scaled face's landmarks are, align, and find the dots again.
    import cv2

    m_src = _similarity(1.7, -25.0, 140.0, 60.0)
    kps = transform_points(template * (112 / size), m_src)
    img = np.zeros((400, 400, 3), np.uint8)
    for x, y in kps:
        cv2.circle(img, (int(round(x)), int(round(y))), 3, (255, 255, 255), -1)
    crop = align_face(img, kps, size)
    assert crop.shape == (size, size, 3) and crop.dtype == np.uint8
    m = alignment_matrix(kps, size)
    np.testing.assert_allclose(transform_points(kps, m), template, atol=1e-3)
    for x, y in template:
        assert crop[int(round(y)), int(round(x))].max() > 100


def test_torch_warp_matches_opencv_and_is_differentiable():
    import cv2
    import torch

    rng = np.random.default_rng(0)
    img = cv2.GaussianBlur(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8), (7, 7), 2)
    m = _similarity(0.8, 12.0, 10.0, 5.0)
    ref = cv2.warpAffine(img.astype(np.float32), m, (64, 64), flags=cv2.INTER_LINEAR, borderValue=0)
    x = torch.from_numpy(img.transpose(2, 0, 1)[None].astype(np.float32)).requires_grad_(True)
    out = warp_affine_torch(x, torch.from_numpy(m)[None], 64)
    assert out.shape == (1, 3, 64, 64)
    got = out[0].detach().permute(1, 2, 0).numpy()
    inner = (slice(4, 60), slice(4, 60))  # borders differ only in how half-outside pixels are blended
    np.testing.assert_allclose(got[inner], ref[inner], atol=0.05)
    out.sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


def test_invert_affine_round_trips_points():
    m = _similarity(1.3, 40.0, -7.0, 2.0)
    pts = np.array([[0.0, 0.0], [10.0, 3.0], [-4.0, 8.0]])
    np.testing.assert_allclose(transform_points(transform_points(pts, m), invert_affine(m)), pts, atol=1e-4)


def test_masks_cover_the_right_region():
    ring = np.array([[50 + 30 * np.cos(t), 60 + 30 * np.sin(t)] for t in np.linspace(0, 2 * np.pi, 20)])
    m = hull_mask((128, 128), ring, forehead=0.0)
    assert m.dtype == np.uint8 and set(np.unique(m)) == {0, 255}
    assert m[60, 50] == 255 and m[5, 5] == 0
    assert abs((m > 0).sum() - np.pi * 30**2) / (np.pi * 30**2) < 0.05
    lifted = hull_mask((128, 128), ring, forehead=0.3)
    assert (lifted > 0).sum() > (m > 0).sum() and lifted[22, 50] == 255 and m[22, 50] == 0
    e = ellipse_mask((100, 100), (20, 10, 60, 90))
    assert e[50, 40] == 255 and e[5, 5] == 0 and e[50, 70] == 0
    with pytest.raises(DataError):
        hull_mask((10, 10), np.zeros((2, 2)))
