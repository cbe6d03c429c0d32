"""Where a run lives and what makes it resumable: its folder, the epoch sampler and its loader, the config a resume
must share, the RNG, the `latest` pointer and checkpoint rotation."""
from __future__ import annotations

import random
import shutil
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Sampler

from common.files import atomic_write_text
from configs.errors import UserError
from configs.loading import config_to_dict
from data.collate import collate_captions
from models.checkpoint import CHECKPOINT_PREFIX, CONFIG_FILE, LATEST_FILE


class EpochSampler(Sampler[int]):
    """A seeded permutation per epoch, sharded across ranks, that can start part-way through (resume).

    Unlike DistributedSampler it skips the batches already trained without loading them."""

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch = size // (batch_size * world_size)
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size

    def __iter__(self):
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        used = order[: self.batches_per_epoch * self.batch_size * self.world_size]
        mine = used.view(self.batches_per_epoch, self.world_size, self.batch_size)[:, self.rank]  # (batches, B)
        return iter(mine[self.start_batch:].flatten().tolist())


def epoch_loader(dataset, batch_size: int, sampler: EpochSampler | None, seed: int, num_workers: int = 0,
                 pin_memory: bool = False) -> DataLoader:
    """Caption batches (collate_captions) in the sampler's order; without a sampler, the dataset's order in full."""
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      collate_fn=collate_captions, drop_last=sampler is not None, pin_memory=pin_memory,
                      # its own generator: making an iterator must not consume the global RNG (resume)
                      generator=torch.Generator().manual_seed(seed))


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def loop_state(loop) -> dict:
    """What a loop (anything with step, epoch, batch_in_epoch, optimizer and lr_schedule) needs to resume, besides
    its weights; saved as the checkpoint's trainer state."""
    return {"step": loop.step, "epoch": loop.epoch, "batch_in_epoch": loop.batch_in_epoch,
            "optimizer": loop.optimizer.state_dict(), "lr_schedule": loop.lr_schedule.state_dict(), "rng": rng_state()}


def restore_loop_state(loop, state: dict) -> None:
    """loop_state's inverse. The RNG is restored last: call it after anything that draws random numbers (building
    modules does)."""
    loop.optimizer.load_state_dict(state["optimizer"])
    loop.lr_schedule.load_state_dict(state["lr_schedule"])
    loop.step, loop.epoch, loop.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
    restore_rng_state(state["rng"])


# Train-section keys a resumed run may change; everything else must match the checkpoint's config.
RESUMABLE_CHANGES = {"epochs", "max_steps", "max_minutes", "num_workers", "log_every_steps", "val_every_steps",
                     "val_batches", "save_every_steps", "keep_checkpoints", "out_dir", "run_name", "overwrite",
                     "feature_store", "report_to", "device"}


def check_resume_config(saved: DuetConfig, cfg: DuetConfig) -> None:
    """A resumed run must train what its checkpoint trained: only RESUMABLE_CHANGES may differ."""
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


def make_run_dir(cfg, dataset_name: str, is_main: bool, resume: str | None) -> Path:
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
    if is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            probe = run_dir / ".write_test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            raise UserError(f"cannot write to output folder {run_dir}: {err.strerror}; "
                            "choose another with --set train.out_dir=PATH") from None
    return run_dir


def commit_checkpoint(run_dir: Path, checkpoint: Path, keep: int) -> None:
    """A periodic checkpoint, complete on disk, becomes `latest`; the oldest beyond `keep` go."""
    write_latest(run_dir, checkpoint)
    rotate_checkpoints(run_dir, keep)


def write_latest(run_dir: Path, checkpoint: Path) -> None:
    atomic_write_text(run_dir / LATEST_FILE, checkpoint.name + "\n")


def resolve_resume(resume: str, run_dir: Path) -> Path:
    """`latest` reads the run's pointer file (never guesses); anything else is a checkpoint folder."""
    if resume == "latest":
        pointer = run_dir / LATEST_FILE
        if not pointer.is_file():
            raise UserError(f"--resume latest: {pointer} does not exist; no checkpoint of this run was written yet")
        folder = run_dir / pointer.read_text().strip()
    else:
        folder = Path(resume)
    if not folder.is_dir():
        raise UserError(f"--resume: checkpoint folder {folder} does not exist")
    return folder


def rotate_checkpoints(run_dir: Path, keep: int) -> None:
    """Deletes the oldest periodic checkpoints beyond `keep` (best_model is never touched)."""
    periodic = sorted(p for p in run_dir.glob(CHECKPOINT_PREFIX + "*") if p.is_dir() and p.name[len(CHECKPOINT_PREFIX):].isdigit())
    for old in periodic[: max(0, len(periodic) - keep)]:
        shutil.rmtree(old, ignore_errors=True)
