"""The photo target's geometry: context boxes clamp to the image, buckets are near the model's area with sides on
the grid, and landmarks and masks land where the face is after the photo is resized into its bucket."""

from __future__ import annotations

import numpy as np
import pytest

from idforge.errors import DataError
from idforge.train import photo_target as pt


def test_context_box_enlarges_about_the_centre_and_clamps_to_the_image():
    assert pt.context_box((40, 40, 60, 60), 2.0, 200, 100) == (30.0, 30.0, 70.0, 70.0)
    # near the top-left corner: clipped, not shifted (the face keeps its place in the photo)
    assert pt.context_box((0, 10, 20, 30), 3.0, 200, 100) == (0.0, 0.0, 40.0, 50.0)
    # a factor larger than the photo: the whole photo
    assert pt.context_box((90, 40, 110, 60), 50.0, 200, 100) == (0.0, 0.0, 200.0, 100.0)
    with pytest.raises(DataError, match="no area"):
        pt.context_box((10, 10, 10, 20), 2.0, 100, 100)
    with pytest.raises(DataError, match="outside"):
        pt.context_box((300, 10, 320, 20), 1.0, 100, 100)
    with pytest.raises(DataError, match="context_factor"):
        pt.context_box((10, 10, 20, 20), 0.5, 100, 100)


@pytest.mark.parametrize("resolution", [512, 768, 1024])
def test_buckets_are_on_the_grid_near_the_native_area(resolution):
    buckets = pt.bucket_sides(resolution, 64, (0.5, 2.0), 0.1)
    assert (resolution, resolution) in buckets and len(buckets) >= 5
    for h, w in buckets:
        assert h % 64 == 0 and w % 64 == 0
        assert abs(h * w - resolution**2) <= 0.1 * resolution**2
        assert 0.5 <= w / h <= 2.0
        assert (w, h) in buckets  # portrait and landscape mirror each other
    aspects = [w / h for h, w in buckets]
    assert aspects == sorted(aspects) and min(aspects) < 0.6 and max(aspects) > 1.6
    with pytest.raises(DataError, match="no bucket .* lower prepare.bucket_step"):
        pt.bucket_sides(100, 64, (0.5, 2.0), 0.01)  # 64x128 is 18 % off 100^2: nothing fits
    with pytest.raises(DataError, match="at most the resolution"):
        pt.bucket_sides(64, 128)


def test_choose_bucket_is_nearest_in_log_aspect():
    buckets = pt.bucket_sides(512, 64)
    assert pt.choose_bucket(1.0, buckets) == (512, 512)
    assert pt.choose_bucket(1.3, buckets) == (448, 576)
    assert pt.choose_bucket(1 / 1.3, buckets) == (576, 448)
    assert pt.choose_bucket(10.0, buckets) == (384, 704)  # beyond the range: the widest
    with pytest.raises(DataError):
        pt.choose_bucket(0.0, buckets)


def test_fit_box_only_shrinks_and_keeps_the_point():
    box = pt.fit_box_to_aspect((0.0, 0.0, 400.0, 100.0), 2.0, keep=(350.0, 50.0))
    assert box == (200.0, 0.0, 400.0, 100.0)  # trimmed to 200 wide, pushed back inside the box
    box = pt.fit_box_to_aspect((0.0, 0.0, 100.0, 400.0), 0.5, keep=(50.0, 100.0))
    assert box == (0.0, 0.0, 100.0, 200.0)
    box = pt.fit_box_to_aspect((10.0, 10.0, 110.0, 110.0), 1.0, keep=(0.0, 0.0))
    assert box == (10.0, 10.0, 110.0, 110.0)


def _dot_centre(img: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(img > img.max() * 0.5)
    wts = img[ys, xs].astype(np.float64)
    return np.array([np.average(xs, weights=wts), np.average(ys, weights=wts)])


def test_landmarks_land_on_the_dot_in_the_resized_photo():
    """A photo with a bright dot at each landmark, cropped and resized like prepare does it (PIL, box=...):
    the moved landmarks sit on the dots."""
    from PIL import Image

    from idforge.faces.align import transform_points

    rng = np.random.default_rng(0)
    w, h = 900, 600
    kps = np.array([[400, 250], [470, 252], [436, 300], [410, 340], [462, 338]], dtype=np.float64)
    kps += rng.normal(0, 3, kps.shape)
    bbox = (kps[:, 0].min() - 30, kps[:, 1].min() - 50, kps[:, 0].max() + 30, kps[:, 1].max() + 30)
    buckets = pt.bucket_sides(256, 32)
    box, (bh, bw), m = pt.photo_frame(bbox, kps, w, h, 2.5, buckets)
    assert bh % 32 == 0 and bw % 32 == 0 and 0 <= box[0] < box[2] <= w and 0 <= box[1] < box[3] <= h
    assert abs((box[2] - box[0]) / (box[3] - box[1]) - bw / bh) < 1e-9
    moved = transform_points(kps, m)
    for k, p in enumerate(kps):
        img = np.zeros((h, w), np.float32)
        yy, xx = np.mgrid[0:h, 0:w]
        img[:] = np.exp(-((xx - p[0]) ** 2 + (yy - p[1]) ** 2) / (2 * 4.0**2))
        out = np.asarray(Image.fromarray(img, mode="F").resize((bw, bh), Image.BICUBIC, box=box))
        np.testing.assert_allclose(_dot_centre(out), moved[k], atol=0.35)


def test_landmarks_at_a_clamped_edge_stay_in_frame():
    kps = np.array([[20, 30], [60, 30], [40, 50], [25, 70], [55, 70]], dtype=np.float64)
    box, bucket, m = pt.photo_frame((5, 5, 75, 85), kps, 1000, 300, 3.0, pt.bucket_sides(512, 64))
    assert box[0] == 0.0 and box[1] == 0.0  # clipped at the photo's corner
    from idforge.faces.align import transform_points

    moved = transform_points(kps, m)
    assert (moved >= 0).all() and (moved[:, 0] < bucket[1]).all() and (moved[:, 1] < bucket[0]).all()


def test_mask_moves_with_the_face_from_the_aligned_crop():
    """A mask drawn as a disc around the nose in the aligned crop arrives as a disc around the nose's target
    position, with the area scaled by the crop->target scale squared."""
    import cv2

    from idforge.faces.align import alignment_matrix, transform_points

    w, h = 800, 500
    kps = np.array([[300, 200], [370, 195], [338, 240], [310, 280], [365, 276]], dtype=np.float64)
    m_crop = alignment_matrix(kps, 512)
    nose_crop = transform_points(kps[2:3], m_crop)[0]
    mask = np.zeros((512, 512), np.float32)
    cv2.circle(mask, (int(round(nose_crop[0])), int(round(nose_crop[1]))), 60, 1.0, -1)
    bbox = (270, 150, 400, 310)
    box, bucket, m_target = pt.photo_frame(bbox, kps, w, h, 2.5, pt.bucket_sides(512, 64))
    out = pt.mask_to_target(mask, m_crop, m_target, bucket)
    assert out.shape == bucket and out.dtype == np.float32
    nose_target = transform_points(kps[2:3], m_target)[0]
    np.testing.assert_allclose(_dot_centre(out), nose_target, atol=1.0)
    crop_scale = np.hypot(*m_crop[:, 0])  # source -> crop
    target_scale = m_target[0, 0]  # source -> target
    want_area = np.pi * 60**2 * (target_scale / crop_scale) ** 2
    assert abs(out.sum() - want_area) / want_area < 0.05
    # a mask that says nothing about the face says it in the target too
    assert pt.mask_to_target(np.zeros((512, 512), np.float32), m_crop, m_target, bucket).max() == 0.0


def test_affine_composition_and_scale():
    a = pt.box_affine((10.0, 20.0, 110.0, 70.0), (100, 200))
    s = pt.scale_affine(1 / 8)
    both = pt.compose(s, a)
    p = np.array([[35.0, 40.0]])
    from idforge.faces.align import transform_points

    np.testing.assert_allclose(transform_points(p, both), transform_points(transform_points(p, a), s), atol=1e-5)
    # the box's corners (continuous) map to the output's corners
    np.testing.assert_allclose(transform_points(np.array([[9.5, 19.5], [109.5, 69.5]]), a),
                               [[-0.5, -0.5], [199.5, 99.5]], atol=1e-9)


def test_generate_size_takes_a_bucket_and_refuses_off_grid_sides():
    from pydantic import ValidationError

    from idforge.evaluate.config import GenerateConfig

    h, w = pt.choose_bucket(1.3, pt.bucket_sides(512))
    g = GenerateConfig(height=h, width=w)
    assert (g.height, g.width) == (448, 576)
    assert GenerateConfig().height is None and GenerateConfig().width is None  # the model's native square
    with pytest.raises(ValidationError, match="generate.width 500 is not a multiple of 8.*use 496 or 504"):
        GenerateConfig(width=500)
