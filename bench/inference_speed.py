"""Inference speed at the embedded preset's size (random weights): text->image through ImageTextGenerator vs a
plain diffusers loop over the same UNet and scheduler, and caption decoding with vs without the KV cache.
Prints one JSON object.

    python bench/inference_speed.py                       # CPU, one torch thread
    python bench/inference_speed.py --threads 0 --device cuda
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

PROMPTS = ["a red circle on the left", "a large blue square in the center", "a small yellow triangle at the top",
           "a green diamond to the left of a white cross", "a purple circle at the bottom", "an orange cross",
           "a cyan square above a red triangle", "a white diamond on the right"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="embedded")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--tokens", type=int, default=32, help="caption length timed, [CLS] and [SEP] included")
    p.add_argument("--caption-vocab-sizes", default="0,45",
                   help="decoder output sizes to time (0: the whole tokenizer; training on the embedded world sets 45)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (0: torch's default; 1 is steadier on a shared 2-core box)")
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call. On a shared CPU box the CPU time is the steadier figure:
    it leaves out the time other processes hold the cores."""
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def summary(name: str, runs: list[tuple[float, float]]) -> dict:
    """Median wall and CPU seconds over repeats."""
    return {f"{name}_s": round(statistics.median(w for w, _ in runs), 5),
            f"{name}_cpu_s": round(statistics.median(c for _, c in runs), 5)}


@torch.no_grad()
def plain_diffusers_loop(model, texts: list[str], seeds: list[int], steps: int, guidance_scale: float):
    """The reference: DDIM from the training schedule, CFG with zero states as the null condition, then the
    same latent decoder and uint8 conversion; what a hand-written diffusers loop does."""
    from diffusers import DDIMScheduler

    from common.images import to_uint8

    device = model.logit_scale.device
    tokens = model.tokenize(texts)
    states = model.text_states(tokens["input_ids"], tokens["attention_mask"])
    scheduler = DDIMScheduler.from_config(model.diffusion.noise_scheduler.config)
    scheduler.set_timesteps(steps, device=device)
    latents = torch.cat([torch.randn((1, *model.latent_shape), generator=torch.Generator().manual_seed(s))
                         for s in seeds]).to(device)
    latents = latents * scheduler.init_noise_sigma
    cond = torch.cat([torch.zeros_like(states), states])
    mask = torch.cat([tokens["attention_mask"]] * 2)
    unet = model.diffusion.unet
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        uncond, text = unet(model_in, t, encoder_hidden_states=cond, encoder_attention_mask=mask).sample.chunk(2)
        latents = scheduler.step(uncond + guidance_scale * (text - uncond), t, latents).prev_sample
    images = model.decode_latents(latents).clamp(-1, 1)
    return to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()


def bench_text_to_image(generator, args, device) -> dict:
    import numpy as np

    results = {}
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        texts, seeds = PROMPTS[:batch] if batch <= len(PROMPTS) else (PROMPTS * batch)[:batch], list(range(batch))

        def ours():
            return generator.batch_text_to_image(texts, None, batch_size=batch, num_inference_steps=args.steps, seed=0)

        def plain():
            return plain_diffusers_loop(generator.model, texts, seeds, args.steps, generator.config.sample.guidance_scale)

        same = all(np.array_equal(np.asarray(a), b) for a, b in zip(ours(), plain()))  # also the warm-up
        ours_runs, plain_runs = [], []
        for _ in range(args.repeats):  # interleaved, so drifting machine load hits both alike
            ours_runs.append(timed(ours, device))
            plain_runs.append(timed(plain, device))
        row = {**summary("ours", ours_runs), **summary("plain", plain_runs)}
        row["ratio_wall"] = round(row["ours_s"] / row["plain_s"], 3)
        row["ratio_cpu"] = round(row["ours_cpu_s"] / max(row["plain_cpu_s"], 1e-9), 3)
        row["identical_images"] = same
        results[f"batch_{batch}"] = row
    return results


def bench_captions(model, args, device) -> dict:
    """Greedy decoding of exactly args.tokens tokens (min_length forces it) with and without the KV cache."""
    from dataclasses import replace

    from models.caption_decoder import CaptionDecoder
    from models.caption_search import CaptionOptions, decode_captions

    tokenizer, token_dim = model.tokenizer, model.image_encoder.token_dim
    specials = [tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id]
    results = {}
    for vocab_size in [int(v) for v in args.caption_vocab_sizes.split(",")]:
        torch.manual_seed(0)
        decoder = CaptionDecoder(replace(model.config.model, caption_vocab_size=vocab_size), token_dim,
                                 len(tokenizer), *specials)
        if vocab_size:  # the specials plus ordinary word ids, as training's set_vocabulary would pick
            words = [i for i in range(1000, len(tokenizer)) if i not in specials][:vocab_size - len(set(specials))]
            decoder.set_vocabulary(specials + words)
        decoder = decoder.to(device).eval()
        for batch in [int(b) for b in args.batch_sizes.split(",")]:
            image_tokens = torch.randn(batch, 16, token_dim, device=device)
            options = {c: CaptionOptions(max_length=args.tokens, min_length=args.tokens, use_cache=c)
                       for c in (True, False)}
            with torch.inference_mode():
                outputs = {c: decode_captions(decoder, image_tokens, o)[0] for c, o in options.items()}  # warm-up
                assert outputs[True].shape[1] == args.tokens
                times = {True: [], False: []}
                for _ in range(args.repeats):
                    for c, o in options.items():
                        times[c].append(timed(lambda: decode_captions(decoder, image_tokens, o), device))
            row = {**summary("kv_cache", times[True]), **summary("no_cache", times[False])}
            row["speedup_wall"] = round(row["no_cache_s"] / row["kv_cache_s"], 2)
            row["speedup_cpu"] = round(row["no_cache_cpu_s"] / max(row["kv_cache_cpu_s"], 1e-9), 2)
            row["same_tokens"] = bool(torch.equal(outputs[True], outputs[False]))
            results[f"vocab_{vocab_size or 'full'}_batch_{batch}"] = row
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    from configs.loading import load_config
    from models.checkpoint import quiet_library_progress
    from models.device import resolve_device
    from models.duet import DuetModel
    from pipelines.generator import ImageTextGenerator

    quiet_library_progress()
    device = resolve_device(args.device)
    overrides = {"model.max_caption_len": max(args.tokens, load_config(args.preset).model.max_caption_len)}
    cfg = load_config(args.preset, overrides)
    torch.manual_seed(0)
    generator = ImageTextGenerator.from_model(DuetModel.build(cfg), device=device)
    report = {
        "preset": args.preset, "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version(),
        "text_encoder": cfg.model.text_encoder, "image_size": cfg.model.image_size, "steps": args.steps,
        "repeats": args.repeats,
        "text_to_image": bench_text_to_image(generator, args, device),
        "caption_tokens": args.tokens,
        "captions": bench_captions(generator.model, args, device),
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
