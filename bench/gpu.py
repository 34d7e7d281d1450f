"""The GPU check in one command, for a machine with one CUDA GPU (about 8 minutes on a fast card):

    python -m bench.gpu [--data ../shared/data/wikipedia-sample] [--steps 200] [--out DIR]

1. the CUDA tests (tests/test_cuda.py: Llama parity in fp32 and bf16, a compiled AMP run, the fp16
   GradScaler path, the --batch_size auto probe, a --deterministic resume compared bitwise);
2. bench.train and bench.memory on CUDA under a 15 GiB cap (the 16 GB card the flagship is for);
3. l1-gpu-compatible for --steps steps on the corpus, --deterministic: once straight, once killed
   with SIGKILL half-way and resumed by the same command; the two final checkpoints must be equal
   bit for bit.

Every child's JSON lines are printed as they come, then one summary object (kind "gpu_summary"):
tests passed/failed, MFU, tokens/s, peak memory against the analytic model, compile time (the
first log window's extra seconds), and the resume check. Without a GPU it says so in one line and
exits 2; `--cpu_smoke` runs the same plan on the CPU at toy size, to check the plumbing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import emit

REPO = Path(__file__).resolve().parents[1]
CAP_GIB = 15.0


def run(cmd: list[str], log: Path, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """A child process with the repo importable; its output kept in log (and JSON lines echoed)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    log.write_text(result.stdout + result.stderr)
    for line in result.stdout.splitlines():
        if line.startswith("{"):
            print(line, flush=True)
    return result


def capped(module: str, args: list[str], fraction: float) -> list[str]:
    """python -c that caps this process's CUDA memory, then runs `python -m module args`."""
    code = (f"import runpy, sys, torch; torch.cuda.set_per_process_memory_fraction({fraction}); "
            f"sys.argv = {[module, *args]!r}; runpy.run_module({module!r}, run_name='__main__')")
    return [sys.executable, "-c", code]


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def tests(out: Path, smoke: bool) -> dict:
    target = "tests/test_cuda.py" if not smoke else "tests/test_cuda.py tests/test_runtime.py"
    result = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *target.split()],
                 out / "tests.log", timeout=600)
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error)", result.stdout)}
    return {"tests_exit": result.returncode, **{f"tests_{k}": v for k, v in counts.items()}}


def benches(out: Path, device: str, fraction: float, smoke: bool) -> dict:
    train_args = ["--device", device, "--shapes", "tiny", *(["--repeats", "1", "--warmup", "1", "--modes", "eager"]
                                                           if smoke else ["l1-v1", "--repeats", "5"])]
    memory_args = ["--device", device, *(["--sizes", "tiny", "--dtypes", "fp32", "--no-math"] if smoke else [])]
    wrap = (lambda m, a: capped(m, a, fraction)) if device == "cuda" else (lambda m, a: [sys.executable, "-m", m, *a])
    trained = json_lines(run(wrap("bench.train", train_args), out / "bench_train.log").stdout)
    memory = json_lines(run(wrap("bench.memory", memory_args), out / "bench_memory.log").stdout)
    summaries = [r for r in trained if r["kind"] == "summary"]
    agreement = next((r for r in memory if r["kind"] == "agreement"), {})
    return {"bench_train": summaries, "memory_model_worst_error": agreement.get("worst_estimate_error")}


def flagship(out: Path, data: str, steps: int, device: str, smoke: bool) -> dict:
    """A straight run and a SIGKILLed-then-resumed one of the same command; bitwise comparison."""
    preset = ["--preset", "tiny", "--batch_size", "4", "--seq_len", "64", "--val_fraction", "0.2"] if smoke \
        else ["--preset", "l1-gpu-compatible"]
    common = [*preset, "--data", data, "--data_dir", str(out / "data"), "--max_steps", str(steps),
              "--save_every", str(max(1, steps // 4)), "--eval_every", str(steps), "--log_every", "10",
              "--device", device, "--deterministic"]
    script = [sys.executable, str(REPO / "train_gpu_compatible.py")]
    run([*script, *common, "--out", str(out / "straight")], out / "straight.log", timeout=1200)
    killed = out / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([*script, *common, "--out", str(killed)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    half = steps // 2
    while proc.poll() is None and not any(int(p.stem.rsplit("_", 1)[1]) >= half
                                          for p in killed.glob("checkpoint_epoch_*_step_*.pt")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run([*script, *common, "--out", str(killed)], out / "resumed.log", timeout=1200)
    from l1.checkpoint import load_file

    a, b = load_file(out / "straight" / "latest_checkpoint.pt"), load_file(killed / "latest_checkpoint.pt")
    bitwise = a["step"] == b["step"] == steps and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    records = [json.loads(line) for line in (out / "straight" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    window = [r["tokens_per_s"] for r in train]
    steady = sorted(window[1:])[len(window[1:]) // 2] if len(window) > 1 else window[0]
    tokens_per_window = train[0]["tokens_seen"] if train else 0
    compile_s = tokens_per_window / window[0] - tokens_per_window / steady if train else None
    return {"flagship_steps": steps, "flagship_tokens_per_s": steady,
            "flagship_mfu": sorted(r["mfu"] for r in train[1:])[len(train[1:]) // 2] if len(train) > 1 else None,
            "flagship_peak_memory_gib": max(r["memory_bytes"] for r in train) / 2**30,
            "flagship_memory_model_gib": _estimate(smoke), "compile_s_estimate": compile_s,
            "resumed_after_sigkill": b["step"] == steps, "resume_bitwise": bitwise}


def _estimate(smoke: bool) -> float:
    """The analytic model's peak for the flagship's step (bench.memory's), in GiB."""
    from bench.memory import estimate_training_bytes
    from l1.config import resolve

    cfg = resolve({"preset": "tiny" if smoke else "l1-gpu-compatible"})
    seq = 64 if smoke else cfg.context
    return estimate_training_bytes(cfg.model, 4 if smoke else cfg.batch_size, seq, torch.bfloat16, False,
                                   "flash", "cpu" if smoke else "cuda")["total"] / 2**30


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "wikipedia-sample"))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", help="keep the logs and runs here (default: a temporary folder)")
    parser.add_argument("--cpu_smoke", action="store_true", help="the same plan on the CPU at toy size")
    args = parser.parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("error: bench.gpu needs a CUDA GPU (torch sees none); --cpu_smoke checks the plumbing on a CPU",
              file=sys.stderr)
        return 2
    out = Path(args.out or tempfile.mkdtemp(prefix="l1-bench-gpu-"))
    out.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.cpu_smoke else "cuda"
    fraction = 1.0
    if device == "cuda":
        fraction = min(1.0, CAP_GIB * 2**30 / torch.cuda.get_device_properties(0).total_memory)
    started = time.perf_counter()
    summary = {"kind": "gpu_summary", "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
               "memory_cap_gib": CAP_GIB if device == "cuda" else None, "out": str(out)}
    summary.update(tests(out, args.cpu_smoke))
    summary.update(benches(out, device, fraction, args.cpu_smoke))
    summary.update(flagship(out, args.data, args.steps, device, args.cpu_smoke))
    summary["seconds"] = time.perf_counter() - started
    emit(**summary)
    return 0 if summary["tests_exit"] == 0 and summary["resume_bitwise"] else 1


if __name__ == "__main__":
    sys.exit(main())
