"""Which torch device a flag names; shared by the scripts and the packages under them."""
from __future__ import annotations

import torch

from configs.errors import UserError


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None or 'auto': CUDA when present, else CPU. Asking for CUDA without a GPU is a UserError."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device '{device}'; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device '{device}' was asked for but CUDA is not available here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"device '{device}' does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    elif device.type != "cpu":
        raise UserError(f"device '{device}' is not supported; use cpu or cuda")
    return device
