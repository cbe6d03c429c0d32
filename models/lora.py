"""LoRA through peft, in diffusers' own layout: add adapters for training, save/load/merge them.

The file is the one diffusers' SD LoRA scripts write (`pytorch_lora_weights.safetensors`, keys `unet.<module>.lora.down
.weight` / `text_encoder.<module>.lora_A.weight`, the LoraConfig as metadata), so `pipe.load_lora_weights(folder)` and
`unet.load_lora_adapter(folder, prefix="unet")` read it as they read any SD LoRA (Hu et al. 2021, LoRA).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn

from configs.errors import UserError

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# Duet's image decoder has no place in diffusers' layout: its adapter (peft keys) goes in a file of its own.
DECODER_WEIGHT_NAME = "image_decoder_lora.safetensors"
ADAPTER_NAME = "default"
UNET_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")  # every attention projection, as diffusers' scripts do
# Attention projections per text-encoder family: our BERT, and the CLIP text model of Stable Diffusion.
TEXT_TARGET_MODULES = {"bert": ("query", "key", "value", "attention.output.dense"),
                       "clip": ("q_proj", "k_proj", "v_proj", "out_proj")}


def text_target_modules(text_encoder: nn.Module) -> list[str]:
    """The attention projections of a BERT or CLIP text model, by the names its modules carry."""
    names = {name.rsplit(".", 1)[-1] for name, _ in text_encoder.named_modules()}
    for family, targets in TEXT_TARGET_MODULES.items():
        if {t.rsplit(".", 1)[-1] for t in targets} <= names:
            return list(targets)
    raise UserError(f"cannot put LoRA on text encoder {type(text_encoder).__name__}: it has neither BERT nor CLIP "
                    "attention projections; train without --train-text-encoder")


def conv_target_modules(module: nn.Module) -> list[str]:
    """Names of a plain module's Conv2d layers (peft has no LoRA for ConvTranspose2d, which keeps its weights)."""
    return [name for name, layer in module.named_modules() if isinstance(layer, nn.Conv2d)]


def add_lora(module: nn.Module, rank: int, alpha: float, target_modules: list[str] | tuple[str, ...]) -> int:
    """Freezes `module` (a diffusers UNet, a transformers text model or a plain nn.Module) and adds a trainable LoRA
    adapter. Returns the number of adapter parameters. lora_B starts at zero: at step 0 the model is the base."""
    from peft import LoraConfig, inject_adapter_in_model

    if rank <= 0 or alpha <= 0:
        raise UserError(f"LoRA rank and alpha must be > 0, got rank={rank}, alpha={alpha}")
    module.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(target_modules))
    try:
        if hasattr(module, "add_adapter"):
            module.add_adapter(config)  # diffusers' PeftAdapterMixin and transformers' both offer it
        else:
            inject_adapter_in_model(config, module)
            for name, param in module.named_parameters():
                param.requires_grad_(".lora_" in name)
    except ValueError as err:  # peft: no module matched the target names
        raise UserError(f"LoRA target modules {list(target_modules)} match nothing in "
                        f"{type(module).__name__}: {str(err).splitlines()[0]}") from None
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def has_lora(module: nn.Module | None) -> bool:
    return module is not None and ADAPTER_NAME in (getattr(module, "peft_config", None) or {})


def lora_layers(module: nn.Module, text_encoder: bool = False) -> dict[str, torch.Tensor]:
    """The adapter's tensors in diffusers' key layout: `<module>.lora.down/up.weight` for the UNet's attention
    (`lora_A/B` when other modules are adapted too), `<module>.lora_linear_layer.down/up.weight` for a text encoder."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(module, adapter_name=ADAPTER_NAME)
    if text_encoder:
        # diffusers' PEFT->diffusers map only knows CLIP's q_proj/k_proj/...; renaming every module the same way
        # gives the layout its text-encoder loader reads for BERT's query/key/value too.
        state = {k.replace(".lora_A.", ".lora_linear_layer.down.").replace(".lora_B.", ".lora_linear_layer.up."): v
                 for k, v in state.items()}
    else:
        converted = convert_state_dict_to_diffusers(state)
        # diffusers' map renames only the attention projections; with other targets (convs, proj_in, ...) a mixed
        # file would load half-way, so such adapters keep the PEFT layout (lora_A/B), which diffusers reads as is.
        mixed = any(".lora_A." in k or ".lora_B." in k for k in converted)
        state = state if mixed else converted
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def _metadata(module: nn.Module) -> dict:
    config = module.peft_config[ADAPTER_NAME].to_dict()
    # JSON cannot hold sets; diffusers does the same conversion in save_lora_adapter.
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}


def save_lora(folder: str | Path, unet: nn.Module, text_encoder: nn.Module | None = None,
              image_decoder: nn.Module | None = None) -> Path:
    """Writes <folder>/pytorch_lora_weights.safetensors (+ image_decoder_lora.safetensors when the decoder has an
    adapter); returns the first file. Files are replaced atomically.

    Uses StableDiffusionLoraLoaderMixin.save_lora_weights, i.e. the exact file diffusers' training scripts write."""
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from common.files import temporary_folder

    folder = Path(folder)
    with temporary_folder(folder) as tmp:
        text = has_lora(text_encoder)
        StableDiffusionLoraLoaderMixin.save_lora_weights(
            tmp, unet_lora_layers=lora_layers(unet), unet_lora_adapter_metadata=_metadata(unet),
            text_encoder_lora_layers=lora_layers(text_encoder, text_encoder=True) if text else None,
            text_encoder_lora_adapter_metadata=_metadata(text_encoder) if text else None,
            weight_name=LORA_WEIGHT_NAME, safe_serialization=True)
        if has_lora(image_decoder):
            config = image_decoder.peft_config[ADAPTER_NAME]
            state = get_peft_model_state_dict(image_decoder, adapter_name=ADAPTER_NAME)
            spec = {"r": config.r, "lora_alpha": config.lora_alpha, "target_modules": sorted(config.target_modules)}
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, tmp / DECODER_WEIGHT_NAME,
                      metadata={"format": "pt", "lora_config": json.dumps(spec)})
        folder.mkdir(parents=True, exist_ok=True)
        # the folder may hold other outputs (a merged model, checkpoints): replace files only
        for item in tmp.iterdir():
            os.replace(item, folder / item.name)
    return folder / LORA_WEIGHT_NAME


def without_adapters(model: nn.Module) -> nn.Module:
    """A copy of a DuetModel with its UNet's and image decoder's LoRA layers removed, unmerged: the base weights."""
    import copy

    from diffusers.utils.peft_utils import recurse_remove_peft_layers

    base = copy.deepcopy(model)
    for module in (base.diffusion.unet, base.image_decoder):
        if has_lora(module):
            recurse_remove_peft_layers(module)
            del module.peft_config
            module._hf_peft_config_loaded = False
    return base


def lora_file(path: str | Path) -> Path:
    """The adapter file of a folder or the file itself; UserError if there is none."""
    path = Path(path)
    file = path / LORA_WEIGHT_NAME if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"no LoRA adapter at {path} (expected {LORA_WEIGHT_NAME} written by "
                        "`python specialize.py --mode finetune`)")
    return file


def read_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(state dict with `unet.`/`text_encoder.` keys, metadata) through diffusers' own reader."""
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin

    file = lora_file(path)
    try:
        state, _, metadata = StableDiffusionLoraLoaderMixin.lora_state_dict(
            str(file.parent), weight_name=file.name, return_lora_metadata=True, local_files_only=True)
    except Exception as err:  # safetensors and diffusers raise several types for a damaged file
        raise UserError(f"LoRA file {file} is damaged or not a LoRA adapter: {str(err).splitlines()[0]}") from None
    if not state:
        raise UserError(f"LoRA file {file} holds no tensors")
    return state, metadata


def merge_lora(module: nn.Module, scale: float = 1.0) -> None:
    """Folds the adapter (times `scale`) into the base weights and removes the peft layers, so `save_pretrained`
    writes a plain model again."""
    from diffusers.utils.peft_utils import recurse_remove_peft_layers
    from peft.tuners.tuners_utils import BaseTunerLayer

    for layer in module.modules():
        if isinstance(layer, BaseTunerLayer):
            if scale != 1.0:
                layer.scale_layer(scale)
            layer.merge()
    recurse_remove_peft_layers(module)
    if hasattr(module, "peft_config"):
        del module.peft_config
    module._hf_peft_config_loaded = False


def load_lora(path: str | Path, unet: nn.Module, text_encoder: nn.Module | None = None, scale: float = 1.0,
              fuse: bool = True) -> None:
    """Loads an adapter file into a UNet (and a text encoder when the file has one) with diffusers' loaders.

    fuse=True merges it (sampling costs what the base costs); fuse=False keeps live peft layers at `scale`.
    """
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin as Loader
    from diffusers.utils.peft_utils import scale_lora_layers

    state, metadata = read_lora(path)
    wants_text = any(k.startswith("text_encoder.") for k in state)
    if wants_text and text_encoder is None:
        raise UserError(f"LoRA {path} also adapts a text encoder, and none was given to load it into")
    try:
        Loader.load_lora_into_unet(state, None, unet, adapter_name=ADAPTER_NAME, metadata=metadata)
        if wants_text:
            Loader.load_lora_into_text_encoder(state, None, text_encoder, adapter_name=ADAPTER_NAME,
                                               metadata=metadata)
    except (RuntimeError, ValueError, KeyError) as err:  # shapes or module names of another model
        detail = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line),
                      str(err).splitlines()[0] if str(err) else type(err).__name__)
        raise UserError(f"LoRA {path} does not fit this model (trained on another base?): {detail}") from None
    modules = [unet] + ([text_encoder] if wants_text else [])
    for module in modules:
        if fuse:
            merge_lora(module, scale)
        else:
            scale_lora_layers(module, scale)


def load_decoder_lora(path: str | Path, image_decoder: nn.Module, scale: float = 1.0, fuse: bool = True) -> None:
    """Loads image_decoder_lora.safetensors (peft keys, its LoraConfig in the metadata) into Duet's image decoder."""
    from diffusers.utils.peft_utils import scale_lora_layers
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    file = Path(path) / DECODER_WEIGHT_NAME if Path(path).is_dir() else Path(path)
    try:
        with safe_open(file, framework="pt") as f:
            spec = json.loads((f.metadata() or {})["lora_config"])
        state = load_file(file)
        config = LoraConfig(r=spec["r"], lora_alpha=spec["lora_alpha"], target_modules=spec["target_modules"])
        inject_adapter_in_model(config, image_decoder)
        result = set_peft_model_state_dict(image_decoder, state)
    except (OSError, SafetensorError, KeyError, TypeError, ValueError, RuntimeError, json.JSONDecodeError) as err:
        raise UserError(f"decoder LoRA {file} is damaged or does not fit this model: "
                        f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    if result.unexpected_keys:
        raise UserError(f"decoder LoRA {file} does not fit this model (first extra key: {result.unexpected_keys[0]})")
    image_decoder.requires_grad_(False)
    if fuse:
        merge_lora(image_decoder, scale)
    else:
        scale_lora_layers(image_decoder, scale)


def apply_lora(model, path: str | Path, scale: float = 1.0, fuse: bool = True):
    """Applies an adapter from `specialize.py --mode finetune` to a loaded DuetModel: its UNet, plus its BERT and image
    decoder when the adapter adapts them; `scale` weighs the adapter (0: the base model). Returns the model."""
    device = next(model.parameters()).device
    load_lora(path, model.diffusion.unet, model.text_encoder.bert, scale=scale, fuse=fuse)
    decoder_file = lora_file(path).parent / DECODER_WEIGHT_NAME
    if decoder_file.is_file():
        load_decoder_lora(decoder_file, model.image_decoder, scale=scale, fuse=fuse)
    return model.to(device)
