"""Domain fine-tuning of the text-to-image half: LoRA (peft, in diffusers' layout) or full, on a COCO-format set.

`python specialize.py --mode finetune [--checkpoint DIR | --backend sd --model-path SD] [--full] [--rank 8] ...`
trains only the denoising loss on latents of the frozen image encoder (diffusers' train_text_to_image_lora.py
recipe) and writes <out>/finetune/: pytorch_lora_weights.safetensors + lora_info.json (LoRA), model/ (full),
merged/ (LoRA with --merge), finetune_report.json, and resumable checkpoint-N/ folders with a `latest` pointer.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from configs.errors import UserError
from specialize.launcher import OUT_SUBDIRS
from models.lora import UNET_TARGET_MODULES
from training.optim import mean_step_seconds, plan_due

# A fine-tuning checkpoint holds what trains, not the frozen base: the trainable weights, the trainer state
# (models.checkpoint's file) and the settings a resume must share.
TRAINABLE_FILE, SETTINGS_FILE = "trainable.safetensors", "settings.json"
REPORT_FILE = "finetune_report.json"
KEEP_CHECKPOINTS = 2
MAX_BAD_STEPS = 5         # consecutive NaN/Inf losses before giving up
# Settings a resumed run may change; every other one must match the checkpoint's.
RESUMABLE_CHANGES = {"max_steps", "max_minutes", "save_every", "num_workers", "merge", "guidance_scale"}


# What a setting left at None/0 means, per backend. Duet's UNet is small (1.2M parameters: a full copy is 5 MB),
# and its autoencoder was never trained on the domain: on fashion, 10 minutes of LoRA on the UNet alone reached class
# accuracy 0.17, with the decoder's LoRA 0.49, full UNet + decoder 0.75 (round-trip ceiling 0.42 -> 0.85).
# A tuned Duet model samples at guidance 3, the generic default: the embedded preset's 2 suits its two-object
# prompts; on fashion the same tuned model drew the right garment class 0.75 of the time at 2, 0.83 at 3.
BACKEND_DEFAULTS = {"duet": {"full": True, "train_decoder": True, "batch_size": 64, "guidance_scale": 3.0},
                    "sd": {"full": False, "train_decoder": False, "batch_size": 32, "guidance_scale": 0.0}}


@dataclass
class FinetuneSettings:
    """Everything --mode finetune needs beyond the base model and the data."""
    full: bool = False
    rank: int = 8
    alpha: float = 0.0               # 0: equal to rank (scale 1)
    target_modules: tuple[str, ...] = UNET_TARGET_MODULES
    train_text_encoder: bool = False
    train_decoder: bool = False      # Duet: also adapt the image decoder (LoRA on its convs; with full, all of it)
    lr: float = 0.0                  # 0: 1e-3 for LoRA, 5e-5 for full fine-tuning
    weight_decay: float = 1e-2
    warmup_steps: int = 20
    lr_schedule: str = "cosine"      # cosine (to 5% at the planned end) | constant, both after the warmup
    batch_size: int = 32
    max_steps: int = 0               # 0: max_minutes decides
    max_minutes: float = 10.0        # training time across resumes; 0: no limit
    max_grad_norm: float = 1.0
    save_every: int = 100
    mixed_precision: str = "auto"    # auto | bf16: bf16 autocast on CUDA, none on CPU; no: fp32 everywhere
    limit_train: int = 0
    num_workers: int = 0
    merge: bool = False
    seed: int = 0
    backend: str = "duet"
    guidance_scale: float = 0.0      # written into a tuned Duet model's sample section; 0: the base's

    @property
    def learning_rate(self) -> float:
        return self.lr or (5e-5 if self.full and self.backend != "duet" else 1e-3)

    @property
    def lora_alpha(self) -> float:
        return self.alpha or float(self.rank)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of --mode finetune (the launcher owns --checkpoint, --backend, --model-path, --dataset, --out, ...)."""
    d = FinetuneSettings()
    g = parser.add_argument_group("fine-tuning (--mode finetune)")
    g.add_argument("--method", choices=("full", "lora"),
                   help="full: every UNet weight (duet's default: its UNet is 1.2M parameters); lora: an adapter "
                        "(sd's default)")
    g.add_argument("--full", action="store_const", const="full", dest="method", help="the same as --method full")
    g.add_argument("--rank", type=int, default=d.rank, help="LoRA rank")
    g.add_argument("--alpha", type=float, default=d.alpha, help="LoRA alpha (0: equal to --rank)")
    g.add_argument("--target-modules", default=",".join(d.target_modules),
                   help="comma-separated UNet module names that get LoRA")
    g.add_argument("--train-text-encoder", action="store_true",
                   help="also adapt the text encoder (LoRA on its attention; with --full, all of it)")
    g.add_argument("--train-decoder", action=argparse.BooleanOptionalAction,
                   help="duet (on by default): also adapt the image decoder to the domain by reconstruction (LoRA on "
                        "its convs; with --full, all of it); the encoder stays frozen, so the latents keep their "
                        "meaning")
    g.add_argument("--lr", type=float, default=d.lr,
                   help="learning rate (0: 1e-3 for LoRA and for duet's full fine-tuning, 5e-5 for sd's)")
    g.add_argument("--batch-size", type=int, default=0, help="images per step (0: 64 for duet, 32 for sd)")
    g.add_argument("--max-steps", type=int, default=d.max_steps, help="optimizer steps (0: --max-minutes decides)")
    g.add_argument("--max-minutes", type=float, default=d.max_minutes,
                   help="training time, summed over resumes (0: no limit)")
    g.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="gradient clipping (0: off)")
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="linear LR warmup steps")
    g.add_argument("--tuned-guidance-scale", type=float, default=None,
                   help="the sampling guidance a fully tuned or merged Duet model keeps as its default (default 3; "
                        "0: the base's)")
    g.add_argument("--lr-schedule", default=d.lr_schedule, choices=("cosine", "constant"),
                   help="after the warmup: cosine to 5%% at the end (its length planned from the measured speed "
                        "under --max-minutes), or constant")
    g.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint every N steps (0: at the end)")
    g.add_argument("--resume", help="'latest' or a checkpoint-N folder of <out>/finetune")
    g.add_argument("--merge", action="store_true", help="also write merged/, a full model with the adapter folded in")
    g.add_argument("--mixed-precision", default=d.mixed_precision, choices=("auto", "no", "bf16"),
                   help="bf16 autocast on CUDA only (on CPU low precision is far slower); auto: bf16 on CUDA")
    g.add_argument("--limit-train", type=int, default=d.limit_train, help="first N training images (0: all)")
    g.add_argument("--num-workers", type=int, default=d.num_workers, help="DataLoader worker processes")


def settings_from_args(args) -> FinetuneSettings:
    targets = tuple(t.strip() for t in args.target_modules.split(",") if t.strip())
    if args.backend not in BACKEND_DEFAULTS:
        raise UserError(f"--mode finetune trains local weights; --backend {args.backend} draws on a server "
                        f"(choose {' or '.join(BACKEND_DEFAULTS)})")
    defaults = BACKEND_DEFAULTS[args.backend]
    s = FinetuneSettings(full=defaults["full"] if args.method is None else args.method == "full", rank=args.rank, alpha=args.alpha, target_modules=targets,
                         train_text_encoder=args.train_text_encoder, lr=args.lr,
                         train_decoder=defaults["train_decoder"] if args.train_decoder is None else args.train_decoder,
                         warmup_steps=args.warmup_steps, lr_schedule=args.lr_schedule,
                         batch_size=args.batch_size or defaults["batch_size"], max_steps=args.max_steps, max_minutes=args.max_minutes,
                         max_grad_norm=args.max_grad_norm, save_every=args.save_every,
                         mixed_precision=args.mixed_precision, limit_train=args.limit_train,
                         num_workers=args.num_workers, merge=args.merge, seed=args.seed,
                         backend=args.backend, guidance_scale=defaults["guidance_scale"]
                         if args.tuned_guidance_scale is None else args.tuned_guidance_scale)
    if not s.full and s.rank <= 0:
        raise UserError(f"--rank must be a positive integer, got {s.rank}")
    if s.train_decoder and args.backend != "duet":
        raise UserError("--train-decoder adapts Duet's image decoder; Stable Diffusion's VAE is not supported")
    if s.alpha < 0 or s.lr < 0 or s.guidance_scale < 0:
        raise UserError("--alpha, --lr and --tuned-guidance-scale must not be negative (0 picks the default)")
    if not s.full and not targets:
        raise UserError("--target-modules is empty; name UNet modules, e.g. to_q,to_k,to_v,to_out.0")
    for flag, value in (("--batch-size", s.batch_size), ("--max-steps", s.max_steps + 1),
                        ("--save-every", s.save_every + 1), ("--warmup-steps", s.warmup_steps + 1),
                        ("--limit-train", s.limit_train + 1), ("--num-workers", s.num_workers + 1)):
        if value < 1:
            raise UserError(f"{flag} must be {'>= 1' if flag == '--batch-size' else '>= 0'}")
    if s.max_minutes < 0 or s.max_grad_norm < 0:
        raise UserError("--max-minutes and --max-grad-norm must not be negative")
    return s


def default_base_checkpoint(out_dir: Path) -> Path:
    """The newest checkpoint under outputs/, unless that is one of our own outputs (a merged model)."""
    from models.checkpoint import find_latest_checkpoint

    found = find_latest_checkpoint("outputs")
    if out_dir.resolve() in found.resolve().parents:
        raise UserError(f"the newest checkpoint under outputs/ is a fine-tuning output ({found}); "
                        "pass the base model with --checkpoint")
    return found


def build_train_set(tunable, args, settings: FinetuneSettings):
    """The domain's training split, tokenised for the tunable's text model at its image size."""
    from configs.schema import DuetConfig
    from data.datasets import build_split
    from data.datasets import domain_folder

    cfg = DuetConfig()  # data defaults, not the base model's training data
    cfg.data.dataset, cfg.data.root, cfg.data.limit_train = args.dataset, args.data_root, settings.limit_train
    cfg.model.image_size, cfg.model.max_caption_len = tunable.image_size, tunable.max_caption_len
    cfg.train.seed, cfg.train.num_workers = settings.seed, settings.num_workers
    # The folder the other modes use too: an existing fashion set is never regenerated with other counts.
    folder = domain_folder(args.dataset, args.data_root)
    name = "fashion" if args.dataset == "fashion" else str(folder)
    # One caption per image per epoch: an epoch is then one pass over the images.
    train = build_split(cfg, name, folder, cfg.data.train_split, tunable.tokenizer, settings.limit_train, "random")
    if len(train) == 0:
        raise UserError(f"the training split of {folder} holds no readable image with a caption")
    return train


class FineTuner:
    """What fine-tuning trains (which parameters, LoRA or full) and exports (the adapter or the model); the loop runs
    on training/'s mechanisms: precision, the optimizer step, the non-finite guard, data order and resume state."""

    def __init__(self, tunable, train_set, settings: FinetuneSettings, out_dir: Path, device: torch.device,
                 dataset: str = ""):
        from tqdm import tqdm

        from models.lora import add_lora, conv_target_modules, text_target_modules
        from training.guard import NonFiniteGuard
        from training.precision import autocast_and_scaler
        from training.state import EpochSampler

        self.tunable, self.train_set, self.s, self.out_dir, self.device = tunable, train_set, settings, out_dir, device
        self.dataset = dataset
        torch.manual_seed(settings.seed)
        for module in tunable.frozen_modules():
            module.requires_grad_(False).eval()
        self.trained: dict[str, torch.nn.Module] = {"unet": tunable.unet}
        decoder = tunable.model.image_decoder if settings.train_decoder else None
        if settings.full:
            tunable.unet.requires_grad_(True)
            if settings.train_text_encoder:
                for i, module in enumerate(tunable.full_text_modules()):
                    module.requires_grad_(True)
                    self.trained[f"text{i}"] = module
            if decoder is not None:
                self.trained["decoder"] = decoder.requires_grad_(True)
        else:
            add_lora(tunable.unet, settings.rank, settings.lora_alpha, settings.target_modules)
            if settings.train_text_encoder:
                add_lora(tunable.text_encoder, settings.rank, settings.lora_alpha,
                         text_target_modules(tunable.text_encoder))
                self.trained["text"] = tunable.text_encoder
            if decoder is not None:
                add_lora(decoder, settings.rank, settings.lora_alpha, conv_target_modules(decoder))
                self.trained["decoder"] = decoder
        for module in self.trained.values():
            module.train()
        self.params = {f"{prefix}.{name}": p for prefix, module in self.trained.items()
                       for name, p in module.named_parameters() if p.requires_grad}
        self.batch_size = min(settings.batch_size, len(train_set))
        self.sampler = EpochSampler(len(train_set), self.batch_size, settings.seed)
        self.optimizer = torch.optim.AdamW(self.params.values(), lr=settings.learning_rate,
                                           weight_decay=settings.weight_decay)
        # the cosine's length: --max-steps, or planned from the measured speed under --max-minutes (None until then)
        self.planned_steps = settings.max_steps or None
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: self._lr_multiplier(step))
        self.step, self.epoch, self.batch_in_epoch, self.elapsed = 0, 0, 0, 0.0
        self.losses: list[float] = []
        self.autocast, self.scaler = autocast_and_scaler(settings.mixed_precision, device)
        self.guard = NonFiniteGuard(MAX_BAD_STEPS, lambda line: tqdm.write(line, file=sys.stderr), out_dir,
                                    f"lower --lr (now {settings.learning_rate:g}) and resume with --resume latest")

    def _lr_multiplier(self, step: int) -> float:
        from training.optim import warmup_cosine

        warmup = max(1, self.s.warmup_steps)
        if self.s.lr_schedule == "constant" or self.planned_steps is None:
            return min(1.0, (step + 1) / warmup)
        return warmup_cosine(warmup, self.planned_steps)(step)

    def _plan(self, seconds: list[float]) -> None:
        """Fixes the cosine's length so that it ends with --max-minutes, from the mean time of the steps so far."""
        s = self.s
        if s.max_steps or not s.max_minutes or s.lr_schedule == "constant":
            return
        left = s.max_minutes * 60 - self.elapsed
        self.planned_steps = self.step + max(1, int(left / mean_step_seconds(seconds)))

    @property
    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.params.values())

    def identity(self) -> dict:
        """The settings a checkpoint must share with the run that resumes it."""
        same = {k: v for k, v in asdict(self.s).items() if k not in RESUMABLE_CHANGES}
        return {**same, "target_modules": list(self.s.target_modules), "base": self.tunable.source,
                "backend": self.tunable.name, "dataset": self.dataset, "train_size": len(self.train_set)}

    # --- checkpoints -------------------------------------------------------------------------------------------
    def save(self) -> Path:
        """checkpoint-<step>/ (trainable weights, the loop's state, settings), written atomically; then `latest`."""
        from safetensors.torch import save_file

        from common.files import atomic_dir
        from models.checkpoint import TRAINER_STATE_FILE, checkpoint_name
        from training.state import commit_checkpoint, loop_state

        def write(tmp: Path) -> None:
            save_file({k: p.detach().cpu().contiguous() for k, p in self.params.items()}, tmp / TRAINABLE_FILE)
            torch.save({**loop_state(self), "elapsed": self.elapsed, "losses": self.losses,
                        "planned_steps": self.planned_steps}, tmp / TRAINER_STATE_FILE)
            (tmp / SETTINGS_FILE).write_text(json.dumps(self.identity(), indent=2))

        folder = atomic_dir(self.out_dir / checkpoint_name(self.step), write)
        commit_checkpoint(self.out_dir, folder, KEEP_CHECKPOINTS)
        return folder

    def restore(self, folder: Path) -> None:
        """Loads a checkpoint of the same settings (UserError naming the first difference otherwise)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from models.checkpoint import load_trainer_state
        from training.state import restore_loop_state

        try:
            saved = json.loads((folder / SETTINGS_FILE).read_text())
            weights = load_file(folder / TRAINABLE_FILE)
        except (OSError, json.JSONDecodeError, SafetensorError) as err:
            raise UserError(f"--resume: {folder} is not a complete fine-tuning checkpoint "
                            f"({type(err).__name__}); resume from an earlier one") from None
        state = load_trainer_state(folder)
        mine = json.loads(json.dumps(self.identity()))
        saved = {"backend": "duet", "lr_schedule": "constant", **saved}   # checkpoints from before these settings
        for key, value in mine.items():
            if saved.get(key) != value:
                raise UserError(f"--resume: {folder} was trained with {key}={saved.get(key)!r}, this run has "
                                f"{value!r}; use the same settings or start afresh in another --out")
        if set(weights) != set(self.params):
            raise UserError(f"--resume: {folder} holds other trainable weights than this run")
        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(weights[name].to(param.device))
        self.elapsed, self.losses = state["elapsed"], list(state["losses"])
        # --max-steps (which a resume may change) fixes the cosine; under --max-minutes the saved plan holds until
        # the next re-plan, which counts the time already spent
        self.planned_steps = self.s.max_steps or state.get("planned_steps")
        restore_loop_state(self, state)

    # --- training ----------------------------------------------------------------------------------------------
    def _done(self) -> bool:
        s = self.s
        return (s.max_steps and self.step >= s.max_steps) or (s.max_minutes and self.elapsed >= s.max_minutes * 60)

    def _batches(self):
        """Batches from the current data position on, epoch after epoch."""
        from training.state import epoch_loader

        while True:
            self.sampler.set_epoch(self.epoch, self.batch_in_epoch)
            self.train_set.set_epoch(self.epoch)
            # train() counts batch_in_epoch, so a checkpoint never counts a batch twice
            yield from epoch_loader(self.train_set, self.batch_size, self.sampler, self.s.seed, self.s.num_workers)
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def train(self) -> None:
        from tqdm import tqdm

        from data.collate import to_device
        from training.optim import backward, optimizer_step

        s = self.s
        bar = tqdm(total=s.max_steps or None, initial=self.step, desc="finetune", dynamic_ncols=True, file=sys.stderr)
        batches, first, seconds = self._batches(), self.step, []
        while not self._done():
            started = time.perf_counter()
            batch = next(batches)
            self.batch_in_epoch += 1
            if batch["images"].shape[0] == 0:
                continue  # every image of the batch was unreadable
            with self.autocast():
                loss = self.tunable.loss(to_device(batch, self.device), train_text=s.train_text_encoder,
                                         train_decoder=s.train_decoder)
            stepped = (backward(loss, self.optimizer, self.scaler)
                       and optimizer_step(self.optimizer, self.lr_schedule, self.params.values(), s.max_grad_norm,
                                          self.scaler))
            if not self.guard.check(stepped, self.step):
                continue
            self.step += 1
            self.losses.append(round(float(loss.detach()), 5))
            seconds.append(time.perf_counter() - started)
            self.elapsed += seconds[-1]
            if plan_due(self.step - first):
                self._plan(seconds)
            bar.update(1)
            bar.set_postfix(loss=f"{self.losses[-1]:.4f}", lr=f"{self.lr_schedule.get_last_lr()[0]:.2e}",
                            minutes=f"{self.elapsed / 60:.1f}")
            if s.save_every and self.step % s.save_every == 0 and not self._done():
                self.save()
        bar.close()
        self.save()

    # --- outputs -----------------------------------------------------------------------------------------------
    def export(self) -> dict:
        """Writes the adapter (LoRA) or the tuned model (full), and merged/ on request; returns their paths."""
        from models.lora import adapter_size, merge_lora, save_lora

        t, outputs = self.tunable, {}
        for module in self.trained.values():
            module.eval()
        if self.s.guidance_scale and t.name == "duet":   # a whole model carries its sampling defaults
            t.sample.guidance_scale = self.s.guidance_scale
        if self.s.full:
            outputs["model"] = str(t.save_model(self.out_dir / "model"))
            return outputs
        info = {"base": t.source, "backend": t.name, "rank": self.s.rank, "alpha": self.s.lora_alpha,
                "target_modules": list(self.s.target_modules), "train_text_encoder": self.s.train_text_encoder,
                "train_decoder": self.s.train_decoder, "steps": self.step, "dataset": self.dataset,
                "note": "trained on the base's EMA UNet when it has one; apply with models.lora.apply_lora"}
        path = save_lora(self.out_dir, t.unet, t.text_encoder if self.s.train_text_encoder else None, extra=info,
                         image_decoder=self.trained.get("decoder"))
        outputs["adapter"] = str(path)
        outputs["adapter_size"] = adapter_size(path, t.unet)
        if self.s.merge:
            merge_lora(t.unet)
            for name in ("text", "decoder"):
                if name in self.trained:
                    merge_lora(self.trained[name])
            outputs["merged"] = str(t.save_model(self.out_dir / "merged"))
        return outputs


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 5) if values else None


def run(args) -> dict:
    """--mode finetune: loads the base and the domain data, trains, writes <out>/finetune/; returns the report."""
    from models.checkpoint import quiet_library_progress
    from models.device import resolve_device
    from specialize.tunable import load_tunable
    from training.state import resolve_resume

    quiet_library_progress()
    settings = settings_from_args(args)
    device = resolve_device(getattr(args, "device", "auto"))
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    out_dir = Path(args.out) / OUT_SUBDIRS["finetune"]
    resume_dir = resolve_resume(args.resume, out_dir) if getattr(args, "resume", None) else None
    if args.backend == "duet" and not args.checkpoint:
        args.checkpoint = str(default_base_checkpoint(out_dir))
    tunable = load_tunable(args, device)
    train_set = build_train_set(tunable, args, settings)
    load_before = os.getloadavg()
    tuner = FineTuner(tunable, train_set, settings, out_dir, device, dataset=args.dataset)
    out_dir.mkdir(parents=True, exist_ok=True)
    if resume_dir is not None:
        tuner.restore(resume_dir)
    start_step = tuner.step
    print(f"finetune: {'full' if settings.full else f'LoRA rank {settings.rank}'} on {tunable.name} base "
          f"{tunable.source}, {tuner.trainable_params:,} trainable parameters, {len(train_set)} images, "
          f"batch {tuner.batch_size}, lr {settings.learning_rate:g}, device {device}"
          + (f", resuming at step {start_step}" if resume_dir else ""), file=sys.stderr)
    tuner.train()
    outputs = tuner.export()
    tenth = max(1, len(tuner.losses) // 10)
    report = {
        "backend": tunable.name, "base": tunable.source, "dataset": args.dataset,
        "method": "full" if settings.full else "lora", "settings": {**asdict(settings),
                                                                    "learning_rate": settings.learning_rate,
                                                                    "lora_alpha": settings.lora_alpha},
        "trainable_params": tuner.trainable_params, "train_images": len(train_set), "batch_size": tuner.batch_size,
        "steps": tuner.step, "resumed_from_step": start_step if resume_dir else None,
        "images_seen": tuner.step * tuner.batch_size,
        "epochs": round(tuner.step * tuner.batch_size / len(train_set), 3),
        "train_minutes": round(tuner.elapsed / 60, 3),
        "seconds_per_step": round(tuner.elapsed / tuner.step, 4) if tuner.step else None,
        "loss_first_10pct": _mean(tuner.losses[:tenth]), "loss_last_10pct": _mean(tuner.losses[-tenth:]),
        "device": str(device), "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "outputs": outputs,
    }
    from specialize.prompt_report import write_json

    write_json(out_dir / REPORT_FILE, report)
    size = outputs.get("adapter_size")
    print(f"finetune: {tuner.step} steps in {report['train_minutes']} min, loss {report['loss_first_10pct']} -> "
          f"{report['loss_last_10pct']}" + (f", adapter {size['adapter_bytes'] / 1e6:.2f} MB = "
                                              f"{100 * size['ratio']:.2f}% of the UNet" if size else "")
          + f"; outputs in {out_dir}", file=sys.stderr)
    return report
