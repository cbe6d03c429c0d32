"""Domain specialisation launcher: `python specialize.py --mode prompt|finetune|compare|all [--checkpoint DIR] ...`.

prompt: optimise prompts for a domain, weights untouched (specialize/prompt_opt.py); finetune: LoRA or full
fine-tune (specialize/finetune.py); compare: base vs tuned (specialize/compare.py); all: the three in turn.
Each mode module registers its own flags with `add_arguments(parser)` and runs with `run(args)`. The repo-root
specialize.py only calls main() here (a top-level module cannot share the package's name and be imported).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights come from local folders, never the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from configs.errors import UserError  # noqa: E402

MODES = ("prompt", "finetune", "compare")
MODULES = {"prompt": "specialize.prompt_opt", "finetune": "specialize.finetune", "compare": "specialize.compare"}
OUT_SUBDIRS = {"prompt": "prompt", "finetune": "finetune", "compare": "compare"}   # each mode's results in --out


def mode_module(mode: str, required: bool = True):
    """The module behind a mode, or None when it is not installed and not required."""
    try:
        return importlib.import_module(MODULES[mode])
    except ModuleNotFoundError as err:
        if err.name != MODULES[mode]:
            raise  # a missing dependency inside the module is a bug to see, not a missing mode
        if required:
            raise UserError(f"--mode {mode} is not available in this checkout ({MODULES[mode]} is missing)") from None
        return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", required=True, choices=(*MODES, "all"))
    parser.add_argument("--checkpoint", help="Duet checkpoint folder (default: the newest under outputs/)")
    parser.add_argument("--backend", default="duet", choices=("duet", "sd", "sdapi"),
                        help="duet: our checkpoint; sd: Stable Diffusion (--model-path) + CLIP (--clip-path); "
                             "sdapi: an A1111-compatible server (--url), judged by --checkpoint or --clip-path")
    parser.add_argument("--url", help="the A1111-compatible server for --backend sdapi, e.g. http://127.0.0.1:7860")
    parser.add_argument("--api-key", help="its API key (default: $DUET_API_KEY)")
    parser.add_argument("--model-path", help="local diffusers Stable Diffusion v1.5 folder (--backend sd)")
    parser.add_argument("--clip-path", help="local HF CLIP or FashionCLIP folder (--backend sd, or sdapi's judge)")
    parser.add_argument("--dataset", default="fashion", help="fashion (tinted Fashion-MNIST) or a COCO-format folder")
    parser.add_argument("--data-root", default="data", help="where the fashion set lives or is generated")
    parser.add_argument("--out", default="outputs/specialize", help="results go to <out>/<mode>/")
    parser.add_argument("--overwrite", action="store_true", help="replace the results an earlier run left in --out")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (0: torch's default; 1 is fastest on a busy 2-core machine)")
    g = parser.add_argument_group("sampling (--mode prompt and compare); default: the checkpoint's sample section")
    g.add_argument("--steps", type=int, help="denoising steps per image")
    g.add_argument("--guidance-scale", type=float, help="classifier-free guidance scale")
    g.add_argument("--scheduler", help="ddim | dpm++ | euler | ddpm (--backend sd: the pipeline's own unless named)")
    g.add_argument("--sample-steps", dest="steps", type=int, help=argparse.SUPPRESS)  # the spellings before
    g.add_argument("--guidance", dest="guidance_scale", type=float, help=argparse.SUPPRESS)
    for mode in MODES:
        module = mode_module(mode, required=False)
        if module is not None and hasattr(module, "add_arguments"):
            module.add_arguments(parser)
    return parser


def refuse_out_in_dataset(args) -> None:
    """--out must not land in the data it reads (fine-tuning rotates checkpoint-* folders there)."""
    from data.datasets import refuse_inside_dataset
    from data.fashion import complete_fashion_sets

    folders = complete_fashion_sets(args.data_root) if args.dataset == "fashion" else [args.dataset]
    for folder in folders:
        refuse_inside_dataset(args.out, folder, "--out", "choose another --out")


def refuse_earlier_results(args, modes: tuple[str, ...]) -> None:
    """A mode's folder under --out that already holds results is replaced only with --overwrite (a fine-tuning
    run may continue its own with --resume)."""
    for mode in modes:
        folder = Path(args.out) / OUT_SUBDIRS[mode]
        resuming = mode == "finetune" and getattr(args, "resume", None)
        if folder.is_dir() and any(folder.iterdir()) and not resuming and not args.overwrite:
            raise UserError(f"{folder} holds results of an earlier run; pass --overwrite to replace them"
                            + (", --resume latest to continue it" if mode == "finetune" else "")
                            + " or choose another --out")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        args = build_parser().parse_args(argv)
        if args.threads > 0:
            import torch

            torch.set_num_threads(args.threads)
        if args.steps is not None and args.steps < 1:
            raise UserError(f"--steps must be >= 1, got {args.steps}")
        refuse_out_in_dataset(args)
        modes = MODES if args.mode == "all" else (args.mode,)
        refuse_earlier_results(args, modes)
        for mode in modes:
            mode_module(mode).run(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


