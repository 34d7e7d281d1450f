"""Decode speed: L1's KV-cache sampler against full recomputation and transformers' generate.

    python -m bench.generate [--contexts 64 256 1024] [--new_tokens 32] [--batches 1 8] [--repeats 3]

Same weights (L1's GPT and a LlamaForCausalLM built from it), greedy, fp32, same threads, the
contenders interleaved. Prints one JSON object per measurement.
"""

from __future__ import annotations

import argparse

import torch

from bench.common import emit, interleaved, machine, memory_bandwidth
from l1.config import ModelConfig, SamplingConfig
from l1.hf import to_llama
from l1.model import GPT
from l1.sampler import generate_ids

SHAPE = ModelConfig(vocab_size=8192, n_layer=6, n_head=8, n_embd=512, block_size=1024)


def l1_decode(model, prompt: torch.Tensor, new_tokens: int) -> None:
    cfg = SamplingConfig(temperature=0, max_tokens=new_tokens)
    generate_ids(model, prompt.tolist(), cfg, vocab_size=model.cfg.vocab_size, eot_id=None,
                 device=prompt.device)


@torch.inference_mode()
def no_cache_decode(model, prompt: torch.Tensor, new_tokens: int) -> None:
    """The naive loop: the whole text through the model for every new token."""
    ids = prompt
    for _ in range(new_tokens):
        nxt = model(ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)


@torch.inference_mode()
def hf_decode(llama, prompt: torch.Tensor, new_tokens: int) -> None:
    llama.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                   min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0)


@torch.inference_mode()
def prefill(model, prompt: torch.Tensor) -> None:
    model(prompt)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no_cache_max_context", type=int, default=256,
                        help="skip full recomputation above this context (it is quadratic)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    device = torch.device("cpu")
    model = GPT(SHAPE).eval()
    llama = to_llama(model)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = memory_bandwidth(device)
    bound = bandwidth / weight_bytes  # tokens/s if each token only had to read the weights once
    emit(kind="setup", **machine(), params=model.num_params(), weight_bytes=weight_bytes,
         memory_bandwidth_gb_s=bandwidth / 1e9, batch1_bound_tokens_per_s=bound)
    for context in args.contexts:
        for batch in args.batches:
            # The prompt leaves room for every new token: no window slide inside the measurement.
            prompt = torch.randint(0, SHAPE.vocab_size, (batch, context - args.new_tokens - 1))
            decoders = {"l1_kv_cache": lambda n: l1_decode(model, prompt, n),
                        "transformers_generate": lambda n: hf_decode(llama, prompt, n)}
            if context <= args.no_cache_max_context:
                decoders["l1_no_cache"] = lambda n: no_cache_decode(model, prompt, n)
            # Decode speed excludes the prompt: time(1 + N new tokens) - time(1 new token).
            contenders = {f"{name}/{n}": (lambda fn=fn, n=n: fn(n)) for name, fn in decoders.items()
                          for n in (1, 1 + args.new_tokens)}
            seconds = interleaved(contenders, args.repeats)
            rates = {name: batch * args.new_tokens / (seconds[f"{name}/{1 + args.new_tokens}"] - seconds[f"{name}/1"])
                     for name in decoders}
            for name, rate in rates.items():
                record = dict(kind="decode", contender=name, context=context, batch=batch,
                              tokens_per_s=rate, ratio_l1_vs_this=rates["l1_kv_cache"] / rate)
                if batch == 1:
                    record["fraction_of_bandwidth_bound"] = rate / bound
                emit(**record)
            full = torch.randint(0, SHAPE.vocab_size, (batch, context))
            pre = interleaved({"l1": lambda: prefill(model, full), "transformers": lambda: prefill(llama, full)},
                              args.repeats)
            emit(kind="prefill", context=context, batch=batch,
                 l1_tokens_per_s=batch * context / pre["l1"],
                 transformers_tokens_per_s=batch * context / pre["transformers"],
                 ratio=pre["transformers"] / pre["l1"])


if __name__ == "__main__":
    main()
