"""Where and how the model runs: device, mixed precision, compilation, distributed set-up.

The only module that imports torch.distributed. The model stays a pure nn.Module; everything
about devices and wrappers lives here.
"""

from __future__ import annotations

import contextlib

import torch

from l1.errors import L1Error


def pick_device(spec: str = "auto") -> torch.device:
    """'auto' picks cuda, then mps, then cpu; an explicit device must exist."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise L1Error(f"unknown device {spec!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise L1Error(f"--device {spec}: CUDA is not available here (torch {torch.__version__}); use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise L1Error(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise L1Error(f"--device {spec}: MPS is not available here; use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise L1Error(f"unsupported device {spec!r}; use auto, cpu, cuda, cuda:N or mps")
    return device


def amp_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the device computes it natively, else fp16 (which then needs loss scaling)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.bfloat16


def autocast(device: torch.device, enabled: bool):
    """The autocast context for this device, or a no-op when mixed precision is off."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype(device))
