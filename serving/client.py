"""A client of any AUTOMATIC1111-compatible server (serve.py, or an A1111 WebUI started with --api): txt2img with
fixed seeds, in requests the server takes; an HTTP error is a UserError carrying the server's own message."""
from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.request

import numpy as np

from configs.errors import UserError
from serving.schemas import MAX_IMAGES_PER_REQUEST   # serve.py refuses more in one txt2img


class SdApiClient:
    """POST JSON to an A1111-style server at url, with a bearer API key when given."""

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 600):
        if not url or not url.startswith(("http://", "https://")):
            raise UserError(f"--url '{url}' is not an http(s) URL; give the server's address, e.g. "
                            "http://127.0.0.1:7860")
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout_s = timeout_s

    def post(self, path: str, body: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url + path, json.dumps(body).encode(), headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")[:300]
            try:
                detail = json.loads(detail).get("detail", detail)
            except (json.JSONDecodeError, AttributeError):
                pass
            raise UserError(f"{self.url}{path} answered {err.code}: {detail}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
            raise UserError(f"cannot reach {self.url}{path}: {getattr(err, 'reason', err)}; is the server "
                            "running (python serve.py)?") from None

    def txt2img(self, prompt: str, seed: int, count: int, steps: int | None, cfg_scale: float | None,
                sampler: str | None = None) -> list[np.ndarray]:
        """count images of one prompt, image i from seed + i (A1111's rule) -> uint8 (H, W, 3) arrays; in requests of
        at most MAX_IMAGES_PER_REQUEST images (serve.py's limit), each starting at its own first seed."""
        arrays = []
        for start in range(0, count, MAX_IMAGES_PER_REQUEST):
            n = min(MAX_IMAGES_PER_REQUEST, count - start)
            body = {"prompt": prompt, "seed": int(seed) + start, "batch_size": n, "steps": steps,
                    "cfg_scale": cfg_scale, "sampler_name": sampler}
            out = self.post("/sdapi/v1/txt2img", {k: v for k, v in body.items() if v is not None})
            images = out.get("images") if isinstance(out, dict) else None
            if not isinstance(images, list) or len(images) < n:
                raise UserError(f"{self.url}/sdapi/v1/txt2img returned {len(images or [])} images for {n} asked")
            arrays += [np.asarray(_open_image(data)) for data in images[:n]]
        return arrays

    def generate(self, prompts: list[str], seeds: list[int], steps: int | None, cfg_scale: float | None,
                 sampler: str | None = None) -> list[np.ndarray]:
        """One image per (prompt, seed) pair: one request per run of the same prompt on consecutive seeds."""
        assert len(prompts) == len(seeds), "one seed per prompt"
        arrays = []
        for start, stop in consecutive_runs(list(prompts), [int(s) for s in seeds]):
            arrays += self.txt2img(prompts[start], seeds[start], stop - start, steps, cfg_scale, sampler)
        return arrays


def _open_image(data: str):
    from PIL import Image

    try:
        return Image.open(io.BytesIO(base64.b64decode(data.split(",", 1)[-1]))).convert("RGB")
    except (ValueError, OSError) as err:
        raise UserError(f"the server returned an image that does not decode: {err}") from None


def consecutive_runs(prompts: list[str], seeds: list[int]) -> list[tuple[int, int]]:
    """(start, stop) slices where the prompt stays the same and each seed is the last + 1: one request each."""
    runs, start = [], 0
    for i in range(1, len(prompts) + 1):
        if i == len(prompts) or prompts[i] != prompts[start] or seeds[i] != seeds[i - 1] + 1:
            runs.append((start, i))
            start = i
    return runs
