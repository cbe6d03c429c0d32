"""Generation time of the embedded world and the oracle's accuracy on its val images; prints one JSON object.

python bench/embedded_world.py [--train 20000] [--val 2000] [--workers 2] [--oracle-images 2000]
Generates into a temp folder (removed afterwards), then reads val images clean, shrunk to 32 and 16 px, and
degraded by blur + noise + JPEG, scoring each against the stored scene.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image, ImageFilter  # noqa: E402

from data.embedded import ensure_embedded, read_split  # noqa: E402
from data.oracle import compare, read_image, summarize  # noqa: E402


def degrade(image: Image.Image, rng: np.random.Generator, blur: float, noise: float, quality: int) -> Image.Image:
    """Gaussian blur (px), Gaussian pixel noise (0..255 units) and a JPEG round trip."""
    pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(blur)), dtype=np.float32)
    pixels = np.clip(pixels + rng.normal(0, noise, pixels.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def oracle_accuracy(records: list[dict], transform) -> dict:
    start = time.perf_counter()
    results = []
    for record in records:
        with Image.open(record["path"]) as im:
            results.append(compare(read_image(transform(im.convert("RGB"))), record["scene"]))
    scores = {k: round(v, 4) for k, v in summarize(results).items()}
    held_out = [r for r, rec in zip(results, records) if rec["held_out"]]
    scores["all_held_out"] = round(summarize(held_out)["all"], 4) if held_out else None
    scores["ms_per_image"] = round((time.perf_counter() - start) / len(records) * 1000, 2)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=20000)
    parser.add_argument("--val", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--oracle-images", type=int, default=2000)
    args = parser.parse_args()
    result = {"train_images": args.train, "val_images": args.val, "workers": args.workers,
              "cpus": os.cpu_count(), "python": platform.python_version()}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        folder = ensure_embedded(tmp, args.train, args.val, seed=0, workers=args.workers)
        result["generate_s"] = round(time.perf_counter() - start, 2)
        start = time.perf_counter()
        ensure_embedded(tmp, args.train, args.val, seed=0, workers=args.workers)
        result["cached_call_ms"] = round((time.perf_counter() - start) * 1000, 3)
        result["dataset_mb"] = round(sum(p.stat().st_size for p in Path(folder).rglob("*")) / 2**20, 1)
        records = read_split(folder, "val")[:args.oracle_images]
        rng = np.random.default_rng(0)
        conditions = {
            "clean_64": lambda im: im,
            "clean_32": lambda im: im.resize((32, 32), Image.BILINEAR),
            "clean_16": lambda im: im.resize((16, 16), Image.BILINEAR),
            "degraded_blur1_noise10_jpeg40": lambda im: degrade(im, rng, 1.0, 10, 40),
            "degraded_blur1.5_noise20_jpeg25": lambda im: degrade(im, rng, 1.5, 20, 25),
        }
        result["oracle_images"] = len(records)
        result["oracle"] = {name: oracle_accuracy(records, fn) for name, fn in conditions.items()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
