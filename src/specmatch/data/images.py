"""Decoding and cropping single images (PIL), with errors that name the file."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".gif")


class BadImage(Exception):
    """An image file that cannot be decoded; the message says which and why."""


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def to_rgb(img: Image.Image) -> Image.Image:
    """Grayscale, palette, 16-bit, CMYK and RGBA all become 8-bit RGB (alpha is dropped)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # PIL cannot convert 16/32-bit gray to RGB directly; rescale to 8 bits first.
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def decode(data: bytes, name: str) -> Image.Image:
    """Fully decode `data` (a truncated file fails here, not later) and convert to RGB."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadImage(f"{name}: cannot decode image ({type(e).__name__}: {e})") from None
    return to_rgb(img)


def adm_center_crop(img: Image.Image, size: int) -> np.ndarray:
    """ADM's centre crop (guided-diffusion, also used by DiT/SiT/REPA): halve with a box filter
    while the short side is >= 2x the target, bicubic-resize the short side to `size`, then
    crop the centre. Written out because no library ships this exact preprocessing."""
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.Resampling.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.Resampling.BICUBIC)
    arr = np.asarray(img)
    top = (arr.shape[0] - size) // 2
    left = (arr.shape[1] - size) // 2
    return np.ascontiguousarray(arr[top:top + size, left:left + size])


def load_file(path: str, size: int) -> tuple[str, np.ndarray | None, str | None]:
    """Worker: read, hash, decode, crop one file. Returns (sha256, image or None, error or None)."""
    data = Path(path).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    try:
        return digest, adm_center_crop(decode(data, path), size), None
    except BadImage as e:
        return digest, None, str(e)
