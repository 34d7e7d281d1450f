"""CUDA checks, skipped on machines without a GPU; `python -m bench.gpu` runs them where there is one.

Each is what a user of one NVIDIA card would hit first: Llama parity in fp32 and bf16, a short
training run with compile and mixed precision (and what its log says of MFU and memory), the fp16
+ GradScaler path of cards without native bf16, the --batch_size auto probe, a --deterministic
resume compared bitwise, int8 decoding, and the checkpoint snapshot taken from GPU memory.
Expected values come from the presets and the code, never restated.
"""

import json
import os

import copy

import pytest
import torch

import train_gpu_compatible
from conftest import tiny_args
from l1 import runtime, sampler, trainer
from l1.checkpoint import _Snapshot, load_file
from l1.config import SamplingConfig, preset_dict, resolve
from l1.hf import to_llama
from l1.model import GPT
from test_model import SMALL
from test_trainer import stop_during

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# --deterministic needs cuBLAS's workspace setting before this process first starts CUDA (an
# earlier test's matmul would be too late: runtime refuses then); pytest imports every test
# module before running any.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", runtime.DETERMINISTIC_CUBLAS[0])


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
    """Compiled, under autocast, the loss falls; the log quotes MFU against this card's datasheet
    peak where the table knows it (else the measured roofline, saying so), and every line's
    memory has the reserved peak beside the allocated one."""
    assert train(cuda_args(corpus, tmp_path, max_steps=12, log_every=1)) == 0
    log = (tmp_path / "run" / "training.log").read_text()
    assert "compile on" in log and "autocast" in log and "eagerly" not in log
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    assert train_records[-1]["loss"] < train_records[0]["loss"]
    device = torch.device("cuda", torch.cuda.current_device())
    peak = runtime.mfu_peak(device, runtime.precision(device).compute_dtype)  # the run's roofline, cached
    datasheet = runtime.datasheet_peak(torch.cuda.get_device_name(device), runtime.precision(device).compute_dtype)
    assert peak.describe() in log and peak.flops == max(datasheet or 0.0, peak.roofline)
    assert all(0 < r["memory_bytes"] <= r["memory_reserved_bytes"] for r in train_records)
    assert all(0 < r["mfu"] < 1 for r in train_records)


def test_fp16_grad_scaler_path(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "precision", lambda device, amp=None: runtime.Precision(device.type, torch.float16))
    assert train(cuda_args(corpus, tmp_path, max_steps=8, log_every=1)) == 0
    state = load_file(tmp_path / "run" / "latest_checkpoint.pt")
    assert "precision torch.float16 autocast" in (tmp_path / "run" / "training.log").read_text()
    assert state["scaler"]["scale"] > 0


def test_auto_batch_probe_keeps_the_global_batch(corpus, tmp_path):
    """The probe (compiled, through runtime.parallelize, two micro-steps) keeps the preset's
    sequences per optimizer step; it may find them all fit one micro-batch, so the validation
    split is made large enough to hold that many windows."""
    wanted = preset_dict("tiny")["batch_size"] * 2
    assert train(cuda_args(corpus, tmp_path, max_steps=2, batch_size="auto", grad_accum=2, val_fraction=0.3)) == 0
    stored = json.loads((tmp_path / "run" / "training_args.json").read_text())
    assert stored["batch_size"] * stored["grad_accum"] == wanted
    assert "--batch_size auto:" in (tmp_path / "run" / "training.log").read_text()


def test_auto_batch_probe_respects_the_memory_cap():
    """Under a per-process cap of 256 MiB the probe finds fewer sequences than the same probe
    uncapped (which finds every wanted sequence fits), and what it finds ran within the cap."""
    cfg = resolve({"preset": "tiny", "batch_size": 0, "grad_accum": 32, "device": "cuda"})
    rt = runtime.setup("cuda")
    cap = 256 * 2**20
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda: 1.0)()  # torch 2.9 has no getter
    found = {}
    try:
        for limit in (None, cap):
            torch.cuda.set_per_process_memory_fraction(
                1.0 if limit is None else limit / torch.cuda.get_device_properties(rt.device).total_memory)
            sized = trainer.auto_batch_size(cfg, rt, log=lambda line: None)
            found[limit] = sized.batch_size
            assert sized.batch_size * sized.grad_accum == preset_dict("tiny")["batch_size"] * 32
    finally:
        torch.cuda.set_per_process_memory_fraction(fraction)
    assert 1 <= found[cap] < found[None]


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


def test_int8_decoding_dequantizes_on_cuda_and_matches_bf16():
    """On CUDA int8 weights go through the dequantizing matmul (not CUDA's naive packed kernel),
    compiled with the decoding step, and greedy decoding agrees with bf16 weights."""
    torch.manual_seed(0)
    model = GPT(SMALL).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # greedy choices well separated
    int8 = sampler.prepare(copy.deepcopy(model), torch.device("cuda"), "int8")
    bf16 = sampler.prepare(copy.deepcopy(model), torch.device("cuda"), "bf16")
    layers = [m for m in int8.modules() if isinstance(m, sampler.Int8Linear)]
    assert layers and not any(layer.packed for layer in layers)
    prompts = [torch.randint(0, SMALL.vocab_size, (12,)).tolist()]
    greedy = SamplingConfig(temperature=0, max_tokens=24)
    ours = sampler.generate_ids(sampler.Decoder(int8, compiled=True), prompts, greedy, vocab_size=SMALL.vocab_size,
                                eot_id=None)
    reference = sampler.generate_ids(bf16, prompts, greedy, vocab_size=SMALL.vocab_size, eot_id=None)
    assert sum(a == b for a, b in zip(ours[0], reference[0])) >= 20


def test_checkpoint_state_is_copied_from_gpu_memory_into_pinned_buffers():
    """On one GPU the model and optimizer state reach the snapshot as GPU tensors (no blocking CPU
    copy first), which the snapshot copies into pinned buffers it keeps for the next save."""
    model = GPT(SMALL).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)
    idx = torch.zeros(1, 8, dtype=torch.long, device="cuda")
    model(idx, idx).backward()
    optimizer.step()
    state = {"model": runtime.model_state(model), "optimizer": runtime.optimizer_state(model, [optimizer])}
    assert all(t.is_cuda for t in state["model"].values())
    snapshot = _Snapshot()
    copied = snapshot.take(state)
    assert all(t.device.type == "cpu" and t.is_pinned() for t in copied["model"].values())
    for name, tensor in state["model"].items():
        assert torch.equal(copied["model"][name], tensor.cpu()), name
    buffers = list(snapshot.buffers)
    snapshot.take(state)
    assert all(a is b for a, b in zip(buffers, snapshot.buffers))  # reused, not reallocated


def test_decoding_replays_its_cuda_graph_across_calls():
    """The compiled decoding step runs as a CUDA graph (no input it updates in place makes inductor
    skip CUDA graphs) and a second generate() of the same batch size reuses its state and graph:
    nothing compiles again, and the same seed gives the same tokens."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    decoder = sampler.Decoder(sampler.prepare(GPT(SMALL), torch.device("cuda"), "bf16"), compiled=True)
    cfg = SamplingConfig(temperature=0.8, top_k=20, repetition_penalty=1.2, max_tokens=30, seed=1)
    skips = counters["inductor"]["cudagraph_skips"]

    def run():
        return sampler.generate_ids(decoder, [[1, 2, 3], [4, 5]], cfg, vocab_size=SMALL.vocab_size, eot_id=None)

    first = run()
    graphs = counters["stats"]["unique_graphs"]
    assert run() == first and len(decoder.states) == 1
    assert counters["stats"]["unique_graphs"] == graphs and counters["inductor"]["cudagraph_skips"] == skips
