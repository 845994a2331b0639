"""Face analysis: the only face code in idforge (curation, the face-identity loss and evaluation all call it).

``load_analyzer(backend, model_dir)`` returns a ``FaceAnalyzer`` (detect faces with 5 landmarks, embed aligned
crops); ``idforge.faces.align`` holds the templates and warps; ``idforge.faces.torch_arcface`` the differentiable
ArcFace. Backend modules import onnxruntime/OpenCV lazily, so importing this package is cheap.
"""

from __future__ import annotations

from pathlib import Path

from idforge.faces.base import Face, FaceAnalyzer, l2_normalise

__all__ = ["Face", "FaceAnalyzer", "load_analyzer", "l2_normalise", "BACKENDS"]

BACKENDS = ("insightface", "opencv")


def load_analyzer(
    backend: str = "insightface",
    model_dir: str | Path | None = None,
    *,
    det_thresh: float | None = None,
    num_threads: int | None = None,
    landmarks106: bool = True,
) -> FaceAnalyzer:
    """Build a face analyzer with its models loaded.

    Args:
        backend: "insightface" (SCRFD + ArcFace 512-d; non-commercial models) or "opencv" (YuNet + SFace 128-d).
        model_dir: model directory; None = the embedded files the registry packages ship.
        det_thresh: detector score threshold (None: the backend's default, 0.5 / 0.6).
        num_threads: per-process inference threads (set 1 when running one worker per core).
        landmarks106: insightface only: also compute 106-point landmarks (face masks).
    Raises:
        ConfigError: unknown backend. ModelNotFoundError: the model files are missing.
    """
    from idforge.errors import ConfigError

    if backend == "insightface":
        from idforge.faces.insightface_backend import InsightfaceAnalyzer

        kw = {} if det_thresh is None else {"det_thresh": det_thresh}
        return InsightfaceAnalyzer(model_dir, landmarks106=landmarks106, num_threads=num_threads, **kw)
    if backend == "opencv":
        from idforge.faces.opencv_backend import OpencvAnalyzer

        kw = {} if det_thresh is None else {"det_thresh": det_thresh}
        return OpencvAnalyzer(model_dir, num_threads=num_threads, **kw)
    raise ConfigError(f"unknown face backend {backend!r}; choose one of {', '.join(BACKENDS)}")
