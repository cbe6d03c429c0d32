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

from common.figures import loss_curve_png, sample_sheet_png
from common.images import to_pil
from configs.errors import UserError
from configs.loading import config_to_dict, config_to_json
from configs.schema import DuetConfig
from data.collate import to_device
from models.checkpoint import (BEST_CHECKPOINT, CHECKPOINT_PREFIX, CONFIG_FILE, EMA_UNET_DIR, checkpoint_name,
                               load_checkpoint, load_trainer_state, read_config, save_checkpoint)
from models.duet import DuetModel
from models.text_encoder import load_text_backbone
from training.distributed import (DistributedContext, all_reduce_grads, all_reduce_mean, init_distributed,
                                  shutdown_distributed)
from training.features import build_frozen_features, diffusion_phase_losses, place_features
from training.guard import NonFiniteGuard
from training.optim import backward, build_optimizer, mean_step_seconds, optimizer_step, plan_due, warmup_cosine
from training.pace import StepClock, first_step_note, gpu_sized_on_cpu, peak_memory_gib
from training.precision import autocast_and_scaler
from training.state import (EpochSampler, commit_checkpoint, epoch_loader, loop_state, resolve_resume,
                            restore_loop_state)

BAR_KEYS = ("loss", "cont", "rec", "diff", "i2t", "t2i")
LOG_KEYS = BAR_KEYS + ("img_rec", "cap")
# The diffusion phase trains the UNet and both decoders on frozen features: no contrastive term to show.
DIFFUSION_KEYS = ("loss", "rec", "diff", "img_rec", "cap")
# Train-section keys a resumed run may change; everything else must match the checkpoint's config.
RESUMABLE_CHANGES = {"epochs", "max_steps", "max_minutes", "num_workers", "log_every_steps", "val_every_steps",
                     "val_batches", "save_every_steps", "keep_checkpoints", "out_dir", "run_name", "overwrite"}
NEAR_CHANCE_FACTOR = 3  # the guard warns while in-batch accuracy stays below this multiple of 1/B


def _log(ctx: DistributedContext, message: str) -> None:
    if ctx.is_main:
        tqdm.write(message, file=sys.stderr)


def _check_resume_config(saved: DuetConfig, cfg: DuetConfig) -> None:
    mine, theirs = config_to_dict(cfg), config_to_dict(saved)
    for section, values in theirs.items():
        for key, value in values.items():
            if section == "train" and key in RESUMABLE_CHANGES:
                continue
            if section == "sample":
                continue  # sampling defaults do not touch training
            if section == "model" and key == "caption_vocab_size":
                continue  # filled in from the data at start
            if mine[section][key] != value:
                raise UserError(f"--resume: the checkpoint was trained with {section}.{key}={value!r}, "
                                f"this run asks for {mine[section][key]!r}; use the same config or start a new run")


def _make_run_dir(cfg: DuetConfig, dataset_name: str, ctx: DistributedContext, resume: str | None) -> Path:
    """<train.out_dir>/<train.run_name or the dataset's safe name>, never in the dataset's folder: a folder
    dataset's path as the run name would otherwise swallow out_dir and write the run into the user's data. A new
    run never replaces an earlier one there unless train.overwrite says so."""
    from data.datasets import dataset_folder, refuse_inside_dataset, safe_dataset_name

    out_dir, name = Path(cfg.train.out_dir), cfg.train.run_name
    if name and (Path(name).is_absolute() or ".." in Path(name).parts or not Path(name).parts):
        raise UserError(f"train.run_name '{name}' must be a folder name inside train.out_dir "
                        "(not absolute, no '..'); or leave it empty to name the run after the dataset")
    run_dir = out_dir / (name or safe_dataset_name(dataset_name))
    # Checked on every rank (no process may go on alone), before anything is created.
    data = dataset_folder(cfg, dataset_name, create=False)
    refuse_inside_dataset(out_dir, data, "train.out_dir", "choose another with --out PATH")
    refuse_inside_dataset(run_dir, data, "the run folder", "choose another train.out_dir or train.run_name")
    if not resume and not cfg.train.overwrite and (run_dir / CONFIG_FILE).exists():
        raise UserError(f"{run_dir} holds an earlier run; continue it with --resume latest, replace it with "
                        "--overwrite, or name a new one with --set train.run_name=NAME")
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


class Trainer:
    """Holds everything a step needs; `run()` below is the entry point."""

    def __init__(self, cfg: DuetConfig, resume: str | None, ctx: DistributedContext):
        from data.datasets import build_datasets, caption_token_ids, resolve_dataset_name, skipped_at_build

        self.cfg, self.ctx, t = cfg, ctx, cfg.train
        self.started = time.time()  # train.max_minutes counts data preparation too
        self.dataset_name = resolve_dataset_name(cfg)
        _log(ctx, f"dataset: {self.dataset_name} ({cfg.data.dataset} requested)")
        self.run_dir = _make_run_dir(cfg, self.dataset_name, ctx, resume)
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
            self.model.enable_gradient_checkpointing()

        self.sampler = EpochSampler(len(self.train_set), t.batch_size, t.seed, ctx.rank, ctx.world_size)
        self.steps_per_epoch = max(1, self.sampler.batches_per_epoch // t.grad_accum_steps)
        self.total_steps = t.max_steps or t.epochs * self.steps_per_epoch
        self.warmup_steps = int(t.warmup_epochs * self.steps_per_epoch)
        # train.joint_steps splits the run: everything jointly, then the UNet and decoders on frozen features.
        self.joint_end = t.joint_steps if 0 < t.joint_steps < self.total_steps else self.total_steps
        self.features, self.diffusion_end = None, self.total_steps
        if self.joint_end < self.total_steps:
            # untouched until the diffusion phase (DDP requires every trained parameter to get a gradient)
            self.model.diffusion.unet.requires_grad_(False)
            self.model.text_encoder.to_states.requires_grad_(False)
        self.optimizer = build_optimizer(self.model, t.learning_rate, t.weight_decay)
        # With a diffusion phase the joint phase has a schedule of its own, so the encoders freeze converged.
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(self.warmup_steps, self.joint_end))
        unet = self.model.diffusion.unet
        # EMA warmup lets the average follow the fast early changes of a short run.
        self.ema = EMAModel(unet.parameters(), decay=t.ema_decay, use_ema_warmup=True, model_cls=UNet2DConditionModel,
                            model_config=unet.config) if ctx.is_main else None
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        # The cache leaves unreadable images out when it is built, so no batch reports them: the count starts there.
        self.best_val_loss = math.inf
        self.guard = NonFiniteGuard(t.max_bad_steps, lambda line: _log(ctx, line), self.run_dir,
                                    "lower train.learning_rate and resume")
        # Unreadable train images, each counted once: left out of the cache when it was built, or met in a batch
        # (uncached reading meets one in every epoch, and once per caption in pairs mode).
        self.skipped_at_build, self.skipped_ids = skipped_at_build(self.train_set), set()
        if self.skipped_at_build:
            _log(ctx, f"{self.skipped_at_build} unreadable train images skipped (left out of the image cache)")
        self.window, self.warned, self.last_val_step, self.final_cost = [], False, -1, 0.0
        self.clock, self.time_first_step = StepClock(), False
        self.plan_restored = False   # a resumed diffusion phase keeps the length its first process planned
        self.autocast, self.scaler = autocast_and_scaler(t.mixed_precision, ctx.device)
        if resume_dir is not None:
            self._restore(resume_dir)

        self.train_module = self.model
        if t.compile:
            self.train_module = torch.compile(self.train_module)
        if ctx.enabled:
            self.train_module = DistributedDataParallel(
                self.train_module, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.tensorboard = self._tensorboard()

    @property
    def skipped_images(self) -> int:
        return self.skipped_at_build + len(self.skipped_ids)

    def _restore(self, folder: Path) -> None:
        state = load_trainer_state(folder)
        self.step = state["step"]
        if state.get("diffusion_end"):
            self._enter_diffusion_phase(state["diffusion_end"])
            self.plan_restored = True
        self.best_val_loss, self.skipped_ids = state["best_val_loss"], set(state.get("skipped_ids", []))
        if self.ema is not None and (folder / EMA_UNET_DIR).is_dir():
            self.ema = EMAModel.from_pretrained(folder / EMA_UNET_DIR, UNet2DConditionModel)
            self.ema.to(self.ctx.device)
        restore_loop_state(self, state)
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

    def _loader(self, dataset, sampler=None) -> DataLoader:
        t = self.cfg.train
        return epoch_loader(dataset, t.batch_size, sampler, t.seed, min(t.num_workers, os.cpu_count() or 1),
                            pin_memory=self.ctx.device.type == "cuda")

    def _train_step(self, micro_batches: list[dict]) -> dict | None:
        """One optimizer step over grad_accum_steps micro-batches; None when the loss was not finite."""
        t, sums = self.cfg.train, {k: 0.0 for k in LOG_KEYS}
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last or not self.ctx.enabled else self.train_module.no_sync()
            with sync, self.autocast():
                out = self.train_module(to_device(batch, self.ctx.device),
                                        with_diffusion=self.joint_end == self.total_steps)
                loss = out["loss"] / len(micro_batches)
            if not backward(loss, self.optimizer, self.scaler):
                return None
            for k in LOG_KEYS:
                sums[k] += out[k].detach().item() / len(micro_batches)
        return self._optimizer_step(sums)

    def _optimizer_step(self, sums: dict, manual_sync: bool = False) -> dict | None:
        """Clips, steps the optimizer, LR schedule and EMA after backward(); None when the gradients are not finite.
        manual_sync: the loss did not go through the DDP wrapper, so gradients are averaged here."""
        if manual_sync:
            all_reduce_grads(self.model.parameters(), self.ctx)
        if not optimizer_step(self.optimizer, self.lr_schedule, self.model.parameters(), self.cfg.train.grad_clip,
                              self.scaler):
            return None
        if self.ema is not None and (self.features is not None or self.joint_end == self.total_steps):
            self.ema.step(self.model.diffusion.unet.parameters())
        return {k: float(all_reduce_mean(torch.tensor(v), self.ctx)) for k, v in sums.items()}

    def _enter_diffusion_phase(self, diffusion_end: int | None = None) -> None:
        """Freezes the encoders, caches what the UNet and decoders need from them, and starts a new optimizer for
        the UNet (with the text-state projection) and the two decoders."""
        t, model = self.cfg.train, self.model
        started = time.time()
        model.requires_grad_(False)
        trained = (model.diffusion.unet, model.text_encoder.to_states, model.caption_decoder, model.image_decoder)
        for module in trained:
            module.requires_grad_(True)
        self.features = build_frozen_features(model, self.train_set, t.diffusion_captions_per_image, self.ctx.device,
                                              self.autocast)
        readable = self.features.readable.numpy()
        self.readable_images = torch.from_numpy(readable.nonzero()[0])
        self.caption_rows = torch.from_numpy(readable[self.train_set.index.caption_image].nonzero()[0])
        self.features = place_features(self.features, self.ctx.device)
        _log(self.ctx, f"diffusion phase from step {self.step}: encoders frozen; cached the latents of "
                       f"{len(self.readable_images)} images and the BERT states of {len(self.features)} captions "
                       f"in {time.time() - started:.0f} s")
        diffusion_lr = t.diffusion_learning_rate or t.learning_rate
        self.optimizer = build_optimizer(model, t.learning_rate, t.weight_decay,
                                         {"diffusion.unet.": diffusion_lr, "text_encoder.to_states.": diffusion_lr})
        self.diffusion_end = diffusion_end or self.total_steps
        # Counted from the phase's first step; the length may still be fixed by _plan_diffusion_phase.
        warmup = min(t.diffusion_warmup_steps, max(1, (self.diffusion_end - self.joint_end) // 10))
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda i: warmup_cosine(warmup, self.diffusion_end - self.joint_end)(i))
        if self.ema is not None:
            # The average starts here: before, the UNet did not train.
            unet = model.diffusion.unet
            self.ema = EMAModel(unet.parameters(), decay=t.ema_decay, use_ema_warmup=True,
                                model_cls=UNet2DConditionModel, model_config=unet.config)

    def _phase_batch(self) -> torch.Generator:
        """This step's batch generator: a function of (seed, rank, step), so a resumed run draws the same batches."""
        return torch.Generator().manual_seed((self.cfg.train.seed * 1_000_003 + self.ctx.rank) * 1_000_003 + self.step)

    def _diffusion_step(self) -> dict | None:
        """One step of the diffusion phase: the diffusion loss on cached latents and BERT states, plus the two
        decoders' losses on the frozen encoder's latents and tokens; None when the loss was not finite."""
        t, f, device = self.cfg.train, self.features, self.ctx.device
        generator = self._phase_batch()
        rows = torch.randint(len(f), (t.diffusion_batch_size or t.batch_size,), generator=generator)
        captions = self.caption_rows[torch.randint(len(self.caption_rows), (t.caption_batch_size or t.batch_size,),
                                                   generator=generator)]
        images = self.readable_images[torch.randint(len(self.readable_images),
                                                    (t.image_decoder_batch_size or t.batch_size,), generator=generator)]
        with self.autocast():
            out = diffusion_phase_losses(self.model, f, self.train_set, rows, captions, images, device)
        if not backward(out["loss"], self.optimizer, self.scaler):
            return None
        return self._optimizer_step({k: float(v.detach()) for k, v in out.items()}, manual_sync=True)

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
        """Images from fixed prompts (EMA weights) and greedy captions of fixed val images."""
        t = self.cfg.train
        val = [self.val_set[i] for i in range(min(4, len(self.val_set)))]
        val = [s for s in val if "images" in s]
        prompts = t.sample_prompts or [s["caption"] for s in val]
        self.model.eval()
        self.ema.store(self.model.diffusion.unet.parameters())
        self.ema.copy_to(self.model.diffusion.unet.parameters())
        try:
            generated = self.model.generate_images(prompts, list(range(len(prompts))))
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
            state = {**loop_state(self), "best_val_loss": self.best_val_loss, "skipped_ids": sorted(self.skipped_ids),
                     "diffusion_end": self.diffusion_end if self.features is not None else 0}
        folder = save_checkpoint(self.model, self.run_dir / name, ema=self.ema, trainer_state=state)
        if name.startswith(CHECKPOINT_PREFIX):
            commit_checkpoint(self.run_dir, folder, self.cfg.train.keep_checkpoints)
        self.clock.restart()
        return folder

    def _after_validation(self, val: dict) -> None:
        _log(self.ctx, f"step {self.step}: val_loss {val['val_loss']:.4f} i2t {val['val_i2t']:.3f} "
                       f"t2i {val['val_t2i']:.3f}")
        self._write_metrics({"step": self.step, "epoch": self.epoch, **val, "skipped_images": self.skipped_images})
        if not self.ctx.is_main:
            return
        if val["val_loss"] < self.best_val_loss:
            self.best_val_loss = val["val_loss"]
            self.save(BEST_CHECKPOINT, with_state=False)
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

    def _record_step(self, metrics: dict | None, keys: tuple[str, ...], bar) -> bool:
        """Bookkeeping after a step: NaN guard, progress bar, log rows, validation. False when it was skipped."""
        t = self.cfg.train
        seconds = self.clock.tick()
        if not self.guard.check(metrics is not None, self.step):
            return False
        self.step += 1
        if self.time_first_step:
            _log(self.ctx, first_step_note(seconds, self.total_steps - self.step, t.max_minutes))
            self.time_first_step = False
        if "i2t" in metrics:
            self.window = (self.window + [metrics])[-50:]
            self.warned = self._guard_chance(self.window, self.warned)
        bar.update(1)
        bar.set_postfix({k: f"{metrics[k]:.3f}" for k in keys}, refresh=False)
        if self.step % t.log_every_steps == 0:
            pace = {"step_seconds": self.clock.take(), "peak_memory_gib": peak_memory_gib(self.ctx.device)}
            self._write_metrics({"step": self.step, "epoch": self.epoch, "lr": self.lr_schedule.get_last_lr()[0],
                                 **metrics, **{k: v for k, v in pace.items() if v is not None}})
        if t.val_every_steps and self.step % t.val_every_steps == 0:
            self._validate_and_sample()
        return True

    def _validate_and_sample(self) -> None:
        started = time.time()
        self._after_validation(self.validate())
        self.last_val_step = self.step
        self.final_cost = max(self.final_cost, time.time() - started)
        self.clock.restart()

    def _fit_joint(self, deadline: float, bar) -> bool:
        """The joint phase, epoch by epoch, up to self.joint_end; True when it stopped on the deadline."""
        t, ctx = self.cfg.train, self.ctx
        save_after_epoch = False
        while self.step < self.joint_end:
            self.sampler.set_epoch(self.epoch, self.batch_in_epoch)
            if hasattr(self.train_set, "set_epoch"):
                self.train_set.set_epoch(self.epoch)
            micro = []
            for batch in self._loader(self.train_set, self.sampler):
                self.batch_in_epoch += 1
                self.skipped_ids.update(batch["skipped_ids"])
                if len(batch["images"]) >= 2:
                    micro.append(batch)
                if len(micro) < t.grad_accum_steps:
                    continue
                metrics, micro = self._train_step(micro), []
                if not self._record_step(metrics, BAR_KEYS, bar):
                    continue
                if self.step % t.save_every_steps == 0 and ctx.is_main:
                    if self.batch_in_epoch < self.sampler.batches_per_epoch:
                        self.save(checkpoint_name(self.step))
                    else:
                        save_after_epoch = True
                if time.time() > deadline:
                    return True
                if self.step >= self.joint_end:
                    break
            else:
                if self.skipped_images:
                    _log(ctx, f"epoch {self.epoch}: {self.skipped_images} unreadable images skipped so far")
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                if not t.val_every_steps:
                    self._validate_and_sample()
                if save_after_epoch:
                    self.save(checkpoint_name(self.step))
                    save_after_epoch = False
        if save_after_epoch and ctx.is_main and self.joint_end < self.total_steps:
            self.save(checkpoint_name(self.step))
        return False

    def _plan_diffusion_phase(self, deadline: float, per_step: float) -> None:
        """Under a time budget, fixes the phase's length (and so its cosine) from the measured seconds per step,
        keeping room for the final validation and checkpoint. A phase restored from a checkpoint keeps its plan."""
        if self.features is None or math.isinf(deadline) or self.plan_restored:
            return
        t = self.cfg.train
        # periodic validations and checkpoints cost about what the last validation did
        per_step += self.final_cost * ((1 / t.val_every_steps if t.val_every_steps else 0) + 1 / t.save_every_steps)
        left = deadline - time.time() - 2 * self.final_cost
        self.diffusion_end = min(self.total_steps, self.step + max(1, int(left / per_step)))
        _log(self.ctx, f"diffusion phase: {per_step:.2f} s/step, planned to end at step {self.diffusion_end}")

    def _fit_diffusion(self, deadline: float, bar) -> None:
        t, ctx = self.cfg.train, self.ctx
        if self.features is None:
            self._enter_diffusion_phase()
            self.clock.restart()
        bar.set_description("diffusion")
        first, seconds = self.step, []
        while self.step < self.diffusion_end and time.time() + self.final_cost < deadline:
            started = time.time()
            metrics = self._diffusion_step()
            seconds.append(time.time() - started)        # the step alone: validations are counted apart
            if not self._record_step(metrics, DIFFUSION_KEYS, bar):
                continue
            if plan_due(self.step - first):
                self._plan_diffusion_phase(deadline, mean_step_seconds(seconds))
                bar.total = self.diffusion_end
                bar.refresh()
            if not t.val_every_steps and (self.step - self.joint_end) % self.steps_per_epoch == 0:
                self._validate_and_sample()
            if self.step % t.save_every_steps == 0 and ctx.is_main:
                self.save(checkpoint_name(self.step))

    def fit(self) -> dict:
        t, ctx = self.cfg.train, self.ctx
        if ctx.is_main:
            (self.run_dir / CONFIG_FILE).write_text(config_to_json(self.cfg))
        self._truncate_metrics()
        deadline = self.started + t.max_minutes * 60 if t.max_minutes else math.inf
        notice = gpu_sized_on_cpu(self.model, ctx.device)
        if notice:
            _log(ctx, notice)
            self.time_first_step = True
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not ctx.is_main, dynamic_ncols=True)
        self.clock.restart()
        try:
            out_of_time = self.step < self.joint_end and self._fit_joint(deadline, bar)
            if not out_of_time and self.joint_end <= self.step < self.total_steps:
                self._fit_diffusion(deadline, bar)
        finally:
            bar.close()
        if self.last_val_step != self.step:
            self._after_validation(self.validate())
        if ctx.is_main:
            self.save(checkpoint_name(self.step))
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
