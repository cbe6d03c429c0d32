"""The training run: data, model, its phases (training/phases.py), validation, sample sheets, metrics, atomic
checkpoints, resume."""
from __future__ import annotations

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

from common.figures import loss_curve_png, sample_sheet_png
from common.images import to_pil
from configs.errors import UserError
from configs.loading import config_to_dict, config_to_json
from configs.schema import DuetConfig
from data.collate import to_device
from data.shards import build_stream, stream_loader
from models.checkpoint import (BEST_CHECKPOINT, CHECKPOINT_PREFIX, CONFIG_FILE, EMA_UNET_DIR, checkpoint_name,
                               load_checkpoint, load_trainer_state, read_config, resolve_checkpoint, save_checkpoint)
from models.duet import DuetModel
from models.text_encoder import load_text_backbone
from training.distributed import DistributedContext, init_distributed, shutdown_distributed
from training.guard import NonFiniteGuard
from training.pace import StepClock, first_step_note, gpu_sized_on_cpu, peak_memory_gib
from training.phases import LOG_KEYS, build_phases
from training.precision import autocast_and_scaler
from training.state import (EpochSampler, check_resume_config, commit_checkpoint, epoch_loader, make_run_dir,
                            resolve_resume, restore_rng_state, rng_state)
from training.trackers import Tracker, build_tracker, numbers

NEAR_CHANCE_FACTOR = 3  # the guard warns while in-batch accuracy stays below this multiple of 1/B


def _log(ctx: DistributedContext, message: str) -> None:
    if ctx.is_main:
        tqdm.write(message, file=sys.stderr)


class Trainer:
    """Holds everything a step needs and runs the phases (training/phases.py); `run()` below is the entry point."""

    def __init__(self, cfg: DuetConfig, resume: str | None, ctx: DistributedContext, model: DuetModel | None = None):
        """model: start from this model in memory (a benchmark's variant of a checkpoint) instead of building or
        loading one."""
        from data.datasets import (build_datasets, caption_token_ids, resolve_dataset_name, skipped_at_build,
                                   uses_stream)

        self.cfg, self.ctx, t = cfg, ctx, cfg.train
        self.started = time.time()  # train.max_minutes counts data preparation too
        self.dataset_name = resolve_dataset_name(cfg)
        _log(ctx, f"dataset: {self.dataset_name} ({cfg.data.dataset} requested)")
        self.run_dir = make_run_dir(cfg, self.dataset_name, ctx.is_main, resume)
        self.resume_dir = resolve_resume(resume, self.run_dir) if resume else None
        base = resolve_checkpoint(t.init_from) if t.init_from else None
        if base is not None:
            # the weights decide the model section; the caption vocabulary stays the base's
            cfg.model = read_config(base).model
        if self.resume_dir is not None:
            check_resume_config(read_config(self.resume_dir), cfg)

        torch.manual_seed(t.seed)
        start_from = self.resume_dir or base
        if t.phases == ["diffusion"] and start_from is None and model is None:
            raise UserError("train.phases=[diffusion] trains on a trained model's frozen encoders: set train.init_from")
        if model is not None and self.resume_dir is None:
            self.model, tokenizer = model, model.tokenizer
        elif start_from is not None:
            # a fine-tune starts from the base's sampling (EMA) UNet; a resumed run from its raw one (and its LoRA
            # adapters live, to train on)
            self.model = load_checkpoint(start_from, use_ema=self.resume_dir is None,
                                         fuse_lora=self.resume_dir is None)
            tokenizer = self.model.tokenizer
        else:
            bert, tokenizer = load_text_backbone(cfg.model.text_encoder)
        # Webdataset shards are streamed, unless a diffusion phase will need random access to the training set:
        # then they are decoded once into the image cache, as a folder's images are.
        self.stream = None
        if uses_stream(cfg) and "diffusion" not in t.phases and not t.joint_steps:
            self.stream, self.val_set, samples = build_stream(cfg, tokenizer, ctx.rank, ctx.world_size)
            self.train_set = self.stream
        else:
            self.train_set, self.val_set = build_datasets(cfg, tokenizer, whole=True)
            samples = len(self.train_set)
        for note in dict.fromkeys(getattr(d, "note", "") for d in (self.train_set, self.val_set)):
            if note:
                self.log(note)
        global_batch = t.batch_size * ctx.world_size
        if samples < global_batch:
            raise UserError(f"train.batch_size={t.batch_size} (x{ctx.world_size} processes) is larger than the "
                            f"training set ({samples} samples); lower it with --set train.batch_size=N")
        if start_from is not None or model is not None:
            cfg.model.caption_vocab_size = self.model.config.model.caption_vocab_size
            self.model.config = cfg
        else:
            # A stream's captions are not known ahead: its decoder speaks the tokenizer's whole vocabulary.
            vocabulary = caption_token_ids(self.train_set) if self.stream is None else None
            cfg.model.caption_vocab_size = len(vocabulary) if vocabulary else 0
            self.model = DuetModel(cfg, bert, tokenizer)
            if vocabulary:
                self.model.caption_decoder.set_vocabulary(vocabulary)
        self.model.to(ctx.device).train()
        if t.gradient_checkpointing:
            self.model.enable_gradient_checkpointing()

        self.sampler = (EpochSampler(len(self.train_set), t.batch_size, t.seed, ctx.rank, ctx.world_size)
                        if self.stream is None else None)
        self.steps_per_epoch = max(1, self.batches_per_epoch // t.grad_accum_steps)
        self.total_steps = t.max_steps or t.epochs * self.steps_per_epoch
        self.warmup_steps = int(t.warmup_epochs * self.steps_per_epoch)
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.best_val_loss = math.inf
        self.guard = NonFiniteGuard(t.max_bad_steps, self.log, self.run_dir, "lower train.learning_rate and resume")
        # Unreadable train images, each counted once: left out of the cache when it was built, or met in a batch
        # (uncached reading meets one in every epoch, and once per caption in pairs mode).
        self.skipped_at_build, self.skipped_ids = skipped_at_build(self.train_set), set()
        if self.skipped_at_build:
            self.log(f"{self.skipped_at_build} unreadable train images skipped (left out of the image cache)")
        self.window, self.warned, self.last_val_step, self.final_cost = [], False, -1, 0.0
        self.clock, self.time_first_step = StepClock(), False
        self.autocast, self.scaler = autocast_and_scaler(t.mixed_precision, ctx.device)
        self.phases = build_phases(self)
        self.phase, self.resumed = self.phases[0], None
        if self.resume_dir is not None:
            self.resumed = self._read_resume_state(self.resume_dir)

        self.train_module = self.model
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.tracker = build_tracker(t.report_to, self.run_dir, config_to_dict(cfg)) if ctx.is_main else Tracker()

    @property
    def skipped_images(self) -> int:
        return self.skipped_at_build + len(self.skipped_ids)

    @property
    def ema(self):
        return self.phase.ema

    def log(self, message: str) -> None:
        _log(self.ctx, message)

    def wrap_model(self) -> None:
        """The module the joint step calls: compiled and under DDP as the config says. Built once what trains is
        set, since DDP expects a gradient for every parameter that requires one when it is built."""
        t, ctx = self.cfg.train, self.ctx
        self.train_module = self.model
        if t.compile:
            self.train_module = torch.compile(self.train_module)
        if ctx.enabled:
            self.train_module = DistributedDataParallel(
                self.train_module, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None)

    def _read_resume_state(self, folder: Path) -> dict:
        state = load_trainer_state(folder)
        if "phase" not in state:   # written before phases were objects
            phase = "diffusion" if state.get("diffusion_end") else "joint"
            state.update(phase=phase, phase_state={"optimizer": state["optimizer"],
                                                   "lr_schedule": state["lr_schedule"],
                                                   "end": state.get("diffusion_end") or self.total_steps})
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.best_val_loss, self.skipped_ids = state["best_val_loss"], set(state.get("skipped_ids", []))
        return state

    def restored_ema(self, phase_state: dict | None):
        """The EMA a resumed phase had (None when starting the phase)."""
        if phase_state is None or self.resume_dir is None or not (self.resume_dir / EMA_UNET_DIR).is_dir():
            return None
        ema = EMAModel.from_pretrained(self.resume_dir / EMA_UNET_DIR, UNet2DConditionModel)
        ema.to(self.ctx.device)
        return ema

    def _write_metrics(self, row: dict) -> None:
        if not self.ctx.is_main:
            return
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self.tracker.scalars(numbers(row), row["step"])

    def _truncate_metrics(self) -> None:
        """On resume, drops log rows past the checkpoint so the curve continues without a fork."""
        if self.ctx.is_main and self.metrics_path.is_file():
            rows = [line for line in self.metrics_path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= self.step]
            self.metrics_path.write_text("".join(r + "\n" for r in rows))

    def _loader(self, dataset, sampler=None) -> DataLoader:
        t = self.cfg.train
        return epoch_loader(dataset, t.batch_size, sampler, t.seed, min(t.num_workers, os.cpu_count() or 1),
                            pin_memory=self.ctx.device.type == "cuda")

    # -- what the phases call ------------------------------------------------------------------------------------

    @property
    def batches_per_epoch(self) -> int:
        return (self.stream or self.sampler).batches_per_epoch

    def train_loader(self) -> DataLoader:
        if self.stream is not None:
            return stream_loader(self.stream, pin_memory=self.ctx.device.type == "cuda")
        return self._loader(self.train_set, self.sampler)

    def start_epoch(self) -> None:
        if self.stream is not None:
            self.stream.set_epoch(self.epoch, self.batch_in_epoch)
            return
        self.sampler.set_epoch(self.epoch, self.batch_in_epoch)
        if hasattr(self.train_set, "set_epoch"):
            self.train_set.set_epoch(self.epoch)

    def end_epoch(self) -> None:
        if self.skipped_images:
            self.log(f"epoch {self.epoch}: {self.skipped_images} unreadable images skipped so far")
        self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        if not self.cfg.train.val_every_steps:
            self.validate_and_sample()

    def save_progress(self) -> None:
        self.save(checkpoint_name(self.step))

    def record_step(self, metrics: dict | None, keys: tuple[str, ...], bar) -> bool:
        """Bookkeeping after a step: NaN guard, progress bar, log rows, validation. False when it was skipped."""
        t = self.cfg.train
        seconds = self.clock.tick()
        if not self.guard.check(metrics is not None, self.step):
            return False
        self.step += 1
        if self.time_first_step:
            self.log(first_step_note(seconds, self.total_steps - self.step, t.max_minutes))
            self.time_first_step = False
        if "i2t" in metrics:
            self.window = (self.window + [metrics])[-50:]
            self.warned = self._guard_chance(self.window, self.warned)
        bar.update(1)
        bar.set_postfix({k: f"{metrics[k]:.3f}" for k in keys}, refresh=False)
        if self.step % t.log_every_steps == 0:
            pace = {"step_seconds": self.clock.take(), "peak_memory_gib": peak_memory_gib(self.ctx.device)}
            self._write_metrics({"step": self.step, "epoch": self.epoch, "lr": self.phase.lr_schedule.get_last_lr()[0],
                                 **metrics, **{k: v for k, v in pace.items() if v is not None}})
        if t.val_every_steps and self.step % t.val_every_steps == 0:
            self.validate_and_sample()
        return True

    def validate_and_sample(self) -> None:
        started = time.time()
        self._after_validation(self.validate())
        self.last_val_step = self.step
        self.final_cost = max(self.final_cost, time.time() - started)
        self.clock.restart()

    # -- validation, samples, checkpoints ------------------------------------------------------------------------

    @torch.no_grad()
    def validate(self) -> dict:
        """Mean losses and in-batch accuracy over the first val_batches val batches, with fixed noise."""
        self.model.eval()
        sums, count = {k: 0.0 for k in LOG_KEYS}, 0
        # fixed noise that leaves the run's own streams (CPU and CUDA) where they were
        cuda = [self.ctx.device] if self.ctx.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda), self.autocast():
            torch.manual_seed(0)
            for i, batch in enumerate(self._loader(self.val_set)):
                if i >= self.cfg.train.val_batches:
                    break
                if len(batch["images"]) < 2:
                    continue
                out = self.model(to_device(batch, self.ctx.device))
                for k in LOG_KEYS:
                    sums[k] += float(out[k])
                count += 1
        self.model.train()
        return {f"val_{k}": v / max(count, 1) for k, v in sums.items()}

    @torch.no_grad()
    def sample_sheet(self) -> Path:
        """Images from fixed prompts (the EMA weights when the phase keeps them) and greedy captions of fixed val
        images."""
        t, unet = self.cfg.train, self.model.diffusion.unet
        val = [self.val_set[i] for i in range(min(4, len(self.val_set)))]
        val = [s for s in val if "images" in s]
        prompts = t.sample_prompts or [s["caption"] for s in val]
        self.model.eval()
        if self.ema is not None:
            self.ema.store(unet.parameters())
            self.ema.copy_to(unet.parameters())
        try:
            generated = self.model.generate_images(prompts, list(range(len(prompts))))
            images = torch.stack([s["images"] for s in val]).to(self.ctx.device)
            captions = self.model.caption(images)
        finally:
            if self.ema is not None:
                self.ema.restore(unet.parameters())
            self.model.train()
        return sample_sheet_png(to_pil(generated), prompts, to_pil(images), captions,
                                self.run_dir / f"samples-{self.step:06d}.png")

    def save(self, name: str, with_state: bool = True) -> Path:
        state = None
        if with_state:
            state = {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                     "rng": rng_state(), "best_val_loss": self.best_val_loss, "skipped_ids": sorted(self.skipped_ids),
                     "phase": self.phase.name, "phase_step": self.step - self.phase.start,
                     "phase_state": self.phase.state_dict()}
        folder = save_checkpoint(self.model, self.run_dir / name, ema=self.ema, trainer_state=state)
        if name.startswith(CHECKPOINT_PREFIX):
            commit_checkpoint(self.run_dir, folder, self.cfg.train.keep_checkpoints)
        self.clock.restart()
        return folder

    def _after_validation(self, val: dict) -> None:
        self.log(f"step {self.step}: val_loss {val['val_loss']:.4f} i2t {val['val_i2t']:.3f} t2i {val['val_t2i']:.3f}")
        self._write_metrics({"step": self.step, "epoch": self.epoch, **val, "skipped_images": self.skipped_images})
        if not self.ctx.is_main:
            return
        if val["val_loss"] < self.best_val_loss:
            self.best_val_loss = val["val_loss"]
            self.save(BEST_CHECKPOINT, with_state=False)
        self.tracker.image("samples", self.sample_sheet(), self.step)
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

    def _begin(self, phase) -> None:
        """Starts a phase; the first one a resumed run enters gets the checkpoint's phase state and RNG."""
        self.phase = phase
        state, self.resumed = self.resumed, None
        phase.begin(state["phase_state"] if state and state["phase"] == phase.name else None)
        if state is not None:
            restore_rng_state(state["rng"])   # last: setting up the phase draws random numbers
            self.log(f"resumed from {self.resume_dir} at step {self.step} ({phase.name} phase, epoch {self.epoch}, "
                     f"batch {self.batch_in_epoch})")
        self.clock.restart()

    def fit(self) -> dict:
        t, ctx = self.cfg.train, self.ctx
        if ctx.is_main:
            (self.run_dir / CONFIG_FILE).write_text(config_to_json(self.cfg))
        self._truncate_metrics()
        deadline = self.started + t.max_minutes * 60 if t.max_minutes else math.inf
        notice = gpu_sized_on_cpu(self.model, ctx.device)
        if notice:
            self.log(notice)
            self.time_first_step = True
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not ctx.is_main, dynamic_ncols=True)
        try:
            for phase in self.phases:
                if self.step >= phase.end and not (self.resumed and self.resumed["phase"] == phase.name):
                    continue
                self._begin(phase)
                if self.step < phase.end and phase.run(deadline, bar):
                    break
            if self.last_val_step != self.step:
                self._after_validation(self.validate())
            if ctx.is_main:
                self.save(checkpoint_name(self.step))
        finally:
            bar.close()
            self.tracker.close()
        if self.skipped_images:
            self.log(f"{self.skipped_images} unreadable images were skipped in all")
        minutes = (time.time() - self.started) / 60
        return {"run_dir": str(self.run_dir), "step": self.step, "best_val_loss": self.best_val_loss,
                "minutes": round(minutes, 2), "skipped_images": self.skipped_images}


def run(cfg: DuetConfig, resume: str | None = None) -> dict:
    """Trains as cfg says (under torchrun: one process per device) and returns a summary."""
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    ctx = init_distributed(cfg.train.device)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*FutureWarning.*")
            trainer = Trainer(cfg, resume, ctx)
            if ctx.is_main:
                print(config_to_json(cfg), file=sys.stderr)
            return trainer.fit()
    finally:
        shutdown_distributed()
