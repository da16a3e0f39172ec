"""Pure image functions: mode conversion, shorter-side resize + centre crop, PNG encoding."""

from __future__ import annotations

import io
from enum import Enum

import numpy as np
from PIL import Image, ImageOps


class Resample(str, Enum):
    LANCZOS = "lanczos"
    BICUBIC = "bicubic"

    @property
    def pil(self) -> Image.Resampling:
        return Image.Resampling.LANCZOS if self is Resample.LANCZOS else Image.Resampling.BICUBIC


ALPHA_BACKGROUND = (255, 255, 255)
"""Transparent pixels are composited over white (a black fill would turn icons' backgrounds black)."""

_HIGH_BIT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def _high_bit_to_l(img: Image.Image) -> Image.Image:
    # PIL's convert("L") clips 16-bit values at 255 instead of scaling them.
    arr = np.asarray(img, dtype=np.float64)
    top = 1.0 if img.mode == "F" and arr.max(initial=0.0) <= 1.0 else (65535.0 if arr.max(initial=0) > 255 else 255.0)
    out = np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
    return Image.fromarray(out)  # uint8 HxW → "L"


def to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Any PIL mode → "L" (channels=1, ITU-R 601 luma) or "RGB" (channels=3)."""
    target = "L" if channels == 1 else "RGB"
    if img.mode in _HIGH_BIT_MODES:
        img = _high_bit_to_l(img)
    has_alpha = img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (img.mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        img = Image.alpha_composite(background, rgba).convert("RGB")
    return img if img.mode == target else img.convert(target)


def resize_center_crop(img: Image.Image, size: int, resample: Resample) -> Image.Image:
    """Scale the shorter side to ``size`` and keep the central ``size``×``size`` square.

    Done as one resample of the central square (``box=``), so there is no rounding of an
    intermediate size and no second interpolation.
    """
    w, h = img.size
    if (w, h) == (size, size):
        return img
    side = min(w, h)
    left, top = (w - side) / 2.0, (h - side) / 2.0
    return img.resize((size, size), resample=resample.pil, box=(left, top, left + side, top + side))


def prepare(img: Image.Image, size: int, channels: int, resample: Resample) -> Image.Image:
    return resize_center_crop(to_mode(img, channels), size, resample)


def open_image_bytes(data: bytes, size: int) -> Image.Image:
    """Decode fully (so corrupt or truncated files fail here), honouring EXIF orientation."""
    img = Image.open(io.BytesIO(data))
    if img.format == "JPEG":
        # Let libjpeg decode at a reduced scale (DCT scaling) while keeping >= 2x the target, which
        # keeps quality for the LANCZOS step and makes large photos several times faster.
        img.draft(img.mode, (2 * size, 2 * size))
    img.load()
    return ImageOps.exif_transpose(img)


def array_to_image(arr: np.ndarray) -> Image.Image:
    """An HxW or HxWxC uint8 array (C in 1, 3, 4) → PIL image."""
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        return Image.fromarray(np.ascontiguousarray(arr))  # uint8 HxW → "L"
    if arr.shape[2] not in (3, 4):
        raise ValueError(f"expected 1, 3 or 4 channels, got shape {arr.shape}")
    return Image.fromarray(np.ascontiguousarray(arr))  # uint8 HxWx3 → "RGB", HxWx4 → "RGBA"


def encode_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()
