"""Prompt optimisation through any AUTOMATIC1111-compatible server (serve.py, or an A1111 WebUI started with
--api): images come from POST /sdapi/v1/txt2img; a local judge scores them, our checkpoint's encoders or a CLIP
folder (--clip-path), so the scores never depend on what the server says about its own images.

    python specialize.py --mode prompt --backend sdapi --url http://127.0.0.1:7860 [--checkpoint DIR | --clip-path CLIP]
"""
from __future__ import annotations

import base64
import io
import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import torch

from common.images import from_uint8
from configs.errors import UserError
from serving.schemas import MAX_IMAGES_PER_REQUEST   # serve.py refuses more in one txt2img
from serving.settings import API_KEY_ENV
from specialize.backends import Backend, fit_images


class SdApiClient:
    """POST JSON to an A1111-style server; an HTTP error is a UserError carrying the server's own message."""

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
        if i == len(prompts) or prompts[i] != prompts[start] or int(seeds[i]) != int(seeds[i - 1]) + 1:
            runs.append((start, i))
            start = i
    return runs


class SdApiBackend(Backend):
    """Generates through an A1111-compatible server; everything else (the aligned space, captions, tokens for PEZ)
    is the local judge's."""

    name = "sdapi"

    def __init__(self, client: SdApiClient, judge: Backend, sampler: str | None = None):
        self.client, self.judge, self.sampler = client, judge, sampler
        self.image_size = judge.image_size
        self.tokenizer = judge.tokenizer
        self.device = judge.device
        self.logit_scale = judge.logit_scale
        self.source = f"{client.url} (judge: {judge.source})"

    def generate(self, prompts, seeds, steps, guidance):
        assert len(prompts) == len(seeds)
        arrays = []
        for start, stop in consecutive_runs(list(prompts), list(seeds)):
            arrays += self.client.txt2img(prompts[start], seeds[start], stop - start, steps, guidance, self.sampler)
        images = torch.stack([from_uint8(a) for a in arrays])
        return fit_images(images.to(self.device), self.image_size)            # (B, 3, S, S) in [-1, 1]

    def encode_images(self, images):
        return self.judge.encode_images(images)

    def encode_texts(self, texts):
        return self.judge.encode_texts(texts)

    def caption(self, images):
        return self.judge.caption(images)

    @property
    def token_embedding(self):
        return self.judge.token_embedding

    def wrap_prompt_ids(self, token_ids):
        return self.judge.wrap_prompt_ids(token_ids)

    def encode_token_ids(self, input_ids, attention_mask):
        return self.judge.encode_token_ids(input_ids, attention_mask)

    def vocabulary_ids(self):
        return self.judge.vocabulary_ids()

    def identity(self):
        return self.judge.identity()        # the text-embedding cache holds the judge's embeddings

    def modules(self):
        return self.judge.modules()


def build_sdapi_backend(args, device: torch.device) -> SdApiBackend:
    """--backend sdapi: the server at --url; the judge is --clip-path's CLIP when given, else --checkpoint's
    encoders (any Duet checkpoint: the judge does not need its diffusion model)."""
    from specialize.backends import DuetBackend, StableDiffusionBackend, load_clip

    client = SdApiClient(args.url, getattr(args, "api_key", None) or os.environ.get(API_KEY_ENV) or None)
    if args.clip_path:
        clip, processor = load_clip(args.clip_path, device)
        judge = StableDiffusionBackend(None, clip, processor, clip_path=Path(args.clip_path))
    else:
        from models.checkpoint import find_latest_checkpoint, load_checkpoint

        folder = Path(args.checkpoint) if args.checkpoint else find_latest_checkpoint("outputs")
        if not folder.is_dir():
            raise UserError(f"checkpoint {folder} does not exist; the sdapi backend scores with --checkpoint's "
                            "encoders or --clip-path's CLIP")
        judge = DuetBackend(load_checkpoint(folder, device=device, use_ema=True), folder)
    return SdApiBackend(client, judge, getattr(args, "scheduler", None))
