"""The one loader: the flags (--backend, --checkpoint, --model-path, --clip-path, --url) -> an adapter
(specialize/adapters.py), from local folders only; nothing is downloaded."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from configs.errors import UserError
from models.checkpoint import UNET_DIR, load_checkpoint, read_config, resolve_checkpoint
from models.device import resolve_device
from models.lora import apply_lora
from models.stable_diffusion import load_clip, load_sd_pipeline
from specialize.adapters import Adapter, DuetAdapter, SdAdapter, SdApiAdapter


def load_adapter(args, path: str | Path | None = None, lora: str | Path | None = None, lora_scale: float = 1.0,
                 judge: bool = True):
    """The model the flags name, or the one at `path` (another model of the same family: a tuned one), with the
    LoRA adapter `lora` fused at lora_scale. judge=False: an sd adapter that only generates (no CLIP loaded)."""
    device = resolve_device(getattr(args, "device", "auto"))
    scheduler = getattr(args, "scheduler", None)
    if args.backend == "duet":
        return load_duet(path or args.checkpoint, device, scheduler, lora, lora_scale)
    if args.backend == "sd":
        model_path = path or args.model_path
        if not model_path:
            raise UserError("--backend sd needs --model-path, a local Stable Diffusion diffusers folder")
        pipe = load_sd_pipeline(model_path, device, lora, lora_scale)
        clip, processor = load_clip(args.clip_path, device) if judge and args.clip_path else (None, None)
        sources = [model_path, *([lora] if lora else []), *([args.clip_path] if clip else [])]
        return SdAdapter(pipe, clip, processor, " + ".join(map(str, sources)), scheduler)
    if args.backend == "sdapi":
        from serving.client import SdApiClient
        from serving.settings import API_KEY_ENV

        client = SdApiClient(args.url, getattr(args, "api_key", None) or os.environ.get(API_KEY_ENV) or None)
        if args.clip_path:
            scorer = SdAdapter(None, *load_clip(args.clip_path, device), source=args.clip_path)
        else:   # any Duet checkpoint: the judge does not need its diffusion model
            scorer = load_duet(args.checkpoint, device, generates=False)
        return SdApiAdapter(client, scorer, scheduler)
    raise UserError(f"unknown --backend '{args.backend}'; choose duet, sd or sdapi")


def load_duet(checkpoint: str | Path | None, device: torch.device, scheduler: str | None = None,
              lora: str | Path | None = None, lora_scale: float = 1.0, generates: bool = True) -> Adapter:
    """A Duet checkpoint (None: the newest under outputs/) with its EMA UNet, the weights sampling uses; generates:
    it must hold a trained text-to-image model."""
    folder = resolve_checkpoint(checkpoint)
    if generates and (not (folder / UNET_DIR).is_dir() or read_config(folder).train.diffusion_weight <= 0):
        raise UserError(f"checkpoint {folder} has no trained text-to-image model (no unet/ or "
                        "train.diffusion_weight=0); train one with train.diffusion_weight > 0")
    model = load_checkpoint(folder, device=device, use_ema=True)
    if lora is None:
        return DuetAdapter(model, str(folder), scheduler)
    return DuetAdapter(apply_lora(model, lora, lora_scale), f"{folder} + {lora}", scheduler)
