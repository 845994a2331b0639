"""Stage 3: quality gates on one face. Each failed gate is a stable reason code on that face's manifest row.

Order (first failure wins): ``face_too_small``, ``low_score``, ``extreme_pose``, ``blurry``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from idforge.curate.config import CurateConfig
from idforge.faces import Face
from idforge.faces.align import ARCFACE_TEMPLATE_112, alignment_matrix, transform_points


@dataclass(frozen=True)
class FaceQuality:
    """Measurements recorded for every face (whether it passes or not).

    Attributes:
        size_px: shorter side of the detection box in source pixels.
        sharpness: variance of the Laplacian of the grey 112x112 aligned crop (blur measure; higher = sharper).
        yaw_deg: left/right head turn estimated from the nose offset against the eye line (0 = frontal).
        roll_deg: in-plane tilt of the eye line (alignment removes it; recorded for audits).
    """

    size_px: float
    sharpness: float
    yaw_deg: float
    roll_deg: float


def sharpness(crop112: np.ndarray) -> float:
    """Variance of the Laplacian of an aligned crop (uint8 RGB): the classic focus measure."""
    import cv2

    grey = cv2.cvtColor(crop112, cv2.COLOR_RGB2GRAY)
    return float(cv2.Laplacian(grey, cv2.CV_64F).var())


def pose_from_landmarks(kps: np.ndarray) -> tuple[float, float]:
    """(yaw, roll) in degrees from 5 landmarks.

    Yaw: the landmarks are mapped into the 112 template frame (scale and roll removed); there the nose's horizontal
    offset from the eye midline, relative to half the eye distance, is ~sin(yaw) (0 frontal, ~1 at profile).
    """
    kps = np.asarray(kps, dtype=np.float64)
    eye_vec = kps[1] - kps[0]
    roll = float(np.degrees(np.arctan2(eye_vec[1], eye_vec[0])))
    pts = transform_points(kps, alignment_matrix(kps, 112)).astype(np.float64)
    t = ARCFACE_TEMPLATE_112
    # Subtract the template's own (tiny) asymmetry so a frontal face reads 0.
    base = (t[2, 0] - (t[0, 0] + t[1, 0]) / 2) / ((t[1, 0] - t[0, 0]) / 2)
    half = max((pts[1, 0] - pts[0, 0]) / 2, 1e-6)
    ratio = (pts[2, 0] - (pts[0, 0] + pts[1, 0]) / 2) / half - base
    yaw = float(np.degrees(np.arcsin(np.clip(ratio, -1.0, 1.0))))
    return yaw, roll


def measure(face: Face, crop112: np.ndarray, scale: float) -> FaceQuality:
    yaw, roll = pose_from_landmarks(face.kps)
    return FaceQuality(size_px=face.size * scale, sharpness=sharpness(crop112), yaw_deg=yaw, roll_deg=roll)


def gate_reason(face: Face, quality: FaceQuality, cfg: CurateConfig) -> str:
    """'' when the face passes every gate, else the first failing gate's reason code."""
    g = cfg.gates
    if quality.size_px < cfg.min_face_px:
        return "face_too_small"
    if face.det_score < g.min_det_score:
        return "low_score"
    if abs(quality.yaw_deg) > g.max_yaw_deg:
        return "extreme_pose"
    if quality.sharpness < g.min_sharpness:
        return "blurry"
    return ""
