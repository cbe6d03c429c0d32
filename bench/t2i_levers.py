"""One text-to-image lever at a time: a fresh UNet (and text-state projection) trained for a wall-clock budget on the
frozen features of a joint-phase checkpoint by the trainer's diffusion phase (the UNet alone; the features come from
the disk store, computed once per checkpoint), then read by the embedded world's oracle. Same features, prompts and
seeds for every row, so rows differ by the lever only. Prints one JSON object per run; asserts nothing.

    python bench/t2i_levers.py --checkpoint outputs/embedded/checkpoint-000200 --minutes 4
    python bench/t2i_levers.py --checkpoint ... --minutes 4 --set model.diffusion_objective=epsilon sample.scheduler=euler
"""
from __future__ import annotations

import argparse
import copy
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
    p.add_argument("--out", default="outputs/levers", help="where the lever runs go (their features: the disk store)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from configs.errors import UserError
    from configs.loading import apply, parse_overrides, validate
    from evaluation.generation import oracle_generation_accuracy
    from models.checkpoint import load_checkpoint
    from models.diffusion import LatentDiffusion
    from models.text_encoder import TextEncoder
    from training.distributed import init_distributed
    from training.loop import Trainer

    result = {"load_average_before": [round(v, 2) for v in os.getloadavg()], "torch_threads": torch.get_num_threads(),
              "set": args.set, "minutes": args.minutes}
    try:
        checkpoint = Path(args.checkpoint)
        model = load_checkpoint(checkpoint, use_ema=False)
        lever = [f"train.max_minutes={args.minutes}", f"train.out_dir={args.out}", f"train.seed={args.seed}",
                 f"train.run_name=lever-{int(time.time())}", "train.phases=[diffusion]", "train.diffusion_trains=[unet]",
                 "train.feature_store=disk", "train.val_every_steps=0", "train.save_every_steps=100000"]
        cfg = validate(apply(copy.deepcopy(model.config), parse_overrides([*args.set, *lever])))
        torch.manual_seed(args.seed)
        model.diffusion = LatentDiffusion(cfg.model, cfg.train.diffusion_timesteps)
        # fresh text-state modules as the config describes them; the aligned embedding stays the checkpoint's
        text_encoder = TextEncoder(cfg.model, model.text_encoder.bert)
        text_encoder.embed.load_state_dict(model.text_encoder.embed.state_dict())
        model.text_encoder = text_encoder
        trainer = Trainer(cfg, None, init_distributed(), model=model)
        summary = trainer.fit()
        rows = [json.loads(line) for line in trainer.metrics_path.read_text().splitlines()]
        losses = [r["diff"] for r in rows if "diff" in r and "val_loss" not in r]
        result.update(steps=summary["step"], samples=summary["step"] * cfg.train.diffusion_batch_size,
                      train_minutes=summary["minutes"], final_loss=round(sum(losses[-5:]) / max(1, len(losses[-5:])), 4),
                      unet_params_m=round(sum(p.numel() for p in model.diffusion.unet.parameters()) / 1e6, 2))
        if trainer.ema is not None:
            trainer.ema.copy_to(model.diffusion.unet.parameters())
        val_set = trainer.val_set
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
