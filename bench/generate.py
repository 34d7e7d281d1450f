"""Decode speed: L1's KV-cache sampler against full recomputation and transformers' generate.

    python -m bench.generate [--quick] [--contexts 64 256 1024] [--batches 1 8] [--new_tokens 32]
                             [--repeats 3] [--threads 1] [--n_layer 6 --n_head 8 --n_embd 512 ...]

Same weights (L1's GPT and a LlamaForCausalLM built from it), greedy, fp32, same threads, the
contenders interleaved, medians over repeats. Decode rates count tokens after the first one, so
the prompt's prefill is excluded; prefill is measured on its own at batch 1. At batch 1, L1 also
runs with transformers' row-major weights, which separates the sampler from the weight layout
(see sampler.prepare). Prints one JSON object per measurement.

One thread by default: on a shared machine, OpenMP threads that spin-wait for a descheduled
sibling make every small parallel op cost milliseconds, and the numbers measure the neighbours.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F

from bench.common import emit, interleaved, machine, memory_bandwidth
from l1.config import ModelConfig, SamplingConfig
from l1.hf import to_llama
from l1.model import GPT
from l1.sampler import generate_ids, prepare


def l1_decode(model: GPT, prompt: torch.Tensor, new_tokens: int) -> float:
    """Seconds from the first new token to the last through L1's sampler (greedy)."""
    stamps = []

    def on_token(row: int, token: int) -> bool:
        if row == 0:
            stamps.append(time.perf_counter())
        return False

    cfg = SamplingConfig(temperature=0, max_tokens=new_tokens)
    generate_ids(model, prompt.tolist(), cfg, vocab_size=model.cfg.vocab_size, eot_id=None, on_token=on_token)
    return stamps[-1] - stamps[0]


@torch.inference_mode()
def no_cache_decode(model: GPT, prompt: torch.Tensor, new_tokens: int) -> float:
    """The naive loop: the whole text through the model for every new token."""
    ids, start = prompt, 0.0
    for i in range(new_tokens):
        if i == 1:
            start = time.perf_counter()
        nxt = model(ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return time.perf_counter() - start


class _Stamps:
    """A generate() streamer that only notes when each step's tokens arrive (the prompt comes first)."""

    def __init__(self):
        self.times = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@torch.inference_mode()
def hf_decode(llama, prompt: torch.Tensor, new_tokens: int) -> float:
    """Seconds from the first new token to the last through transformers' generate (greedy)."""
    stamps = _Stamps()
    llama.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                   min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0, streamer=stamps)
    return stamps.times[-1] - stamps.times[1]  # times[0] is the prompt, before the prefill


@torch.inference_mode()
def prefill(model, prompt: torch.Tensor) -> None:
    model(prompt)


def matmul_floor(model: GPT, column_major: bool, repeats: int) -> float:
    """Seconds of the weight matmuls alone of one batch-1 decoding step (the rest costs nothing)."""
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if column_major:
        weights = [w.t().contiguous().t() for w in weights]
    else:
        weights = [w.contiguous() for w in weights]
    inputs = {w.shape[1]: torch.randn(1, 1, w.shape[1]) for w in weights}

    def step():
        for w in weights:
            F.linear(inputs[w.shape[1]], w)

    with torch.inference_mode():
        step()
        return interleaved({"step": step}, repeats * 5)["step"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    parser.add_argument("--quick", action="store_true", help="contexts 64 256, batch 1, 8 new tokens")
    parser.add_argument("--no_cache_max_tokens", type=int, default=512,
                        help="skip full recomputation above this batch x context (it is quadratic)")
    shape = ModelConfig(vocab_size=8192, n_layer=6, n_head=8, n_embd=512, block_size=1024)
    for name in ("vocab_size", "n_layer", "n_head", "n_embd", "block_size"):
        parser.add_argument(f"--{name}", type=int, default=getattr(shape, name), help="model shape")
    args = parser.parse_args(argv)
    if args.quick:
        args.contexts, args.batches, args.new_tokens = [64, 256], [1], 8
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = ModelConfig(vocab_size=args.vocab_size, n_layer=args.n_layer, n_head=args.n_head,
                        n_embd=args.n_embd, block_size=args.block_size)
    torch.manual_seed(0)
    device = torch.device("cpu")
    model = GPT(shape).eval()
    llama = to_llama(model)  # fp32, transformers' own (row-major) layout
    row_major = copy.deepcopy(model)  # the same, for L1's sampler
    model = prepare(model, device)  # as sampler.load leaves it
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = memory_bandwidth(device)
    bound = bandwidth / weight_bytes  # tokens/s if a batch-1 token only had to read the weights once
    floors = {layout: 1.0 / matmul_floor(model, layout == "column_major", args.repeats)
              for layout in ("row_major", "column_major")}
    emit(kind="setup", **machine(), shape=f"{shape.n_layer}x{shape.n_embd} h{shape.n_head} v{shape.vocab_size}",
         params=model.num_params(), weight_bytes=weight_bytes, memory_bandwidth_gb_s=bandwidth / 1e9,
         bandwidth_bound_tokens_per_s=bound,
         **{f"matmul_floor_{k}_tokens_per_s": v for k, v in floors.items()})
    for context in args.contexts:
        for batch in args.batches:
            decode(model, row_major, llama, context, batch, args, bound)
        full = torch.randint(0, shape.vocab_size, (1, context))
        pre = interleaved({"l1": lambda: prefill(model, full), "transformers": lambda: prefill(llama, full)},
                          args.repeats)
        emit(kind="prefill", context=context, batch=1, l1_tokens_per_s=context / pre["l1"],
             transformers_tokens_per_s=context / pre["transformers"], l1_speedup=pre["transformers"] / pre["l1"])


def decode(model: GPT, row_major: GPT, llama, context: int, batch: int, args, bound: float) -> None:
    """Decode tokens/s of each contender at this context and batch; one JSON line each."""
    # The prompt leaves room for every new token: no window slide inside the measurement.
    prompt = torch.randint(0, model.cfg.vocab_size, (batch, context - args.new_tokens))
    contenders = {"l1_kv_cache": lambda: l1_decode(model, prompt, args.new_tokens),
                  "transformers_generate": lambda: hf_decode(llama, prompt, args.new_tokens)}
    if batch == 1:
        contenders["l1_kv_cache_row_major"] = lambda: l1_decode(row_major, prompt, args.new_tokens)
    if batch * context <= args.no_cache_max_tokens:
        contenders["l1_no_cache"] = lambda: no_cache_decode(model, prompt, args.new_tokens)
    seconds = interleaved(contenders, args.repeats)
    rates = {name: batch * (args.new_tokens - 1) / s for name, s in seconds.items()}
    for name, rate in rates.items():
        record = dict(kind="decode", contender=name, context=context, batch=batch, tokens_per_s=rate,
                      l1_speedup=rates["l1_kv_cache"] / rate)
        if batch == 1:
            record["fraction_of_bandwidth_bound"] = rate / bound
        emit(**record)


if __name__ == "__main__":
    main()
