"""Curation's quality gates as decisions: each at its default threshold +/- epsilon, both sides of the yaw gate,
and which reason a face failing several gates gets (the documented order: the first failing gate wins)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from idforge.curate.config import CurateConfig
from idforge.curate.gates import FaceQuality, gate_reason, measure, pose_from_landmarks
from idforge.faces import Face
from idforge.faces.align import ARCFACE_TEMPLATE_112

ORDER = ("face_too_small", "low_score", "extreme_pose", "blurry")  # gates.py's documented order
EPS = 1e-3
CFG = CurateConfig()  # the defaults are what a user gets


def _face(score: float = 0.9, kps=ARCFACE_TEMPLATE_112, side: float = 112.0) -> Face:
    return Face(bbox=(0.0, 0.0, side, side), kps=np.asarray(kps, np.float32), det_score=score)


def _passing() -> FaceQuality:
    return FaceQuality(size_px=CFG.min_face_px * 2, sharpness=CFG.gates.min_sharpness * 4, yaw_deg=0.0, roll_deg=0.0)


def _with(q: FaceQuality, **changes: float) -> FaceQuality:
    return FaceQuality(**{**q.__dict__, **changes})


def test_defaults_pass_a_good_face():
    assert gate_reason(_face(), _passing(), CFG) == ""


@pytest.mark.parametrize(("reason", "field", "threshold", "failing_side"), [
    ("face_too_small", "size_px", CFG.min_face_px, -1),
    ("extreme_pose", "yaw_deg", CFG.gates.max_yaw_deg, +1),
    ("extreme_pose", "yaw_deg", -CFG.gates.max_yaw_deg, -1),  # turned the other way
    ("blurry", "sharpness", CFG.gates.min_sharpness, -1),
])
def test_each_measured_gate_at_its_default_threshold(reason, field, threshold, failing_side):
    assert gate_reason(_face(), _with(_passing(), **{field: threshold}), CFG) == ""  # the threshold itself passes
    assert gate_reason(_face(), _with(_passing(), **{field: threshold - failing_side * EPS}), CFG) == ""
    assert gate_reason(_face(), _with(_passing(), **{field: threshold + failing_side * EPS}), CFG) == reason


def test_detection_score_gate_at_its_default_threshold():
    t = CFG.gates.min_det_score
    assert gate_reason(_face(score=t), _passing(), CFG) == ""
    assert gate_reason(_face(score=t + EPS), _passing(), CFG) == ""
    assert gate_reason(_face(score=t - EPS), _passing(), CFG) == "low_score"


def test_measured_size_is_the_shorter_box_side_in_source_pixels():
    crop = np.random.default_rng(0).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    side = float(CFG.min_face_px)
    for scale, box, want in ((1.0, side, ""), (1.0, side - EPS, "face_too_small"), (0.5, 2 * side, ""),
                             (0.5, 2 * side - EPS, "face_too_small")):
        face = Face(bbox=(10.0, 10.0, 10.0 + box, 10.0 + 3 * box), kps=ARCFACE_TEMPLATE_112.astype(np.float32),
                    det_score=0.9)
        q = measure(face, crop, scale)
        assert q.size_px == pytest.approx(box * scale) and gate_reason(face, q, CFG) == want, (scale, box)


def _turned(yaw_target: float) -> np.ndarray:
    """Template landmarks with the nose moved sideways until the measured yaw is ``yaw_target`` degrees."""
    lo, hi = ARCFACE_TEMPLATE_112[0, 0] + 0.5, ARCFACE_TEMPLATE_112[1, 0] - 0.5
    for _ in range(60):  # yaw grows monotonically with the nose's x: bisection
        mid = (lo + hi) / 2
        kps = ARCFACE_TEMPLATE_112.copy()
        kps[2, 0] = mid
        if pose_from_landmarks(kps)[0] < yaw_target:
            lo = mid
        else:
            hi = mid
    return kps


def _mirrored(kps: np.ndarray, width: float = 112.0) -> np.ndarray:
    """The same face flipped left-right: x mirrored, and the left/right eyes and mouth corners swapped."""
    m = kps.copy()
    m[:, 0] = width - m[:, 0]
    return m[[1, 0, 2, 4, 3]]


@pytest.mark.parametrize("offset", [-0.5, +0.5])
def test_mirrored_faces_get_the_same_pose_decision(offset):
    crop = np.random.default_rng(1).integers(0, 256, (112, 112, 3), dtype=np.uint8)  # sharp: only pose can fail
    kps = _turned(CFG.gates.max_yaw_deg + offset)
    yaw, _ = pose_from_landmarks(kps)
    yaw_m, _ = pose_from_landmarks(_mirrored(kps))
    assert yaw == pytest.approx(CFG.gates.max_yaw_deg + offset, abs=0.05)
    assert yaw_m == pytest.approx(-yaw, abs=0.05)  # the other way, as far
    want = "extreme_pose" if offset > 0 else ""
    for pts in (kps, _mirrored(kps)):
        face = _face(kps=pts)
        assert gate_reason(face, measure(face, crop, 1.0), CFG) == want, pts[2]


@pytest.mark.parametrize("failing", [set(c) for n in range(2, 5) for c in itertools.combinations(ORDER, n)],
                         ids=lambda s: "+".join(sorted(s)))
def test_a_face_failing_several_gates_gets_the_first_in_gate_order(failing):
    q, score = _passing(), 0.9
    if "face_too_small" in failing:
        q = _with(q, size_px=CFG.min_face_px - 1)
    if "low_score" in failing:
        score = CFG.gates.min_det_score / 2
    if "extreme_pose" in failing:
        q = _with(q, yaw_deg=-(CFG.gates.max_yaw_deg + 10))
    if "blurry" in failing:
        q = _with(q, sharpness=CFG.gates.min_sharpness / 4)
    assert gate_reason(_face(score=score), q, CFG) == next(r for r in ORDER if r in failing)
