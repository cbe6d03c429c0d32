"""What makes a run resumable: the epoch sampler, RNG state, the `latest` pointer and checkpoint rotation."""
from __future__ import annotations

import random
import shutil
from pathlib import Path

import torch
from torch.utils.data import Sampler

from common.files import atomic_write_text
from configs.errors import UserError
from models.checkpoint import CHECKPOINT_PREFIX, LATEST_FILE


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
