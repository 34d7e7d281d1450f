"""CUDA checks, skipped on machines without a GPU; `python -m bench.gpu` runs them where there is one.

Each is what a user of one NVIDIA card would hit first: Llama parity in fp32 and bf16, a short
training run with compile and mixed precision, the fp16 + GradScaler path of cards without native
bf16, the --batch_size auto probe, and a --deterministic resume compared bitwise.
"""

import json

import pytest
import torch

import train_gpu_compatible
from conftest import tiny_args
from l1 import runtime, trainer
from l1.checkpoint import load_file
from l1.hf import to_llama
from l1.model import GPT
from test_model import SMALL
from test_trainer import stop_during

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def train(argv) -> int:
    return train_gpu_compatible.main([str(a) for a in argv])


def cuda_args(corpus, tmp, **extra):
    """tiny_args on the GPU: without --no-compile, so the CUDA default (compiled) is what runs."""
    return [a for a in tiny_args(corpus, tmp, device="cuda", **extra) if a != "--no-compile"]


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_llama_parity_on_cuda(dtype, tolerance):
    torch.manual_seed(0)
    model = GPT(SMALL).eval()
    llama = to_llama(model)
    model, llama = model.to("cuda", dtype), llama.to("cuda", dtype)
    idx = torch.randint(0, SMALL.vocab_size, (3, 40), device="cuda")
    with torch.no_grad():
        ours, theirs = model(idx).float(), llama(idx).logits.float()
    torch.testing.assert_close(ours, theirs, rtol=tolerance, atol=tolerance)


def test_compiled_amp_run_trains(corpus, tmp_path):
    assert train(cuda_args(corpus, tmp_path, max_steps=12, log_every=1)) == 0
    log = (tmp_path / "run" / "training.log").read_text()
    assert "compile on" in log and "autocast" in log and "eagerly" not in log
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert losses[-1] < losses[0]


def test_fp16_grad_scaler_path(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "precision", lambda device, amp=None: runtime.Precision(device.type, torch.float16))
    assert train(cuda_args(corpus, tmp_path, max_steps=8, log_every=1)) == 0
    state = load_file(tmp_path / "run" / "latest_checkpoint.pt")
    assert "precision torch.float16 autocast" in (tmp_path / "run" / "training.log").read_text()
    assert state["scaler"]["scale"] > 0


def test_auto_batch_probe_keeps_the_global_batch(corpus, tmp_path):
    assert train(cuda_args(corpus, tmp_path, max_steps=2, batch_size="auto", grad_accum=2)) == 0
    stored = json.loads((tmp_path / "run" / "training_args.json").read_text())
    assert stored["batch_size"] * stored["grad_accum"] == 8 * 2  # the tiny preset's 8 sequences x 2
    assert "--batch_size auto:" in (tmp_path / "run" / "training.log").read_text()


def test_deterministic_resume_is_bitwise(corpus, tmp_path, monkeypatch):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train(cuda_args(corpus, straight, max_steps=12) + ["--deterministic"]) == 0
    original = trainer._Run._train_step
    stop_during(monkeypatch, 6)  # a real SIGTERM during step 6: saved, exit 0
    assert train(cuda_args(corpus, resumed, max_steps=12) + ["--deterministic"]) == 0
    monkeypatch.setattr(trainer._Run, "_train_step", original)
    assert train(cuda_args(corpus, resumed, max_steps=12) + ["--deterministic"]) == 0
    a, b = load_file(straight / "run" / "latest_checkpoint.pt"), load_file(resumed / "run" / "latest_checkpoint.pt")
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
