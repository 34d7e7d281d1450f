"""Shared benchmark plumbing: machine facts, interleaved timing with medians, JSON lines out."""

from __future__ import annotations

import json
import platform
import resource
import statistics
import time
from typing import Callable

import torch


def machine() -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else cpu
    return {"device": device, "threads": torch.get_num_threads(), "torch": torch.__version__}


def peak_rss_bytes() -> int:
    """The peak resident set of this process since its exec, or of a child it waited for, in bytes
    (Linux). Not wait4's ru_maxrss of this process: that counts the pages of the parent it was
    forked from (a benchmark's parent with torch loaded: about 900 MB) as if they were its own."""
    with open("/proc/self/status") as f:
        own = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return 1024 * max(own, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)


def emit(**record) -> None:
    """One measurement: one JSON object on its own line."""
    print(json.dumps(record), flush=True)


def interleaved(contenders: dict[str, Callable[[], float | None]], repeats: int) -> dict[str, float]:
    """Median seconds of each contender, run in turns (A B C A B C ...) so machine noise hits all alike.

    A contender may return its own measured seconds (e.g. excluding a prefill); else wall time counts.
    """
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            start = time.perf_counter()
            own = fn()
            times[name].append(own if own is not None else time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def interleaved_decodes(contenders: dict[str, Callable[[], tuple[float, float]]],
                        repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """interleaved() for decoders that return (decode seconds, seconds to the first token): the
    median of each, per contender."""
    firsts: dict[str, list[float]] = {name: [] for name in contenders}

    def timed(name, fn):
        def run():
            seconds, first = fn()
            firsts[name].append(first)
            return seconds
        return run

    seconds = interleaved({name: timed(name, fn) for name, fn in contenders.items()}, repeats)
    return seconds, {name: statistics.median(ts) for name, ts in firsts.items()}


def memory_bandwidth(device: torch.device, megabytes: int = 256) -> float:
    """Measured bytes/s of a large copy (read + write): the bound for batch-1 decoding."""
    src = torch.empty(megabytes * 2**20 // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best
