"""One text-to-image lever at a time: a fresh UNet (and text-state projection) trained for a wall-clock budget on the
frozen features of a joint-phase checkpoint, as the diffusion phase does but with the UNet alone, then read by the
embedded world's oracle. Same features, prompts and seeds for every row, so rows differ by the lever only. Prints one
JSON object per run; asserts nothing.

    python bench/t2i_levers.py --checkpoint outputs/embedded/checkpoint-000200 --minutes 4
    python bench/t2i_levers.py --checkpoint ... --minutes 4 --set model.diffusion_objective=epsilon sample.scheduler=euler
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from t2i_quality import flat  # noqa: E402

FEATURE_FIELDS = ("latents", "tokens", "readable", "hidden", "mask", "image")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a checkpoint whose encoders are frozen from here on")
    p.add_argument("--minutes", type=float, default=4.0, help="training budget of the UNet")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="model.* (the UNet), train.* (diffusion_batch_size, diffusion_learning_rate, "
                        "ema_decay, diffusion_captions_per_image) and sample.* overrides")
    p.add_argument("--num-prompts", type=int, default=240, help="val images whose first caption is a prompt")
    p.add_argument("--guidance-scale", default="", help="extra guidance scales to read besides sample.guidance_scale")
    p.add_argument("--guidance", dest="guidance_scale", help=argparse.SUPPRESS)  # the spelling before
    p.add_argument("--cache-dir", default="outputs/lever_features", help="frozen features, kept between runs")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def frozen_features(model, train_set, per_image: int, cache_dir: Path, checkpoint: Path):
    """build_frozen_features, kept in a safetensors file named by the checkpoint and caption count."""
    from safetensors.torch import load_file, save_file

    from common.files import atomic_write
    from training.features import FrozenFeatures, build_frozen_features

    key = hashlib.sha1(f"{checkpoint.resolve()}:{per_image}".encode()).hexdigest()[:12]
    path = cache_dir / f"features-{key}.safetensors"
    if path.exists():
        return FrozenFeatures(**load_file(path)), 0.0
    started = time.time()
    features = build_frozen_features(model, train_set, per_image, torch.device("cpu"), contextlib.nullcontext)
    atomic_write(path, lambda tmp: save_file({k: getattr(features, k).contiguous() for k in FEATURE_FIELDS}, tmp))
    return features, time.time() - started


def train_unet(model, features, minutes: float, seed: int) -> dict:
    """The diffusion loss alone on cached features for `minutes`: AdamW, warmup then cosine planned from the speed of
    the first steps, EMA as the trainer keeps it. Leaves the EMA weights in model.diffusion.unet."""
    from diffusers import UNet2DConditionModel
    from diffusers.training_utils import EMAModel

    from training.optim import warmup_cosine

    t, diffusion = model.config.train, model.diffusion
    params = [*diffusion.unet.parameters(), *model.text_encoder.to_states.parameters()]
    lr = t.diffusion_learning_rate or t.learning_rate
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=t.weight_decay)
    batch = t.diffusion_batch_size or t.batch_size
    ema = EMAModel(diffusion.unet.parameters(), decay=t.ema_decay, use_ema_warmup=True,
                   model_cls=UNet2DConditionModel, model_config=diffusion.unet.config)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    started, total, step, losses = time.time(), None, 0, []
    schedule = None
    while True:
        if step == 10:   # fix the cosine's length from the speed of the first steps
            total = max(11, int(minutes * 60 / ((time.time() - started) / 10)))
            schedule = warmup_cosine(min(t.diffusion_warmup_steps, total // 10), total)
        if total is not None and step >= total:
            break
        for group in optimizer.param_groups:
            group["lr"] = lr * (schedule(step) if schedule else min(1.0, (step + 1) / t.diffusion_warmup_steps))
        rows = torch.randint(len(features), (batch,), generator=generator)
        mask = features.mask[rows]
        embeds, states = model.text_encoder.heads(features.hidden[rows].float(), mask)
        loss = diffusion.training_loss(features.latents[features.image[rows]], states, mask,
                                       model.pooled_embedding(embeds))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
        optimizer.step()
        ema.step(diffusion.unet.parameters())
        losses.append(float(loss))
        step += 1
    ema.copy_to(diffusion.unet.parameters())
    return {"steps": step, "samples": step * batch, "train_minutes": round((time.time() - started) / 60, 2),
            "final_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4),
            "unet_params_m": round(sum(p.numel() for p in diffusion.unet.parameters()) / 1e6, 2)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from configs.errors import UserError
    from configs.loading import apply, parse_overrides, validate
    from data.datasets import build_datasets
    from evaluation.generation import oracle_generation_accuracy
    from models.checkpoint import load_checkpoint
    from models.diffusion import LatentDiffusion
    from models.text_encoder import TextEncoder

    result = {"load_average_before": [round(v, 2) for v in os.getloadavg()], "torch_threads": torch.get_num_threads(),
              "set": args.set, "minutes": args.minutes}
    try:
        checkpoint = Path(args.checkpoint)
        model = load_checkpoint(checkpoint, use_ema=False)
        cfg = validate(apply(copy.deepcopy(model.config), parse_overrides(args.set)))
        train_set, val_set = build_datasets(cfg, model.tokenizer)
        features, seconds = frozen_features(model, train_set, cfg.train.diffusion_captions_per_image,
                                            Path(args.cache_dir), checkpoint)
        result["feature_seconds"] = round(seconds, 1)
        torch.manual_seed(args.seed)
        model.config = cfg
        model.diffusion = LatentDiffusion(cfg.model, cfg.train.diffusion_timesteps)
        # fresh text-state modules as the config describes them; the aligned embedding stays the checkpoint's
        text_encoder = TextEncoder(cfg.model, model.text_encoder.bert)
        text_encoder.embed.load_state_dict(model.text_encoder.embed.state_dict())
        model.text_encoder = text_encoder
        model.requires_grad_(False)
        for module in (model.diffusion, text_encoder.to_states):
            module.requires_grad_(True)
        model.train()
        result.update(train_unet(model, features, args.minutes, args.seed))
        model.eval()
        count = min(args.num_prompts, val_set.num_images)
        prompts = [val_set.image_captions(i)[0] for i in range(count)]
        result["sweep"] = []
        guidances = [cfg.sample.guidance_scale] + [float(g) for g in args.guidance_scale.split(",") if g]
        for guidance in guidances:
            generated = model.generate_images(prompts, list(range(len(prompts))), guidance_scale=guidance,
                                              batch_size=120)
            result["sweep"].append({"guidance": guidance, **flat(oracle_generation_accuracy(generated, prompts))})
        result["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
