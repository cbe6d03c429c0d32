"""What a server operator may set: the API key, batching and the upload limits (the request limits are in
serving/schemas.py)."""
from __future__ import annotations

from dataclasses import dataclass

from configs.errors import UserError


API_KEY_ENV = "DUET_API_KEY"   # serve.py's --api-key default, and the sdapi client's


@dataclass
class ServeSettings:
    api_key: str | None = None                   # None: no key; else every route but the page needs it
    max_batch_images: int = 8                    # images in one denoising batch
    max_queue_images: int = 64                   # images waiting for the model; more answers 503 + Retry-After
    max_body_bytes: int = 8 * 2**20              # any request body (a 6 MB image is 8 MB of base64)
    max_image_bytes: int = 6 * 2**20             # one decoded upload
    max_image_pixels: int = 4096 * 4096          # one upload's width * height, read before decoding it

    def __post_init__(self):
        for name in ("max_batch_images", "max_queue_images", "max_body_bytes", "max_image_bytes",
                     "max_image_pixels"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
