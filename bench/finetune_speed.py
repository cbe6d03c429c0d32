"""Seconds per fine-tuning step, LoRA vs full, on a model of a preset's size with random data; prints one JSON line.

`python bench/finetune_speed.py [--config embedded] [--set model.image_size=32] [--batch-size 32] [--steps 5]`
The first step is a warm-up and not counted. Reports the load average, since the machine may be shared.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def step_seconds(model, method: str, batch_size: int, steps: int, rank: int) -> dict:
    from models.lora import UNET_TARGET_MODULES, add_lora

    unet = model.diffusion.unet
    model.requires_grad_(False)
    if method == "lora":
        add_lora(unet, rank, rank, UNET_TARGET_MODULES)
    else:
        unet.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    size = model.config.model.image_size
    images = torch.rand(batch_size, 3, size, size) * 2 - 1
    tokens = model.tokenize(["a photo of a red dress"] * batch_size)
    with torch.no_grad():  # what specialize/tunable.py memoises after the first epoch
        latents = model.encode_latents(images)
        states = model.text_states(tokens["input_ids"], tokens["attention_mask"])
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        model.diffusion.training_loss(latents, states, tokens["attention_mask"]).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return {"trainable_params": sum(p.numel() for p in params), "seconds_per_step": round(sum(times[1:]) / steps, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="embedded")
    parser.add_argument("--set", nargs="*", default=["model.image_size=32"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    from configs.loading import load_config
    from models.duet import DuetModel

    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.set)
    result = {"config": args.config, "overrides": args.set, "batch_size": args.batch_size, "threads": args.threads,
              "load_average_before": [round(x, 2) for x in os.getloadavg()]}
    for method in ("lora", "full"):
        torch.manual_seed(0)
        model = DuetModel.build(cfg).eval()
        result["unet_params"] = sum(p.numel() for p in model.diffusion.unet.parameters())
        result[method] = step_seconds(model, method, args.batch_size, args.steps, args.rank)
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
