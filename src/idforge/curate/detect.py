"""Stage 2: faces with 5 landmarks through a ``FaceAnalyzer`` (the backend is chosen by ``curate.backend``)."""

from __future__ import annotations

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
