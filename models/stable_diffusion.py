"""Stable Diffusion and CLIP from local diffusers/transformers folders, offline: what goes wrong is one line that
names the flag the folder came from."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from configs.errors import UserError


def load_sd_pipeline(path: str | Path, device: str | torch.device = "cpu", lora: str | Path | None = None,
                     lora_scale: float = 1.0, flag: str = "--model-path"):
    """A diffusers StableDiffusionPipeline from a local folder (model_index.json + components), progress bars off,
    with the LoRA adapter `lora` (its folder or file) fused at lora_scale."""
    from diffusers import StableDiffusionPipeline

    pipe = _from_folder(flag, path, "model_index.json", "a Stable Diffusion pipeline",
                        lambda folder: StableDiffusionPipeline.from_pretrained(folder, local_files_only=True))
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    if lora:
        from models.lora import lora_file

        file = lora_file(lora)   # diffusers' own pipeline loader, as any SD LoRA user would load it
        pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name="tuned")
        pipe.fuse_lora(lora_scale=lora_scale, adapter_names=["tuned"])
        pipe.unload_lora_weights()   # the fused weights stay: the pipeline saves as a plain one
    return pipe


def load_clip(path: str | Path, device: str | torch.device = "cpu", flag: str = "--clip-path"):
    """(CLIPModel, CLIPProcessor) from a local HF folder: OpenAI CLIP, FashionCLIP or any CLIPModel checkpoint;
    frozen, in eval mode."""
    from transformers import CLIPModel, CLIPProcessor

    def load(folder: Path):
        try:
            model_type = json.loads((folder / "config.json").read_text()).get("model_type")
        except json.JSONDecodeError:
            raise UserError(f"{flag} {folder}: config.json is not valid JSON") from None
        if model_type != "clip":
            raise UserError(f"{flag} {folder} holds a '{model_type}' model, not a CLIP model (model_type 'clip')")
        return (CLIPModel.from_pretrained(folder, local_files_only=True),
                CLIPProcessor.from_pretrained(folder, local_files_only=True))

    model, processor = _from_folder(flag, path, "config.json", "CLIPModel + CLIPProcessor", load)
    return model.to(device).eval().requires_grad_(False), processor


def _from_folder(flag: str, path: str | Path, marker: str, what: str, load):
    """load(folder) for a local folder saved with save_pretrained; what goes wrong is one line naming the flag."""
    folder = Path(path)
    if not (folder / marker).is_file():
        raise UserError(f"{flag} {folder} is not a local {what} folder (no {marker}); give one saved with "
                        "save_pretrained")
    try:
        return load(folder)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise UserError(f"{flag} {folder} does not load as {what}: "
                        f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
