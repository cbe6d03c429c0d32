"""The training run: data, model, AdamW with warmup+cosine, validation, sample sheets, atomic checkpoints, resume."""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.training_utils import EMAModel
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from configs.errors import UserError
from configs.loading import config_to_dict, config_to_json
from configs.schema import DuetConfig
from models.checkpoint import load_checkpoint, load_trainer_state, read_config, save_checkpoint
from models.diffusion import sampling_scheduler
from models.duet import DuetModel
from models.text_encoder import load_text_backbone
from training.distributed import DistributedContext, all_reduce_mean, init_distributed, shutdown_distributed
from training.figures import loss_curve_png, sample_sheet_png, to_pil
from training.optim import build_optimizer, warmup_cosine
from training.state import (CHECKPOINT_PREFIX, EpochSampler, resolve_resume, restore_rng_state, rng_state,
                            rotate_checkpoints, write_latest)

BAR_KEYS = ("loss", "cont", "rec", "diff", "i2t", "t2i")
LOG_KEYS = BAR_KEYS + ("img_rec", "cap")
# Train-section keys a resumed run may change; everything else must match the checkpoint's config.
RESUMABLE_CHANGES = {"epochs", "max_steps", "max_minutes", "num_workers", "log_every_steps", "val_every_steps",
                     "val_batches", "save_every_steps", "keep_checkpoints", "sample_steps", "out_dir", "run_name"}
NEAR_CHANCE_FACTOR = 3  # the guard warns while in-batch accuracy stays below this multiple of 1/B


class TrainingDiverged(UserError):
    """Too many NaN/Inf losses in a row; the last good checkpoint is left as it was."""


def _log(ctx: DistributedContext, message: str) -> None:
    if ctx.is_main:
        tqdm.write(message, file=sys.stderr)


def _check_resume_config(saved: DuetConfig, cfg: DuetConfig) -> None:
    mine, theirs = config_to_dict(cfg), config_to_dict(saved)
    for section, values in theirs.items():
        for key, value in values.items():
            if section == "train" and key in RESUMABLE_CHANGES:
                continue
            if section == "model" and key == "caption_vocab_size":
                continue  # filled in from the data at start
            if mine[section][key] != value:
                raise UserError(f"--resume: the checkpoint was trained with {section}.{key}={value!r}, "
                                f"this run asks for {mine[section][key]!r}; use the same config or start a new run")


def _make_run_dir(cfg: DuetConfig, dataset_name: str, ctx: DistributedContext) -> Path:
    run_dir = Path(cfg.train.out_dir) / (cfg.train.run_name or dataset_name)
    if ctx.is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            probe = run_dir / ".write_test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            raise UserError(f"cannot write to output folder {run_dir}: {err.strerror}; "
                            "choose another with --set train.out_dir=PATH") from None
    return run_dir


def _autocast(cfg: DuetConfig, device: torch.device):
    """bf16 (or fp16 with a scaler) on CUDA only: on these CPUs low-precision matmul is far slower than fp32."""
    mode = cfg.train.mixed_precision
    if device.type != "cuda" or mode == "no":
        return contextlib.nullcontext, None
    dtype = torch.float16 if mode == "fp16" else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return (lambda: torch.autocast("cuda", dtype=dtype)), scaler


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


class Trainer:
    """Holds everything a step needs; `run()` below is the entry point."""

    def __init__(self, cfg: DuetConfig, resume: str | None, ctx: DistributedContext):
        from data.datasets import build_datasets, caption_token_ids, resolve_dataset_name

        self.cfg, self.ctx, t = cfg, ctx, cfg.train
        self.dataset_name = resolve_dataset_name(cfg)
        _log(ctx, f"dataset: {self.dataset_name} ({cfg.data.dataset} requested)")
        self.run_dir = _make_run_dir(cfg, self.dataset_name, ctx)
        resume_dir = resolve_resume(resume, self.run_dir) if resume else None
        if resume_dir is not None:
            _check_resume_config(read_config(resume_dir), cfg)

        torch.manual_seed(t.seed)
        bert, tokenizer = load_text_backbone(cfg.model.text_encoder)
        self.train_set, self.val_set = build_datasets(cfg, tokenizer)
        global_batch = t.batch_size * ctx.world_size
        if len(self.train_set) < global_batch:
            raise UserError(f"train.batch_size={t.batch_size} (x{ctx.world_size} processes) is larger than the "
                            f"training set ({len(self.train_set)} samples); lower it with --set train.batch_size=N")
        vocabulary = caption_token_ids(self.train_set)
        cfg.model.caption_vocab_size = len(vocabulary)
        if resume_dir is not None:
            self.model = load_checkpoint(resume_dir, use_ema=False)
            self.model.config = cfg
        else:
            self.model = DuetModel(cfg, bert, tokenizer)
            self.model.caption_decoder.set_vocabulary(vocabulary)
        self.model.to(ctx.device).train()
        if t.gradient_checkpointing:
            self.model.diffusion.unet.enable_gradient_checkpointing()
            self.model.text_encoder.bert.gradient_checkpointing_enable()

        self.sampler = EpochSampler(len(self.train_set), t.batch_size, t.seed, ctx.rank, ctx.world_size)
        self.steps_per_epoch = max(1, self.sampler.batches_per_epoch // t.grad_accum_steps)
        self.total_steps = t.max_steps or t.epochs * self.steps_per_epoch
        self.warmup_steps = int(t.warmup_epochs * self.steps_per_epoch)
        self.optimizer = build_optimizer(self.model, t.learning_rate, t.weight_decay)
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(self.warmup_steps, self.total_steps))
        unet = self.model.diffusion.unet
        # EMA warmup lets the average follow the fast early changes of a short run.
        self.ema = EMAModel(unet.parameters(), decay=t.ema_decay, use_ema_warmup=True, model_cls=UNet2DConditionModel,
                            model_config=unet.config) if ctx.is_main else None
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.best_val_loss, self.bad_steps, self.skipped_images = math.inf, 0, 0
        if resume_dir is not None:
            self._restore(resume_dir)

        self.train_module = self.model
        if t.compile:
            self.train_module = torch.compile(self.train_module)
        if ctx.enabled:
            self.train_module = DistributedDataParallel(
                self.train_module, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None)
        self.autocast, self.scaler = _autocast(cfg, ctx.device)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.tensorboard = self._tensorboard()
        self.started = time.time()

    def _restore(self, folder: Path) -> None:
        state = load_trainer_state(folder)
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.best_val_loss, self.skipped_images = state["best_val_loss"], state["skipped_images"]
        if self.ema is not None and (folder / "unet_ema").is_dir():
            self.ema = EMAModel.from_pretrained(folder / "unet_ema", UNet2DConditionModel)
            self.ema.to(self.ctx.device)
        restore_rng_state(state["rng"])
        _log(self.ctx, f"resumed from {folder} at step {self.step} (epoch {self.epoch}, batch {self.batch_in_epoch})")

    def _tensorboard(self):
        if not self.ctx.is_main:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return None
        return SummaryWriter(str(self.run_dir / "tensorboard"))

    def _write_metrics(self, row: dict) -> None:
        if not self.ctx.is_main:
            return
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tensorboard is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                    self.tensorboard.add_scalar(key, value, row["step"])

    def _truncate_metrics(self) -> None:
        """On resume, drops log rows past the checkpoint so the curve continues without a fork."""
        if self.ctx.is_main and self.metrics_path.is_file():
            rows = [line for line in self.metrics_path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= self.step]
            self.metrics_path.write_text("".join(r + "\n" for r in rows))

    def _loader(self, dataset, sampler=None, shuffle=False) -> DataLoader:
        from data.collate import collate_captions

        workers = min(self.cfg.train.num_workers, os.cpu_count() or 1)
        return DataLoader(dataset, batch_size=self.cfg.train.batch_size, sampler=sampler, shuffle=shuffle,
                          num_workers=workers, collate_fn=collate_captions, drop_last=sampler is not None,
                          pin_memory=self.ctx.device.type == "cuda",
                          # its own generator: making an iterator must not consume the global RNG (resume)
                          generator=torch.Generator().manual_seed(self.cfg.train.seed))

    def _train_step(self, micro_batches: list[dict]) -> dict | None:
        """One optimizer step over grad_accum_steps micro-batches; None when the loss was not finite."""
        t, sums = self.cfg.train, {k: 0.0 for k in LOG_KEYS}
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last or not self.ctx.enabled else self.train_module.no_sync()
            with sync, self.autocast():
                out = self.train_module(_to_device(batch, self.ctx.device))
                loss = out["loss"] / len(micro_batches)
            if not torch.isfinite(loss):
                self.optimizer.zero_grad(set_to_none=True)
                return None
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            for k in LOG_KEYS:
                sums[k] += out[k].detach().item() / len(micro_batches)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        if not torch.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            return None
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_schedule.step()
        if self.ema is not None:
            self.ema.step(self.model.diffusion.unet.parameters())
        return {k: float(all_reduce_mean(torch.tensor(v), self.ctx)) for k, v in sums.items()}

    @torch.no_grad()
    def validate(self) -> dict:
        """Mean losses and in-batch accuracy over the first val_batches val batches, with fixed noise."""
        self.model.eval()
        sums, count = {k: 0.0 for k in LOG_KEYS}, 0
        with torch.random.fork_rng(devices=[]), self.autocast():
            torch.manual_seed(0)
            for i, batch in enumerate(self._loader(self.val_set)):
                if i >= self.cfg.train.val_batches:
                    break
                if len(batch["images"]) < 2:
                    continue
                out = self.model(_to_device(batch, self.ctx.device))
                for k in LOG_KEYS:
                    sums[k] += float(out[k])
                count += 1
        self.model.train()
        return {f"val_{k}": v / max(count, 1) for k, v in sums.items()}

    @torch.no_grad()
    def sample_sheet(self) -> Path:
        """Images from fixed prompts (EMA weights) and greedy captions of fixed val images."""
        t = self.cfg.train
        val = [self.val_set[i] for i in range(min(4, len(self.val_set)))]
        val = [s for s in val if s is not None]
        prompts = t.sample_prompts or [s["caption"] for s in val]
        self.model.eval()
        self.ema.store(self.model.diffusion.unet.parameters())
        self.ema.copy_to(self.model.diffusion.unet.parameters())
        try:
            scheduler = sampling_scheduler("ddim", self.model.diffusion.noise_scheduler)
            generator = torch.Generator(self.ctx.device).manual_seed(0)
            generated = self.model.generate_images(prompts, scheduler, t.sample_steps, 3.0, generator)
            images = torch.stack([s["images"] for s in val]).to(self.ctx.device)
            captions = self.model.caption(images)
        finally:
            self.ema.restore(self.model.diffusion.unet.parameters())
            self.model.train()
        return sample_sheet_png(to_pil(generated), prompts, to_pil(images), captions,
                                self.run_dir / f"samples-{self.step:06d}.png")

    def save(self, name: str, with_state: bool = True) -> Path:
        state = None
        if with_state:
            state = {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                     "optimizer": self.optimizer.state_dict(), "lr_schedule": self.lr_schedule.state_dict(),
                     "best_val_loss": self.best_val_loss, "skipped_images": self.skipped_images, "rng": rng_state()}
        folder = save_checkpoint(self.model, self.run_dir / name, ema=self.ema, trainer_state=state)
        if name.startswith(CHECKPOINT_PREFIX):
            write_latest(self.run_dir, folder)
            rotate_checkpoints(self.run_dir, self.cfg.train.keep_checkpoints)
        return folder

    def _after_validation(self, val: dict) -> None:
        _log(self.ctx, f"step {self.step}: val_loss {val['val_loss']:.4f} i2t {val['val_i2t']:.3f} "
                       f"t2i {val['val_t2i']:.3f}")
        self._write_metrics({"step": self.step, "epoch": self.epoch, **val})
        if not self.ctx.is_main:
            return
        if val["val_loss"] < self.best_val_loss:
            self.best_val_loss = val["val_loss"]
            self.save("best_model", with_state=False)
        self.sample_sheet()
        loss_curve_png(self.metrics_path, self.run_dir / "loss_curve.png")

    def _guard_chance(self, window: list[dict], warned: bool) -> bool:
        """The original recipe's classic failure: accuracy stuck at chance after warmup."""
        if warned or self.step < self.warmup_steps + 50 or len(window) < 50:
            return warned
        chance = 1.0 / self.cfg.train.batch_size
        if max(sum(r["i2t"] for r in window), sum(r["t2i"] for r in window)) / len(window) < NEAR_CHANCE_FACTOR * chance:
            _log(self.ctx, f"warning: in-batch i2t/t2i accuracy is still near chance ({chance:.3f}) after warmup: "
                           "the text encoder looks frozen or the learning rate is off (check model.freeze_bert "
                           "and train.learning_rate)")
            return True
        return warned

    def fit(self) -> dict:
        t, ctx = self.cfg.train, self.ctx
        if ctx.is_main:
            (self.run_dir / "config.json").write_text(config_to_json(self.cfg))
        self._truncate_metrics()
        deadline = self.started + t.max_minutes * 60 if t.max_minutes else math.inf
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not ctx.is_main, dynamic_ncols=True)
        window, warned, last_val_step, stop, save_after_epoch = [], False, -1, False, False
        try:
            while self.step < self.total_steps and not stop:
                self.sampler.set_epoch(self.epoch, self.batch_in_epoch)
                if hasattr(self.train_set, "set_epoch"):
                    self.train_set.set_epoch(self.epoch)
                micro = []
                for batch in self._loader(self.train_set, self.sampler):
                    self.batch_in_epoch += 1
                    self.skipped_images += batch["num_skipped"]
                    if len(batch["images"]) >= 2:
                        micro.append(batch)
                    if len(micro) < t.grad_accum_steps:
                        continue
                    metrics, micro = self._train_step(micro), []
                    if metrics is None:
                        self.bad_steps += 1
                        _log(ctx, f"warning: non-finite loss at step {self.step}; step skipped "
                                  f"({self.bad_steps}/{t.max_bad_steps} in a row)")
                        if self.bad_steps >= t.max_bad_steps:
                            raise TrainingDiverged(f"training diverged: {self.bad_steps} non-finite losses in a row at "
                                                   f"step {self.step}; the last checkpoint in {self.run_dir} is intact; "
                                                   "lower train.learning_rate and resume")
                        continue
                    self.bad_steps = 0
                    self.step += 1
                    window = (window + [metrics])[-50:]
                    warned = self._guard_chance(window, warned)
                    bar.update(1)
                    bar.set_postfix({k: f"{metrics[k]:.3f}" for k in BAR_KEYS}, refresh=False)
                    if self.step % t.log_every_steps == 0:
                        self._write_metrics({"step": self.step, "epoch": self.epoch,
                                             "lr": self.lr_schedule.get_last_lr()[0], **metrics})
                    if t.val_every_steps and self.step % t.val_every_steps == 0:
                        self._after_validation(self.validate())
                        last_val_step = self.step
                    if self.step % t.save_every_steps == 0 and ctx.is_main:
                        if self.batch_in_epoch < self.sampler.batches_per_epoch:
                            self.save(f"{CHECKPOINT_PREFIX}{self.step:06d}")
                        else:
                            save_after_epoch = True
                    if self.step >= self.total_steps or time.time() > deadline:
                        stop = True
                        break
                if not stop:
                    if self.skipped_images:
                        _log(ctx, f"epoch {self.epoch}: {self.skipped_images} unreadable images skipped so far")
                    self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                    if not t.val_every_steps:
                        self._after_validation(self.validate())
                        last_val_step = self.step
                    if save_after_epoch:
                        self.save(f"{CHECKPOINT_PREFIX}{self.step:06d}")
                        save_after_epoch = False
        finally:
            bar.close()
        if last_val_step != self.step:
            self._after_validation(self.validate())
        if ctx.is_main:
            self.save(f"{CHECKPOINT_PREFIX}{self.step:06d}")
        if self.skipped_images:
            _log(ctx, f"{self.skipped_images} unreadable images were skipped in all")
        minutes = (time.time() - self.started) / 60
        return {"run_dir": str(self.run_dir), "step": self.step, "best_val_loss": self.best_val_loss,
                "minutes": round(minutes, 2), "skipped_images": self.skipped_images}


def run(cfg: DuetConfig, resume: str | None = None) -> dict:
    """Trains as cfg says (under torchrun: one process per device) and returns a summary."""
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    ctx = init_distributed()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*FutureWarning.*")
            trainer = Trainer(cfg, resume, ctx)
            if ctx.is_main:
                print(config_to_json(cfg), file=sys.stderr)
            return trainer.fit()
    finally:
        shutdown_distributed()
