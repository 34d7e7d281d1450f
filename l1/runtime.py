"""Where and how the model runs: device, mixed precision, compilation, distributed set-up.

The only module that imports torch.distributed. The model stays a pure nn.Module; everything
about devices and wrappers lives here.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

from l1.errors import L1Error


# The oldest torch with every API L1 uses: torch.optim.Muon (2.9), public fully_shard and
# MixedPrecisionPolicy (2.6), is_bf16_supported(including_emulation=...) (2.4).
MIN_TORCH = "2.9"


def check_torch_version(version: str = torch.__version__) -> None:
    """Refuse, in one line, a torch older than L1 needs (pip would not stop an old install)."""
    if torch.torch_version.TorchVersion(version) < MIN_TORCH:
        raise L1Error(f"L1 needs torch >= {MIN_TORCH}, found {version}: pip install -U torch "
                      "(on a CPU-only machine: pip install -U torch --index-url https://download.pytorch.org/whl/cpu)")


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


def native_bf16(device: torch.device) -> bool:
    """Whether the device computes bf16 in hardware. torch.cuda.is_bf16_supported() also counts
    emulated bf16 (T4, V100, RTX 20xx), which runs slower than fp16, so only native support counts."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


@dataclass(frozen=True)
class Precision:
    """The one decision about dtypes in a run: what the matmuls compute in, whether autocast is on,
    and whether fp16 gradients need loss scaling. Built once from the device (see precision())."""

    device_type: str
    compute_dtype: torch.dtype  # float32 when mixed precision is off

    @property
    def amp(self) -> bool:
        """Mixed precision: autocast to compute_dtype; weights and optimizer state stay fp32."""
        return self.compute_dtype != torch.float32

    @property
    def needs_grad_scaler(self) -> bool:
        """fp16 gradients underflow without loss scaling; bf16 and fp32 do not need it."""
        return self.compute_dtype == torch.float16

    @property
    def name(self) -> str:
        """fp32, bf16 or fp16, as the log and the benches print it."""
        return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.compute_dtype]

    def autocast(self):
        """The autocast context of this precision, a no-op in fp32."""
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.compute_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A GradScaler that scales only where needs_grad_scaler (a disabled one passes through)."""
        return torch.amp.GradScaler(self.device_type, enabled=self.needs_grad_scaler)


def precision(device: torch.device, amp: bool | None = None) -> Precision:
    """Mixed precision unless turned off (amp=False): bf16 where the device has it natively, else
    fp16 with loss scaling on GPUs. On a CPU without native bf16 (AVX2-only) the default is fp32,
    since emulated bf16 matmuls run several times slower there; amp=True forces bf16."""
    if amp is None:
        amp = device.type != "cpu" or native_bf16(device)
    if not amp:
        return Precision(device.type, torch.float32)
    if device.type == "cpu":
        return Precision("cpu", torch.bfloat16)
    return Precision(device.type, torch.bfloat16 if native_bf16(device) else torch.float16)


def newton_schulz_dtype(device: torch.device) -> torch.dtype:
    """The dtype of Muon's Newton-Schulz iterations: bf16 where the device computes it natively,
    fp32 elsewhere (an AVX2-only CPU emulates bf16 matmuls several times slower than fp32)."""
    return torch.bfloat16 if native_bf16(device) else torch.float32


def largest_batch(fits, limit: int = 1024) -> int:
    """The largest batch size b <= limit with fits(b) true, assuming fits is monotone (0 if none)."""
    good, bad = 0, limit + 1
    b = 1
    while b <= limit and fits(b):  # double until it no longer fits
        good, b = b, b * 2
    bad = min(bad, b)
    while bad - good > 1:  # then bisect between the last fit and the first miss
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good


def cuda_batch_fits(step, device: torch.device, reserve_bytes: float, headroom: float = 0.9):
    """fits(b) for largest_batch: run step(b) (a forward and backward) and compare its peak memory,
    plus what is reserved for the optimizer state, with the memory free on the GPU now (a card
    that also drives a display has 1-2 GB less than its total). A probe that runs out of memory
    counts as a miss; step must leave no gradients behind, even when it fails."""
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    budget = headroom * (free + torch.cuda.memory_allocated(device))  # what is ours already counts in the peak

    def fits(batch: int) -> bool:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            step(batch)
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            torch.cuda.empty_cache()
        return torch.cuda.max_memory_allocated(device) + reserve_bytes <= budget

    return fits


def probe_step(model: torch.nn.Module, precision: Precision, vocab_size: int, context: int,
               device: torch.device) -> Callable[[int], None]:
    """step(b) for cuda_batch_fits: a forward and backward of b random sequences. It never leaves
    gradients behind, even when it fails half-way (an out-of-memory backward leaves partial ones)."""

    def step(batch: int) -> None:
        try:
            x = torch.randint(0, vocab_size, (batch, context), device=device)
            with precision.autocast():
                model(x, x).backward()
        finally:
            model.zero_grad(set_to_none=True)

    return step


def split_batch(batch_size: int, grad_accum: int, world_size: int) -> tuple[int, int]:
    """(micro-batch, micro-steps) of each process, so that world_size processes together consume
    exactly batch_size x grad_accum sequences per optimizer step, in the fewest micro-steps whose
    micro-batch is at most batch_size (the size known to fit in memory)."""
    total = batch_size * grad_accum
    if total % world_size:
        raise L1Error(f"--batch_size {batch_size} x --grad_accum {grad_accum} = {total} sequences per step "
                      f"cannot be shared evenly by {world_size} processes; make it a multiple of {world_size}")
    per_rank = total // world_size
    accum = next(a for a in range(-(-per_rank // batch_size), per_rank + 1) if per_rank % a == 0)
    return per_rank // accum, accum


def fit_global_batch(largest_micro: int, sequences_per_step: int) -> tuple[int, int]:
    """(batch_size, grad_accum) for --batch_size auto: the largest micro-batch no bigger than what
    fits that divides the wanted sequences per optimizer step, so the global batch stays the
    preset's whatever fits (and whatever the world size: see split_batch)."""
    batch = max(b for b in range(1, min(largest_micro, sequences_per_step) + 1) if sequences_per_step % b == 0)
    return batch, sequences_per_step // batch


@functools.cache
def matmul_peak_flops(device: torch.device, dtype: torch.dtype, seconds: float = 0.3, windows: int = 6) -> float:
    """Measured FLOP/s of a large square matmul on this device: the roofline MFU is quoted against.

    The best of several short windows: a neighbour that takes the cores for a moment (a shared
    machine, another job starting) slows some windows, not the machine's peak. Measured once per
    process and device and dtype: every run a process trains (bench.recipe's dozens, the tests')
    quotes the same roofline and does not pay 0.4 s to re-measure it.
    """
    n = 2048 if device.type == "cuda" else 1024
    # Its own generator: a start-up measurement must not advance the global RNG a resume restored.
    generator = torch.Generator(device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    a @ b  # warm up kernels and clocks
    synchronize(device)
    start = time.perf_counter()
    a @ b
    synchronize(device)
    once = time.perf_counter() - start
    if 4 * once > seconds / windows:  # too slow to time in windows (emulated fp16 on a CPU): once will do
        return 2 * n ** 3 / once
    best = 0.0
    for _ in range(windows):
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / windows:
            for _ in range(4):
                a @ b
            synchronize(device)
            count += 4
        best = max(best, 2 * n ** 3 * count / (time.perf_counter() - start))
    return best


def rng_state(device: torch.device) -> dict:
    """The random generators a resume must restore: the CPU's, and this process's own GPU's (not
    every visible GPU's, so a run resumes on a machine with fewer GPUs)."""
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore rng_state(); a GPU state is restored only on a GPU."""
    torch.set_rng_state(state["cpu"])
    cuda = state.get("cuda")
    if isinstance(cuda, list):  # checkpoints before this change held every visible GPU's state
        cuda = cuda[0] if cuda else None
    if device.type == "cuda" and cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels (timing needs it; the training loop itself avoids it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def memory_in_use(device: torch.device) -> float:
    """Peak bytes since the last call on GPU (the CUDA allocator's, then reset, so each log line
    shows its own window); the process's peak resident set size elsewhere."""
    if device.type == "cuda":
        peak = float(torch.cuda.max_memory_allocated(device))
        torch.cuda.reset_peak_memory_stats(device)
        return peak
    if sys.platform.startswith("linux"):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0  # Linux reports KiB
    return float("nan")


# torch.compile on a CPU costs tens of seconds (the training and the evaluation graphs) and then
# makes a step 10-15% faster (BENCHMARKS.md): it pays for runs longer than this.
CPU_COMPILE_PAYS_AFTER_S = 600.0


def cpp_compiler() -> str | None:
    """The C++ compiler inductor would use for CPU kernels, or None where there is none."""
    candidates = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
    return next((path for path in map(shutil.which, candidates) if path), None)


def use_compile(device: torch.device, requested: bool | None, expected_seconds: float) -> bool:
    """torch.compile unless turned off: always on CUDA; on CPU where a C++ compiler exists and the
    run is expected to last longer than CPU_COMPILE_PAYS_AFTER_S; never on MPS."""
    if requested is not None:
        return requested
    if device.type == "cuda":
        return True
    return device.type == "cpu" and expected_seconds > CPU_COMPILE_PAYS_AFTER_S and cpp_compiler() is not None


# ---- distributed (torchrun) -----------------------------------------------------------------------

@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun job; a single process is rank 0 of 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


@dataclass(frozen=True)
class Runtime:
    """Where and how this process computes: its place in a torchrun job, its device, its precision."""

    dist: Distributed
    device: torch.device
    precision: Precision


# Non-main ranks wait at this barrier while the main rank downloads, trains the tokenizer and
# tokenizes: hours for a large corpus, far past NCCL's 10-minute default.
PREPARATION_TIMEOUT = datetime.timedelta(hours=24)


def setup(device_spec: str = "auto", amp: bool | None = None, deterministic: bool = False) -> Runtime:
    """The one place a process picks its device and precision: joins the torchrun job if launched
    by one (nccl on CUDA, gloo on CPU, this rank's own GPU), else runs as rank 0 of 1.

    fp32 matmuls on CUDA use TF32 (as every peer does; bf16 autocast is unaffected).
    deterministic=True makes CUDA runs repeatable bit for bit: deterministic algorithms, the
    cuBLAS workspace setting, and no cuDNN autotuning (CPU runs are deterministic already).
    """
    check_torch_version()
    device = pick_device(device_spec)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before the first cuBLAS call
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Runtime(Distributed(), device, precision(device, amp))
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device
                                if device.type == "cuda" else None)
    global _preparation_group
    _preparation_group = dist.new_group(backend="gloo", timeout=PREPARATION_TIMEOUT)
    return Runtime(Distributed(rank, world_size, local_rank), device, precision(device, amp))


_preparation_group = None  # a gloo group with a long timeout, for the wait on data preparation


def preparation_outcome(ctx: Distributed, failure: str | None = None) -> None:
    """The main rank's data preparation has ended: the main rank sends its outcome (failure: the
    error's message, None when it succeeded), the others wait for it as long as preparation takes
    (PREPARATION_TIMEOUT) and raise the main rank's L1Error, so that a bad --data or a missing
    network ends every rank with the one error line instead of a lost-connection traceback from
    each of the others. A no-op in one process."""
    if not ctx.enabled:
        return
    import torch.distributed as dist

    outcome = [failure]
    dist.broadcast_object_list(outcome, src=0, group=_preparation_group)
    if outcome[0] is not None and not ctx.is_main:
        raise L1Error(outcome[0])


def shutdown_distributed(ctx: Distributed) -> None:
    """Leave the process group cleanly at the end of a run."""
    if ctx.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def apply_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each block in the backward pass instead of keeping its activations.

    Each block is wrapped in place (torch's checkpoint_wrapper, non-reentrant); the wrapper's
    state-dict hooks keep the parameter names, so checkpoints are unaffected.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    for i, block in enumerate(model.blocks):
        model.blocks[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)


def parallelize(model: torch.nn.Module, rt: "Runtime", *, grad_ckpt: bool, compile: bool, fsdp: bool,
                log) -> tuple[torch.nn.Module, Callable]:
    """Wrap the pure model for training, in torchtitan's order: activation checkpointing per block,
    then torch.compile, then DDP or FSDP2 (fully_shard per block, then the root) under torchrun.

    Returns the outermost module (what gradient_sync and clip_grad_norm take) and the callable a
    training step runs: the same module, behind an eager fallback when compiled. The model itself
    is compiled in place (nn.Module.compile), so its parameter names never change.
    """
    if grad_ckpt:
        apply_activation_checkpointing(model)
    compiled = compile and torch._dynamo.is_dynamo_supported()
    if compile and not compiled:
        log("torch.compile is not supported on this platform; running eagerly")
    if compiled:
        model.compile()
    outer = model
    if rt.dist.enabled and fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # Under mixed precision, gather parameters in the compute dtype (half the traffic of fp32)
        # and reduce gradients in fp32, as torchtitan does; the sharded master weights stay fp32.
        policy = MixedPrecisionPolicy(param_dtype=rt.precision.compute_dtype, reduce_dtype=torch.float32) \
            if rt.precision.amp else MixedPrecisionPolicy()
        for block in model.blocks:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)  # the root: the embedding, the head (tied or not), the final norm
    elif rt.dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        # Gradients as views into the all-reduce buckets: no copy in and out of them each step.
        outer = DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None,
                                        gradient_as_bucket_view=True)
    if not compiled:
        return outer, outer

    def eager(*args, **kwargs):
        model._compiled_call_impl = None  # undo nn.Module.compile(): run the plain forward from now on
        return outer(*args, **kwargs)

    return outer, CompiledOrEager(outer, eager, log)


class CompiledOrEager:
    """Calls `compiled` until compilation fails, then `eager` from then on, after one log line."""

    def __init__(self, compiled: Callable, eager: Callable, log):
        self.compiled, self.eager, self.log = compiled, eager, log

    def __call__(self, *args, **kwargs):
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except torch._dynamo.exc.TorchDynamoException as exc:
                first_line = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
                self.log(f"torch.compile failed ({type(exc).__name__}: {first_line}); continuing eagerly")
                self.compiled = None
        return self.eager(*args, **kwargs)


def compile_function(fn: Callable, log, **options) -> Callable:
    """torch.compile a function (options: torch.compile's, e.g. mode="reduce-overhead" for CUDA
    graphs) behind an eager fallback; fn itself, after one log line, where dynamo is unsupported."""
    if not torch._dynamo.is_dynamo_supported():
        log("torch.compile is not supported on this platform; running eagerly")
        return fn
    return CompiledOrEager(torch.compile(fn, **options), fn, log)


def gradient_sync(model: torch.nn.Module, enabled: bool):
    """Skip the gradient all-reduce on accumulation micro-steps (DDP no_sync / FSDP2 flag)."""
    if hasattr(model, "no_sync"):
        return contextlib.nullcontext() if enabled else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def barrier(ctx: Distributed) -> None:
    """Wait for every rank; a no-op in one process."""
    if ctx.enabled:
        import torch.distributed as dist

        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, ctx: Distributed) -> torch.Tensor:
    """Sum a tensor over ranks (in place); a no-op in one process."""
    if ctx.enabled:
        import torch.distributed as dist

        dist.all_reduce(tensor)
    return tensor


def all_reduce_min(tensor: torch.Tensor, ctx: Distributed) -> torch.Tensor:
    """The minimum of a tensor over ranks (in place); a no-op in one process."""
    if ctx.enabled:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm; with FSDP2 the norm is a sharded DTensor made whole here."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def _state_options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def model_state(model: torch.nn.Module) -> dict:
    """Full, unwrapped model weights by parameter name (collective under FSDP: call on every rank)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_state_options(cpu_offload=True))


def optimizer_state(model: torch.nn.Module, optimizers: list[torch.optim.Optimizer]) -> dict:
    """Full optimizer state keyed by parameter name, so any world size or wrapper can resume it."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizers, options=_state_options(cpu_offload=True))


def load_states(model: torch.nn.Module, optimizers: list[torch.optim.Optimizer], model_sd: dict,
                optim_sd: dict | None) -> None:
    """Restore full model and optimizer states into a (possibly wrapped or sharded) model; with
    optim_sd None, the weights only (the optimizers keep their fresh state)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(model, model_sd, options=_state_options())
    if optim_sd is not None:
        set_optimizer_state_dict(model, optimizers, optim_sd, options=_state_options())
