"""Text-to-image quality per minute of training on the embedded world: trains the default preset for a wall-clock
budget (or takes --checkpoint), then reads generated images with the world's oracle over a sweep of sampling
settings, and the greedy captions of the same val images. Prints one JSON object; asserts nothing.

    python bench/t2i_quality.py --minutes 15                       # the default run, then the sweep
    python bench/t2i_quality.py --checkpoint outputs/embedded/checkpoint-000900 --guidance-scale 2,3,5 --spacing trailing,leading
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=15.0, help="training budget (train.max_minutes)")
    p.add_argument("--checkpoint", help="evaluate this checkpoint instead of training one")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra config overrides for training")
    p.add_argument("--out", default="outputs", help="train.out_dir")
    p.add_argument("--out-dir", dest="out", help=argparse.SUPPRESS)  # the spelling before --out
    p.add_argument("--run-name", default="", help="default: t2i_quality-<minutes>min-<unix time>")
    p.add_argument("--num-prompts", type=int, default=400, help="val images whose first caption is a prompt")
    p.add_argument("--guidance-scale", default="", help="guidance scales to sweep (default: the checkpoint's)")
    p.add_argument("--guidance", dest="guidance_scale", help=argparse.SUPPRESS)  # the spelling before
    p.add_argument("--steps", default="", help="sampling steps to sweep (default: the checkpoint's)")
    p.add_argument("--spacing", default="", help="timestep spacings to sweep (default: the checkpoint's)")
    p.add_argument("--scheduler", default="", help="samplers to sweep (default: the checkpoint's)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto (where the model samples and captions)")
    return p.parse_args(argv)


def train(args) -> tuple[Path, dict]:
    from configs.loading import load_config
    from models.checkpoint import find_latest_checkpoint
    from training.loop import run

    name = args.run_name or f"t2i_quality-{args.minutes:g}min-{int(time.time())}"
    cfg = load_config("embedded", [*args.set, f"train.max_minutes={args.minutes}", f"train.out_dir={args.out}",
                                   f"train.run_name={name}"])
    summary = run(cfg)
    run_dir = Path(summary["run_dir"])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last_val = [r for r in rows if "val_loss" in r][-1]
    return find_latest_checkpoint(run_dir), {
        "minutes": summary["minutes"], "steps": summary["step"], "joint_steps": cfg.train.joint_steps,
        "val_loss": last_val["val_loss"], "val_i2t": last_val["val_i2t"], "val_t2i": last_val["val_t2i"]}


def flat(summary: dict) -> dict:
    """The headline numbers of evaluation.generation.oracle_summary."""
    out = {f"{k}": summary["overall"][k] for k in ("colour", "shape", "size", "position", "relation", "all")}
    out.update({"single_all": summary["single_object"].get("all"), "pair_all": summary["two_objects"].get("all"),
                "held_out_all": summary["held_out"].get("all"), "pair_relation": summary["two_objects"].get("relation"),
                "single_position": summary["single_object"].get("position")})
    out["geneval"] = summary["geneval"]
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from configs.errors import UserError
    from data.datasets import build_split, dataset_folder, resolve_dataset_name
    from data.world import Scene
    from evaluation.generation import oracle_caption_accuracy, oracle_generation_accuracy
    from evaluation.suite import caption_one_thread, image_entries
    from models.checkpoint import load_checkpoint
    from models.device import resolve_device

    result = {"load_average_before": [round(v, 2) for v in os.getloadavg()], "torch_threads": torch.get_num_threads()}
    try:
        if args.checkpoint:
            checkpoint = Path(args.checkpoint)
        else:
            checkpoint, result["train"] = train(args)
        device = resolve_device(args.device)
        model = load_checkpoint(checkpoint, device)
        cfg = model.config
        name = resolve_dataset_name(cfg)
        if name != "embedded":
            raise UserError(f"{checkpoint} was trained on {name}; the oracle reads the embedded world only")
        folder = dataset_folder(cfg, name)
        val = build_split(cfg, name, folder, cfg.data.val_split, model.tokenizer, args.num_prompts, "random")
        entries = image_entries(folder, cfg.data.val_split)
        count = min(args.num_prompts, val.num_images)
        prompts = [val.image_captions(i)[0] for i in range(count)]
        scenes = [Scene.from_dict(entries[int(val.index.image_ids[i])]["scene"]) for i in range(count)]
        started = time.time()
        with torch.no_grad():
            images = torch.stack([val.image_tensor(i) for i in range(count)])
            captions = [c for s in range(0, count, 100) for c in caption_one_thread(model, images[s:s + 100].to(device))]
        caption_summary = oracle_caption_accuracy(captions, scenes)
        result["captions"] = {"all": caption_summary["overall"]["all"],
                              "relation": caption_summary["two_objects"].get("relation"),
                              "single_all": caption_summary["single_object"].get("all"),
                              "pair_all": caption_summary["two_objects"].get("all")}
        sample = cfg.sample
        grid = itertools.product(args.scheduler.split(",") if args.scheduler else [sample.scheduler],
                                 [int(v) for v in floats(args.steps)] or [sample.steps],
                                 floats(args.guidance_scale) or [sample.guidance_scale],
                                 args.spacing.split(",") if args.spacing else [sample.timestep_spacing])
        result["sweep"] = []
        for scheduler, steps, guidance, spacing in grid:
            model.config.sample.timestep_spacing = spacing
            t0 = time.time()
            generated = model.generate_images(prompts, list(range(len(prompts))), steps, guidance, scheduler,
                                              batch_size=100)
            result["sweep"].append({"scheduler": scheduler, "steps": steps, "guidance": guidance, "spacing": spacing,
                                    "seconds": round(time.time() - t0, 1),
                                    **flat(oracle_generation_accuracy(generated, prompts))})
        result.update({"checkpoint": str(checkpoint), "num_prompts": count, "device": str(device),
                       "eval_minutes": round((time.time() - started) / 60, 2),
                       "load_average_after": [round(v, 2) for v in os.getloadavg()]})
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
