"""Stable Diffusion LoRA fine-tuning, the recipe of diffusers' train_text_to_image_lora.py: VAE latents times
scaling_factor, CLIP text states, the noise (or velocity) MSE at random timesteps; on the machinery every loop here
shares (training/optim.py, precision.py, guard.py, state.py), reading the fine-tuning config's train and data sections.

<train.out_dir>/<train.run_name>/checkpoint-N/ holds pytorch_lora_weights.safetensors (diffusers' layout: what
`pipe.load_lora_weights` reads), trainer_state.pt and config.json; `latest` names the newest, and resume continues it.
"""
from __future__ import annotations

import copy
import json
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from common.files import write_folder
from configs.errors import UserError
from configs.loading import config_to_dict, config_to_json
from data.collate import to_device
from models.checkpoint import (CONFIG_FILE, FORMAT_VERSION, TRAINER_STATE_FILE, checkpoint_name, load_trainer_state,
                               read_config)
from models.lora import add_lora, has_lora, load_lora, save_lora, text_target_modules
from training.guard import NonFiniteGuard
from training.optim import (backward, build_optimizer, mean_step_seconds, optimizer_step, plan_due,
                            warmup_cosine)
from training.precision import autocast_and_scaler
from training.state import (EpochSampler, check_resume_config, commit_checkpoint, epoch_loader, loop_state,
                            resolve_resume, restore_loop_state)


def denoising_loss(pipe, noise_scheduler, batch: dict, train_text: bool) -> torch.Tensor:
    """The MSE of the UNet's prediction on one caption batch; gradients reach the text encoder only when train_text."""
    with torch.no_grad():
        latents = pipe.vae.encode(batch["images"]).latent_dist.sample() * pipe.vae.config.scaling_factor
    with torch.set_grad_enabled(train_text):
        states = pipe.text_encoder(batch["input_ids"], return_dict=False)[0]               # (B, T, D)
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(latents),), device=latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    pred = pipe.unet(noisy, timesteps, encoder_hidden_states=states, return_dict=False)[0]
    return F.mse_loss(pred.float(), target.float())


def train_split(cfg, pipe):
    """The domain's training split at the pipeline's resolution, tokenised for its CLIP text model."""
    from data.datasets import build_split, dataset_folder, resolve_dataset_name

    cfg = copy.deepcopy(cfg)
    cfg.model.image_size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    cfg.model.max_caption_len = pipe.tokenizer.model_max_length
    name = resolve_dataset_name(cfg)
    split = build_split(cfg, name, dataset_folder(cfg, name), cfg.data.train_split, pipe.tokenizer,
                        cfg.data.limit_train, "random")   # one caption per image per epoch
    if len(split) < cfg.train.batch_size:
        raise UserError(f"the training split of {name} holds {len(split)} readable captioned images, fewer than "
                        f"the batch of {cfg.train.batch_size}; lower --batch-size")
    return split


def adapt(pipe, cfg, resume_dir: Path | None, train_text: bool) -> nn.ModuleDict:
    """Freezes the pipeline and puts LoRA on its UNet (and text encoder): a fresh adapter, or the checkpoint's."""
    t = cfg.train
    for module in (pipe.unet, pipe.text_encoder, pipe.vae):
        module.requires_grad_(False)
    trained = nn.ModuleDict({"unet": pipe.unet, **({"text_encoder": pipe.text_encoder} if train_text else {})})
    if resume_dir is None:
        alpha = t.lora_alpha or t.lora_rank
        add_lora(pipe.unet, t.lora_rank, alpha, t.lora_targets)
        if train_text:
            add_lora(pipe.text_encoder, t.lora_rank, alpha, text_target_modules(pipe.text_encoder))
        return trained
    load_lora(resume_dir, pipe.unet, pipe.text_encoder if train_text else None, fuse=False)
    if train_text and not has_lora(pipe.text_encoder):
        raise UserError(f"--resume: {resume_dir} was trained without --train-text-encoder; use the same settings")
    for name, param in trained.named_parameters():
        param.requires_grad_(".lora_" in name)
    return trained


def train(pipe, cfg, resume: str | None = None, train_text_encoder: bool = False) -> dict:
    """Trains a LoRA adapter on pipe (in place) as cfg says; returns {"run_dir", "step", "minutes", "loss"}."""
    from diffusers import DDPMScheduler

    t, started = cfg.train, time.time()
    run_dir = Path(t.out_dir) / t.run_name
    resume_dir = resolve_resume(resume, run_dir) if resume else None
    if resume_dir is not None:
        check_resume_config(read_config(resume_dir), cfg)
    device = pipe.unet.device
    train_set = train_split(cfg, pipe)
    torch.manual_seed(t.seed)
    trained = adapt(pipe, cfg, resume_dir, train_text_encoder)
    params = [p for p in trained.parameters() if p.requires_grad]
    sampler = EpochSampler(len(train_set), t.batch_size, t.seed)
    loop = SimpleNamespace(step=0, epoch=0, batch_in_epoch=0, end=t.max_steps or t.epochs * sampler.batches_per_epoch)
    loop.optimizer = build_optimizer(trained, t.diffusion_learning_rate or t.learning_rate, t.weight_decay)
    warmup = min(t.diffusion_warmup_steps, max(1, loop.end // 10))
    loop.lr_schedule = torch.optim.lr_scheduler.LambdaLR(loop.optimizer, lambda i: warmup_cosine(warmup, loop.end)(i))
    if resume_dir is not None:
        state = load_trainer_state(resume_dir)
        loop.end = state["end"]            # the length its first process planned
        restore_loop_state(loop, state)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    autocast, scaler = autocast_and_scaler(t.mixed_precision, device)
    guard = NonFiniteGuard(t.max_bad_steps, lambda line: tqdm.write(line, file=sys.stderr), run_dir,
                           "lower --lr and resume with --resume latest")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CONFIG_FILE).write_text(config_to_json(cfg))
    metrics = run_dir / "metrics.jsonl"
    rows = [line for line in metrics.read_text().splitlines() if json.loads(line)["step"] <= loop.step
            ] if metrics.is_file() else []   # a resumed curve continues without a fork
    metrics.write_text("".join(row + "\n" for row in rows))

    def save() -> None:
        def write(tmp: Path) -> None:
            save_lora(tmp, pipe.unet, trained["text_encoder"] if train_text_encoder else None)
            torch.save({**loop_state(loop), "end": loop.end}, tmp / TRAINER_STATE_FILE)
            (tmp / CONFIG_FILE).write_text(json.dumps({"format_version": FORMAT_VERSION, **config_to_dict(cfg)}))

        commit_checkpoint(run_dir, write_folder(run_dir / checkpoint_name(loop.step), write), t.keep_checkpoints)

    deadline = started + t.max_minutes * 60 if t.max_minutes else math.inf
    bar = tqdm(total=loop.end, initial=loop.step, desc="sd lora", dynamic_ncols=True, file=sys.stderr)
    first, seconds, losses, saved = loop.step, [], [], loop.step
    trained.train()
    while loop.step < loop.end and time.time() < deadline:
        sampler.set_epoch(loop.epoch, loop.batch_in_epoch)
        train_set.set_epoch(loop.epoch)
        for batch in epoch_loader(train_set, t.batch_size, sampler, t.seed, t.num_workers):
            loop.batch_in_epoch += 1
            if len(batch["images"]) == 0:
                continue   # every image of the batch was unreadable
            tick = time.time()
            with autocast():
                loss = denoising_loss(pipe, noise_scheduler, to_device(batch, device), train_text_encoder)
            stepped = backward(loss, loop.optimizer, scaler) and optimizer_step(
                loop.optimizer, loop.lr_schedule, params, t.grad_clip, scaler)
            if not guard.check(stepped, loop.step):
                continue
            loop.step += 1
            seconds.append(time.time() - tick)
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if loop.step % t.log_every_steps == 0:
                with metrics.open("a") as f:
                    f.write(json.dumps({"step": loop.step, "loss": losses[-1], "step_seconds": seconds[-1],
                                        "lr": loop.lr_schedule.get_last_lr()[0]}) + "\n")
            if plan_due(loop.step - first) and t.max_minutes and not t.max_steps and resume_dir is None:
                # under a time budget the cosine's length follows the measured speed
                left = deadline - time.time()
                loop.end = min(loop.end, loop.step + max(1, int(left / mean_step_seconds(seconds))))
                bar.total = loop.end
            if loop.step % t.save_every_steps == 0:
                save()
                saved = loop.step
            if loop.step >= loop.end or time.time() >= deadline:
                break
        else:
            loop.epoch, loop.batch_in_epoch = loop.epoch + 1, 0
    bar.close()
    trained.eval()
    if saved != loop.step or not (run_dir / checkpoint_name(loop.step)).is_dir():
        save()   # the end is always a checkpoint, even of a run cut off before its first step
    return {"run_dir": str(run_dir), "step": loop.step, "minutes": round((time.time() - started) / 60, 2),
            "loss": round(sum(losses[-50:]) / len(losses[-50:]), 5) if losses else None}
