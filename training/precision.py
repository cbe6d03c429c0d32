"""Mixed precision for every training loop here: autocast on CUDA only, parameters and optimizer state in fp32."""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import torch


def autocast_and_scaler(mode: str, device: torch.device) -> tuple[Callable[[], ContextManager], object]:
    """(a context factory to run forward passes in, a GradScaler or None). mode: auto | bf16 (bf16 autocast),
    fp16 (with a loss scaler), no (fp32). CPU always runs fp32: on these CPUs low-precision matmul is far slower."""
    if device.type != "cuda" or mode == "no":
        return contextlib.nullcontext, None
    dtype = torch.float16 if mode == "fp16" else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return (lambda: torch.autocast("cuda", dtype=dtype)), scaler
