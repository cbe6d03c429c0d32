"""Domain specialisation: `python specialize.py --mode prompt|finetune|compare|all [--checkpoint DIR] ...`.
prompt: optimise prompts for a domain, weights untouched; finetune: the trainer's fine-tuning preset (full or LoRA);
compare: base vs tuned; all: the three in turn. Each mode (prompt_opt.py, finetune.py, compare.py) adds its flags with
add_arguments(parser), declares MINIMUMS (flag dest -> least value) and runs with run(args, folders), folders being
every mode's results folder under --out."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights come from local folders, never the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from configs.errors import UserError  # noqa: E402
from data.datasets import refuse_inside_dataset  # noqa: E402
from data.fashion import complete_fashion_sets  # noqa: E402
from models.checkpoint import quiet_library_progress  # noqa: E402
from specialize import compare, finetune, prompt_opt  # noqa: E402

MODES = {"prompt": prompt_opt, "finetune": finetune, "compare": compare}   # --mode all runs them in this order


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
    for module in MODES.values():
        module.add_arguments(parser)
    return parser


def refuse_out_in_dataset(args) -> None:
    """--out must not land in the data it reads (fine-tuning rotates checkpoint-* folders there)."""
    folders = complete_fashion_sets(args.data_root) if args.dataset == "fashion" else [args.dataset]
    for folder in folders:
        refuse_inside_dataset(args.out, folder, "--out", "choose another --out")


def refuse_earlier_results(args, folders: dict[str, Path]) -> None:
    """A mode's folder that already holds results is replaced only with --overwrite (a fine-tuning run may continue
    its own with --resume)."""
    for mode, folder in folders.items():
        resuming = mode == "finetune" and args.resume
        if folder.is_dir() and any(folder.iterdir()) and not resuming and not args.overwrite:
            raise UserError(f"{folder} holds results of an earlier run; pass --overwrite to replace them"
                            + (", --resume latest to continue it" if mode == "finetune" else "")
                            + " or choose another --out")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    modes: list[str] = []
    try:
        args = build_parser().parse_args(argv)
        if args.threads > 0:
            torch.set_num_threads(args.threads)
        modes = list(MODES) if args.mode == "all" else [args.mode]
        for dest, least in {"steps": 1, **{k: v for mode in modes for k, v in MODES[mode].MINIMUMS.items()}}.items():
            if (value := getattr(args, dest)) is not None and value < least:
                raise UserError(f"--{dest.replace('_', '-')} must be >= {least}, got {value}")
        refuse_out_in_dataset(args)
        folders = {mode: Path(args.out) / mode for mode in MODES}
        refuse_earlier_results(args, {mode: folders[mode] for mode in modes})
        quiet_library_progress()
        for mode in modes:
            MODES[mode].run(args, folders)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted" + ("; resume with --resume latest" if "finetune" in modes else ""), file=sys.stderr)
        return 130
    return 0
