"""torchrun with 2 CPU processes (gloo): DDP and FSDP2 follow the single-process loss curve."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, run_script, tiny_args
from l1 import runtime
from l1.checkpoint import load_file

TOLERANCE = 1e-4  # relative, per logged step: only float summation order differs
# Under bf16 autocast FSDP2 gathers every parameter in bf16, the embedding and norms too, which one
# process keeps in fp32: at the tiny preset's lr step 8 then differs by 2e-4 (by <1e-4 in fp32).
FSDP_BF16_TOLERANCE = 1e-3


def torchrun(args, nproc=2) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(REPO / "train_gpu_compatible.py"), *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def losses(run) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


@pytest.fixture(scope="module")
def single_run(corpus, tmp_path_factory):
    """The single-process reference run of an optimizer, trained once per module."""
    runs = {}

    def get(optimizer):
        if optimizer not in runs:
            tmp = tmp_path_factory.mktemp(f"single-{optimizer}")
            env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
            result = subprocess.run([sys.executable, str(REPO / "train_gpu_compatible.py"), "--optimizer", optimizer,
                                     *map(str, tiny_args(corpus, tmp, max_steps=8, log_every=1))],
                                    cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
            assert result.returncode == 0, result.stderr
            runs[optimizer] = tmp / "run"
        return runs[optimizer]
    return get


# DDP with the tiny preset's Muon (each rank orthogonalizes the same all-reduced gradient), FSDP2
# with AdamW (Muon needs whole matrices and is refused there); fsdp_accum: the same global batch in
# two micro-steps per rank, through which FSDP2 keeps its parameters gathered.
@pytest.mark.parametrize("mode, optimizer", [("ddp", "muon"), ("fsdp", "adamw"), ("fsdp_accum", "adamw")])
def test_two_processes_match_one(corpus, tmp_path, single_run, mode, optimizer):
    extra = ["--fsdp"] if mode.startswith("fsdp") else []
    if mode == "fsdp_accum":
        extra += ["--batch_size", "2", "--grad_accum", "4"]
    result = torchrun(tiny_args(corpus, tmp_path, max_steps=8, log_every=1) + ["--optimizer", optimizer] + extra)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    ours, reference = losses(run), losses(single_run(optimizer))
    assert ours.keys() == reference.keys() == set(range(1, 9))
    tolerance = FSDP_BF16_TOLERANCE if extra and runtime.native_bf16(torch.device("cpu")) else TOLERANCE
    for step in reference:
        assert ours[step] == pytest.approx(reference[step], rel=tolerance), step
    log = (run / "training.log").read_text()
    assert f"distributed: 2 processes, {'FSDP2' if extra else 'DDP'}" in log
    assert ("2 micro-steps of 2 sequences" in log) == (mode == "fsdp_accum")
    assert log.count("model tiny:") == 1, "only rank 0 writes the log"
    assert ("Muon's Newton-Schulz" in log) == (optimizer == "muon")
    # The checkpoint it wrote resumes in a single process and matches the single run's weights.
    state = load_file(run / "latest_checkpoint.pt")
    assert state["step"] == 8
    resumed = run_script("train_gpu_compatible.py", *tiny_args(corpus, tmp_path, max_steps=10))
    assert resumed.returncode == 0, resumed.stderr
    assert load_file(run / "latest_checkpoint.pt")["step"] == 10


def test_a_failed_preparation_ends_every_rank_with_one_error_line(tmp_path):
    """The main rank's data preparation fails (no text): the other rank, waiting for it, ends with
    the same error instead of a lost-connection traceback, and the error is printed once."""
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    result = torchrun(tiny_args(empty, tmp_path))
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith(("error:", "[rank"))]
    assert ours == [f"error: --data {empty}: no text found"], result.stderr[-3000:]
    assert not (tmp_path / "run" / "latest_checkpoint.pt").exists()


def test_ranks_draw_their_own_dropout_and_resume_it_bitwise(corpus, tmp_path):
    """Under DDP with --dropout each rank seeds its own stream (else both ranks would drop the
    same units), saves it in the checkpoint, and restores its own on resume: a run stopped at
    step 2 and resumed ends with the straight run's weights bit for bit."""
    flags = ["--dropout", "0.2"]
    straight = torchrun(tiny_args(corpus, tmp_path / "straight", max_steps=4, save_every=2) + flags)
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = torchrun(tiny_args(corpus, tmp_path / "resumed", max_steps=2, save_every=2) + flags)
    assert first.returncode == 0, first.stderr[-3000:]
    state = load_file(tmp_path / "resumed" / "run" / "latest_checkpoint.pt")
    ranks = state["rng"]["ranks"]
    assert len(ranks) == 2 and not torch.equal(ranks[0]["cpu"], ranks[1]["cpu"])
    assert torch.equal(ranks[0]["cpu"], state["rng"]["cpu"])  # rank 0's own is the main state
    second = torchrun(tiny_args(corpus, tmp_path / "resumed", max_steps=4, save_every=2) + flags)
    assert second.returncode == 0, second.stderr[-3000:]
    a = load_file(tmp_path / "straight" / "run" / "latest_checkpoint.pt")
    b = load_file(tmp_path / "resumed" / "run" / "latest_checkpoint.pt")
    assert a["step"] == b["step"] == 4
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
