"""AdamW with decay only on weight matrices, linear warmup then cosine decay, and the step every loop here takes:
backward, clip, optimizer and schedule, skipped when the loss or the gradients are not finite."""
from __future__ import annotations

import math

import torch
import torch.nn as nn


def build_optimizer(model: nn.Module, learning_rate: float, weight_decay: float,
                    prefix_rates: dict[str, float] | None = None) -> torch.optim.AdamW:
    """AdamW over the trainable parameters. Biases, norms, embeddings and the temperature get no weight decay (as
    in CLIP and nanoGPT); prefix_rates gives the parameters under a name prefix their own learning rate."""
    groups: dict[tuple[float, float], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        rate = next((r for prefix, r in (prefix_rates or {}).items() if name.startswith(prefix)), learning_rate)
        decay = weight_decay if param.ndim >= 2 and "embed" not in name.split(".")[-1] else 0.0
        groups.setdefault((rate, decay), []).append(param)
    return torch.optim.AdamW([{"params": params, "lr": rate, "weight_decay": decay}
                              for (rate, decay), params in groups.items()],
                             lr=learning_rate, betas=(0.9, 0.98), eps=1e-6)


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float = 0.05):
    """LambdaLR multiplier: linear from ~0 to 1 over warmup_steps, then cosine down to min_ratio at total_steps."""
    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return multiplier


# Under a time budget, a cosine's length is (re)fixed from the measured speed after these steps, then every
# REPLAN_EVERY: the first steps run slow (allocator, caches), and a machine that gets busier mid-run would otherwise
# cut the cosine short at the deadline.
PLAN_AT = (10, 60, 300)
REPLAN_EVERY = 300


def plan_due(steps_done: int) -> bool:
    return steps_done in PLAN_AT or (steps_done > PLAN_AT[-1] and steps_done % REPLAN_EVERY == 0)


def mean_step_seconds(seconds: list[float]) -> float:
    """The mean time of the steps measured so far, leaving out the first PLAN_AT[0] (allocator, caches: slow)."""
    timed = seconds[PLAN_AT[0]:] or seconds
    return sum(timed) / len(timed)


def backward(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler=None) -> bool:
    """loss.backward() (scaled by an fp16 GradScaler); False, with the gradients cleared, when loss is not finite."""
    if not torch.isfinite(loss):
        optimizer.zero_grad(set_to_none=True)
        return False
    (scaler.scale(loss) if scaler else loss).backward()
    return True


def optimizer_step(optimizer: torch.optim.Optimizer, lr_schedule, params, max_grad_norm: float,
                   scaler=None) -> bool:
    """After backward(): clips the gradients of params to max_grad_norm (0: no clipping) and steps the optimizer and
    the LR schedule; False, with nothing stepped, when the gradients are not finite. Gradients end cleared."""
    if scaler:
        scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm or math.inf)
    if not torch.isfinite(grad_norm):
        if scaler:
            scaler.update()   # lowers the scale after an overflow; skipping it would overflow again every step
        optimizer.zero_grad(set_to_none=True)
        return False
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    lr_schedule.step()
    return True
