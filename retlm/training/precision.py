"""Device and numeric precision: mixed precision only where the device has it."""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch

from retlm.errors import OptionError, short_repr
from retlm.training.options import PRECISIONS


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise OptionError(f"unknown device {short_repr(device)}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OptionError("device 'cuda' was asked for but no CUDA device is available; use 'cpu'")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise OptionError(f"device {device} does not exist: this machine has {count} GPU(s)")
    if device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise OptionError(f"unsupported device {short_repr(str(device))}; use cpu, cuda or cuda:N")
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> bf16 on a CUDA device that supports it, fp16 on other CUDA devices, fp32 on CPU.

    bf16 is also accepted on CPU (torch autocasts matmuls there); fp16 needs CUDA.
    """
    if precision not in PRECISIONS:
        raise OptionError(f"unknown precision {short_repr(precision)}; choose one of {', '.join(PRECISIONS)}")
    cuda = device.type == "cuda"
    if precision == "auto":
        if not cuda:
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp16" and not cuda:
        raise OptionError("precision fp16 needs a CUDA device; on CPU use bf16 or fp32")
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise OptionError("this CUDA device has no bf16 support; use fp16 or fp32")
    return precision


def autocast_for(precision: str, device: torch.device) -> AbstractContextManager | None:
    """An autocast context for ``precision``, or None for full precision."""
    if precision == "fp32":
        return None
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
