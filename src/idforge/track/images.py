"""Images for MLflow: a pure grid builder and loggers for single images and grids."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from idforge.errors import DataError
from idforge.track.runs import active_run_id

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["log_image", "log_image_grid", "log_image_step", "make_image_grid", "to_pil"]

log = logging.getLogger(__name__)


def to_pil(image: Any) -> Image.Image:
    """A PIL image from a PIL image or an array ``(H, W)``, ``(H, W, 1|3|4)``: uint8, or float in [0, 1].

    Raises:
        DataError: another shape or dtype (named in the message).
    """
    import numpy as np
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise DataError(f"image array has shape {arr.shape}; expected (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)")
    if arr.dtype == np.uint8:
        return Image.fromarray(arr)
    if np.issubdtype(arr.dtype, np.floating) or arr.dtype == np.bool_:
        # Float images are [0, 1] by convention (diffusers' output_type="np"); values outside are clipped.
        return Image.fromarray(np.clip(np.rint(arr.astype(np.float64) * 255.0), 0, 255).astype(np.uint8))
    raise DataError(f"image array has dtype {arr.dtype}; expected uint8, or float in [0, 1]")


def make_image_grid(
    images: Sequence[Any], rows: int, cols: int, background: tuple[int, int, int] = (255, 255, 255)
) -> Image.Image:
    """Tile ``images`` row-major into an RGB grid of ``rows x cols`` cells, each the size of the first image.

    Images of another size are resized (bilinear) to the cell; cells past the last image stay ``background``.
    The result is ``(cols * W, rows * H)`` pixels.

    Raises:
        DataError: no images, ``rows``/``cols`` < 1, or more images than cells.
    """
    from PIL import Image

    if rows < 1 or cols < 1:
        raise DataError(f"image grid needs rows >= 1 and cols >= 1, got rows={rows}, cols={cols}")
    if not images:
        raise DataError("image grid got no images")
    if len(images) > rows * cols:
        raise DataError(f"image grid of {rows}x{cols} has {rows * cols} cells but got {len(images)} images")
    tiles = [to_pil(im).convert("RGB") for im in images]
    w, h = tiles[0].size
    grid = Image.new("RGB", (cols * w, rows * h), background)
    for i, tile in enumerate(tiles):
        if tile.size != (w, h):
            tile = tile.resize((w, h), Image.Resampling.BILINEAR)
        grid.paste(tile, ((i % cols) * w, (i // cols) * h))
    return grid


def log_image(image: Any, artifact_file: str) -> None:
    """Log one image (PIL or array, see :func:`to_pil`) to the active run as ``artifact_file`` (e.g. ``a/b.png``)."""
    pil = to_pil(image)
    if active_run_id() is None:
        log.debug("no active MLflow run: image %s not logged", artifact_file)
        return
    import mlflow

    mlflow.log_image(pil, artifact_file=artifact_file)


def log_image_step(image: Any, key: str, step: int) -> None:
    """Log one image of the series ``key`` at ``step`` (MLflow's image series: a step slider in the run's
    Model metrics / images view)."""
    if active_run_id() is None:
        log.debug("no active MLflow run: image %s@%d not logged", key, step)
        return
    import mlflow

    mlflow.log_image(to_pil(image), key=key, step=step)


def log_image_grid(images: Sequence[Any], rows: int, cols: int, artifact_file: str) -> Image.Image:
    """Build :func:`make_image_grid` and log it as ``artifact_file``; returns the grid."""
    grid = make_image_grid(images, rows, cols)
    log_image(grid, artifact_file)
    return grid
