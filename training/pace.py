"""How fast a run goes: the seconds per step that each log row reports, and the notice a config sized for a GPU
gives when it finds only a CPU (instead of a progress bar that stays empty for minutes)."""
from __future__ import annotations

import time

import torch

# Trainable parameters above which a config counts as sized for a GPU: the embedded preset trains about 5M (BERT
# frozen), the coco preset about 90M (BERT, a 42M-parameter UNet, 256 px), whose first step at batch 64 takes
# minutes on 2 CPU cores.
GPU_SIZED_PARAMETERS = 20_000_000


class StepClock:
    """Wall seconds from the end of one step (or of a validation or checkpoint) to the end of the next: data
    loading and the step, without the bookkeeping between steps. `take()` gives the mean since the last call."""

    def __init__(self):
        self.last, self.total, self.count = time.time(), 0.0, 0

    def restart(self) -> None:
        """After work that is not a step (validation, sample sheet, checkpoint)."""
        self.last = time.time()

    def tick(self) -> float:
        now = time.time()
        seconds, self.last = now - self.last, now
        self.total, self.count = self.total + seconds, self.count + 1
        return seconds

    def take(self) -> float | None:
        mean = self.total / self.count if self.count else None
        self.total, self.count = 0.0, 0
        return mean


def peak_memory_gib(device: torch.device) -> float | None:
    """The most CUDA memory tensors held so far in this process (None on the CPU)."""
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def gpu_sized_on_cpu(model: torch.nn.Module, device: torch.device) -> str | None:
    """The notice for a run start: what makes this config a GPU's, or None when it fits where it runs."""
    if device.type != "cpu":
        return None
    count = trainable_parameters(model)
    if count < GPU_SIZED_PARAMETERS:
        return None
    side = model.config.model.image_size
    return (f"this config trains {count / 1e6:.0f}M parameters at {side} px: it is sized for a GPU, and this run "
            f"found only the CPU. Timing the first step...")


def first_step_note(seconds: float, steps_left: int, deadline_minutes: float) -> str:
    """What the first step's time means for the run: how long the rest would take on this CPU."""
    hours = seconds * steps_left / 3600
    note = (f"first step: {seconds:.0f} s on the CPU; the {steps_left} steps left would take about {hours:.1f} hours "
            f"here")
    if deadline_minutes:
        note += f" (train.max_minutes={deadline_minutes:g} stops it with a checkpoint)"
    return note + ". Train on a GPU, or use --config embedded for a model sized for a CPU"
