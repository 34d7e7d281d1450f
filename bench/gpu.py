"""The GPU check in one command, for a machine with one CUDA GPU:

    python -m bench.gpu [--quick] [--out summary.json] [--work DIR] [--data DIR] [--steps N]

--quick (under 6 minutes on an H100-class card, compilation included) runs 1, 3 and 4; the full
check (15-25 minutes on a 16 GB card) runs all five:

1. the CUDA tests (tests/test_cuda.py: Llama parity in fp32 and bf16, a compiled AMP run with its
   MFU and memory log, the fp16 GradScaler path, the --batch_size auto probe, a --deterministic
   resume compared bitwise, the int8 decoding path, the checkpoint snapshot from GPU memory);
2. bench.train on CUDA under the 15 GiB cap (the 16 GB card the flagship is for);
3. bench.memory: the 16 GB plan's flagship sizes (l1-gpu-compatible, 8 x 1024 and the plan's
   largest micro-batch) measured on the GPU with every child process capped at 15 GiB, and in the
   full check the analytic model against measured steps of every size;
4. l1-gpu-compatible for --steps steps, --deterministic and capped at 15 GiB: once straight, once
   killed with SIGKILL half-way and resumed by the same command; the two final checkpoints must be
   equal bit for bit;
5. bench.generate: decoding tokens/s of bf16 and int8 weights (int8 dequantized in the compiled
   step), eager and compiled.

Every child's JSON lines are printed as they come, then one summary object (kind "gpu_summary",
also written to --out): tests passed/failed, MFU against the card's datasheet peak, tokens/s,
peak memory (allocated and reserved) against the analytic model, compile time (the first log
window's extra seconds), the resume check, and "failures": every part that failed or timed out,
with why. The exit status is 0 only when there is none. Nothing here needs the Hugging Face hub
or the `datasets` package: without --data the flagship trains on a synthetic corpus written here.
Without a GPU it says so in one line and exits 2; `--cpu_smoke` runs the same plan on the CPU at
toy size, to check the plumbing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import emit
from l1.runtime import DETERMINISTIC_CUBLAS

REPO = Path(__file__).resolve().parents[1]
CAP_GIB = 15.0
# Seconds each part may take: (--quick, full). A part past its limit is recorded as failed and the
# check goes on with the next.
LIMITS = {"tests": (240, 900), "bench_train": (0, 600), "bench_memory": (150, 900), "flagship_run": (150, 900),
          "bench_generate": (0, 600)}


class PartFailed(Exception):
    """A part of the check failed; its message goes into the summary's failures."""


def run(cmd: list[str], log: Path, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    """A child process with the repo importable; its output kept in log (and JSON lines echoed).
    Past its timeout it is killed and PartFailed says so (the output so far stays in log)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    try:
        result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        log.write_text(_text(exc.stdout) + _text(exc.stderr))
        raise PartFailed(f"timed out after {timeout:.0f} s (log: {log})") from None
    log.write_text(result.stdout + result.stderr)
    for line in result.stdout.splitlines():
        if line.startswith("{"):
            print(line, flush=True)
    return result


def _text(output) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else (output or "")


def last_error(result: subprocess.CompletedProcess) -> str:
    """The last line of a failed child's stderr (its error), for the summary."""
    lines = (result.stderr or result.stdout).strip().splitlines()
    return f"exit status {result.returncode}: {lines[-1][:300] if lines else 'no output'}"


def capped(target: list[str], fraction: float | None) -> list[str]:
    """The command `python target...` (a module as ["-m", name, ...] or a script path), run under
    a CUDA memory cap of `fraction` of the card when fraction is given."""
    if fraction is None:
        return [sys.executable, *target]
    module = target[0] == "-m"
    name, args = (target[1], target[2:]) if module else (target[0], target[1:])
    runner = f"runpy.run_module({name!r}, run_name='__main__')" if module \
        else f"runpy.run_path({name!r}, run_name='__main__')"
    code = (f"import runpy, sys, torch; torch.cuda.set_per_process_memory_fraction({fraction}); "
            f"sys.argv = {[name, *args]!r}; {runner}")
    return [sys.executable, "-c", code]


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def tests(work: Path, smoke: bool, limit: float) -> dict:
    targets = ["tests/test_cuda.py"] if not smoke else ["tests/test_cuda.py", "tests/test_runtime.py"]
    result = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", *targets],
                 work / "tests.log", limit)
    counts = {k.replace("errors", "error"): int(v)
              for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)\b", result.stdout)}
    record = {"tests_exit": result.returncode, **{f"tests_{k}": v for k, v in counts.items()}}
    record["tests_failed_names"] = re.findall(r"^(?:FAILED|ERROR) (\S+)", result.stdout, re.M)
    if result.returncode != 0:
        failed = ", ".join(record["tests_failed_names"]) or "see tests.log"
        raise PartFailed(f"pytest exit status {result.returncode}: {failed}", record)
    if not smoke and counts.get("skipped"):
        raise PartFailed(f"{counts['skipped']} CUDA test(s) skipped on a GPU", record)
    return record


def bench_train(work: Path, device: str, fraction: float | None, smoke: bool, limit: float) -> dict:
    args = ["--device", device, "--shapes", "tiny",
            *(["--repeats", "1", "--warmup", "1", "--modes", "eager"] if smoke else ["l1-v1", "--repeats", "5"])]
    result = run(capped(["-m", "bench.train", *args], fraction), work / "bench_train.log", limit)
    if result.returncode != 0:
        raise PartFailed(last_error(result))
    return {"bench_train": [r for r in json_lines(result.stdout) if r["kind"] == "summary"]}


def bench_memory(work: Path, device: str, quick: bool, smoke: bool, limit: float) -> dict:
    """The analytic model against measured steps (not in --quick), and on CUDA the flagship plan
    under the cap, which bench.memory applies in each of its child processes."""
    args = ["--device", device]
    if smoke:
        args += ["--sizes", "tiny", "--dtypes", "fp32", "--no-math"]
    elif quick:
        args += ["--sizes"]  # none: only the flagship sizes
    if device == "cuda":
        args += ["--flagship", "--cap_gib", str(CAP_GIB), "--budget_gib", str(CAP_GIB)]
    result = run([sys.executable, "-m", "bench.memory", *args], work / "bench_memory.log", limit)
    lines = json_lines(result.stdout)
    agreement = next((r for r in lines if r["kind"] == "agreement"), {})
    record = {"memory_model_worst_error": agreement.get("worst_estimate_error"),
              "memory_flagship": [r for r in lines if r["kind"] == "flagship"],
              "memory_errors": [r for r in lines if r["kind"] == "memory_error"]}
    if result.returncode != 0 or not agreement:
        failed = [f"{r['preset']} {r['dtype']} b{r['batch']}: {r.get('error') or 'out of memory'}"
                  for r in record["memory_errors"]]
        failed += [f"flagship b{r['batch']}x{r['seq']} ckpt={r['grad_ckpt']}: "
                   f"{r['error'] or f'out of memory under the {CAP_GIB:g} GiB cap'}"
                   for r in record["memory_flagship"] if not r["fits_under_cap"]]
        raise PartFailed("; ".join(failed) or last_error(result), record)
    return record


def synthetic_corpus(folder: Path, documents: int = 4000, seed: int = 0) -> Path:
    """A parquet file of English-looking documents (random words of a fixed list): enough tokens for
    the flagship's steps without any download."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    words = ("time person year way day thing man world life hand part child eye woman place work week case "
             "point government company number group problem fact be have do say get make go know take see "
             "come think look want give use find tell ask seem feel try leave call good new first last long "
             "great little own other old right big high different small large next early young important "
             "few public bad same able to of in for on with at by from up about into over after").split()
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(80, 400))).capitalize() + "."
             for _ in range(documents)]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "synthetic.parquet"
    pq.write_table(pa.table({"text": texts}), path)
    return folder


def flagship(work: Path, data: str, steps: int, device: str, fraction: float | None, smoke: bool,
             limit: float) -> dict:
    """A straight run and a SIGKILLed-then-resumed one of the same command; bitwise comparison."""
    preset = ["--preset", "tiny", "--batch_size", "4", "--seq_len", "64"] if smoke \
        else ["--preset", "l1-gpu-compatible"]
    common = [*preset, "--data", data, "--data_dir", str(work / "data"), "--max_steps", str(steps), "--val_fraction",
              "0.05", 
              "--save_every", str(max(1, steps // 4)), "--eval_every", str(steps), "--log_every", str(max(1, steps // 4)),
              "--device", device, "--deterministic"]
    script = str(REPO / "train_gpu_compatible.py")
    # The cap starts CUDA before the trainer can set cuBLAS's deterministic workspace: set it first.
    deterministic = {"CUBLAS_WORKSPACE_CONFIG": DETERMINISTIC_CUBLAS[0]}
    straight = run(capped([script, *common, "--out", str(work / "straight")], fraction), work / "straight.log", limit,
                   deterministic)
    if straight.returncode != 0:
        raise PartFailed(f"straight run: {last_error(straight)}")
    record = _throughput(work / "straight", steps, smoke)
    killed = work / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO), **deterministic}
    with open(work / "killed.log", "w") as log:
        proc = subprocess.Popen(capped([script, *common, "--out", str(killed)], fraction), cwd=REPO, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        half, deadline = steps // 2, time.monotonic() + limit
        while proc.poll() is None and time.monotonic() < deadline and not any(
                int(p.stem.rsplit("_", 1)[1]) >= half for p in killed.glob("checkpoint_epoch_*_step_*.pt")):
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    resumed = run(capped([script, *common, "--out", str(killed)], fraction), work / "resumed.log", limit, deterministic)
    if resumed.returncode != 0:
        raise PartFailed(f"resumed run: {last_error(resumed)}", record)
    from l1.checkpoint import load_file

    a, b = load_file(work / "straight" / "latest_checkpoint.pt"), load_file(killed / "latest_checkpoint.pt")
    record["resumed_after_sigkill"] = b["step"] == steps
    record["resume_bitwise"] = a["step"] == b["step"] == steps and all(
        torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    if not record["resume_bitwise"]:
        raise PartFailed("the SIGKILLed and resumed run's final weights differ from the straight run's", record)
    return record


def _throughput(run_dir: Path, steps: int, smoke: bool) -> dict:
    """The straight run's steady tokens/s and MFU (medians past the first, compiling window), its peak
    memory, and what its log says MFU is quoted against."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    if not train:
        raise PartFailed("the straight run logged no training step")
    steady = train[1:] or train

    def median(key):
        values = sorted(r[key] for r in steady)
        return values[len(values) // 2]

    tokens_per_window = train[0]["tokens_seen"]
    log = (run_dir / "training.log").read_text()
    reserved = [r["memory_reserved_bytes"] for r in train if r.get("memory_reserved_bytes") is not None]
    return {"flagship_steps": steps, "flagship_tokens_per_s": median("tokens_per_s"), "flagship_mfu": median("mfu"),
            "flagship_mfu_basis": next((line[line.index("MFU against"):] for line in log.splitlines()
                                        if "MFU against" in line), None),
            "flagship_peak_memory_gib": max(r["memory_bytes"] for r in train) / 2**30,
            "flagship_peak_reserved_gib": max(reserved) / 2**30 if reserved else None,
            "flagship_memory_model_gib": _estimate(smoke),
            "compile_s_estimate": tokens_per_window / train[0]["tokens_per_s"]
            - tokens_per_window / median("tokens_per_s")}


def _estimate(smoke: bool) -> float:
    """The analytic model's peak for the flagship's step (bench.memory's), in GiB."""
    from bench.memory import estimate_training_bytes
    from l1.config import resolve

    cfg = resolve({"preset": "tiny" if smoke else "l1-gpu-compatible"})
    seq = 64 if smoke else cfg.context
    return estimate_training_bytes(cfg.model, 4 if smoke else cfg.batch_size, seq, torch.bfloat16, False,
                                   "flash", "cpu" if smoke else "cuda")["total"] / 2**30


def bench_generate(work: Path, device: str, limit: float) -> dict:
    result = run([sys.executable, "-m", "bench.generate", "--device", device, "--contexts", "256", "1024",
                  "--variants", "l1_bf16", "l1_int8", "l1_int8_eager"], work / "bench_generate.log", limit)
    if result.returncode != 0:
        raise PartFailed(last_error(result))
    return {"generate": [r for r in json_lines(result.stdout) if r["kind"] == "decode"]}


def part(name: str, summary: dict, fn, *args) -> None:
    """Run one part; its record goes into the summary, its failure (an error, a timeout, an
    unexpected exception) into summary["failures"] and the exit status."""
    started = time.perf_counter()
    try:
        summary.update(fn(*args))
    except PartFailed as exc:
        summary["failures"][name] = exc.args[0]
        if len(exc.args) > 1:
            summary.update(exc.args[1])
    except Exception as exc:  # a bug of the check itself must still end in a summary
        summary["failures"][name] = f"{type(exc).__name__}: {exc}"
    summary[f"{name}_seconds"] = round(time.perf_counter() - started, 1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="the CUDA tests, the flagship memory plan and the resume check only (< 6 minutes)")
    parser.add_argument("--data", help="the flagship's corpus (default: a synthetic one, written under --work)")
    parser.add_argument("--steps", type=int, help="the flagship's steps (default: 20 with --quick, else 200; 8 on CPU)")
    parser.add_argument("--out", help="also write the JSON summary to this file")
    parser.add_argument("--work", help="keep the logs and runs here (default: a temporary folder)")
    parser.add_argument("--cpu_smoke", action="store_true", help="the same plan on the CPU at toy size")
    args = parser.parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("error: bench.gpu needs a CUDA GPU (torch sees none); --cpu_smoke checks the plumbing on a CPU",
              file=sys.stderr)
        return 2
    work = Path(args.work or tempfile.mkdtemp(prefix="l1-bench-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    smoke, quick = args.cpu_smoke, args.quick or args.cpu_smoke
    limits = {name: limit[0 if quick and not smoke else 1] for name, limit in LIMITS.items()}  # a CPU is slow
    device = "cpu" if smoke else "cuda"
    fraction = None if smoke else min(1.0, CAP_GIB * 2**30 / torch.cuda.get_device_properties(0).total_memory)
    steps = args.steps or (8 if smoke else 20 if quick else 200)
    started = time.perf_counter()
    summary = {"kind": "gpu_summary", "quick": quick, "device": torch.cuda.get_device_name() if not smoke else "cpu",
               "torch": torch.__version__, "memory_cap_gib": None if smoke else CAP_GIB, "work": str(work),
               "failures": {}}
    part("tests", summary, tests, work, smoke, limits["tests"])
    if not quick:
        part("bench_train", summary, bench_train, work, device, fraction, smoke, limits["bench_train"])
    part("bench_memory", summary, bench_memory, work, device, quick, smoke, limits["bench_memory"])
    data = args.data or str(synthetic_corpus(work / "corpus", documents=400 if smoke else 4000))
    part("flagship", summary, flagship, work, data, steps, device, fraction, smoke, limits["flagship_run"])
    if not quick:
        part("bench_generate", summary, bench_generate, work, device, limits["bench_generate"])
    summary["seconds"] = round(time.perf_counter() - started, 1)
    summary["passed"] = not summary["failures"]
    emit(**summary)
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
