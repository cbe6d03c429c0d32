"""Image decoding for the caption datasets: any PIL mode -> RGB, shorter-side resize + center crop -> uint8.

Only numpy and PIL here, so the cache builder's pool workers start without importing torch.
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
from PIL import Image

# What PIL raises for a missing, corrupt or truncated file; callers skip the image instead of crashing.
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)

_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_HIGH_DEPTH_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
WHITE = (255, 255, 255, 255)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; alpha (RGBA, LA, transparent palette) is composited on white."""
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode in _HIGH_DEPTH_MODES:
        # PIL's convert("L") clips 16-bit values at 255 instead of scaling them.
        pixels = np.asarray(img, dtype=np.float32)
        if pixels.max(initial=0) > 255:
            pixels = pixels / 257.0
        img = Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8), mode="L")
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE), rgba)
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, RGBA after compositing


def resize_center_crop(img: Image.Image, size: int) -> np.ndarray:
    """Bicubic resize so the shorter side is `size`, then the center square. Returns (size, size, 3) uint8."""
    w, h = img.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8)


def read_image(path: str | Path, size: int) -> np.ndarray:
    """Decodes one file to a (size, size, 3) uint8 array; raises one of IMAGE_ERRORS if it cannot be read."""
    with Image.open(path) as img:
        # JPEG can decode at 1/2, 1/4 or 1/8 scale for free; draft keeps both sides >= size.
        if img.format == "JPEG":
            img.draft(None, (size, size))
        img.load()  # decode now, inside the caller's try: a truncated file raises here
        return resize_center_crop(to_rgb(img), size)
