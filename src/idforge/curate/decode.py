"""Stage 1: decode and validate one input file into an upright 8-bit RGB array.

Every way a file can fail becomes a :class:`Rejected` with a stable reason code, never an exception that stops the
run: ``empty_file``, ``too_large`` (bytes or header pixels: checked before any pixel is decoded), ``not_an_image``,
``unsupported_format``, ``animated``, ``decode_error`` (corrupt or truncated), ``image_too_small``.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np

from idforge.curate.config import DecodeConfig


class Rejected(Exception):
    """A file (or face) left out of the dataset, with a stable ``reason`` code and a human ``detail``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Decoded:
    """An upright image ready for detection.

    Attributes:
        rgb: (H, W, 3) uint8, EXIF orientation applied, alpha composited on grey.
        scale: source pixels per decoded pixel (> 1 when a large photo was decoded at reduced size).
        format: the container format PIL found (JPEG, PNG, WEBP...).
        source_size: (width, height) of the upright source image in pixels.
        mode: the source's PIL mode (RGB, L, CMYK, I;16, RGBA...).
    """

    rgb: np.ndarray
    scale: float
    format: str
    source_size: tuple[int, int]
    mode: str


def _to_rgb(im, grey: int = 128) -> np.ndarray:
    """Any PIL mode -> (H, W, 3) uint8 RGB."""
    from PIL import Image

    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # PIL's convert("L") clips 16-bit values at 255 instead of scaling: scale the full range ourselves.
        arr = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        grey8 = np.clip(np.round(arr / peak * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(grey8[..., None], 3, axis=2)
    if mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        peak = 1.0 if arr.max() <= 1.0 else 255.0
        grey8 = np.clip(np.round(arr / peak * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(grey8[..., None], 3, axis=2)
    if mode == "P":
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "RGBa", "La", "PA"):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (grey, grey, grey, 255))
        return np.asarray(Image.alpha_composite(bg, rgba).convert("RGB"))
    # CMYK (including Adobe's inverted JPEGs, which PIL's decoder handles), YCbCr, L, 1, RGB.
    return np.asarray(im.convert("RGB"))


def decode_image(data: bytes, cfg: DecodeConfig | None = None) -> Decoded:
    """Decode ``data`` (a whole file) into a :class:`Decoded`, or raise :class:`Rejected`."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    cfg = cfg or DecodeConfig()
    if len(data) == 0:
        raise Rejected("empty_file", "the file has zero bytes")
    if len(data) > cfg.max_bytes:
        raise Rejected("too_large", f"{len(data)} bytes > curate.decode.max_bytes={cfg.max_bytes}")
    with warnings.catch_warnings():
        # PIL warns (and past 2x its own limit raises) on huge headers; we apply our own limit below.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            raise Rejected("too_large", str(exc)) from None
        except UnidentifiedImageError:
            raise Rejected("not_an_image", "not a recognised image file") from None
        except Exception as exc:  # corrupt headers raise all sorts (SyntaxError, struct.error...)
            raise Rejected("decode_error", f"{type(exc).__name__}: {exc}") from None
        with im:
            fmt = im.format or "unknown"
            w, h = im.size
            if w * h > cfg.max_pixels:
                raise Rejected("too_large", f"{w}x{h} pixels > curate.decode.max_pixels={cfg.max_pixels}")
            if fmt.upper() not in {f.upper() for f in cfg.formats}:
                raise Rejected("unsupported_format", f"{fmt} is not one of {', '.join(cfg.formats)}")
            if getattr(im, "is_animated", False) and getattr(im, "n_frames", 1) > 1:
                raise Rejected("animated", f"animated {fmt} with {im.n_frames} frames; give a still image")
            mode = im.mode
            try:
                if fmt in ("JPEG", "MPO") and max(w, h) > cfg.max_side:
                    # DCT-domain downscale: decodes a 6000-px JPEG at 1/2..1/8 cost, never below max_side.
                    im.draft("RGB", (cfg.max_side, cfg.max_side))
                decoded_size = im.size
                im.load()
                upright = ImageOps.exif_transpose(im)
            except Image.DecompressionBombError as exc:
                raise Rejected("too_large", str(exc)) from None
            except Exception as exc:  # truncated or corrupt pixel data
                raise Rejected("decode_error", f"{type(exc).__name__}: {exc}") from None
            scale = w / decoded_size[0]
            swapped = upright.size != decoded_size  # EXIF orientation 5-8 swap width and height
            source_size = (h, w) if swapped else (w, h)
            if min(source_size) < cfg.min_side:
                raise Rejected("image_too_small", f"{source_size[0]}x{source_size[1]} < {cfg.min_side} px")
            rgb = _to_rgb(upright)
    if max(rgb.shape[:2]) > cfg.max_side:
        import cv2

        f = cfg.max_side / max(rgb.shape[:2])
        new = (max(1, round(rgb.shape[1] * f)), max(1, round(rgb.shape[0] * f)))
        rgb = cv2.resize(rgb, new, interpolation=cv2.INTER_AREA)
        scale = max(source_size) / max(rgb.shape[:2])
    return Decoded(rgb=np.ascontiguousarray(rgb), scale=float(scale), format=fmt, source_size=source_size, mode=mode)
