"""Evaluate a checkpoint: retrieval, caption metrics and generated-image metrics on a split, with a report.

    python evaluate.py --checkpoint outputs/embedded/best_model --limit 500 --num-generated 64 --steps 25
"""
from __future__ import annotations

import argparse
import sys

from configs.errors import UserError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="checkpoint folder (default: the newest under outputs/)")
    p.add_argument("--dataset", help="coco, embedded, fashion or a COCO-format folder (default: the checkpoint's)")
    p.add_argument("--data-root", help="where named datasets live (default: the checkpoint's data.root)")
    p.add_argument("--split", help="split to evaluate (default: the checkpoint's data.val_split)")
    p.add_argument("--limit", type=int, default=0, help="first N images of the split (default 0: all)")
    p.add_argument("--out", help="output folder (default: <checkpoint>/eval); never inside the dataset's folder")
    p.add_argument("--overwrite", action="store_true", help="replace the report an earlier evaluation left in --out")
    p.add_argument("--num-generated", type=int, default=64, help="images to generate (0: skip generation)")
    p.add_argument("--steps", type=int, help="sampling steps per generated image (default: the checkpoint's)")
    p.add_argument("--guidance-scale", type=float, help="classifier-free guidance (default: the checkpoint's)")
    p.add_argument("--scheduler", help="ddim, dpm++, euler or ddpm (default: the checkpoint's sample.scheduler)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="generated image i uses seed + i")
    p.add_argument("--device", default="auto", help="auto (CUDA if visible), cpu or cuda[:N]")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--no-meteor", action="store_true", help="skip METEOR (it starts a 2 GB Java process)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from evaluation.suite import evaluate_checkpoint  # torch and friends: after --help

    if args.threads > 0:
        torch.set_num_threads(args.threads)

    try:
        evaluate_checkpoint(args.checkpoint, dataset=args.dataset, split=args.split, limit=args.limit,
                            out_dir=args.out, num_generated=args.num_generated, steps=args.steps,
                            guidance_scale=args.guidance_scale, scheduler=args.scheduler, batch_size=args.batch_size,
                            seed=args.seed, device=args.device, data_root=args.data_root,
                            use_meteor=not args.no_meteor, overwrite=args.overwrite)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
