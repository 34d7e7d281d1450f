"""Where and how the model runs: device, mixed precision, compilation, distributed set-up.

The only module that imports torch.distributed. The model stays a pure nn.Module; everything
about devices and wrappers lives here.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
import re
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
    """Whether the device computes bf16 in hardware: compute capability 8.0 (Ampere) or newer on
    CUDA. Asked of this device itself (torch.cuda.is_bf16_supported() asks the current device,
    GPU 0 for --device cuda:1 without torchrun); emulated bf16 (T4, V100, RTX 20xx) runs slower
    than fp16, so only native support counts."""
    if device.type == "cuda":
        return bool(torch.version.hip) or torch.cuda.get_device_capability(device) >= (8, 0)
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


def memory_cap(device: torch.device) -> float:
    """Bytes this process may take on the GPU: its per-process memory fraction
    (torch.cuda.set_per_process_memory_fraction) of the card's total."""
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)  # torch 2.9 cannot read it back
    return total * (fraction(device) if fraction else 1.0)


def cuda_batch_fits(step, device: torch.device, reserve_bytes: float, headroom: float = 0.9):
    """fits(b) for largest_batch: run step(b) (what a training step does) and compare the peak
    memory the allocator reserved (what the card must hold, fragmentation included), plus what is
    reserved for the optimizer state, with the memory this process may use: what is free on the
    GPU now (a card that also drives a display has 1-2 GB less than its total) and no more than
    its per-process cap. A probe that runs out of memory counts as a miss; step must leave no
    gradients behind, even when it fails."""
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    ours = torch.cuda.memory_reserved(device)  # already ours: it counts in the peak
    budget = headroom * min(free + ours, memory_cap(device))

    def fits(batch: int) -> bool:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            step(batch)
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            torch.cuda.empty_cache()
        return torch.cuda.max_memory_reserved(device) + reserve_bytes <= budget

    return fits


def probe_step(model: torch.nn.Module, forward: Callable, precision: Precision, vocab_size: int, context: int,
               device: torch.device, micro_steps: int = 2) -> Callable[[int], None]:
    """step(b) for cuda_batch_fits: what training does with micro-batches of b random sequences,
    through forward (runtime.parallelize's: checkpointed, compiled), over micro_steps accumulating
    micro-steps, since the gradients of the first stay alive while the next runs (and a compiled
    backward returns new gradients before adding them). It never leaves gradients behind, even
    when it fails half-way (an out-of-memory backward leaves partial ones)."""

    def step(batch: int) -> None:
        try:
            for _ in range(micro_steps):
                x = torch.randint(0, vocab_size, (batch, context), device=device)
                with precision.autocast():
                    loss = forward(x, x)
                loss.backward()
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
    """Measured FLOP/s of a large square matmul on this device: the roofline beside the datasheet
    peak (see mfu_peak), and the peak itself where the card is unknown.

    The best of several short windows: a neighbour that takes the cores for a moment (a shared
    machine, another job starting) slows some windows, not the machine's peak. Measured once per
    process and device and dtype: every run a process trains (bench.recipe's dozens, the tests')
    quotes the same roofline and does not pay 0.4 s to re-measure it.
    """
    if device.type == "cuda":
        return _cuda_matmul_flops(device, dtype, windows)
    n = 1024
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


def _cuda_matmul_flops(device: torch.device, dtype: torch.dtype, windows: int, repeats: int = 10) -> float:
    """The CUDA roofline: 8192^2 matmuls in half precision (4096^2 in fp32/TF32, 2 and 3 x 10^11
    FLOP each), big enough to keep every SM busy (a 2048^2 one reaches about half an H100's peak),
    timed by CUDA events around `repeats` back-to-back launches; the buffers are freed after."""
    n = 4096 if dtype == torch.float32 else 8192
    with torch.cuda.device(device):
        generator = torch.Generator(device).manual_seed(0)
        a = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
        b = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
        out = torch.matmul(a, b)  # warm up kernels and clocks
        best = 0.0
        for _ in range(windows):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(repeats):
                torch.matmul(a, b, out=out)
            end.record()
            end.synchronize()
            best = max(best, 2 * n ** 3 * repeats / (start.elapsed_time(end) / 1e3))
        del a, b, out
        torch.cuda.empty_cache()  # the measurement's 400 MB must not stay reserved through training
    return best


# Dense (not sparse) tensor-core peaks in TFLOP/s: bf16, fp16 (both with fp32 accumulation, as
# torch's matmuls accumulate) and TF32, at boost clock, from NVIDIA's datasheets (data-centre
# cards) and architecture whitepapers (GeForce: GA102, AD102 and GB202 list SMs x 512 FLOP per
# clock with fp32 accumulation, half the fp16-accumulate figure NVIDIA's product pages quote, and
# the sparse figures double that again). None: no such tensor path (T4 and V100 have no bf16 nor
# TF32). Looked up by device name (see datasheet_peak); laptop parts run other clocks and are not here.
DENSE_TFLOPS: dict[str, tuple[float | None, float | None, float | None]] = {
    # GeForce RTX 30 (Ampere)
    "RTX 3060": (25.5, 25.5, 12.7), "RTX 3060 TI": (32.4, 32.4, 16.2), "RTX 3070": (40.6, 40.6, 20.3),
    "RTX 3070 TI": (43.5, 43.5, 21.7), "RTX 3080": (59.5, 59.5, 29.8), "RTX 3080 TI": (68.2, 68.2, 34.1),
    "RTX 3090": (71.2, 71.2, 35.6), "RTX 3090 TI": (80.0, 80.0, 40.0),
    # GeForce RTX 40 (Ada)
    "RTX 4060": (30.2, 30.2, 15.1), "RTX 4060 TI": (44.1, 44.1, 22.1), "RTX 4070": (58.3, 58.3, 29.1),
    "RTX 4070 SUPER": (71.0, 71.0, 35.5), "RTX 4070 TI": (80.2, 80.2, 40.1),
    "RTX 4070 TI SUPER": (88.2, 88.2, 44.1), "RTX 4080": (97.5, 97.5, 48.7),
    "RTX 4080 SUPER": (104.4, 104.4, 52.2), "RTX 4090": (165.2, 165.2, 82.6),
    # GeForce RTX 50 (Blackwell)
    "RTX 5060": (38.4, 38.4, 19.2), "RTX 5060 TI": (47.4, 47.4, 23.7), "RTX 5070": (61.7, 61.7, 30.9),
    "RTX 5070 TI": (87.9, 87.9, 43.9), "RTX 5080": (112.6, 112.6, 56.3), "RTX 5090": (209.5, 209.5, 104.8),
    # Workstation
    "RTX A6000": (154.8, 154.8, 77.4), "RTX 6000 ADA": (364.2, 364.2, 182.1),
    # Data centre
    "T4": (None, 65.0, None), "V100": (None, 112.0, None), "V100 SXM2": (None, 125.0, None),
    "A10": (125.0, 125.0, 62.5), "A30": (165.0, 165.0, 82.0), "A40": (149.7, 149.7, 74.8),
    "A100": (312.0, 312.0, 156.0), "L4": (121.0, 121.0, 60.0), "L40": (181.0, 181.0, 90.5),
    "L40S": (362.0, 362.0, 183.0), "H100": (989.4, 989.4, 494.7), "H100 PCIE": (756.0, 756.0, 378.0),
    "H100 NVL": (835.0, 835.0, 417.5), "H200": (989.4, 989.4, 494.7), "H200 NVL": (835.0, 835.0, 417.5),
    "GH200": (989.4, 989.4, 494.7), "B200": (2250.0, 2250.0, 1100.0),
}


def datasheet_peak(name: str, dtype: torch.dtype) -> float | None:
    """The dense datasheet FLOP/s of the card named `name` (torch.cuda.get_device_name) for
    matmuls in dtype (fp32 runs TF32 on CUDA), or None where the card or its variant is not in
    DENSE_TFLOPS (a laptop part, an RTX 4090 D, an unknown card)."""
    words = re.sub(r"\b(NVIDIA|GEFORCE|TESLA)\b", " ", name.upper()).replace("-", " ").split()
    if {"LAPTOP", "MOBILE", "MAX"} & set(words):
        return None
    text = " ".join(words)
    column = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}[dtype]
    for key in sorted(DENSE_TFLOPS, key=len, reverse=True):  # "RTX 4060 TI" before "RTX 4060"
        # The model must be the whole name's first words, not followed by a variant (4090 D, 3080 TI).
        if re.match(rf"{key}( |$)", text) and not re.match(rf"{key} (TI|SUPER|D)\b", text):
            tflops = DENSE_TFLOPS[key][column]
            return None if tflops is None else tflops * 1e12
    return None


@dataclass(frozen=True)
class Peak:
    """What MFU divides by (flops) and where it comes from; the measured roofline beside it, and
    why the roofline is the peak where it is (why: None for a datasheet peak)."""

    flops: float
    roofline: float
    source: str
    why: str | None = None

    def describe(self) -> str:
        """The log line that says what MFU is quoted against."""
        if self.why:
            return f"MFU against {self.source} ({self.flops / 1e12:.3g} TFLOP/s): {self.why}"
        return (f"MFU against {self.source} ({self.flops / 1e12:.4g} TFLOP/s); "
                f"measured matmul roofline {self.roofline / 1e12:.3g} TFLOP/s")


def mfu_peak(device: torch.device, dtype: torch.dtype) -> Peak:
    """The peak MFU is quoted against, as PaLM, nanoGPT and torchtitan quote it: the card's dense
    datasheet peak for dtype. The measured roofline (matmul_peak_flops) stands beside it and is
    the peak only where the card is unknown (and on CPUs, which have no datasheet figure here),
    or where it beats the datasheet (GeForce Blackwell runs fp32-accumulate matmuls faster than
    its whitepaper's figure), so that MFU never passes 100%."""
    roofline = matmul_peak_flops(device, dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    kind = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "TF32"}[dtype]
    measured = f"the measured {kind} matmul roofline"
    datasheet = datasheet_peak(name, dtype) if device.type == "cuda" else None
    if datasheet is None:
        why = f"{name} is not in the datasheet table" if device.type == "cuda" else f"no datasheet peak for {name}"
        return Peak(roofline, roofline, measured, why)
    if roofline > datasheet:
        return Peak(roofline, roofline, measured,
                    f"above {name}'s datasheet dense {kind} peak of {datasheet / 1e12:.4g} TFLOP/s")
    return Peak(datasheet, roofline, f"{name}'s datasheet dense {kind} peak")


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels (timing needs it; the training loop itself avoids it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def memory_in_use(device: torch.device) -> dict[str, float | None]:
    """Peak bytes since the last call: on GPU what tensors held (allocated) and what the CUDA
    allocator reserved from the card (reserved: what a 16 GB card must hold, fragmentation and
    cached blocks included; the CUDA context comes on top), both then reset so that each log line
    shows its own window. Elsewhere the process's peak resident set size, reserved None."""
    if device.type == "cuda":
        peak = {"allocated": float(torch.cuda.max_memory_allocated(device)),
                "reserved": float(torch.cuda.max_memory_reserved(device))}
        torch.cuda.reset_peak_memory_stats(device)
        return peak
    if sys.platform.startswith("linux"):
        import resource
        return {"allocated": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0,  # Linux reports KiB
                "reserved": None}
    return {"allocated": float("nan"), "reserved": None}


def memory_text(memory: dict[str, float | None]) -> str:
    """memory_in_use() for the log: 'mem 3.21GiB' and, on GPU, '(reserved 3.80GiB)' beside it."""
    text = f"mem {memory['allocated'] / 2**30:.2f}GiB"
    return text if memory["reserved"] is None else f"{text} (reserved {memory['reserved'] / 2**30:.2f}GiB)"


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
    """Where and how this process computes: its place in a torchrun job, its device, its precision,
    and whether runs must repeat bit for bit (--deterministic)."""

    dist: Distributed
    device: torch.device
    precision: Precision
    deterministic: bool = False


def seed_rank(seed: int, dist: Distributed) -> None:
    """Give each rank its own random stream once the model's initial weights (the same on every
    rank) are drawn: with --dropout, ranks that shared one stream would drop the same units of
    different sequences. Rank 0 keeps the single process's stream; rank r > 0 is seeded from
    (seed, r) through numpy's SeedSequence, whose low 32 bits (all the CPU generator reads) differ
    by rank."""
    if dist.rank:
        import numpy as np

        torch.manual_seed(int(np.random.SeedSequence([seed, dist.rank]).generate_state(1, np.uint64)[0]))


def _own_rng_state(device: torch.device) -> dict:
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def rng_state(device: torch.device, dist: Distributed = Distributed()) -> dict:
    """The random generators a resume must restore: the CPU's, and this process's own GPU's (not
    every visible GPU's, so a run resumes on a machine with fewer GPUs); under torchrun also
    every rank's own ("ranks", gathered: a collective, call it on every rank)."""
    state = _own_rng_state(device)
    if dist.enabled:
        import torch.distributed as distributed

        ranks = [None] * dist.world_size
        distributed.all_gather_object(ranks, state)
        state["ranks"] = ranks
    return state


def set_rng_state(state: dict, device: torch.device, dist: Distributed = Distributed()) -> None:
    """Restore rng_state(): each rank its own state where the checkpoint holds one per rank of
    this world size; where it does not (another world size, a single-process checkpoint), rank
    0 restores the saved state and the others derive their own from it (see seed_rank). A GPU
    state is restored only on a GPU."""
    ranks = state.get("ranks")
    own = ranks is not None and len(ranks) == dist.world_size
    if own:
        state = ranks[dist.rank]
    torch.set_rng_state(state["cpu"])
    cuda = state.get("cuda")
    if isinstance(cuda, list):  # checkpoints before this change held every visible GPU's state
        cuda = cuda[0] if cuda else None
    if device.type == "cuda" and cuda is not None:
        torch.cuda.set_rng_state(cuda, device)
    if not own and dist.rank:
        seed_rank(int(torch.randint(0, 2**31, ())), dist)


# Non-main ranks wait at this barrier while the main rank downloads, trains the tokenizer and
# tokenizes: hours for a large corpus, far past NCCL's 10-minute default.
PREPARATION_TIMEOUT = datetime.timedelta(hours=24)


# The cuBLAS workspace settings under which CUDA's matmuls are deterministic.
DETERMINISTIC_CUBLAS = (":4096:8", ":16:8")


def setup(device_spec: str = "auto", amp: bool | None = None, deterministic: bool = False) -> Runtime:
    """The one place a process picks its device and precision: joins the torchrun job if launched
    by one (nccl on CUDA, gloo on CPU, this rank's own GPU), else runs as rank 0 of 1 on the
    device asked for (made the current CUDA device, so that --device cuda:1 computes, allocates
    and decides its precision there, not on GPU 0).

    fp32 matmuls on CUDA use TF32 (as every peer does; bf16 autocast is unaffected).
    deterministic=True makes CUDA runs repeatable bit for bit: deterministic algorithms, the
    cuBLAS workspace setting, inductor's deterministic mode (no benchmarking of kernel choices),
    and no cuDNN autotuning (CPU runs are deterministic already).
    """
    check_torch_version()
    device = pick_device(device_spec)
    if deterministic:
        _set_deterministic(device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        if device.type == "cuda":
            device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
            torch.cuda.set_device(device)
        return Runtime(Distributed(), device, precision(device, amp), deterministic)
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
    return Runtime(Distributed(rank, world_size, local_rank), device, precision(device, amp), deterministic)


def _set_deterministic(device: torch.device) -> None:
    """--deterministic's settings. cuBLAS reads CUBLAS_WORKSPACE_CONFIG once, when this process
    first starts CUDA: set here before that (the scripts call setup first); where CUDA already
    runs without it (a program that calls train() after its own CUDA work) the run is refused
    rather than silently nondeterministic."""
    if os.environ.get("CUBLAS_WORKSPACE_CONFIG") not in DETERMINISTIC_CUBLAS:
        if device.type == "cuda" and torch.cuda.is_initialized():
            raise L1Error("--deterministic needs CUBLAS_WORKSPACE_CONFIG=:4096:8 before CUDA starts, and CUDA "
                          "already runs in this process: set it in the environment first")
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = DETERMINISTIC_CUBLAS[0]
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    from torch._inductor import config as inductor

    inductor.deterministic = True


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
    training step runs: the same module, behind an eager fallback when compiled, and under the
    attention-kernel priority of attention_priority(). Modules are compiled in place
    (nn.Module.compile), so parameter names never change: the whole model in one process, each
    block under DDP/FSDP (see compile_in_place).
    """
    if grad_ckpt:
        apply_activation_checkpointing(model)
    compiled = compile and torch._dynamo.is_dynamo_supported()
    if compile and not compiled:
        log("torch.compile is not supported on this platform; running eagerly")
    modules = compile_in_place(model, per_block=rt.dist.enabled) if compiled else []
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
    forward = outer
    if compiled:
        def eager(*args, **kwargs):
            for module in modules:  # undo nn.Module.compile(): run the plain forward from now on
                module._compiled_call_impl = None
            return outer(*args, **kwargs)

        forward = CompiledOrEager(outer, eager, log)
    priority = attention_priority(rt.device, rt.deterministic)
    return outer, (forward if priority is None else WithAttentionPriority(forward, priority))


def compile_in_place(model: torch.nn.Module, per_block: bool) -> list[torch.nn.Module]:
    """nn.Module.compile() on the whole model, or with per_block on each block alone (torchtitan's
    order under DDP/FSDP: a whole compiled model hands every gradient back at the end of its one
    backward graph, so the all-reduce of early buckets cannot overlap the rest of the backward).
    In place: the state-dict names stay those of the pure model. Returns the compiled modules."""
    modules = list(model.blocks) if per_block else [model]
    for module in modules:
        module.compile()
    return modules


def attention_priority(device: torch.device, deterministic: bool) -> list | None:
    """The SDPA backends in the order L1 prefers them, or None for torch's default order. On
    Hopper (sm90) cuDNN's attention is the fastest, but torch's default priority puts it after the
    math kernel, so it never runs: prefer cuDNN, then flash; not under --deterministic (cuDNN's
    and flash's backward are not deterministic there)."""
    if deterministic or device.type != "cuda" or torch.cuda.get_device_capability(device) != (9, 0):
        return None
    from torch.nn.attention import SDPBackend

    return [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class WithAttentionPriority:
    """Calls fn under sdpa_kernel(priority, set_priority=True): also while torch.compile traces
    it, which is when a compiled graph's attention kernel is chosen."""

    def __init__(self, fn: Callable, priority: list):
        self.fn, self.priority = fn, priority

    def __call__(self, *args, **kwargs):
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(self.priority, set_priority=True):
            return self.fn(*args, **kwargs)


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
    """Skip the gradient all-reduce on accumulation micro-steps (DDP no_sync / FSDP2 flag).

    FSDP2 also keeps the parameters gathered through an accumulation: from its first micro-step
    on they are not resharded after forward (so backward does not gather them again) nor after
    backward until the last micro-step's (so the next forward does not either). Without
    accumulation (every micro-step syncs) they are resharded after forward as usual, which keeps
    ZeRO-3's memory; with it they cost one unsharded copy in the compute dtype for two fewer
    all-gathers per micro-step, which on PCIe GeForce cards cost as much as the compute.
    """
    if hasattr(model, "no_sync"):
        return contextlib.nullcontext() if enabled else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)
        model.set_reshard_after_backward(enabled)
        if not enabled:
            model.set_reshard_after_forward(False)
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


def _sharded(model: torch.nn.Module) -> bool:
    """Whether the model's parameters are FSDP2 shards (DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def model_state(model: torch.nn.Module) -> dict:
    """Full, unwrapped model weights by parameter name (collective under FSDP: call on every rank).

    Under FSDP each gathered tensor goes to the CPU as it comes (the whole model gathered on the
    GPU could not fit); otherwise the tensors stay where they live, for the checkpoint's snapshot
    to copy straight into its pinned buffers (one copy, one synchronisation: checkpoint._Snapshot).
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_state_options(cpu_offload=_sharded(model)))


def optimizer_state(model: torch.nn.Module, optimizers: list[torch.optim.Optimizer]) -> dict:
    """Full optimizer state keyed by parameter name, so any world size or wrapper can resume it
    (on the CPU under FSDP, else where it lives: see model_state)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizers, options=_state_options(cpu_offload=_sharded(model)))


def load_states(model: torch.nn.Module, optimizers: list[torch.optim.Optimizer], model_sd: dict,
                optim_sd: dict | None) -> None:
    """Restore full model and optimizer states into a (possibly wrapped or sharded) model; with
    optim_sd None, the weights only (the optimizers keep their fresh state)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(model, model_sd, options=_state_options())
    if optim_sd is not None:
        set_optimizer_state_dict(model, optimizers, optim_sd, options=_state_options())
