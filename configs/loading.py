"""YAML presets and dotted `--set a.b=v` overrides on top of the dataclass defaults, cast and checked."""
from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from pathlib import Path

import yaml

from configs.errors import UserError
from configs.schema import DATA_FORMATS, DuetConfig

PRESET_DIR = Path(__file__).resolve().parent
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _all_keys(cfg) -> list[str]:
    return [f"{section.name}.{f.name}"
            for section in dataclasses.fields(cfg)
            for f in dataclasses.fields(getattr(cfg, section.name))]


def _unknown_key(key: str, cfg) -> UserError:
    close = difflib.get_close_matches(key, _all_keys(cfg), n=5, cutoff=0.5)
    # a typo seldom changes a name's first letter: among close keys, those that keep it come first
    field = key.rpartition(".")[2][:1]
    close.sort(key=lambda k: k.rpartition(".")[2][:1] != field)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return UserError(f"unknown config key '{key}'{hint}")


def _cast(key: str, value, annotation):
    """Casts a YAML value or a `--set` string to the field's declared type."""
    origin = typing.get_origin(annotation)
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if isinstance(value, str):
            value = [v.strip() for v in value.strip("[]").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config key '{key}' takes a list, got {value!r}")
        return [_cast(key, v, item_type) for v in value]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in _TRUE | _FALSE:
            return str(value).lower() in _TRUE
        raise UserError(f"config key '{key}' takes true or false, got {value!r}")
    if annotation in (int, float):
        if isinstance(value, bool):
            raise UserError(f"config key '{key}' takes a number, got {value!r}")
        try:
            number = float(value)
            if annotation is int:
                if number != int(number):
                    raise ValueError
                return int(number)
            return number
        except (TypeError, ValueError):
            raise UserError(f"config key '{key}' takes {annotation.__name__}, got {value!r}") from None
    if annotation is str:
        return str(value)
    raise AssertionError(f"unsupported config type {annotation} for {key}")


def apply(cfg: DuetConfig, values: dict[str, object]) -> DuetConfig:
    """Sets dotted keys (`train.learning_rate`) on cfg in place; unknown keys and bad values raise UserError."""
    for key, value in values.items():
        section_name, _, name = key.partition(".")
        section = getattr(cfg, section_name, None) if not section_name.startswith("_") else None
        if section is None or not dataclasses.is_dataclass(section):
            raise _unknown_key(key, cfg)
        hints = typing.get_type_hints(type(section))
        if name not in hints:
            raise _unknown_key(key, cfg)
        setattr(section, name, _cast(key, value, hints[name]))
    return cfg


def _flatten(tree: dict, where: str) -> dict[str, object]:
    if not isinstance(tree, dict):
        raise UserError(f"{where}: expected sections model/data/train/sample, got {type(tree).__name__}")
    flat = {}
    for section, values in tree.items():
        if not isinstance(values, dict):
            raise UserError(f"{where}: section '{section}' must be a mapping of keys to values")
        flat.update({f"{section}.{k}": v for k, v in values.items()})
    return flat


def _read_preset(name_or_path: str) -> dict[str, object]:
    path = Path(name_or_path)
    if not path.suffix and (PRESET_DIR / f"{name_or_path}.yaml").exists():
        path = PRESET_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise UserError(f"config '{name_or_path}' not found; give a YAML file or a preset: {', '.join(preset_names())}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"config {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    return _flatten(tree, str(path))


def parse_overrides(pairs: list[str] | None) -> dict[str, str]:
    overrides = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"override '{pair}' must look like section.key=value, e.g. train.learning_rate=1e-3")
        overrides[key.strip()] = value.strip()
    return overrides


def validate(cfg: DuetConfig) -> DuetConfig:
    """Checks the values that other code cannot recover from, with a message that says how to fix them."""
    m, t, d = cfg.model, cfg.train, cfg.data
    down = m.latent_downsample
    if down < 1 or down & (down - 1):
        raise UserError(f"model.latent_downsample must be a power of two, got {down}")
    if m.image_size < 8 or m.image_size % down or (m.image_size // down) % 2:
        raise UserError(f"model.image_size={m.image_size} does not fit model.latent_downsample={down}: "
                        f"it must be a multiple of {2 * down} (e.g. {max(2 * down, m.image_size // (2 * down) * 2 * down)})")
    if not m.use_simple_cnn and down not in (4, 8, 16, 32):
        raise UserError(f"the ResNet50 encoder gives latents at stride 4, 8, 16 or 32, not model.latent_downsample={down}")
    if m.caption_decoder_width % m.caption_decoder_heads:
        raise UserError("model.caption_decoder_width must be divisible by model.caption_decoder_heads")
    for ch in m.unet_block_out_channels:
        if ch % m.unet_attention_head_dim:
            raise UserError(f"model.unet_block_out_channels ({ch}) must be multiples of model.unet_attention_head_dim")
    if t.batch_size < 2:
        raise UserError("train.batch_size must be at least 2 (the contrastive loss compares pairs in a batch)")
    if t.mixed_precision not in ("auto", "no", "bf16", "fp16"):
        raise UserError(f"train.mixed_precision must be auto, no, bf16 or fp16, got '{t.mixed_precision}'")
    if d.caption_mode not in ("pairs", "random"):
        raise UserError(f"data.caption_mode must be pairs or random, got '{d.caption_mode}'")
    if d.format not in DATA_FORMATS:
        raise UserError(f"data.format must be one of {', '.join(DATA_FORMATS)}, got '{d.format}'")
    if not 0 < d.val_fraction < 1:
        raise UserError(f"data.val_fraction must be between 0 and 1 (e.g. 0.05), got {d.val_fraction}")
    if d.train_num_samples < 0 or not d.image_column or not d.caption_column:
        raise UserError("data.train_num_samples must be >= 0, and data.image_column and data.caption_column "
                        "must name a column")
    if len(d.csv_separator) > 1 and d.csv_separator not in ("tab", "\\t"):
        raise UserError(f"data.csv_separator must be one character, 'tab' or empty (by the file's suffix), "
                        f"got '{d.csv_separator}'")
    if m.diffusion_objective not in ("epsilon", "v_prediction"):
        raise UserError(f"model.diffusion_objective must be epsilon or v_prediction, got '{m.diffusion_objective}'")
    if min(t.joint_steps, t.diffusion_batch_size, t.diffusion_captions_per_image, t.image_decoder_batch_size,
           t.caption_batch_size) < 0:
        raise UserError("train.joint_steps, train.diffusion_batch_size, train.diffusion_captions_per_image, "
                        "train.image_decoder_batch_size and train.caption_batch_size must be >= 0")
    if t.phases not in ([], ["joint"], ["diffusion"], ["joint", "diffusion"]):
        raise UserError(f"train.phases must be [joint], [diffusion] or [joint, diffusion], got {t.phases}")
    unknown = sorted(set(t.diffusion_trains) - {"unet", "caption_decoder", "image_decoder"})
    if unknown or not t.diffusion_trains:
        raise UserError(f"train.diffusion_trains takes unet, caption_decoder and image_decoder, got {t.diffusion_trains}")
    if t.lora_rank < 0 or t.lora_alpha < 0 or (t.lora_rank and not t.lora_targets):
        raise UserError("train.lora_rank and train.lora_alpha must be >= 0, and LoRA needs train.lora_targets")
    if t.lora_rank and "unet" not in t.diffusion_trains:
        raise UserError("train.lora_rank puts adapters on the UNet (and the image decoder): add unet to "
                        "train.diffusion_trains")
    if t.report_to not in ("none", "tensorboard", "wandb"):
        raise UserError(f"train.report_to (--report-to) must be none, tensorboard or wandb, got '{t.report_to}'")
    if t.feature_store not in ("auto", "memory", "disk"):
        raise UserError(f"train.feature_store must be auto, memory or disk, got '{t.feature_store}'")
    s = cfg.sample
    if s.steps < 1 or s.timestep_spacing not in ("leading", "trailing", "linspace"):
        raise UserError("sample.steps must be >= 1 and sample.timestep_spacing leading, trailing or linspace")
    if t.learning_rate <= 0 or t.grad_accum_steps < 1 or t.epochs < 1:
        raise UserError("train.learning_rate must be > 0, train.grad_accum_steps and train.epochs >= 1")
    return cfg


def load_config(config: str | None = None, overrides: list[str] | dict | None = None) -> DuetConfig:
    """Defaults, then the preset or YAML file, then overrides; returns a validated DuetConfig."""
    cfg = DuetConfig()
    if config:
        apply(cfg, _read_preset(config))
    apply(cfg, overrides if isinstance(overrides, dict) else parse_overrides(overrides))
    return validate(cfg)


def config_to_dict(cfg: DuetConfig) -> dict:
    return dataclasses.asdict(cfg)


# Knobs that measurements rejected and this version removed, with the value that meant "off": a saved config that
# has them off still loads; one trained with them on is refused by name.
RETIRED = {"model.unet_text_time_embedding": False, "train.snr_gamma": 0.0}


def config_from_dict(tree: dict) -> DuetConfig:
    """Rebuilds a saved config; keys this version does not know are an error naming the key."""
    flat = _flatten(tree, "saved config")
    for key, off in RETIRED.items():
        if key in flat and flat.pop(key) != off:
            raise UserError(f"{key} was used to train this model; this version no longer supports it")
    return validate(apply(DuetConfig(), flat))


def config_to_json(cfg: DuetConfig) -> str:
    return json.dumps(config_to_dict(cfg), indent=2)
