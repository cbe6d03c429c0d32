"""Quality per compute: train the default embedded preset for a fixed wall-clock budget through training.loop.run
(train.max_minutes), then evaluate its last checkpoint with evaluate.py's suite. Prints one JSON object with the
headline figures; asserts nothing. The full report lands in <run>/<checkpoint>/eval/.

    python bench/embedded_quality.py --minutes 15            # the headline run (~15 min + evaluation)
    python bench/embedded_quality.py --minutes 1 --limit 200 --num-generated 8 --steps 10   # a smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=15.0, help="training wall-clock budget (train.max_minutes)")
    p.add_argument("--preset", default="embedded")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra config overrides")
    p.add_argument("--out", default="outputs", help="train.out_dir")
    p.add_argument("--out-dir", dest="out", help=argparse.SUPPRESS)  # the spelling before --out
    p.add_argument("--run-name", default="", help="default: embedded_quality-<unix time>, a fresh run each time")
    p.add_argument("--limit", type=int, default=0, help="evaluate the first N val images (0: all)")
    p.add_argument("--num-generated", type=int, default=64)
    p.add_argument("--steps", type=int, help="sampling steps (default: the checkpoint's sample.steps)")
    return p.parse_args(argv)


def headline(metrics: dict) -> dict:
    """The few numbers worth comparing between runs, flattened."""
    r, c, g = metrics["retrieval"], metrics["captioning"], metrics["generation"] or {}
    out = {f"{d}_r{k}": r[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)}
    out.update({"i2t_median_rank": r["i2t_median_rank"], "t2i_median_rank": r["t2i_median_rank"],
                "BLEU_4": c["BLEU_4"], "METEOR": c["METEOR"], "ROUGE_L": c["ROUGE_L"], "CIDEr": c["CIDEr"]})
    if c.get("oracle"):
        out["caption_oracle_all"] = c["oracle"]["overall"]["all"]
    out["image_text_score"] = g.get("image_text_score")
    out["fd_duet_features"] = g.get("fd_duet_features")
    if g.get("oracle"):
        out["generation_oracle_all"] = g["oracle"]["overall"]["all"]
        out["generation_oracle_held_out_all"] = g["oracle"]["held_out"].get("all")
        out.update({f"generation_oracle_{k}": g["oracle"]["overall"][k]
                    for k in ("colour", "shape", "size", "position", "relation")})
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from configs.errors import UserError
    from configs.loading import load_config
    from evaluation.suite import evaluate_checkpoint
    from models.checkpoint import find_latest_checkpoint
    from training.loop import run

    run_name = args.run_name or f"embedded_quality-{int(time.time())}"
    result = {"torch_version": torch.__version__, "torch_threads": torch.get_num_threads(),
              "cpu_count": os.cpu_count(), "python": platform.python_version(),
              "load_average_before": [round(v, 2) for v in os.getloadavg()], "preset": args.preset,
              "budget_minutes": args.minutes}
    try:
        cfg = load_config(args.preset, [*args.set, f"train.max_minutes={args.minutes}",
                                        f"train.out_dir={args.out}", f"train.run_name={run_name}"])
        summary = run(cfg)
        result["load_average_after_training"] = [round(v, 2) for v in os.getloadavg()]
        checkpoint = find_latest_checkpoint(summary["run_dir"])
        started = time.time()
        metrics = evaluate_checkpoint(checkpoint, limit=args.limit, num_generated=args.num_generated,
                                      steps=args.steps)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result.update({"train_minutes": summary["minutes"], "train_steps": summary["step"],
                   "train_samples": summary["step"] * cfg.train.batch_size * cfg.train.grad_accum_steps,
                   "best_val_loss": summary["best_val_loss"], "checkpoint": str(checkpoint),
                   "eval_minutes": round((time.time() - started) / 60, 2),
                   "eval_images": metrics["retrieval"]["num_images"],
                   "report": str(checkpoint / "eval" / "report.md"), **headline(metrics),
                   "load_average_after": [round(v, 2) for v in os.getloadavg()]})
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
