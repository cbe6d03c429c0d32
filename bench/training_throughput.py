"""Training throughput at a preset (default: embedded, batch 64): samples/s of the loop's step (forward, backward,
clip, AdamW, UNet EMA), each component's forward+backward timed alone, their sum against the full step, and the
cached data loader's images/s against what training consumes. Prints one JSON object; asserts nothing.

    python bench/training_throughput.py                   # torch's default threads (2 here)
    python bench/training_throughput.py --threads 1 --repeats 10 --no-loader
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="embedded")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (the median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs first")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--no-loader", action="store_true", help="skip the data-loader comparison")
    p.add_argument("--loader-images", type=int, default=2000, help="images of the cached train split to time")
    return p.parse_args(argv)


def timed(fn, repeats: int, warmup: int) -> float:
    """Median seconds of fn() over `repeats` runs after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build_model(cfg):
    """The model as training.loop builds it: packaged BERT, output vocabulary = the captions' token ids."""
    from data.embedded import world_prompts
    from models.duet import DuetModel
    from models.text_encoder import load_text_backbone

    bert, tokenizer = load_text_backbone(cfg.model.text_encoder)
    prompts = [text for text, _ in world_prompts(256)]
    ids = tokenizer(prompts)["input_ids"]
    specials = {tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id}
    vocabulary = sorted({i for row in ids for i in row} | specials)
    cfg.model.caption_vocab_size = len(vocabulary)
    model = DuetModel(cfg, bert, tokenizer)
    model.caption_decoder.set_vocabulary(vocabulary)
    return model.train(), prompts


def make_batch(model, prompts: list[str], batch_size: int) -> dict:
    """Random images (compute does not depend on content) and real world captions, padded as the loader pads."""
    side = model.config.model.image_size
    generator = torch.Generator().manual_seed(0)
    texts = [prompts[i % len(prompts)] for i in range(batch_size)]
    return {"images": torch.rand(batch_size, 3, side, side, generator=generator) * 2 - 1, **model.tokenize(texts)}


def component_steps(model, batch: dict) -> dict:
    """Closures running one component's forward+backward alone, fed what it gets inside the full step
    (inputs that receive gradient there are leaves with requires_grad here)."""
    images, input_ids, attention_mask = batch["images"], batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        encoded = model.image_encoder(images)
        text_states = model.text_states(input_ids, attention_mask)
    latents = encoded["latents"].detach().requires_grad_()
    tokens = encoded["tokens"].detach().requires_grad_()
    states = text_states.detach().requires_grad_()

    def run(loss_fn):
        def step():
            model.zero_grad(set_to_none=True)
            loss_fn().backward()
        return step

    def image_encoder_loss():
        out = model.image_encoder(images)
        return out["latents"].mean() + out["tokens"].mean() + out["embeds"].mean()

    def text_encoder_loss():
        embeds, token_states = model.text_encoder(input_ids, attention_mask)
        return embeds.mean() + token_states.mean()

    return {
        "image_encoder": run(image_encoder_loss),
        "text_encoder": run(text_encoder_loss),
        "caption_decoder": run(lambda: model.caption_decoder.loss(input_ids, attention_mask, tokens)),
        # The full step feeds detached latents to diffusion (no gradient into the autoencoder) and live states.
        "diffusion": run(lambda: model.diffusion.training_loss(latents.detach() * model.latent_scale, states,
                                                               attention_mask)),
        "image_decoder": run(lambda: F.mse_loss(model.image_decoder(latents), images)),
    }


def loader_throughput(cfg, tokenizer, count: int) -> dict:
    """Images/s of the cached train split (bench/data_loader.py's measure) with 0 and 2 workers."""
    from torch.utils.data import Subset

    from data.datasets import build_split, dataset_folder, resolve_dataset_name
    from data_loader import images_per_second

    name = resolve_dataset_name(cfg)
    folder = dataset_folder(cfg, name, create=False)
    if name != "embedded" or not (folder / "manifest.json").is_file():
        return {"loader": f"skipped: no generated {name} dataset under {cfg.data.root}/ (train once first)"}
    train = build_split(cfg, name, folder, cfg.data.train_split, tokenizer, 0, "random")
    subset = Subset(train, range(min(count, len(train))))
    return {f"loader_images_per_s_workers{w}": images_per_second(subset, w, cfg.train.batch_size) for w in (0, 2)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusers import UNet2DConditionModel
    from diffusers.training_utils import EMAModel

    from configs.loading import load_config
    from training.optim import build_optimizer

    cfg = load_config(args.preset, {"train.batch_size": args.batch_size})
    result = {"torch_version": torch.__version__, "torch_threads": torch.get_num_threads(),
              "cpu_count": os.cpu_count(), "python": platform.python_version(),
              "load_average_before": [round(v, 2) for v in os.getloadavg()],
              "preset": args.preset, "batch_size": args.batch_size, "image_size": cfg.model.image_size,
              "repeats": args.repeats}
    torch.manual_seed(0)
    model, prompts = build_model(cfg)
    result["caption_vocab_size"] = cfg.model.caption_vocab_size
    result["parameters_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    batch = make_batch(model, prompts, args.batch_size)
    optimizer = build_optimizer(model, cfg.train.learning_rate, cfg.train.weight_decay)
    unet = model.diffusion.unet
    ema = EMAModel(unet.parameters(), decay=cfg.train.ema_decay, use_ema_warmup=True,
                   model_cls=UNet2DConditionModel, model_config=unet.config)

    def forward_backward():
        model.zero_grad(set_to_none=True)
        model(batch)["loss"].backward()

    def full_step():  # training.loop.Trainer._train_step on CPU in fp32, without the logging
        forward_backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(unet.parameters())

    step_s = timed(full_step, args.repeats, args.warmup)
    result["full_step_s"] = round(step_s, 4)
    result["samples_per_s"] = round(args.batch_size / step_s, 1)
    result["forward_backward_s"] = round(timed(forward_backward, args.repeats, 1), 4)
    forward_backward()
    result["optimizer_step_s"] = round(timed(optimizer.step, args.repeats, 1), 4)
    result["ema_step_s"] = round(timed(lambda: ema.step(unet.parameters()), args.repeats, 1), 4)
    components = {name: timed(fn, args.repeats, 1) for name, fn in component_steps(model, batch).items()}
    result["component_fwd_bwd_s"] = {name: round(s, 4) for name, s in components.items()}
    total = sum(components.values())
    result["components_sum_s"] = round(total, 4)
    result["ratio_full_step_to_components"] = round(step_s / total, 3)            # goal <= 1.10
    result["ratio_forward_backward_to_components"] = round(result["forward_backward_s"] / total, 3)
    if not args.no_loader:
        loader = loader_throughput(cfg, model.tokenizer, args.loader_images)
        result.update(loader)
        if "loader_images_per_s_workers2" in loader:
            result["loader_to_training_ratio_workers2"] = round(loader["loader_images_per_s_workers2"]
                                                                / result["samples_per_s"], 1)
    result["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
