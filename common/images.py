"""Image tensors and pixels: [-1, 1] float <-> uint8, tensor <-> PIL, and the file suffixes read as images."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Floats in [-1, 1] (any shape) -> uint8 in [0, 255], rounded; out-of-range values are clipped."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def from_uint8(pixels: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 pixels -> (3, H, W) float32 in [-1, 1]. Copies: PIL and memmap arrays are read-only."""
    return torch.from_numpy(np.array(pixels)).permute(2, 0, 1).float() / 127.5 - 1.0


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> B RGB PIL images."""
    return [Image.fromarray(p) for p in to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()]
