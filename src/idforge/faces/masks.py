"""Face masks from landmarks: what SeFi-IDE's face-wise attention loss needs, always available (no segmenter).

With 106 dense landmarks (insightface 2d106det) the mask is the filled convex hull of the face contour, eyebrows
and features, raised to cover the forehead; with only 5 points and a box it is an ellipse fitted to the box.
"""

from __future__ import annotations

import numpy as np

from idforge.errors import DataError


def hull_mask(shape: tuple[int, int], points: np.ndarray, forehead: float = 0.35) -> np.ndarray:
    """(H, W) uint8 {0, 255}: filled convex hull of ``points`` (K, 2), K >= 3.

    ``forehead`` raises the hull above the eyebrows by that fraction of the brow-to-chin height, because
    106-point contours stop at the brows and a face mask should include the forehead.
    """
    import cv2

    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if pts.shape[0] < 3:
        raise DataError(f"a hull mask needs at least 3 points, got {pts.shape[0]}")
    if forehead > 0:
        top, bottom = pts[:, 1].min(), pts[:, 1].max()
        lift = forehead * (bottom - top)
        upper = pts[pts[:, 1] < top + 0.25 * (bottom - top)].copy()
        upper[:, 1] -= lift
        pts = np.vstack([pts, upper])
    hull = cv2.convexHull(np.round(pts).astype(np.int32))
    mask = np.zeros(shape, dtype=np.uint8)
    cv2.fillConvexPoly(mask, hull, 255)
    return mask


def ellipse_mask(shape: tuple[int, int], bbox: tuple[float, float, float, float]) -> np.ndarray:
    """(H, W) uint8 {0, 255}: the ellipse inscribed in ``bbox`` (x0, y0, x1, y1)."""
    import cv2

    x0, y0, x1, y1 = (float(v) for v in bbox)
    if not (x1 > x0 and y1 > y0):
        raise DataError(f"bbox {bbox} is empty")
    mask = np.zeros(shape, dtype=np.uint8)
    centre = (int(round((x0 + x1) / 2)), int(round((y0 + y1) / 2)))
    axes = (max(int(round((x1 - x0) / 2)), 1), max(int(round((y1 - y0) / 2)), 1))
    cv2.ellipse(mask, centre, axes, 0, 0, 360, 255, thickness=-1)
    return mask


def face_mask_in_crop(face, m: np.ndarray, size: int) -> np.ndarray:
    """The face mask of ``face`` (an ``idforge.faces.Face``) in an aligned crop made with matrix ``m``.

    Returns (size, size) uint8 {0, 255}.
    """
    from idforge.faces.align import transform_points

    if face.landmarks106 is not None:
        return hull_mask((size, size), transform_points(face.landmarks106, m))
    x0, y0, x1, y1 = face.bbox
    corners = transform_points(np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]]), m)
    # The box rotates with the alignment; its axis-aligned extent in the crop is a fair ellipse frame.
    return ellipse_mask((size, size), (*corners.min(0), *corners.max(0)))
