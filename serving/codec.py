"""base64 <-> images at the HTTP boundary, with the upload limits: encoded bytes, pixels, and formats PIL reads."""
from __future__ import annotations

import base64
import binascii
import io
import re
import warnings

from PIL import Image, UnidentifiedImageError

from data.transforms import IMAGE_ERRORS, to_rgb

_DATA_URL = re.compile(r"^data:[\w/+.-]*;base64,", re.IGNORECASE)


class ImageDecodeError(ValueError):
    """A client's image is not valid base64, not an image, or over a limit; the message says which."""


def decode_image(data: str, max_bytes: int, max_pixels: int, field: str = "image") -> Image.Image:
    """base64 (or a data: URL, as browsers and A1111 clients send) -> an RGB PIL image, fully loaded.

    The pixel count is checked from the header before any pixel is decoded, so a small file that declares a
    huge image (a decompression bomb) costs nothing."""
    data = _DATA_URL.sub("", data.strip(), count=1)
    if len(data) > max_bytes * 4 // 3 + 4:
        raise ImageDecodeError(f"{field} is larger than {max_bytes} bytes")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ImageDecodeError(f"{field} is not valid base64") from None
    if not raw:
        raise ImageDecodeError(f"{field} is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageDecodeError(f"{field} is {width}x{height} pixels; at most {max_pixels} pixels")
            image.load()
            return to_rgb(image)    # as training and the CLI read images: alpha on white, 16-bit scaled
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError(f"{field} is not an image PIL can read (PNG, JPEG, WebP, ...)") from None
    except (*IMAGE_ERRORS, Image.DecompressionBombWarning) as err:
        raise ImageDecodeError(f"{field} is damaged or truncated ({str(err).splitlines()[0] or type(err).__name__})"
                               ) from None


def encode_png(image: Image.Image) -> str:
    """A PIL image -> base64 PNG, the way A1111 returns images."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
