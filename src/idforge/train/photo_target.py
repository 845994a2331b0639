"""Geometry of the ``photo`` training target: the photo around a face, in an aspect-ratio bucket.

Pure functions (numpy/OpenCV), all in OpenCV's pixel convention (``faces/align.py``): a (2, 3) matrix maps a pixel
(x, y) to ``M @ [x, y, 1]``, pixel centres at integer coordinates. Boxes are (x0, y0, x1, y1) in *continuous*
coordinates (pixel i covers [i, i + 1)), as PIL's ``resize(box=...)`` and the detector's boxes use them.

The chain for one face: face box (manifest, source pixels) -> :func:`context_box` (enlarged, clamped to the image)
-> :func:`choose_bucket` by its aspect -> :func:`fit_box_to_aspect` (trimmed to the bucket's exact aspect around
the face) -> :func:`box_affine` (source pixels -> target pixels) -> landmarks by ``transform_points`` and the face
mask by :func:`mask_to_target` (FFHQ-crop frame -> source -> target).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from idforge.errors import DataError

Box = tuple[float, float, float, float]


def context_box(bbox: Sequence[float], factor: float, width: int, height: int) -> Box:
    """The face box scaled by ``factor`` about its centre, intersected with the ``width`` x ``height`` image.

    Clamping (not shifting) keeps the face where the photo has it: a face at the photo's edge stays at the
    target's edge, and the clipped box takes another aspect (another bucket) instead of inventing pixels.
    Raises DataError for a box with no area, one outside the image, or a factor below 1.
    """
    x0, y0, x1, y1 = (float(v) for v in bbox)
    if not (np.isfinite([x0, y0, x1, y1]).all() and x1 > x0 and y1 > y0):
        raise DataError(f"face box {list(bbox)} has no area: expected (x0, y0, x1, y1) with x1 > x0, y1 > y0")
    if factor < 1:
        raise DataError(f"context_factor must be >= 1 (the face box itself), got {factor}")
    if width < 1 or height < 1:
        raise DataError(f"image size must be positive, got {width}x{height}")
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    hw, hh = (x1 - x0) * factor / 2, (y1 - y0) * factor / 2
    box = (max(0.0, cx - hw), max(0.0, cy - hh), min(float(width), cx + hw), min(float(height), cy + hh))
    if box[2] <= box[0] or box[3] <= box[1]:
        raise DataError(f"face box {list(bbox)} lies outside the {width}x{height} image")
    return box


def bucket_sides(resolution: int, step: int = 64, aspect_range: tuple[float, float] = (0.5, 2.0),
                 area_tolerance: float = 0.1) -> list[tuple[int, int]]:
    """Every (height, width) bucket near ``resolution``^2 pixels, sorted by aspect (width / height).

    For each width (multiple of ``step``), the height is the multiple of ``step`` nearest to area / width; the
    bucket is kept when its aspect lies in ``aspect_range`` and its area within ``area_tolerance`` of the target,
    together with its transpose (when in range), so portrait and landscape photos get mirror-image choices.
    The square (resolution, resolution) is always one of them when ``resolution`` is a multiple of ``step``.
    """
    if resolution < step or step < 1:
        raise DataError(f"bucket step {step} must be positive and at most the resolution {resolution}")
    lo, hi = aspect_range
    area = resolution * resolution
    out: set[tuple[int, int]] = set()
    w, w_max = step, resolution * math.sqrt(hi * (1 + area_tolerance)) + step
    while w <= w_max:
        h = max(step, round(area / w / step) * step)
        if lo <= w / h <= hi and abs(w * h - area) <= area_tolerance * area:
            out.add((h, w))
            if lo <= h / w <= hi:
                out.add((w, h))  # portrait and landscape alike
        w += step
    if not out:
        raise DataError(f"no bucket with sides multiple of {step} has an area within {area_tolerance:.0%} of "
                        f"{resolution}^2 and an aspect in {aspect_range}: lower prepare.bucket_step or raise "
                        "prepare.bucket_area_tolerance")
    return sorted(out, key=lambda hw: hw[1] / hw[0])


def choose_bucket(aspect: float, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The (height, width) bucket whose aspect (width / height) is nearest to ``aspect`` in log scale (so 2:1 and
    1:2 are equally far from square); ties go to the first bucket."""
    if not aspect > 0 or not buckets:
        raise DataError(f"cannot choose a bucket for aspect {aspect} among {len(buckets)} buckets")
    return min(buckets, key=lambda hw: abs(math.log(hw[1] / hw[0]) - math.log(aspect)))


def fit_box_to_aspect(box: Box, aspect: float, keep: Sequence[float]) -> Box:
    """``box`` trimmed along one side to width / height == ``aspect``, the trimmed side centred on ``keep`` (x, y)
    as far as the box allows. Only ever shrinks, so the result stays inside the image and holds no invented
    pixels; the resize into the bucket is then uniform (faces keep their proportions)."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    if w / h > aspect:  # too wide: trim the width
        nw = h * aspect
        nx0 = min(max(float(keep[0]) - nw / 2, x0), x1 - nw)
        return (nx0, y0, nx0 + nw, y1)
    nh = w / aspect
    ny0 = min(max(float(keep[1]) - nh / 2, y0), y1 - nh)
    return (x0, ny0, x1, ny0 + nh)


def box_affine(box: Box, out_hw: tuple[int, int]) -> np.ndarray:
    """(2, 3) float64 matrix from image pixels to the pixels of ``box`` resized to ``out_hw`` (height, width).

    With pixel centres at integers and ``box`` continuous: x_out + 0.5 = (x_in + 0.5 - x0) * sx, the mapping
    PIL's ``resize(size, box=box)`` applies to the pixels.
    """
    x0, y0, x1, y1 = box
    h, w = out_hw
    sx, sy = w / (x1 - x0), h / (y1 - y0)
    return np.array([[sx, 0.0, sx * (0.5 - x0) - 0.5], [0.0, sy, sy * (0.5 - y0) - 0.5]], dtype=np.float64)


def scale_affine(factor: float) -> np.ndarray:
    """(2, 3) matrix of a uniform resize by ``factor`` in the pixel-centre convention of :func:`box_affine`."""
    return np.array([[factor, 0.0, 0.5 * factor - 0.5], [0.0, factor, 0.5 * factor - 0.5]], dtype=np.float64)


def compose(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """The (2, 3) affine ``outer ∘ inner`` (apply ``inner`` first)."""
    full = lambda m: np.vstack([np.asarray(m, dtype=np.float64), [0.0, 0.0, 1.0]])  # noqa: E731
    return (full(outer) @ full(inner))[:2]


def mask_to_target(mask: np.ndarray, crop_from_source: np.ndarray, target_from_source: np.ndarray,
                   out_hw: tuple[int, int]) -> np.ndarray:
    """A mask drawn in the aligned crop's frame, moved into the target frame.

    Args:
        mask: (S, S) float32/uint8 mask in the FFHQ-aligned crop.
        crop_from_source: (2, 3) alignment matrix, source pixels -> crop pixels (``alignment_matrix(kps, S)``).
        target_from_source: (2, 3) matrix, source pixels -> target pixels (:func:`box_affine`).
        out_hw: (height, width) of the target.
    Returns:
        (height, width) float32 in the mask's value range; zero where the crop does not reach (the face lies
        inside the crop, so nothing of it is lost).
    """
    import cv2

    from idforge.faces.align import invert_affine

    m = compose(target_from_source, invert_affine(crop_from_source))  # crop -> source -> target
    h, w = out_hw
    return cv2.warpAffine(np.asarray(mask, dtype=np.float32), m, (int(w), int(h)), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)


def photo_frame(bbox: Sequence[float], landmarks: np.ndarray, width: int, height: int, factor: float,
                buckets: Sequence[tuple[int, int]]) -> tuple[Box, tuple[int, int], np.ndarray]:
    """(crop box, bucket (h, w), source -> target matrix) of one face: the whole chain of the module docstring.

    ``bbox``, ``landmarks`` (5, 2) and the box returned are in the source image's pixels (``width`` x ``height``).
    The trimmed side is centred on the landmarks' centre, so the face stays in frame.
    """
    box = context_box(bbox, factor, width, height)
    bucket = choose_bucket((box[2] - box[0]) / (box[3] - box[1]), buckets)
    centre = np.asarray(landmarks, dtype=np.float64).reshape(-1, 2).mean(0) + 0.5  # continuous coordinates
    box = fit_box_to_aspect(box, bucket[1] / bucket[0], centre)
    return box, bucket, box_affine(box, bucket)
