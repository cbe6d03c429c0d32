"""Image files in and out of the generator API: any image a user hands in -> a model tensor, a PIL image -> a
file; each failure is one UserError that says what to fix."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common.images import from_uint8
from configs.errors import UserError
from data.transforms import IMAGE_ERRORS, read_image, resize_center_crop, to_rgb


def load_image(image, size: int) -> torch.Tensor:
    """A path, PIL image or numpy array -> (3, size, size) float in [-1, 1], preprocessed as in training
    (data.transforms: RGB conversion, shorter-side resize, center crop).

    numpy arrays: uint8 (H, W), (H, W, 3) or (H, W, 4), or floats in [0, 1]."""
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise UserError(f"image {path} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
        try:
            pixels = read_image(path, size)  # the training path itself, JPEG draft decoding included
        except IMAGE_ERRORS as err:
            raise UserError(f"cannot read image {path}: {str(err).splitlines()[0] or type(err).__name__} "
                            "(not an image, or a truncated/damaged file)") from None
    else:
        if isinstance(image, np.ndarray):
            array = image
            if array.dtype != np.uint8:
                array = (np.clip(array.astype(np.float32), 0, 1) * 255 + 0.5).astype(np.uint8)
            if array.ndim == 3 and array.shape[-1] == 1:
                array = array[..., 0]
            try:
                image = Image.fromarray(array)
            except TypeError:
                raise UserError(f"cannot use an array of shape {image.shape} as an image; "
                                "give (H, W), (H, W, 3) or (H, W, 4)") from None
        if not isinstance(image, Image.Image):
            raise UserError(f"cannot use a {type(image).__name__} as an image; give a path, PIL image or numpy array")
        try:
            pixels = resize_center_crop(to_rgb(image), size)
        except IMAGE_ERRORS as err:  # a lazily loaded PIL image can still turn out truncated here
            raise UserError(f"cannot read the image: {str(err).splitlines()[0]}") from None
    return from_uint8(pixels)                                                  # (3, H, W)


def check_writable(path: str | Path) -> Path:
    """Makes path's folder if needed; UserError when the file cannot be written there."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"output path {path} is a folder; give a file name such as {path / 'out.png'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the output folder {path.parent} ({err.strerror})") from None
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UserError(f"cannot write {path}: permission denied; choose another --out")
    return path


def save_image(image: Image.Image, path: str | Path) -> Path:
    path = check_writable(path)
    try:
        image.save(path)
    except (ValueError, KeyError):
        raise UserError(f"cannot save {path}: unknown image type '{path.suffix}'; use .png or .jpg") from None
    except OSError as err:
        raise UserError(f"cannot write {path} ({err.strerror or err})") from None
    return path
