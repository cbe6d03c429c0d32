"""Images/s of the caption loader: the uint8 memmap cache vs decoding JPEGs every epoch vs webdataset shards
streamed (1 and 2 workers), beside what training consumes (docs/gpu_check*.json); prints one JSON object.

python bench/data_loader.py [--images 300] [--image-size 64] [--threads 1] [--embedded data/embedded-20000x2000-seed0-v2]
Writes a few hundred photo-sized JPEGs to a temp COCO-layout folder and the same as shards (python -m data.convert);
with --embedded, also times building the cache of that (already generated) folder's train split from scratch.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from configs.schema import PACKAGED_TEXT_ENCODER  # noqa: E402
from data.cache import build_cache, load_cached_captions  # noqa: E402
from data.coco import CocoCaptions, resolve_split_files  # noqa: E402
from data.collate import collate_captions  # noqa: E402
from models.text_encoder import resolve_text_encoder  # noqa: E402


def write_jpegs(folder: Path, count: int, seed: int = 0, split: str = "train") -> None:
    """Photo-like JPEGs (smooth gradients, blobs and grain) of 320-400 x 240-300 pixels, COCO's aspect ratios."""
    rng = np.random.default_rng(seed)
    (folder / split).mkdir(parents=True)
    images, annotations = [], []
    for i in range(count):
        w, h = int(rng.integers(320, 401)), int(rng.integers(240, 301))
        y, x = np.mgrid[0:h, 0:w] / max(w, h)
        base = rng.uniform(0, 255, 3) * (0.5 + 0.5 * np.sin(6 * x[..., None] + rng.uniform(0, 6, 3)))
        blob = 120 * np.exp(-((x - rng.uniform(0.2, 0.8)) ** 2 + (y - rng.uniform(0.2, 0.6)) ** 2) / 0.02)
        pixels = np.clip(base + blob[..., None] + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / split / f"{i:06d}.jpg", quality=90)
        images.append({"id": i + 1, "file_name": f"{i:06d}.jpg", "width": w, "height": h})
        annotations += [{"id": 5 * i + k + 1, "image_id": i + 1, "caption": f"a blurry photo number {i} view {k}"}
                        for k in range(5)]
    (folder / f"captions_{split}.json").write_text(json.dumps({"images": images, "annotations": annotations}))


def images_per_second(dataset, workers: int, batch_size: int = 64, epochs: int = 3) -> float:
    """One caption per image (random mode), so images/s counts decoded images; the best epoch.

    Workers persist across epochs, so their start-up is left out (the caption draw then stays at epoch 0,
    which does not matter for speed).
    """
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate_captions,
                        persistent_workers=workers > 0)
    best = 0.0
    for _ in range(epochs):
        start = time.perf_counter()
        count = sum(len(batch["caption"]) for batch in loader)
        best = max(best, count / (time.perf_counter() - start))
    return round(best, 1)


def stream_samples_per_second(folder: Path, tokenizer, size: int, max_len: int, workers: int, tmp: Path) -> float:
    """Samples/s of a shard stream (one epoch after a warm one), as a joint run reads it."""
    from configs.loading import load_config
    from data.shards import build_stream, stream_loader

    cfg = load_config(None, {"data.dataset": str(folder), "data.root": str(tmp), "model.image_size": size,
                             "model.max_caption_len": max_len, "train.num_workers": workers,
                             "train.batch_size": 32})
    stream, _, _ = build_stream(cfg, tokenizer)
    best = 0.0
    for epoch in range(2):
        stream.set_epoch(epoch)
        start = time.perf_counter()
        count = sum(len(batch["caption"]) for batch in stream_loader(stream))
        best = max(best, count / (time.perf_counter() - start))
    return round(best, 1)


def consumption() -> dict:
    """Samples/s the joint step takes in, from the GPU check and its CPU reference (the diffusion phase reads
    cached features, not the loader)."""
    docs, out = Path(__file__).resolve().parents[1] / "docs", {}
    for name, file in (("cpu", "gpu_check_cpu.json"), ("gpu", "gpu_check.json")):
        if (docs / file).is_file():
            report = json.loads((docs / file).read_text())
            joint = (report.get("embedded") or {}).get("joint") or {}
            if joint.get("samples_per_s"):
                out[f"{name}_embedded_64px_joint"] = joint["samples_per_s"]
            pace = (report.get("coco256") or {}).get("pace") or {}
            if pace.get("samples_per_s"):
                out[f"{name}_coco_256px_joint"] = pace["samples_per_s"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--max-caption-len", type=int, default=24)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--embedded", default="", help="a generated embedded folder whose train cache to time")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)  # workers always use 1; this sets the main process (workers0 rows)
    tokenizer = AutoTokenizer.from_pretrained(resolve_text_encoder(PACKAGED_TEXT_ENCODER))
    size, max_len = args.image_size, args.max_caption_len
    result = {"torch_version": torch.__version__, "torch_threads": torch.get_num_threads(),
              "cpu_count": os.cpu_count(), "python": platform.python_version(),
              "load_average_before": [round(v, 2) for v in os.getloadavg()],
              "images": args.images, "jpeg_size": "320-400 x 240-300", "image_size": size}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        write_jpegs(folder, args.images)
        ann_file, image_dir = resolve_split_files(folder, "train")
        jpeg = CocoCaptions(ann_file, image_dir, tokenizer, size, max_len, caption_mode="random")
        start = time.perf_counter()
        cached = load_cached_captions(ann_file, image_dir, Path(tmp) / "cache", "photos", "train", tokenizer, size,
                                      max_len, caption_mode="random", processes=2)
        result["jpeg_cache_build_s"] = round(time.perf_counter() - start, 2)
        for workers in (0, 2):
            result[f"jpeg_images_per_s_workers{workers}"] = images_per_second(jpeg, workers)
            result[f"cached_images_per_s_workers{workers}"] = images_per_second(cached, workers)
        from data import convert

        shards = Path(tmp) / "shards"
        write_jpegs(folder, 4, seed=1, split="val")   # the converter writes both splits
        assert convert.main([str(folder), str(shards), "--shard-size", "25"]) == 0
        for workers in (1, 2):
            result[f"stream_samples_per_s_workers{workers}"] = stream_samples_per_second(
                shards, tokenizer, size, max_len, workers, Path(tmp))
        result["consumed_samples_per_s"] = consumption()
        fastest = max(result["stream_samples_per_s_workers1"], result["stream_samples_per_s_workers2"])
        result["stream_over_consumption"] = {k: round(fastest / v, 2) for k, v in result["consumed_samples_per_s"].items()}
        if args.embedded:
            ann_file, image_dir = resolve_split_files(args.embedded, "train")
            start = time.perf_counter()
            out = build_cache(ann_file, image_dir, Path(tmp) / "cache" / "embedded", tokenizer, size, max_len,
                              processes=2)
            result["embedded_cache_build_s"] = round(time.perf_counter() - start, 2)
            manifest = json.loads((out / "manifest.json").read_text())
            result["embedded_cache_images"] = manifest["num_images"]
            result["embedded_cache_captions"] = manifest["num_captions"]
    result["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
