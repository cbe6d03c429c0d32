"""--mode finetune: the trainer (training/loop.py) with the fine-tuning preset (configs/finetune.yaml) from a Duet
checkpoint on the domain's captioned images; for --backend sd, a LoRA adapter on a local Stable Diffusion pipeline
(training/sd_lora.py). The run goes to <out>/finetune/ (config.json, checkpoint-N/, latest, metrics.jsonl, samples),
then manifest.json there names what --mode compare loads."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from common.figures import read_metrics
from configs.errors import UserError
from configs.loading import load_config
from configs.schema import TrainConfig
from data.datasets import domain_folder
from models.checkpoint import LATEST_FILE, read_config, resolve_checkpoint
from models.device import resolve_device
from models.lora import DECODER_WEIGHT_NAME, LORA_WEIGHT_NAME
from models.stable_diffusion import load_sd_pipeline
from specialize.loading import load_adapter
from specialize.manifest import write_manifest

PRESET = "finetune"
SD_BATCH_SIZE = 32   # Stable Diffusion's default: its 512 px images cost far more per step than Duet's
# flag -> the config keys it sets; a flag left unset keeps the preset's value
FLAG_KEYS = {"max_steps": ("train.max_steps",), "max_minutes": ("train.max_minutes",),
             "lr": ("train.learning_rate", "train.diffusion_learning_rate"),
             "batch_size": ("train.batch_size", "train.diffusion_batch_size", "train.image_decoder_batch_size"),
             "warmup_steps": ("train.diffusion_warmup_steps",), "max_grad_norm": ("train.grad_clip",),
             "save_every": ("train.save_every_steps",), "mixed_precision": ("train.mixed_precision",),
             "limit_train": ("data.limit_train",), "num_workers": ("train.num_workers",)}
MINIMUMS = {**{dest: 0 for dest in (*FLAG_KEYS, "alpha", "tuned_guidance_scale") if dest != "mixed_precision"},
            "batch_size": 1, "save_every": 1}   # specialize/cli.py checks these


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of --mode finetune (specialize/cli.py owns --checkpoint, --backend, --model-path, --dataset, ...)."""
    g = parser.add_argument_group("fine-tuning (--mode finetune; unset flags keep configs/finetune.yaml's values)")
    g.add_argument("--method", choices=("full", "lora"),
                   help="full: the UNet's (and image decoder's) weights, duet's default; lora: adapters (sd's only)")
    g.add_argument("--full", action="store_const", const="full", dest="method", help="the same as --method full")
    g.add_argument("--rank", type=int, default=8, help="LoRA rank")
    g.add_argument("--alpha", type=float, default=0.0, help="LoRA alpha (0: equal to --rank)")
    g.add_argument("--target-modules", default=",".join(TrainConfig().lora_targets),
                   help="comma-separated UNet module names that get LoRA")
    g.add_argument("--train-decoder", action=argparse.BooleanOptionalAction,
                   help="duet (on by default): also train the image decoder, by reconstruction (LoRA: on its convs); "
                        "the encoder stays frozen, so the latents keep their meaning")
    g.add_argument("--train-text-encoder", action="store_true",
                   help="sd: also put LoRA on the CLIP text encoder (duet's BERT stays frozen: its cached states are "
                        "what the UNet learns from)")
    g.add_argument("--lr", type=float, help="learning rate (preset: 1e-3)")
    g.add_argument("--batch-size", type=int, help=f"images per step (duet: the preset's 64; sd: {SD_BATCH_SIZE})")
    g.add_argument("--max-steps", type=int, help="optimizer steps (0: --max-minutes decides)")
    g.add_argument("--max-minutes", type=float,
                   help="this run's time budget (preset: 5); the cosine is planned from the measured speed to end "
                        "with it (0: no limit)")
    g.add_argument("--max-grad-norm", type=float, help="gradient clipping (0: off)")
    g.add_argument("--warmup-steps", type=int, help="linear LR warmup steps, then the cosine")
    g.add_argument("--lr-schedule", default="cosine", choices=("cosine",),
                   help="after the warmup, cosine to 5%% at the planned end")
    g.add_argument("--tuned-guidance-scale", type=float,
                   help="duet: the sampling guidance the tuned model keeps as its default (preset: 3; 0: the base's)")
    g.add_argument("--save-every", type=int, help="checkpoint every N steps (the end is always saved)")
    g.add_argument("--resume", help="'latest' or a checkpoint-N folder of <out>/finetune, with the same flags")
    g.add_argument("--merge", action="store_true", help="LoRA: also write merged/, the model with the adapter fused")
    g.add_argument("--mixed-precision", choices=("auto", "no", "bf16", "fp16"),
                   help="autocast on CUDA (auto: bf16); CPU runs fp32")
    g.add_argument("--limit-train", type=int, help="the first N training images (0: all)")
    g.add_argument("--num-workers", type=int, help="DataLoader worker processes")


def method_of(args) -> str:
    return args.method or ("full" if args.backend == "duet" else "lora")


def check_flags(args) -> list[str]:
    """What the trainer cannot take, as one-line errors; returns the LoRA target modules."""
    targets = [t.strip() for t in args.target_modules.split(",") if t.strip()]
    if args.backend not in ("duet", "sd"):
        raise UserError(f"--mode finetune trains local weights; --backend {args.backend} draws on a server "
                        "(choose duet or sd)")
    if args.backend == "sd" and (args.method == "full" or args.train_decoder):
        raise UserError("--backend sd fine-tunes a LoRA adapter on the UNet (and --train-text-encoder); --method "
                        "full and --train-decoder are for duet")
    if args.backend == "duet" and args.train_text_encoder:
        raise UserError("--train-text-encoder is for --backend sd: a Duet fine-tune keeps BERT frozen, its cached "
                        "states being what the UNet learns from")
    if method_of(args) == "lora" and (args.rank < 1 or not targets):
        raise UserError(f"LoRA needs --rank >= 1 (got {args.rank}) and --target-modules, e.g. to_q,to_k,to_v,to_out.0")
    return targets


def base_model(args, out_dir: Path) -> Path:
    """--checkpoint (default: the newest under outputs/, which must not be one of this --out's own fine-tunes) or
    --model-path."""
    if args.backend == "sd":
        if not args.model_path:
            raise UserError("--backend sd needs --model-path, a local Stable Diffusion diffusers folder")
        return Path(args.model_path)
    base = resolve_checkpoint(args.checkpoint)
    if out_dir.resolve() in base.resolve().parents:
        raise UserError(f"the base {base} is a fine-tuning output of this --out; pass the base model with --checkpoint")
    return base


def finetune_config(args, base: Path, out_dir: Path, targets: list[str]):
    """The preset with what the flags set: the base, the domain, the method, where the run goes."""
    values = {"train.init_from": str(base), "data.dataset": str(domain_folder(args.dataset, args.data_root)),
              "data.root": args.data_root, "train.out_dir": str(out_dir.parent), "train.run_name": out_dir.name,
              "train.seed": args.seed, "train.overwrite": args.overwrite,
              "train.lora_rank": args.rank if method_of(args) == "lora" else 0, "train.lora_alpha": args.alpha,
              "train.lora_targets": targets}
    values.update({key: value for dest, keys in FLAG_KEYS.items() if (value := getattr(args, dest)) is not None
                   for key in keys})
    if args.backend == "duet":
        sample = read_config(base).sample   # the tuned model samples as its base did, at its own guidance
        values.update({"sample.scheduler": sample.scheduler, "sample.steps": sample.steps,
                       "sample.timestep_spacing": sample.timestep_spacing})
        if args.tuned_guidance_scale is not None:
            values["sample.guidance_scale"] = args.tuned_guidance_scale or sample.guidance_scale
        if args.train_decoder is False:
            values["train.diffusion_trains"] = ["unet"]
    elif args.batch_size is None:
        values.update({key: SD_BATCH_SIZE for key in FLAG_KEYS["batch_size"]})
    return load_config(PRESET, values)


def run(args, folders: dict[str, Path]) -> dict:
    """Trains, merges on request, writes the manifest; returns it."""
    out_dir = folders["finetune"]
    targets = check_flags(args)
    base = base_model(args, out_dir)
    cfg = finetune_config(args, base, out_dir, targets)
    device = resolve_device(args.device)
    if args.backend == "duet":
        from training.loop import run as train

        if device.type != resolve_device("auto").type:   # training/distributed.py places the run; no key sets it
            print(f"note: the trainer runs on CUDA when there is one, not on --device {device}", file=sys.stderr)
        summary = train(cfg, resume=args.resume)
    else:
        from training.sd_lora import train

        summary = train(load_sd_pipeline(base, device), cfg, args.resume, args.train_text_encoder)
    checkpoint = out_dir / (out_dir / LATEST_FILE).read_text().strip()
    rows = read_metrics(out_dir / "metrics.jsonl")
    last = {key: next((r[key] for r in reversed(rows) if key in r), None) for key in ("loss", "val_loss")}
    manifest = {"backend": args.backend, "base": str(base), "method": method_of(args), "dataset": cfg.data.dataset,
                "trains": cfg.train.diffusion_trains if args.backend == "duet" else
                ["unet", *(["text_encoder"] if args.train_text_encoder else [])],
                "steps": summary["step"], "minutes": summary["minutes"],
                "metrics": {**last, "best_val_loss": summary.get("best_val_loss")},
                "sample": dataclasses.asdict(cfg.sample) if args.backend == "duet" else None}
    if method_of(args) == "full":
        manifest["model"] = checkpoint
    else:
        manifest["adapter"] = checkpoint / LORA_WEIGHT_NAME
        manifest["lora"] = {"rank": args.rank, "alpha": args.alpha or args.rank, "target_modules": targets}
        if (checkpoint / DECODER_WEIGHT_NAME).is_file():
            manifest["decoder_adapter"] = checkpoint / DECODER_WEIGHT_NAME
        if args.merge:   # a Duet checkpoint loads with its adapters fused; an SD adapter goes on its base
            tuned = (load_adapter(args, checkpoint) if args.backend == "duet" else
                     load_adapter(args, base, lora=checkpoint, judge=False))
            manifest["model"] = tuned.save(out_dir / "merged")
    write_manifest(out_dir, manifest)
    print(f"finetune: {manifest['method']} on the {args.backend} base {base}, {summary['step']} steps in "
          f"{summary['minutes']} min, loss {last['loss']}; {out_dir / 'manifest.json'}", file=sys.stderr)
    return manifest
