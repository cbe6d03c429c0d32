"""Checkpoint folders: config JSON, our modules in safetensors, HF/diffusers subfolders, trainer state.

    config.json            resolved DuetConfig + format_version
    model.safetensors      our modules (CNN, decoders, projections, logit_scale, latent_scale, caption vocabulary)
    text_encoder/          transformers save_pretrained: BERT + tokenizer
    unet/  unet_ema/       diffusers save_pretrained (unet_ema: the EMA weights, used for sampling)
    scheduler/             the training noise schedule
    trainer_state.pt       step, optimizer, LR schedule, RNG; read with weights_only=True

Written into a temporary sibling then renamed (common.files.write_folder), so a folder with the final name is
always complete.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from common.files import leftover_of, write_folder
from configs.errors import UserError
from configs.loading import config_from_dict, config_to_dict
from models.lora import LORA_WEIGHT_NAME, apply_lora, has_lora, save_lora, without_adapters

FORMAT_VERSION = 1
CONFIG_FILE, WEIGHTS_FILE, TRAINER_STATE_FILE = "config.json", "model.safetensors", "trainer_state.pt"
TEXT_ENCODER_DIR, UNET_DIR, EMA_UNET_DIR, SCHEDULER_DIR = "text_encoder", "unet", "unet_ema", "scheduler"
# A run's folder: checkpoint-NNNNNN/ folders (rotated), best_model/, and `latest` naming the newest checkpoint.
CHECKPOINT_PREFIX, BEST_CHECKPOINT, LATEST_FILE = "checkpoint-", "best_model", "latest"
# Added after checkpoints of the same format were written; zeros reproduce what those models computed.
ZERO_IF_ABSENT = ("caption_decoder.memory_pos",)
HF_PREFIXES = ("text_encoder.bert.", "diffusion.unet.")  # saved by their own libraries in subfolders


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:06d}"


def own_state_dict(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not k.startswith(HF_PREFIXES)}


def save_checkpoint(model, folder: str | Path, ema=None, trainer_state: dict | None = None) -> Path:
    """Writes model (unwrapped DuetModel), its EMA (diffusers EMAModel) and trainer state atomically. A model with
    LoRA adapters is written as its base weights plus the adapter files (models/lora.py), which load_checkpoint
    applies."""
    adapted = has_lora(model.diffusion.unet)
    base = without_adapters(model) if adapted else model

    def write(tmp: Path) -> None:
        config = {"format_version": FORMAT_VERSION, **config_to_dict(base.config)}
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        save_file(own_state_dict(base), tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        base.text_encoder.bert.save_pretrained(tmp / TEXT_ENCODER_DIR)
        base.tokenizer.save_pretrained(tmp / TEXT_ENCODER_DIR)
        base.diffusion.unet.save_pretrained(tmp / UNET_DIR)
        base.diffusion.noise_scheduler.save_pretrained(tmp / SCHEDULER_DIR)
        if adapted:
            save_lora(tmp, model.diffusion.unet, image_decoder=model.image_decoder)
        if ema is not None:
            with torch.random.fork_rng(devices=[]):  # it builds a fresh UNet, which must not move the run's RNG
                ema.save_pretrained(tmp / EMA_UNET_DIR)
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER_STATE_FILE)

    return write_folder(folder, write)


def quiet_library_progress() -> None:
    """Turns off transformers' and diffusers' per-file load/save bars: our own bar and one-line errors stay readable."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()


@contextlib.contextmanager
def _quiet_diffusers():
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


def read_config(folder: str | Path):
    """The DuetConfig saved in a checkpoint; another version or an unknown field is a UserError naming it."""
    folder = Path(folder)
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{folder} is not a Duet checkpoint (no {CONFIG_FILE}); give a folder written by main.py")
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{path} is not valid JSON; the checkpoint is damaged") from None
    version = saved.pop("format_version", None)
    if "sample_steps" in saved.get("train", {}):  # written before the sample section held the sampling defaults
        saved.setdefault("sample", {})["steps"] = saved["train"].pop("sample_steps")
    if version != FORMAT_VERSION:
        raise UserError(f"{folder} has checkpoint format {version}, this version reads {FORMAT_VERSION}")
    try:
        return config_from_dict(saved)
    except UserError as err:
        raise UserError(f"{folder} was written by another version or config: {err}") from None


def load_checkpoint(folder: str | Path, device: str | torch.device = "cpu", use_ema: bool = True,
                    fuse_lora: bool = True):
    """Builds the DuetModel a checkpoint describes and loads its weights (strict); returns it in eval mode.

    With use_ema the UNet is the EMA one when the checkpoint has it (what sampling wants). The LoRA adapters of a
    LoRA fine-tune's checkpoint are applied: fused into the weights, or live (fuse_lora=False: to train on)."""
    from diffusers import UNet2DConditionModel
    from transformers import AutoModel, AutoTokenizer

    from models.diffusion import build_noise_scheduler
    from models.duet import DuetModel

    folder = Path(folder)
    cfg = read_config(folder)
    unet_dir = folder / (EMA_UNET_DIR if use_ema and (folder / EMA_UNET_DIR).is_dir() else UNET_DIR)
    try:
        bert = AutoModel.from_pretrained(folder / TEXT_ENCODER_DIR, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(folder / TEXT_ENCODER_DIR, local_files_only=True)
        with _quiet_diffusers():  # unet_ema's config carries the EMA's decay etc., which the UNet ignores
            unet = UNet2DConditionModel.from_pretrained(unet_dir, local_files_only=True)
        scheduler_cls = type(build_noise_scheduler(cfg.train.diffusion_timesteps, cfg.model.diffusion_objective))
        noise_scheduler = scheduler_cls.from_pretrained(folder / SCHEDULER_DIR, local_files_only=True)
        state = load_file(folder / WEIGHTS_FILE)
    except (OSError, ValueError, SafetensorError, EnvironmentError) as err:
        raise UserError(f"checkpoint {folder} is incomplete or damaged: {str(err).splitlines()[0]}") from None
    model = DuetModel(cfg, bert, tokenizer, unet, noise_scheduler)
    for key in ZERO_IF_ABSENT:
        if key not in state:
            state[key] = torch.zeros_like(model.state_dict()[key])
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # a shape differs from what config.json describes
        detail = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), str(err))
        raise UserError(f"checkpoint {folder} does not match its config.json: {detail}") from None
    missing = [k for k in missing if not k.startswith(HF_PREFIXES)]
    if missing or unexpected:
        key = (missing or unexpected)[0]
        raise UserError(f"checkpoint {folder} does not match its config.json (first mismatch: '{key}')")
    if (folder / LORA_WEIGHT_NAME).is_file():
        apply_lora(model, folder, fuse=fuse_lora)
    return model.to(device).eval()


def load_trainer_state(folder: str | Path) -> dict:
    path = Path(folder) / TRAINER_STATE_FILE
    if not path.is_file():
        raise UserError(f"{folder} has no {TRAINER_STATE_FILE}: it cannot be resumed (it may be an exported model)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated pickle raises several types
        raise UserError(f"{path} is damaged ({type(err).__name__}); resume from an earlier checkpoint") from None


def _is_complete_checkpoint(folder: Path, root: Path) -> bool:
    """Our weights plus the HF subfolders (text_encoder/ holds a config.json too), outside any temporary folder
    (write_folder's `.tmp-<pid>-<n>` / `.old-<pid>-<n>`, or an earlier version's `.tmp` / `.old`)."""
    return ((folder / WEIGHTS_FILE).is_file() and (folder / TEXT_ENCODER_DIR).is_dir() and (folder / UNET_DIR).is_dir()
            and not any(leftover_of(part) for part in folder.relative_to(root).parts))


def resolve_checkpoint(checkpoint: str | Path | None, root: str | Path = "outputs") -> Path:
    """The checkpoint folder a user means. None: the newest complete one under root. A folder that exists: itself.
    <runs>/best_model or <runs>/latest, where <runs> holds run folders (outputs/best_model, as runs live in
    outputs/<run>/best_model): that checkpoint of the newest run that has one. Anything else is a UserError that
    names the runs there are."""
    if checkpoint is None:
        return find_latest_checkpoint(root)
    path = Path(checkpoint)
    if path.is_dir():
        return path
    runs = sorted(d for d in path.parent.iterdir() if (d / CONFIG_FILE).is_file() or (d / BEST_CHECKPOINT).is_dir()
                  ) if path.parent.is_dir() else []
    if path.name in (BEST_CHECKPOINT, LATEST_FILE):
        found = [run / (BEST_CHECKPOINT if path.name == BEST_CHECKPOINT else _latest_name(run)) for run in runs]
        found = [f for f in found if _is_complete_checkpoint(f, path.parent)]
        if found:
            return max(found, key=lambda f: (f / WEIGHTS_FILE).stat().st_mtime)
    named = f"; the runs there: {', '.join(str(r) for r in runs)}" if runs else ""
    raise UserError(f"checkpoint folder {path} does not exist; give a folder such as "
                    f"outputs/<run>/best_model{named}")


def _latest_name(run: Path) -> str:
    try:
        return (run / LATEST_FILE).read_text().strip()
    except OSError:
        return LATEST_FILE


def find_latest_checkpoint(root: str | Path = "outputs") -> Path:
    """The newest complete checkpoint folder under root (a run's best_model or checkpoint-N), by write time."""
    root = Path(root)
    found = [p.parent for p in root.glob("**/" + CONFIG_FILE) if _is_complete_checkpoint(p.parent, root)]
    if not found:
        raise UserError(f"no checkpoint found under {root.resolve()}; train one with `python main.py` "
                        "or pass --checkpoint PATH")
    return max(found, key=lambda p: (p / WEIGHTS_FILE).stat().st_mtime)
