"""Stage 5: person matte of each FFHQ-style crop, and the crop composited on neutral grey.

``mediapipe`` selfie segmentation cannot live in the main venv (mediapipe 0.10.21 pins numpy<2 and protobuf<5;
kfp needs protobuf>=6.33.5). It runs in a small venv of its own, driven through a batch protocol (a JSON list of
crop files in, mask files out; see ``matte_worker.py``) so the model loads once per batch. Create that venv with::

    python -m idforge.curate.matte --create .venv-matte

``landmarks`` derives the matte from the face mask (106-point hull) and needs nothing extra.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from idforge.curate.config import MatteConfig
from idforge.errors import ConfigError, DataError

log = logging.getLogger(__name__)

DEFAULT_ENV = ".venv-matte"
# Found empirically: mediapipe's package import reaches cv2 and matplotlib.pyplot (drawing_utils) even when only
# selfie segmentation is used; jax, sentencepiece and sounddevice are never imported for it, so --no-deps with this
# set keeps the venv at ~400 MB instead of ~1.5 GB. opencv-python-headless is this venv's own OpenCV (4.10 still
# supports numpy<2); it never meets the main venv's opencv-python.
MATTE_REQUIREMENTS = (
    "mediapipe==0.10.21",
    "numpy==1.26.4",
    "protobuf==4.25.9",
    "absl-py==2.5.1",
    "attrs==26.1.0",
    "flatbuffers==25.12.19",
    "opencv-python-headless==4.10.0.84",
    "matplotlib==3.10.9",
    "contourpy==1.3.3",
    "cycler==0.12.1",
    "fonttools==4.68.0",
    "kiwisolver==1.5.1",
    "packaging==26.3",
    "pillow==13.0.0",
    "pyparsing==3.3.3",
    "python-dateutil==4.0.0",
    "six==1.17.0",
)
_CREATE_HINT = (
    "create it with `python -m idforge.curate.matte --create {env}` (or `make matte-env`), point "
    "curate.matte.python / $IDFORGE_MATTE_PYTHON at one, or set curate.matte.backend=landmarks"
)
WORKER_SCRIPT = Path(__file__).with_name("matte_worker.py")


def matte_python(cfg: MatteConfig) -> Path:
    """The interpreter of the matte venv: ``cfg.python``, else $IDFORGE_MATTE_PYTHON, else ``.venv-matte`` in the
    working directory, else ``.venv-matte`` at the root of the checkout this package runs from (editable installs,
    so tests and `make demo` find it from any directory)."""
    if cfg.python:
        return Path(cfg.python)
    env = os.environ.get("IDFORGE_MATTE_PYTHON")
    if env:
        return Path(env)
    here = Path(DEFAULT_ENV) / "bin" / "python"
    checkout = Path(__file__).resolve().parents[3] / DEFAULT_ENV / "bin" / "python"
    return here if here.exists() or not checkout.exists() else checkout


def check_matte_env(python: Path) -> None:
    """Raise ConfigError with the fix when ``python`` cannot import mediapipe's selfie segmentation."""
    if not python.exists():
        raise ConfigError(
            f"curate.matte.backend=mediapipe needs the matte environment, but {python} does not exist; "
            + _CREATE_HINT.format(env=DEFAULT_ENV)
        )
    probe = subprocess.run(
        [str(python), "-c", "import mediapipe as mp; mp.solutions.selfie_segmentation"],
        capture_output=True, text=True, timeout=120,
    )
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        raise ConfigError(
            f"the matte environment {python} cannot import mediapipe ({last}); " + _CREATE_HINT.format(env=DEFAULT_ENV)
        )


def create_matte_env(env_dir: str | os.PathLike[str] = DEFAULT_ENV, base_python: str | None = None) -> Path:
    """Create (or repair) the matte venv at ``env_dir`` and return its interpreter. Idempotent: a working env is
    left as it is. Needs the package index (pip), like any install."""
    env = Path(env_dir)
    python = env / "bin" / "python"
    if python.exists():
        try:
            check_matte_env(python)
            return python
        except ConfigError:
            log.info("repairing the matte environment at %s", env)
    base = base_python or getattr(sys, "_base_executable", None) or sys.executable
    subprocess.run([base, "-m", "venv", str(env)], check=True)
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps", *MATTE_REQUIREMENTS],
        check=True,
    )
    check_matte_env(python)
    log.info("matte environment ready at %s", env)
    return python


def run_mediapipe(python: Path, items: list[tuple[Path, ...]], batch_size: int = 64, grey: int = 128,
                  timeout_s: float = 600) -> None:
    """Person masks for ``items`` [(crop png, mask png out[, composite png out])], one worker call per batch.

    Raises:
        DataError: the worker failed (its stderr's last line is in the message) or left an output missing.
    """
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
            json.dump({"model_selection": 0, "grey": grey, "items": [[str(p) for p in it] for it in chunk]}, fh)
            job = fh.name
        try:
            proc = subprocess.run([str(python), str(WORKER_SCRIPT), job], capture_output=True, text=True,
                                  timeout=timeout_s)
        finally:
            os.unlink(job)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["?"])[-1]
            raise DataError(f"the mediapipe matte worker failed on a batch of {len(chunk)} crops: {last}")
        missing = [str(p) for it in chunk for p in it[1:] if not Path(p).is_file()]
        if missing:
            raise DataError(f"the mediapipe matte worker did not write {missing[:3]}")


def landmark_matte(face_mask: np.ndarray) -> np.ndarray:
    """A soft person matte from the face mask alone: the hull, feathered (uint8 0..255)."""
    import cv2

    k = max(3, (face_mask.shape[0] // 64) | 1)
    return cv2.GaussianBlur(face_mask, (k, k), 0)


def composite(rgb: np.ndarray, matte: np.ndarray, grey: int = 128, threshold: float | None = None) -> np.ndarray:
    """Foreground over neutral grey: ``rgb * a + grey * (1 - a)`` with ``a`` the matte in [0, 1] (hard-cut at
    ``threshold`` when given). Returns (H, W, 3) uint8."""
    import cv2

    a = matte.astype(np.float32) * (1.0 / 255.0)
    if threshold is not None:
        a = (a >= threshold).astype(np.float32)
    bg = np.full(rgb.shape, float(grey), np.float32)
    # cv2.blendLinear: rgb * a + bg * (1 - a) in one pass (per-pixel weights, all channels), without the GIL.
    out = cv2.blendLinear(rgb.astype(np.float32), bg, a, 1.0 - a)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m idforge.curate.matte", description=__doc__.split("\n\n")[0])
    parser.add_argument("--create", metavar="ENV_DIR", help="create/repair the matte venv here", default=None)
    parser.add_argument("--check", metavar="PYTHON", help="check that this interpreter can run the matte worker")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    if args.create:
        print(create_matte_env(args.create))
    if args.check:
        check_matte_env(Path(args.check))
        print(f"{args.check}: ok")
    if not (args.create or args.check):
        parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
