"""Decode speed and quality: L1's decoding step (eager, compiled, int8, bf16) against transformers' generate.

    python -m bench.generate [--smoke] [--device cpu|cuda] [--contexts 64 256 1024] [--batches 1 8] [--new_tokens 32]
                             [--repeats 3] [--threads 1] [--variants ...] [--n_layer 6 --n_embd 512 ...]
                             [--quality RUN [--quality_text FILE] [--quality_bytes N]]

Speed: one set of random weights for every contender: L1's GPT prepared in each dtype
(sampler.prepare) and transformers' LlamaForCausalLM built from the fp32 weights; greedy, same
threads, the contenders interleaved, medians over repeats. Decode rates count tokens after the
first one; time to first token (prefill + first sampling) is reported on its own, and so is
each compiled variant's one-off compilation and warm-up (its first call at each batch size).
The fraction of the memory-bandwidth bound uses the bytes each variant's step actually reads:
its matmul weights (int8 with their scales, bf16 or fp32) and the keys and values of every
cache slot. Quality (--quality RUN): bits per byte of a held-out text for each dtype against
fp32, and greedy agreement with fp32 on a fixed prompt set. Prints one JSON object per measurement.

On CUDA (--device cuda, as bench.gpu runs it) the same contenders run on the GPU: int8 weights
then go through the dequantizing matmul compiled into the decoding step, bf16 through cuBLAS.
One thread by default: on a shared machine, OpenMP threads that spin-wait for a descheduled
sibling make every small parallel op cost milliseconds, and the numbers measure the neighbours.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import emit, interleaved, interleaved_decodes, machine, memory_bandwidth
from l1 import sampler
from l1.config import ModelConfig, SamplingConfig
from l1.hf import to_llama
from l1.model import GPT, RMSNorm

# contender -> (weights, compiled)
VARIANTS = {"l1_eager_fp32": ("fp32", False), "l1_compiled_fp32": ("fp32", True), "l1_int8": ("int8", True),
            "l1_int8_eager": ("int8", False), "l1_bf16": ("bf16", True)}
QUALITY_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2" / "wiki.valid.tokens"


def l1_decode(decoder: sampler.Decoder, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """(seconds from the first new token to the last, seconds to the first token) through L1's sampler."""
    stamps = []

    def on_token(row: int, token: int) -> bool:
        if row == 0:
            stamps.append(time.perf_counter())
        return False

    cfg = SamplingConfig(temperature=0, max_tokens=new_tokens)
    start = time.perf_counter()
    sampler.generate_ids(decoder, prompt.tolist(), cfg, vocab_size=decoder.model.cfg.vocab_size, eot_id=None,
                         on_token=on_token)
    return stamps[-1] - stamps[0], stamps[0] - start


@torch.inference_mode()
def no_cache_decode(model: GPT, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """The naive loop: the whole text through the model for every new token (each token read
    back to the host, as a sampler streaming text must)."""
    ids, start, first = prompt.to(model.norm.weight.device), time.perf_counter(), 0.0
    for i in range(new_tokens):
        if i == 1:
            first = time.perf_counter()
        nxt = model(ids)[:, -1].argmax(-1, keepdim=True)
        nxt.tolist()
        ids = torch.cat([ids, nxt], dim=1)
    return time.perf_counter() - first, first - start


class _Stamps:
    """A generate() streamer that only notes when each step's tokens arrive (the prompt comes first)."""

    def __init__(self):
        self.times = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@torch.inference_mode()
def hf_decode(llama, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """(decode seconds, seconds to the first token) through transformers' generate (greedy)."""
    stamps = _Stamps()
    prompt = prompt.to(llama.device)
    start = time.perf_counter()
    llama.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                   min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0, streamer=stamps)
    return stamps.times[-1] - stamps.times[1], stamps.times[1] - start  # times[0] is the prompt


def step_bytes(model: GPT, batch: int, slots: int, kv_bytes: int) -> int:
    """Bytes one decoding step reads: each matmul weight (and its scales) and norm once, the keys
    and values of every cache slot, the batch's embedding rows."""
    own = [t for m in model.modules() if isinstance(m, (torch.nn.Linear, sampler.Int8Linear, RMSNorm))
           for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))]
    cfg = model.cfg
    cache = 2 * cfg.n_layer * batch * cfg.n_embd * slots * kv_bytes
    return sum(t.numel() * t.element_size() for t in own) + cache + batch * cfg.n_embd * model.embed.weight.element_size()


def matmul_floor(model: GPT, repeats: int) -> float:
    """Seconds of the fp32 column-major weight matmuls alone of one batch-1 decoding step."""
    weights = [m.weight.t().contiguous().t() for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {w.shape[1]: torch.randn(1, 1, w.shape[1]) for w in weights}

    def step():
        for w in weights:
            F.linear(inputs[w.shape[1]], w)

    with torch.inference_mode():
        step()
        return interleaved({"step": step}, repeats * 5)["step"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (python -m bench.gpu runs it there)")
    parser.add_argument("--contexts", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--smoke", action="store_true",
                        help="seconds: a 2 x 128 model, context 64, batches 1 and 2, 8 new tokens, 1 repeat")
    parser.add_argument("--no_cache_max_tokens", type=int, default=512,
                        help="skip full recomputation above this batch x context (it is quadratic)")
    parser.add_argument("--quality", metavar="RUN", help="a trained run: bits per byte and greedy agreement per dtype")
    parser.add_argument("--quality_text", default=str(QUALITY_TEXT), help="held-out text for --quality")
    parser.add_argument("--quality_bytes", type=int, default=300_000, help="bytes of it to score")
    parser.add_argument("--quality_prompts", type=int, default=16, help="greedy prompts (lines of the text)")
    shape = ModelConfig(vocab_size=8192, n_layer=6, n_head=8, n_embd=512, block_size=1024)
    for name in ("vocab_size", "n_layer", "n_head", "n_embd", "block_size"):
        parser.add_argument(f"--{name}", type=int, default=getattr(shape, name), help="model shape")
    args = parser.parse_args(argv)
    if args.smoke:
        args.contexts, args.batches, args.new_tokens, args.repeats = [64], [1, 2], 8, 1
        args.vocab_size, args.n_layer, args.n_head, args.n_embd, args.block_size = 512, 2, 2, 128, 128
        args.quality_bytes, args.quality_prompts = 20_000, 4
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 64  # a graph per compiled variant and batch size
    shape = ModelConfig(vocab_size=args.vocab_size, n_layer=args.n_layer, n_head=args.n_head,
                        n_embd=args.n_embd, block_size=args.block_size)
    torch.manual_seed(0)
    device = torch.device(args.device)
    base = GPT(shape).eval()
    llama = to_llama(base).to(device)  # fp32, transformers' own layout
    decoders = {name: sampler.Decoder(sampler.prepare(copy.deepcopy(base), device, dtype), compiled)
                for name, (dtype, compiled) in VARIANTS.items() if name in args.variants}
    fp32 = sampler.prepare(base, device, "fp32")
    bandwidth = memory_bandwidth(device)
    emit(kind="setup", **machine(), shape=f"{shape.n_layer}x{shape.n_embd} h{shape.n_head} v{shape.vocab_size}",
         params=fp32.num_params(), memory_bandwidth_gb_s=bandwidth / 1e9,
         matmul_floor_fp32_tokens_per_s=1.0 / matmul_floor(fp32, args.repeats) if device.type == "cpu" else None)
    warmed: set[tuple[str, int]] = set()
    for context in args.contexts:
        for batch in args.batches:
            decode(decoders, fp32, llama, context, batch, args, bandwidth, warmed)
        full = torch.randint(0, shape.vocab_size, (1, context), device=device)
        pre = interleaved({"l1": lambda: prefill(fp32, full), "transformers": lambda: prefill(llama, full)},
                          args.repeats)
        emit(kind="prefill", context=context, batch=1, l1_tokens_per_s=context / pre["l1"],
             transformers_tokens_per_s=context / pre["transformers"], l1_speedup=pre["transformers"] / pre["l1"])
    if args.quality:
        quality(args)


@torch.inference_mode()
def prefill(model, prompt: torch.Tensor) -> None:
    """The prompt's pass, the last position's logits only (as both samplers do), finished."""
    if isinstance(model, GPT):
        logits = model(prompt, last=True)
    else:
        logits = model(prompt, logits_to_keep=1).logits
    logits.sum().item()  # waits for the GPU's kernels


def decode(decoders: dict, fp32: GPT, llama, context: int, batch: int, args, bandwidth: float, warmed: set) -> None:
    """Decode tokens/s and time to first token of each contender at this context and batch; one JSON line each."""
    # The prompt leaves room for every new token: no window slide inside the measurement.
    prompt = torch.randint(0, fp32.cfg.vocab_size, (batch, context - args.new_tokens))
    contenders = {name: (lambda d=d: l1_decode(d, prompt, args.new_tokens)) for name, d in decoders.items()}
    contenders["transformers_generate"] = lambda: hf_decode(llama, prompt, args.new_tokens)
    if batch * context <= args.no_cache_max_tokens:
        contenders["l1_no_cache"] = lambda: no_cache_decode(fp32, prompt, args.new_tokens)
    for name, fn in contenders.items():  # compiles, warms caches; a first call per batch size is reported
        start = time.perf_counter()
        fn()
        if name in decoders and decoders[name].compiled and (name, batch) not in warmed:
            warmed.add((name, batch))
            emit(kind="warmup", contender=name, batch=batch, seconds=time.perf_counter() - start)
    seconds, firsts = interleaved_decodes(contenders, args.repeats)
    rates = {name: batch * (args.new_tokens - 1) / s for name, s in seconds.items()}
    slots = sampler.cache_slots(context, fp32.cfg.block_size)
    for name, rate in rates.items():
        model = decoders[name].model if name in decoders else fp32
        kv_bytes = model.norm.weight.element_size()
        read = step_bytes(model, batch, slots if name in decoders else context, kv_bytes)
        record = dict(kind="decode", contender=name, context=context, batch=batch, tokens_per_s=rate,
                      vs_transformers=rate / rates["transformers_generate"],
                      first_token_s=firsts[name], step_bytes=read,
                      fraction_of_bandwidth_bound=rate / (batch * bandwidth / read))
        if name == "l1_no_cache":
            del record["step_bytes"], record["fraction_of_bandwidth_bound"]  # it reads the whole text per token
        emit(**record)


@torch.inference_mode()
def bits_per_byte(lm: sampler.LoadedModel, ids: list[int]) -> float:
    """Cross-entropy of every token after the first of each context-long window, in bits per byte of text."""
    block, nats, nbytes = lm.cfg.block_size, 0.0, 0
    for start in range(0, len(ids) - 1, block):
        window = torch.tensor(ids[start:start + block + 1])
        logits = lm.model(window[None, :-1])[0].float()
        nats += F.cross_entropy(logits, window[1:], reduction="sum").item()
        nbytes += sum(len(lm.token_bytes[t]) for t in window[1:].tolist())
    return nats / math.log(2) / nbytes


def quality(args) -> None:
    """Bits per byte of the held-out text and greedy agreement with fp32, for each dtype."""
    text = Path(args.quality_text).read_text(encoding="utf-8")[:args.quality_bytes]
    lines = [line.strip() for line in text.splitlines() if len(line.split()) >= 20]
    prompts_text = [" ".join(line.split()[:12]) for line in lines[:args.quality_prompts]]
    reference: list[list[int]] | None = None
    greedy = SamplingConfig(temperature=0, max_tokens=args.new_tokens)
    base_bpb = None
    for dtype in ("fp32", "bf16", "int8"):
        lm = sampler.load(args.quality, "cpu", dtype=dtype)
        bpb = bits_per_byte(lm, lm.tokenizer.encode(text))
        prompts = [lm.tokenizer.encode(p) for p in prompts_text]
        out = [sampler.generate_ids(lm.model, [p], greedy, vocab_size=lm.tokenizer.vocab_size, eot_id=None)[0]
               for p in prompts]
        reference = reference or out
        base_bpb = base_bpb or bpb
        # Agreement: the share of new tokens before the first one that differs from fp32's.
        prefix = [next((i for i, (a, b) in enumerate(zip(o, r)) if a != b), len(r)) / len(r)
                  for o, r in zip(out, reference)]
        emit(kind="quality", dtype=dtype, run=str(lm.path), text=args.quality_text, bytes=len(text.encode()),
             bits_per_byte=bpb, vs_fp32=bpb / base_bpb - 1, greedy_identical=sum(p == 1 for p in prefix) / len(prefix),
             greedy_agreeing_prefix=sum(prefix) / len(prefix), prompts=len(prompts), new_tokens=args.new_tokens)


if __name__ == "__main__":
    main()
