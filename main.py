"""Train Duet: `python main.py [--config PRESET|FILE] [--dataset coco|embedded|fashion|PATH] [--set a.b=v ...]`."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights come from packages and local folders, never the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from configs.errors import UserError  # noqa: E402
from configs.loading import load_config, preset_names  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", help=f"a preset ({', '.join(preset_names())}) or a YAML file; default: coco "
                                         "when data/coco/coco2017 exists, else embedded")
    parser.add_argument("--dataset", help="coco | embedded | fashion | a COCO-format folder (sets data.dataset)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides, e.g. train.epochs=3")
    parser.add_argument("--resume", help="'latest' or a checkpoint folder of this run")
    parser.add_argument("--out", help="where runs go (sets train.out_dir; default outputs)")
    parser.add_argument("--out-dir", dest="out", help=argparse.SUPPRESS)  # the spelling before --out
    parser.add_argument("--device", help="auto (CUDA when present; the default), cpu, cuda or cuda:N (train.device)")
    parser.add_argument("--report-to", choices=("none", "tensorboard", "wandb"),
                        help="where scalars and sample sheets go besides metrics.jsonl (train.report_to; default "
                             "tensorboard; wandb runs offline unless WANDB_MODE=online)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier run of the same name (sets train.overwrite)")
    return parser.parse_args(argv)


def default_preset(dataset: str | None, data_root: str = "data") -> str:
    """The original recipe when COCO is on disk or asked for; otherwise the embedded world's preset."""
    if dataset == "coco" or (dataset in (None, "auto") and (Path(data_root) / "coco" / "coco2017").is_dir()):
        return "coco"
    return "embedded"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        overrides = list(args.set)
        if args.dataset:
            overrides.append(f"data.dataset={args.dataset}")
        if args.out:
            overrides.append(f"train.out_dir={args.out}")
        if args.overwrite:
            overrides.append("train.overwrite=true")
        if args.device:
            overrides.append(f"train.device={args.device}")
        if args.report_to:
            overrides.append(f"train.report_to={args.report_to}")
        cfg = load_config(args.config or default_preset(args.dataset), overrides)
        from training.loop import run  # after the config: a typo is reported before torch loads

        summary = run(cfg, resume=args.resume)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; resume with --resume latest", file=sys.stderr)
        return 130
    if int(os.environ.get("RANK", "0")) == 0:   # under torchrun, rank 0 speaks for the run
        print(f"done: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
