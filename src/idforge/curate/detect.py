"""Stage 2: faces with 5 landmarks through a ``FaceAnalyzer`` (the backend is chosen by ``curate.backend``).

Inputs that come pre-aligned (``curate.input_alignment``): a face that fills the frame, as in ArcFace 112x112 or
FFHQ-aligned crops, is missed by a detector trained on photos. ``arcface112`` / ``ffhq`` declare the template: the
face's landmarks are the template's, scaled to the image, and no detector runs. ``auto`` runs the detector, and
when it finds nothing runs it again on the image centred in a grey canvas twice its size (the face then looks
like one in a photo), mapping the result back to the image's pixels. ``raw`` is the detector alone.
"""

from __future__ import annotations

import numpy as np

from idforge.curate.config import CurateConfig
from idforge.faces import Face, FaceAnalyzer


def load_curate_analyzer(cfg: CurateConfig, num_threads: int | None = None) -> FaceAnalyzer:
    """The analyzer the curation config asks for, models loaded (call once per worker process)."""
    from idforge.faces import load_analyzer

    return load_analyzer(cfg.backend, cfg.model_dir, det_thresh=cfg.detect.det_thresh, num_threads=num_threads)


def detect_faces(analyzer: FaceAnalyzer, rgb) -> list[Face]:
    """Faces in decoded-image pixels, largest first (ties broken by position so the order is deterministic)."""
    faces = analyzer.detect(rgb)
    return sorted(faces, key=lambda f: (-round(f.area, 3), round(f.bbox[0], 3), round(f.bbox[1], 3)))


# The border added on each side for the second look of ``auto``, as a fraction of the longer side.
PAD_FRACTION = 0.5


def find_faces(analyzer: FaceAnalyzer, rgb: np.ndarray, input_alignment: str = "raw") -> list[Face]:
    """The faces of one decoded image under ``curate.input_alignment`` (module docstring), largest first."""
    if input_alignment in ("arcface112", "ffhq"):
        return [declared_face(rgb.shape[1], rgb.shape[0], input_alignment)]
    faces = detect_faces(analyzer, rgb)
    if faces or input_alignment == "raw":
        return faces
    return detect_padded(analyzer, rgb)


def declared_face(width: int, height: int, template: str) -> Face:
    """The face of a ``template``-aligned image (``arcface112`` or ``ffhq``) of ``width`` x ``height`` pixels: the
    template's landmarks scaled to the image; box = the ArcFace 112 frame those landmarks define (the whole image
    for an ArcFace crop); score 1 (declared, not detected)."""
    from idforge.faces.align import (
        ARCFACE_TEMPLATE_112,
        FFHQ_TEMPLATE_512,
        alignment_matrix,
        invert_affine,
        transform_points,
    )

    base, size = (ARCFACE_TEMPLATE_112, 112) if template == "arcface112" else (FFHQ_TEMPLATE_512, 512)
    kps = (base * np.array([width / size, height / size])).astype(np.float32)
    corners = np.array([[0.0, 0.0], [112.0, 112.0]])
    (x0, y0), (x1, y1) = transform_points(corners, invert_affine(alignment_matrix(kps, 112)))
    return Face(bbox=(float(x0), float(y0), float(x1), float(y1)), kps=kps, det_score=1.0)


def detect_padded(analyzer: FaceAnalyzer, rgb: np.ndarray, grey: int = 128) -> list[Face]:
    """Detect on ``rgb`` centred in a grey canvas; faces in ``rgb``'s pixels (boxes may reach past its edges)."""
    import cv2

    pad = max(1, int(round(PAD_FRACTION * max(rgb.shape[:2]))))
    canvas = cv2.copyMakeBorder(rgb, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=(grey, grey, grey))
    shift = np.array([pad, pad], dtype=np.float32)
    out = []
    for f in detect_faces(analyzer, canvas):
        x0, y0, x1, y1 = f.bbox
        dense = None if f.landmarks106 is None else f.landmarks106 - shift
        out.append(Face(bbox=(x0 - pad, y0 - pad, x1 - pad, y1 - pad), kps=f.kps - shift, det_score=f.det_score,
                        landmarks106=dense))
    return out
