"""The stretches of a run (train.phases). A phase owns what trains, its optimizer, learning-rate schedule, the UNet's
EMA, its step and the keys its progress bar shows; the Trainer (training/loop.py) runs the phases in order and
checkpoints the one in progress, so a resumed run continues mid-phase.

joint: everything learns together from image-caption batches, epoch by epoch (the UNet too, unless a diffusion
phase follows: then it waits). diffusion: the image encoder, BERT and the alignment heads are frozen; the modules of
train.diffusion_trains learn from their cached outputs (training/features.py), batches drawn at random. A fine-tune
is a run of this phase alone, from a trained checkpoint (train.init_from), on the domain's data.
"""
from __future__ import annotations

import contextlib
import math
import time

import numpy as np
import torch
from diffusers import UNet2DConditionModel
from diffusers.training_utils import EMAModel

from data.collate import to_device
from models.lora import add_lora, conv_target_modules, has_lora
from training.distributed import all_reduce_grads, all_reduce_mean
from training.feature_store import load_features
from training.features import diffusion_phase_losses, place_features
from training.optim import backward, build_optimizer, mean_step_seconds, optimizer_step, plan_due, warmup_cosine

JOINT_KEYS = ("loss", "cont", "rec", "diff", "i2t", "t2i")
LOG_KEYS = JOINT_KEYS + ("img_rec", "cap")
# What the diffusion phase may train; "unet" includes the projection of BERT's states it cross-attends to.
TRAINABLE = {"unet": ("diffusion.unet", "text_encoder.to_states"), "caption_decoder": ("caption_decoder",),
             "image_decoder": ("image_decoder",)}
ADAPTED = ("unet", "image_decoder")   # what train.lora_rank puts adapters on


def new_ema(unet, decay: float) -> EMAModel:
    # EMA warmup lets the average follow the fast early changes of a short run.
    return EMAModel(unet.parameters(), decay=decay, use_ema_warmup=True, model_cls=UNet2DConditionModel,
                    model_config=unet.config)


class Phase:
    """Steps [start, end) of a run. `begin` sets up what trains (restoring `state` on resume), `run` steps until the
    end or the deadline."""
    name = ""
    keys: tuple[str, ...] = ()

    def __init__(self, trainer, start: int, end: int):
        self.trainer, self.start, self.end = trainer, start, end
        self.optimizer = self.lr_schedule = self.ema = None

    def begin(self, state: dict | None = None) -> None:
        raise NotImplementedError

    def run(self, deadline: float, bar) -> bool:
        """Steps until self.end; True when it stopped on the deadline."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "lr_schedule": self.lr_schedule.state_dict(),
                "end": self.end}

    def _restore(self, state: dict | None) -> None:
        if state:
            self.optimizer.load_state_dict(state["optimizer"])
            self.lr_schedule.load_state_dict(state["lr_schedule"])

    def _optimizer_step(self, sums: dict, manual_sync: bool = False) -> dict | None:
        """Clips, steps the optimizer, LR schedule and EMA after backward(); None when the gradients are not finite.
        manual_sync: the loss did not go through the DDP wrapper, so gradients are averaged here."""
        trainer = self.trainer
        if manual_sync:
            all_reduce_grads(trainer.model.parameters(), trainer.ctx)
        if not optimizer_step(self.optimizer, self.lr_schedule, trainer.model.parameters(), trainer.cfg.train.grad_clip,
                              trainer.scaler):
            return None
        if self.ema is not None:
            self.ema.step(trainer.model.diffusion.unet.parameters())
        return {k: float(all_reduce_mean(torch.tensor(v), trainer.ctx)) for k, v in sums.items()}


class JointPhase(Phase):
    """Everything trains on image-caption batches (the UNet only when no diffusion phase follows)."""
    name, keys = "joint", JOINT_KEYS

    def __init__(self, trainer, start: int, end: int, with_diffusion: bool):
        super().__init__(trainer, start, end)
        self.with_diffusion = with_diffusion

    def begin(self, state: dict | None = None) -> None:
        trainer, t = self.trainer, self.trainer.cfg.train
        model = trainer.model
        if not self.with_diffusion:
            # untouched until the diffusion phase (DDP requires every trained parameter to get a gradient)
            model.diffusion.unet.requires_grad_(False)
            model.text_encoder.to_states.requires_grad_(False)
        trainer.wrap_model()
        self.optimizer = build_optimizer(model, t.learning_rate, t.weight_decay)
        # With a diffusion phase next the joint phase has a schedule of its own, so the encoders freeze converged.
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(trainer.warmup_steps, self.end))
        if self.with_diffusion and trainer.ctx.is_main:
            self.ema = trainer.restored_ema(state) or new_ema(model.diffusion.unet, t.ema_decay)
        self._restore(state)

    def step(self, micro_batches: list[dict]) -> dict | None:
        """One optimizer step over grad_accum_steps micro-batches; None when the loss was not finite."""
        trainer, sums = self.trainer, {k: 0.0 for k in LOG_KEYS}
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last or not trainer.ctx.enabled else trainer.train_module.no_sync()
            with sync, trainer.autocast():
                out = trainer.train_module(to_device(batch, trainer.ctx.device), with_diffusion=self.with_diffusion)
                loss = out["loss"] / len(micro_batches)
            if not backward(loss, self.optimizer, trainer.scaler):
                return None
            for k in LOG_KEYS:
                sums[k] += out[k].detach().item() / len(micro_batches)
        return self._optimizer_step(sums)

    def run(self, deadline: float, bar) -> bool:
        trainer, t = self.trainer, self.trainer.cfg.train
        save_after_epoch = False
        while trainer.step < self.end:
            trainer.start_epoch()
            micro = []
            for batch in trainer.train_loader():
                trainer.batch_in_epoch += 1
                trainer.skipped_ids.update(batch["skipped_ids"])
                if len(batch["images"]) >= 2:
                    micro.append(batch)
                if len(micro) < t.grad_accum_steps:
                    continue
                metrics, micro = self.step(micro), []
                if not trainer.record_step(metrics, self.keys, bar):
                    continue
                if trainer.step % t.save_every_steps == 0 and trainer.ctx.is_main:
                    if trainer.batch_in_epoch < trainer.batches_per_epoch:
                        trainer.save_progress()
                    else:
                        save_after_epoch = True     # saved once the epoch is closed, so a resume starts the next
                if time.time() > deadline:
                    return True
                if trainer.step >= self.end:
                    break
            else:
                trainer.end_epoch()
                if save_after_epoch:
                    trainer.save_progress()
                    save_after_epoch = False
        if save_after_epoch and trainer.ctx.is_main:
            trainer.save_progress()
        return False


class DiffusionPhase(Phase):
    """The modules of train.diffusion_trains learn from the frozen encoders' cached outputs."""
    name, keys = "diffusion", ("loss", "rec", "diff", "img_rec", "cap")

    def __init__(self, trainer, start: int, end: int):
        super().__init__(trainer, start, end)
        self.trains = trainer.cfg.train.diffusion_trains
        self.keys = ("loss", "rec") + tuple(k for k, part in (("diff", "unet"), ("img_rec", "image_decoder"),
                                                              ("cap", "caption_decoder")) if part in self.trains)
        self.features = None
        self.plan_restored = False    # a resumed phase keeps the length its first process planned

    def begin(self, state: dict | None = None) -> None:
        """Freezes all but what trains, caches the frozen encoders' outputs (or reads them from the disk store), and
        starts the optimizer of what trains, with its own warmup and cosine."""
        trainer, t, model = self.trainer, self.trainer.cfg.train, self.trainer.model
        started = time.time()
        model.requires_grad_(False)
        lora = t.lora_rank > 0
        prefixes = [p for part in self.trains for p in TRAINABLE[part] if not (lora and part in ADAPTED)]
        for name, module in model.named_modules():
            if name in prefixes:
                module.requires_grad_(True)
        if lora:
            self._add_adapters(t)
        features, how = load_features(t.feature_store, trainer.cfg.data.root, model, trainer.train_set,
                                      t.diffusion_captions_per_image, trainer.ctx.device, trainer.autocast)
        readable = np.asarray(features.readable)
        self.readable_images = torch.from_numpy(readable.nonzero()[0])
        self.caption_rows = torch.from_numpy(readable[trainer.train_set.index.caption_image].nonzero()[0])
        self.features = place_features(features, trainer.ctx.device)
        trainer.log(f"diffusion phase from step {trainer.step}: {', '.join(self.trains)} train; the latents of "
                    f"{len(self.readable_images)} images and the BERT states of {len(features)} captions "
                    f"{how} in {time.time() - started:.0f} s")
        rate = t.diffusion_learning_rate or t.learning_rate
        self.optimizer = build_optimizer(model, t.learning_rate, t.weight_decay,
                                         {"diffusion.unet.": rate, "text_encoder.to_states.": rate})
        if state:
            self.end, self.plan_restored = state["end"], True
        # Counted from the phase's first step; the length may still be fixed by _plan.
        warmup = min(t.diffusion_warmup_steps, max(1, (self.end - self.start) // 10))
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda i: warmup_cosine(warmup, self.end - self.start)(i))
        if "unet" in self.trains and not lora and trainer.ctx.is_main:
            # The average starts here: before, the UNet did not train (or trained elsewhere).
            self.ema = trainer.restored_ema(state) or new_ema(model.diffusion.unet, t.ema_decay)
        self._restore(state)

    def _add_adapters(self, t) -> None:
        """LoRA on the UNet's t.lora_targets and the image decoder's convolutions, for those that train; a resumed
        run's checkpoint brought its adapters back, which train on."""
        model, count = self.trainer.model, 0
        for part, module in (("unet", model.diffusion.unet), ("image_decoder", model.image_decoder)):
            if part not in self.trains:
                continue
            if has_lora(module):
                for name, param in module.named_parameters():
                    param.requires_grad_(".lora_" in name)
            else:
                targets = t.lora_targets if part == "unet" else conv_target_modules(module)
                add_lora(module, t.lora_rank, t.lora_alpha or float(t.lora_rank), targets)
            count += sum(p.numel() for p in module.parameters() if p.requires_grad)
        self.trainer.log(f"LoRA rank {t.lora_rank}: {count} adapter parameters train")

    def _batch(self) -> torch.Generator:
        """This step's batch generator: a function of (seed, rank, step), so a resumed run draws the same batches."""
        trainer = self.trainer
        return torch.Generator().manual_seed((trainer.cfg.train.seed * 1_000_003 + trainer.ctx.rank) * 1_000_003
                                             + trainer.step)

    def step(self) -> dict | None:
        """One step: each trained module's loss on its own random batch; None when the loss was not finite."""
        trainer, t, f = self.trainer, self.trainer.cfg.train, self.features
        generator = self._batch()

        def draw(pool: torch.Tensor | int, size: int, part: str) -> torch.Tensor | None:
            picked = torch.randint(pool if isinstance(pool, int) else len(pool), (size or t.batch_size,),
                                   generator=generator)
            if part not in self.trains:
                return None
            return picked if isinstance(pool, int) else pool[picked]

        rows = draw(len(f), t.diffusion_batch_size, "unet")
        captions = draw(self.caption_rows, t.caption_batch_size, "caption_decoder")
        images = draw(self.readable_images, t.image_decoder_batch_size, "image_decoder")
        with trainer.autocast():
            out = diffusion_phase_losses(trainer.model, f, trainer.train_set, trainer.ctx.device, rows, captions,
                                         images)
        if not backward(out["loss"], self.optimizer, trainer.scaler):
            return None
        return self._optimizer_step({k: float(out[k].detach()) for k in self.keys}, manual_sync=True)

    def _plan(self, deadline: float, per_step: float) -> None:
        """Under a time budget, fixes the phase's length (and so its cosine) from the measured seconds per step,
        keeping room for the final validation and checkpoint. A phase restored from a checkpoint keeps its plan."""
        trainer, t = self.trainer, self.trainer.cfg.train
        if math.isinf(deadline) or self.plan_restored:
            return
        # periodic validations and checkpoints cost about what the last validation did
        per_step += trainer.final_cost * ((1 / t.val_every_steps if t.val_every_steps else 0) + 1 / t.save_every_steps)
        left = deadline - time.time() - 2 * trainer.final_cost
        self.end = min(trainer.total_steps, trainer.step + max(1, int(left / per_step)))
        trainer.log(f"diffusion phase: {per_step:.2f} s/step, planned to end at step {self.end}")

    def run(self, deadline: float, bar) -> bool:
        trainer, t = self.trainer, self.trainer.cfg.train
        bar.set_description("diffusion")
        first, seconds = trainer.step, []
        while trainer.step < self.end:
            if time.time() + trainer.final_cost >= deadline:
                return True
            started = time.time()
            metrics = self.step()
            seconds.append(time.time() - started)        # the step alone: validations are counted apart
            if not trainer.record_step(metrics, self.keys, bar):
                continue
            if plan_due(trainer.step - first):
                self._plan(deadline, mean_step_seconds(seconds))
                bar.total = self.end
                bar.refresh()
            if not t.val_every_steps and (trainer.step - self.start) % trainer.steps_per_epoch == 0:
                trainer.validate_and_sample()
            if trainer.step % t.save_every_steps == 0 and trainer.ctx.is_main:
                trainer.save_progress()
        return False


def build_phases(trainer) -> list[Phase]:
    """The run's phases from train.phases; [] means joint, then diffusion when 0 < train.joint_steps < its steps."""
    t, total = trainer.cfg.train, trainer.total_steps
    names = t.phases or (["joint", "diffusion"] if 0 < t.joint_steps < total else ["joint"])
    if names == ["joint"]:
        return [JointPhase(trainer, 0, total, with_diffusion=True)]
    if names == ["diffusion"]:
        return [DiffusionPhase(trainer, 0, total)]
    joint_end = min(t.joint_steps, total - 1)
    return [JointPhase(trainer, 0, joint_end, with_diffusion=False), DiffusionPhase(trainer, joint_end, total)]
