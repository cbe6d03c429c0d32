"""Smoke-checks a trained checkpoint: 5 text-to-image samples, captions for a few validation images, the embedded
world's oracle scores for both directions when it applies; prints a short report and ends with one JSON line.
On the embedded world it fails (exit 1, one line saying why) when the oracle reads fewer generated images or
captions right than --min-t2i / --min-i2t, so "ok" means both directions work.

    python test_generation.py                      # the newest checkpoint under outputs/
    python test_generation.py --checkpoint outputs/embedded/best_model --steps 25
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from configs.errors import UserError

NUM_PROMPTS = 5
ORACLE_PROMPTS = 48      # embedded world: val captions whose images the oracle reads (5 would be too noisy)
# Used when the checkpoint's dataset is not on this machine: phrased like the embedded world's captions.
FIXED_PROMPTS = ("a red circle on the left", "a large blue square in the center", "a small yellow triangle at the top",
                 "a green diamond to the left of a white cross", "a purple star at the bottom")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Generate test images and captions with a Duet checkpoint.")
    p.add_argument("--checkpoint", help="checkpoint folder (default: the newest under outputs/)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the checkpoint's sample.steps)")
    p.add_argument("--guidance-scale", type=float, help="classifier-free guidance (default: the checkpoint's)")
    p.add_argument("--num-captions", type=int, default=5, help="validation images to caption (default 5)")
    p.add_argument("--min-t2i", type=float, default=0.5,
                   help="embedded world: least share of generated images the oracle reads right (default 0.5)")
    p.add_argument("--min-i2t", type=float, default=0.6,
                   help="embedded world: least share of captions the oracle reads right (default 0.6)")
    p.add_argument("--out", help="where the test images go (default: <run>/test_generation beside the checkpoint)")
    p.add_argument("--out-dir", dest="out", help=argparse.SUPPRESS)  # the spelling before --out
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: CUDA when present)")
    return p.parse_args(argv)


def read_val_split(cfg, limit: int) -> tuple[str, list[dict]]:
    """(dataset name, up to `limit` val images {"path", "captions", "scene" or None}) of the checkpoint's dataset;
    no images when the dataset is not on this machine (nothing is generated or downloaded here)."""
    from data.coco import resolve_split_files
    from data.datasets import dataset_folder, resolve_dataset_name

    try:
        name = resolve_dataset_name(cfg)
    except UserError:  # a folder dataset that is not here
        return cfg.data.dataset, []
    folder = dataset_folder(cfg, name, create=False)
    try:
        ann_file, image_dir = resolve_split_files(folder, cfg.data.val_split)
        tree = json.loads(ann_file.read_text())
    except (UserError, OSError, json.JSONDecodeError):
        return name, []
    captions: dict[int, list[str]] = {}
    for ann in tree.get("annotations", []):
        captions.setdefault(ann["image_id"], []).append(ann["caption"])
    images = [{"path": image_dir / im["file_name"], "captions": captions[im["id"]], "scene": im.get("scene")}
              for im in tree.get("images", []) if captions.get(im["id"])]
    return name, images[:limit]


def pick_prompts(name: str, val_images: list[dict]) -> tuple[list[str], list | None]:
    """(prompts, their true scenes or None): val captions when there are enough, else fixed prompts."""
    if len(val_images) >= NUM_PROMPTS:
        return [im["captions"][0] for im in val_images[:NUM_PROMPTS]], None
    if name == "embedded":
        from data.embedded import world_prompts

        pairs = world_prompts(NUM_PROMPTS)
        return [text for text, _ in pairs], [scene for _, scene in pairs]
    return list(FIXED_PROMPTS), None


def oracle_scores(prompts: list[str], images: list[Image.Image], val_images: list[dict],
                  captions: list[str]) -> dict:
    """The embedded world's oracle in both directions: generated image vs its prompt, caption vs true scene."""
    from data.oracle import compare, parse_caption, read_image, summarize
    from data.world import Scene

    t2i = [compare(read_image(image), parse_caption(prompt)) for prompt, image in zip(prompts, images)]
    i2t = [compare(parse_caption(caption), Scene.from_dict(im["scene"]))
           for caption, im in zip(captions, val_images) if im.get("scene")]
    return {"t2i": summarize(t2i), "i2t": summarize(i2t)}


def blank_images(images: list[Image.Image]) -> list[int]:
    """Indices of single-colour images: what NaN latents or a dead decoder produce."""
    return [i for i, image in enumerate(images) if np.asarray(image, dtype=np.float32).std() == 0]


def run(args: argparse.Namespace) -> dict:
    from pipelines.generator import ImageTextGenerator

    generator = ImageTextGenerator(args.checkpoint, device=args.device)
    checkpoint = generator.checkpoint
    cfg = generator.config
    name, val_images = read_val_split(cfg, max(args.num_captions, NUM_PROMPTS, ORACLE_PROMPTS))
    prompts, _ = pick_prompts(name, val_images)
    out_dir = Path(args.out) if args.out else checkpoint.parent / "test_generation"

    start = time.perf_counter()
    images = generator.batch_text_to_image(prompts, out_dir, batch_size=16, num_inference_steps=args.steps,
                                           guidance_scale=args.guidance_scale, seed=args.seed)
    t2i_seconds = time.perf_counter() - start
    print(f"checkpoint {checkpoint} ({name}), {generator.device}")
    steps = args.steps or cfg.sample.steps
    print(f"text -> image: {len(images)} images, {steps} steps, {t2i_seconds:.1f} s")
    for prompt, image in list(zip(prompts, images))[:NUM_PROMPTS]:
        print(f"  {Path(image.filename).name}  '{prompt}'")

    captioned = val_images[:args.num_captions]
    start = time.perf_counter()
    captions = generator.batch_image_to_text([im["path"] for im in captioned]) if captioned else []
    i2t_seconds = time.perf_counter() - start
    if name == "embedded":  # the thresholds read more images than the report shows
        checked = val_images[:ORACLE_PROMPTS]
        oracle_prompts = [im["captions"][0] for im in checked]
        oracle_images = generator.batch_text_to_image(oracle_prompts, None, batch_size=16, seed=args.seed,
                                                      num_inference_steps=args.steps,
                                                      guidance_scale=args.guidance_scale)
        oracle_captions = generator.batch_image_to_text([im["path"] for im in checked])
    print(f"image -> text: {len(captions)} validation images, {i2t_seconds:.2f} s"
          + ("" if captioned else " (the dataset's val split is not on this machine)"))
    for im, caption in list(zip(captioned, captions))[:NUM_PROMPTS]:
        print(f"  {Path(im['path']).name}: '{caption}'  (reference: '{im['captions'][0]}')")

    report = {"checkpoint": str(checkpoint), "dataset": name, "device": str(generator.device),
              "t2i": {"prompts": prompts, "paths": [im.filename for im in images], "seconds": round(t2i_seconds, 3)},
              "i2t": {"images": [str(im["path"]) for im in captioned], "captions": captions,
                      "references": [im["captions"][0] for im in captioned], "seconds": round(i2t_seconds, 3)}}
    if name == "embedded":
        scores = oracle_scores(oracle_prompts, oracle_images, checked, oracle_captions)
        scores["n"] = len(checked)
        report["oracle"] = scores
        for direction, summary in scores.items():
            if isinstance(summary, dict) and summary:
                print(f"oracle {direction} ({len(checked)} val images): " + ", ".join(f"{k} {v:.2f}" for k, v in summary.items()))
    problems = [f"generated image {Path(images[i].filename).name} is a single colour" for i in blank_images(images)]
    if name == "embedded":
        for direction, floor, what in (("t2i", args.min_t2i, "generated images"), ("i2t", args.min_i2t, "captions")):
            share = scores[direction].get("all") if scores[direction] else None
            if share is not None and share < floor:
                problems.append(f"the oracle reads {share:.0%} of {what} right, below --min-{direction} {floor:.0%}")
    if captions and not any(captions):
        problems.append("every caption is empty")
    report["problems"] = problems
    report["ok"] = not problems
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        from models.checkpoint import quiet_library_progress

        quiet_library_progress()
        report = run(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for problem in report["problems"]:
        print(f"problem: {problem}", file=sys.stderr)
    print(json.dumps(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
