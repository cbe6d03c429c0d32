"""Where a run's scalars and sample sheets go besides metrics.jsonl (train.report_to, `--report-to` as in diffusers'
and open_clip's scripts): TensorBoard (`<run>/tensorboard/`), Weights & Biases (offline under `<run>/wandb/` unless
WANDB_MODE says otherwise: this project never needs the network), or none."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
from PIL import Image

from configs.errors import UserError

TRACKERS = ("none", "tensorboard", "wandb")


class Tracker:
    """Scalars of a metrics row and images by name, at a step."""

    def scalars(self, row: dict, step: int) -> None:
        pass

    def image(self, name: str, path: Path, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoard(Tracker):
    def __init__(self, folder: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder))

    def scalars(self, row: dict, step: int) -> None:
        for key, value in row.items():
            self.writer.add_scalar(key, value, step)

    def image(self, name: str, path: Path, step: int) -> None:
        with Image.open(path) as picture:
            self.writer.add_image(name, np.asarray(picture.convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class WandB(Tracker):
    def __init__(self, run_dir: Path, config: dict):
        import wandb

        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_SILENT", "true")
        # One wandb run per Duet run: a resumed run continues it (its id is the folder's name).
        digest = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:8]
        self.run = wandb.init(project="duet", dir=str(run_dir), name=run_dir.name, config=config,
                              id=f"{run_dir.name}-{digest}", resume="allow")
        self.wandb = wandb

    def scalars(self, row: dict, step: int) -> None:
        self.run.log(row, step=step)

    def image(self, name: str, path: Path, step: int) -> None:
        self.run.log({name: self.wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        self.run.finish()


def build_tracker(name: str, run_dir: Path, config: dict) -> Tracker:
    if name == "tensorboard":
        return TensorBoard(run_dir / "tensorboard")
    if name == "wandb":
        try:
            return WandB(run_dir, config)
        except ImportError:
            raise UserError("--report-to wandb needs the wandb package: pip install wandb") from None
    return Tracker()


def numbers(row: dict) -> dict:
    """A metrics row's scalars, without the step and epoch counters."""
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and k not in ("step", "epoch")}
