"""Training throughput: L1's GPT against transformers' Llama and GPT-2 of the same size.

    python -m bench.train [--shapes l1-v1 tiny] [--dtypes fp32 [bf16]] [--modes eager compiled]
                          [--repeats 3] [--bf16_repeats 1] [--warmup 2] [--threads N]

One training step = forward + mean loss + backward + fused AdamW step on the same random batch.
The contenders: L1's GPT; LlamaForCausalLM with the very same weights (l1/hf.py); GPT2LMHeadModel
with L1's width and depth and a GELU MLP as wide as SwiGLU's three matrices (equal matmul
parameters). All (contender, eager/compiled) pairs of one dtype run in turns, together with GEMMs
of the shapes that dominate the step, so the machine's noise hits all alike; the GEMMs' best
median FLOP/s is the roofline that MFU is quoted against (on CUDA, mfu_datasheet beside it
divides by the card's dense datasheet peak, as the trainer's log does: runtime.mfu_peak). FLOPs per token are L1's
GPT.flops_per_token for every contender. bf16 autocast is measured by default only where the
CPU computes bf16 natively (elsewhere it is several times slower than fp32): ask for it with
--dtypes fp32 bf16. Prints one JSON object per measurement, then one summary per shape: L1's
default configuration (the dtype and compile setting the trainer picks on this machine for a
long run) against the best peer configuration.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from bench.common import emit, interleaved, machine
from l1 import runtime
from l1.config import ModelConfig, resolve
from l1.hf import to_llama
from l1.model import GPT

# name -> (model shape, micro-batch); both at context 256.
SHAPES = {
    "l1-v1": (ModelConfig(vocab_size=8192, n_layer=6, n_head=8, n_embd=512, block_size=256), 8),
    "tiny": (resolve({"preset": "tiny"}).model, 16),
}
DTYPES = {"fp32": None, "bf16": torch.bfloat16}  # None: no autocast
PEERS = ("llama", "gpt2")


def gpt2_like(cfg: ModelConfig, seq: int):
    """GPT2LMHeadModel as wide and deep as L1, its MLP holding as many weights as SwiGLU's."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=cfg.padded_vocab_size, n_positions=seq, n_embd=cfg.n_embd,
                        n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=3 * cfg.mlp_hidden // 2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
                        tie_word_embeddings=True, attn_implementation="sdpa")
    return GPT2LMHeadModel(config)


def build(contender: str, cfg: ModelConfig, seq: int):
    """The model in training mode and its loss function (model, idx, targets) -> mean loss."""
    torch.manual_seed(0)
    if contender == "l1":
        return GPT(cfg).train(), lambda model, idx, targets: model(idx, targets)
    if contender == "llama":
        model = to_llama(GPT(cfg))
        model.config.use_cache = False  # a training step keeps no KV cache
    else:
        model = gpt2_like(cfg, seq)
    # transformers shifts the labels itself: its loss covers T - 1 of the T positions.
    return model.train(), lambda model, idx, targets: model(input_ids=idx, labels=idx).loss


def training_step(model, loss_fn, idx, targets, amp: torch.dtype | None, compiled: bool):
    """A closure running one full training step: forward, loss, backward, fused AdamW (on the
    device of idx, waited for, so that wall time is the step's)."""
    forward = torch.compile(model) if compiled else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=True)
    precision = runtime.Precision(idx.device.type, amp or torch.float32)

    def step() -> None:
        with precision.autocast():
            loss = loss_fn(forward, idx, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        runtime.synchronize(idx.device)

    return step


def gemm_shapes(cfg: ModelConfig, tokens: int) -> list[tuple[int, int, int]]:
    """(M, K, N) of the step's big matmuls: fused qkv, SwiGLU gate/up and down, the vocabulary head."""
    C, H, V = cfg.n_embd, cfg.mlp_hidden, cfg.padded_vocab_size
    return [(tokens, C, 3 * C), (tokens, C, 2 * H), (tokens, H, C), (tokens, C, V)]


def gemm(m: int, k: int, n: int, dtype: torch.dtype, device: torch.device, target_s: float = 0.3):
    """A closure running enough (M, K) x (K, N) matmuls for about target_s, and their FLOPs."""
    x, w = torch.randn(m, k, dtype=dtype, device=device), torch.randn(n, k, dtype=dtype, device=device)
    F.linear(x, w)  # lets oneDNN (or cuBLAS) pick its kernel
    runtime.synchronize(device)
    start = time.perf_counter()
    F.linear(x, w)
    runtime.synchronize(device)
    count = max(1, round(target_s / (time.perf_counter() - start)))

    def run() -> None:
        for _ in range(count):
            F.linear(x, w)
        runtime.synchronize(device)

    return run, 2.0 * m * k * n * count


def measure_group(shape: str, dtype: str, modes: list[str], repeats: int, warmup: int,
                  device: torch.device) -> list[dict]:
    """Every contender of one shape and dtype, eager and compiled, in turns with the roofline GEMMs."""
    cfg, batch = SHAPES[shape]
    seq, amp = cfg.block_size, DTYPES[dtype]
    torch.manual_seed(1)
    data = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)
    idx, targets = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    flops_per_token = GPT(cfg).flops_per_token(seq)
    steps, params = {}, {}
    for contender in ("l1", *PEERS):
        for mode in modes:
            model, loss_fn = build(contender, cfg, seq)
            model = model.to(device)
            params[contender] = sum(p.numel() for p in model.parameters())
            step = training_step(model, loss_fn, idx, targets, amp, mode == "compiled")
            for _ in range(warmup):  # compilation and first-touch allocations happen here
                step()
            steps[(contender, mode)] = step
    gemms = {s: gemm(*s, amp or torch.float32, device) for s in gemm_shapes(cfg, batch * seq)}
    load_before = os.getloadavg()[0]
    seconds = interleaved({**steps, **{("gemm", s): run for s, (run, _) in gemms.items()}}, repeats)
    roofline = max(flops / seconds[("gemm", s)] for s, (_, flops) in gemms.items())
    datasheet = runtime.datasheet_peak(torch.cuda.get_device_name(device), amp or torch.float32) \
        if device.type == "cuda" else None
    records = []
    for (contender, mode), step_s in steps_only(seconds):
        tokens_per_s = batch * seq / step_s
        records.append(dict(kind="train", contender=contender, shape=shape, dtype=dtype,
                            compiled=mode == "compiled", batch=batch, seq=seq, params=params[contender],
                            repeats=repeats, step_s=step_s, tokens_per_s=tokens_per_s,
                            flops_per_token=flops_per_token, flops_per_s=flops_per_token * tokens_per_s,
                            roofline=roofline, mfu=flops_per_token * tokens_per_s / roofline,
                            mfu_datasheet=flops_per_token * tokens_per_s / datasheet if datasheet else None,
                            load_avg=[load_before, os.getloadavg()[0]]))
    return records


def steps_only(seconds: dict) -> list:
    """The (contender, mode) entries of interleaved()'s result, without the GEMMs."""
    return [(key, s) for key, s in seconds.items() if key[0] != "gemm"]


def label(record: dict) -> str:
    """contender/dtype/mode, e.g. 'l1/fp32/eager'."""
    return f"{record['contender']}/{record['dtype']}/{'compiled' if record['compiled'] else 'eager'}"


def summarize(shape: str, records: list[dict], default_dtype: str, default_compiled: bool) -> dict:
    """L1 against the best peer configuration of the shape, L1's default being its default dtype
    and compile setting."""
    best_peer = max((r for r in records if r["contender"] in PEERS), key=lambda r: r["tokens_per_s"])
    for r in records:
        if r["contender"] == "l1":
            r["ratio_vs_best_peer"] = r["tokens_per_s"] / best_peer["tokens_per_s"]
    default = next(r for r in records if r["contender"] == "l1" and r["dtype"] == default_dtype
                   and r["compiled"] == default_compiled)
    best_l1 = max((r for r in records if r["contender"] == "l1"), key=lambda r: r["tokens_per_s"])
    return dict(kind="summary", shape=shape, l1_default=label(default),
                l1_default_tokens_per_s=default["tokens_per_s"], l1_default_mfu=default["mfu"],
                l1_default_mfu_datasheet=default["mfu_datasheet"],
                best_peer=label(best_peer), best_peer_tokens_per_s=best_peer["tokens_per_s"],
                best_peer_mfu=best_peer["mfu"], ratio_default_vs_best_peer=default["ratio_vs_best_peer"],
                best_l1=label(best_l1), best_l1_mfu=best_l1["mfu"],
                ratio_best_l1_vs_best_peer=best_l1["ratio_vs_best_peer"])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (python -m bench.gpu runs it there)")
    device = torch.device(parser.parse_known_args(argv)[0].device)
    native_bf16 = runtime.native_bf16(device)
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES),
                        default=list(DTYPES) if native_bf16 else ["fp32"])
    parser.add_argument("--modes", nargs="+", choices=["eager", "compiled"], default=["eager", "compiled"])
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per contender (fp32)")
    parser.add_argument("--bf16_repeats", type=int, default=1,
                        help="timed steps per contender in bf16 (slow on CPUs without native bf16)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed steps first, compilation included (bf16: at most 1)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    emit(kind="setup", **machine(), cores=os.cpu_count(), native_bf16=native_bf16)
    # What the trainer picks on this device for a run long enough for throughput to matter.
    default_dtype = runtime.precision(device).name
    default_compiled = runtime.use_compile(device, None, float("inf"))
    default_mode = "compiled" if default_compiled else "eager"
    emit(kind="defaults", dtype=default_dtype, mode=default_mode)
    for shape in args.shapes:
        records = []
        for dtype in args.dtypes:
            slow = dtype == "bf16" and not native_bf16
            records += measure_group(shape, dtype, args.modes, args.bf16_repeats if slow else args.repeats,
                                     min(args.warmup, 1) if slow else args.warmup, device)
        measured_default = default_dtype in args.dtypes and default_mode in args.modes
        summary = summarize(shape, records, default_dtype, default_compiled) if measured_default else None
        for record in records:
            emit(**record)
        if summary:
            emit(**summary)


if __name__ == "__main__":
    main()
