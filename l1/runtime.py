"""Where and how the model runs: device, mixed precision, compilation, distributed set-up.

The only module that imports torch.distributed. The model stays a pure nn.Module; everything
about devices and wrappers lives here.
"""

from __future__ import annotations

import contextlib
import sys
import time

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


def use_amp(device: torch.device, requested: bool | None) -> bool:
    """Mixed precision unless turned off; on CPU only where oneDNN has native bf16 kernels.

    Without them (e.g. AVX2-only CPUs) bf16 matmuls run several times slower than fp32.
    """
    if requested is not None:
        return requested
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return True


def needs_grad_scaler(device: torch.device, amp: bool) -> bool:
    """fp16 gradients underflow without loss scaling; bf16 and fp32 do not need it."""
    return amp and amp_dtype(device) == torch.float16


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, seconds: float = 0.3) -> float:
    """Measured FLOP/s of a large square matmul on this device: the roofline MFU is quoted against."""
    n = 2048 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):  # warm up kernels and clocks
        a @ b
    synchronize(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(4):
            a @ b
        synchronize(device)
        count += 4
    return 2 * n ** 3 * count / (time.perf_counter() - start)


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels (timing needs it; the training loop itself avoids it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def memory_in_use(device: torch.device) -> float:
    """Peak bytes: CUDA allocator peak on GPU, peak resident set size of the process elsewhere."""
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    if sys.platform.startswith("linux"):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0  # Linux reports KiB
    return float("nan")


def compile_model(model: torch.nn.Module, log) -> "CompiledOrEager":
    """torch.compile the model; if compilation fails, say so once and run eagerly."""
    return CompiledOrEager(model, log)


class CompiledOrEager:
    """Calls the compiled model until compilation fails, then the eager one, after one log line."""

    def __init__(self, model: torch.nn.Module, log):
        self.model = model
        self.compiled = torch.compile(model) if torch.compiler.is_dynamo_supported() else None
        self.log = log
        if self.compiled is None:
            log("torch.compile is not supported on this platform; running eagerly")

    def __call__(self, *args, **kwargs):
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except torch._dynamo.exc.TorchDynamoException as exc:
                first_line = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
                self.log(f"torch.compile failed ({type(exc).__name__}: {first_line}); continuing eagerly")
                self.compiled = None
        return self.model(*args, **kwargs)
