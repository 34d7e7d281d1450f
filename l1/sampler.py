"""Load a trained run for inference and generate text with the model's KV cache.

The prompt is processed once (prefill, the last position's logits only); each new token is then
one static-shape step through the cache (its position and slot as tensors, attention over every
slot with a mask, the sampling of the next token included), which Decoder can compile into one
graph (CUDA graphs on a GPU, replayed from call to call on the state it keeps per batch size). Weights can
be int8 or bf16 for inference (prepare), read once per token: decoding is memory-bound.
Several prompts decode together, left-padded, with a key mask and per-row positions. When the text outgrows the context, the newest half of the context is kept
and re-prefilled into the same cache. A prompt longer than the context is refused rather than
cut, since cutting would silently change what is continued. Text is decoded incrementally from the tokens' bytes, so
streaming and stop strings cost the same for every token.
"""

from __future__ import annotations

import codecs
import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from l1 import chat, checkpoint, runtime
from l1.config import ModelConfig, SamplingConfig
from l1.errors import L1Error
from l1.model import GPT, KVCache
from l1.tokenizer import Tokenizer

# Rows decoded together: bounds the KV cache's memory when many prompts or samples are asked for.
ROWS_PER_BATCH = 16


@dataclass
class LoadedModel:
    """A model ready for inference, with its own tokenizer."""

    model: GPT
    tokenizer: Tokenizer
    path: Path
    step: int
    device: torch.device
    dtype: str = "fp32"  # the weights: fp32, bf16 or int8 (see prepare)
    decoder: Decoder | None = None  # the decoding step (default: eager); see compile_decoder

    @property
    def cfg(self) -> ModelConfig:
        return self.model.cfg

    @functools.cached_property
    def token_bytes(self) -> list[bytes]:
        """The bytes each token id stands for (see tokens_as_bytes())."""
        return tokens_as_bytes(self.tokenizer)


def load(model_path: str | None = None, device: str = "auto", models_root: Path = Path("models"),
         dtype: str = "auto") -> LoadedModel:
    """Load a run for sampling (see checkpoint.load_run) onto the device.

    dtype: the weights for inference (see prepare); the checkpoint itself is never changed.
    """
    rt = runtime.setup(device)  # a bad --device or --dtype fails before the checkpoint is read
    chosen = pick_dtype(rt.device, dtype)
    run = checkpoint.load_run(model_path, models_root)
    return LoadedModel(prepare(run.model(), rt.device, chosen), run.tokenizer, run.path, run.step, rt.device, chosen)


DTYPES = ("auto", "fp32", "bf16", "int8")


def pick_dtype(device: torch.device, requested: str = "auto") -> str:
    """The inference weights: `requested`, or for auto what measured fastest on this kind of
    device within 1% of fp32's bits per byte (BENCHMARKS.md, "Decoding"): int8 on a CPU with
    native bf16 (its int8 kernel runs bf16 activations), bf16 on a GPU with native bf16, else fp32."""
    if requested not in DTYPES:
        raise L1Error(f"unknown --dtype {requested!r}; use one of {', '.join(DTYPES)}")
    if requested != "auto":
        return requested
    if not runtime.native_bf16(device):
        return "fp32"
    return "int8" if device.type == "cpu" else "bf16"


def prepare(model: GPT, device: torch.device, dtype: str = "fp32") -> GPT:
    """The model in eval mode on the device with its weights in dtype (fp32, bf16 or int8).

    int8: every matmul weight (the head too, a tied one as its own copy) becomes Int8Linear, the
    rest of the model and the activations bf16 where the device computes it natively, else fp32.
    On CPU float matmul weights are stored column-major (same values, transposed strides):
    a single decoding row then multiplies through MKL's streaming gemv variant, measured ~30%
    faster at batch 1 than the row-major dot-product one, and no different for larger batches.
    """
    if dtype == "int8":
        activations = torch.bfloat16 if runtime.native_bf16(device) else torch.float32
    else:
        activations = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    model = model.to(device=device).eval()
    with torch.no_grad():
        for parent in list(model.modules()):
            for name, child in parent.named_children():
                if isinstance(child, nn.Linear) and dtype == "int8":  # the embedding keeps its float table
                    setattr(parent, name, Int8Linear(child.weight, activations))
                elif isinstance(child, nn.Linear) and device.type == "cpu":
                    child.weight.data = child.weight.data.t().contiguous().t()
    return model.to(dtype=activations)


class Int8Linear(nn.Module):
    """A bias-free linear layer with int8 weights and one symmetric scale per output channel.

    Weight-only quantization: activations stay in `dtype`, so each token reads a quarter of the
    fp32 weight bytes. On CPU the matmul is torch's int8 weight-pack kernel; elsewhere it is the
    dequantizing matmul that torch.compile fuses into the compiled decoding step (gpt-fast's
    form): CUDA's _weight_int8pack_mm is a naive kernel (one thread per output, uncoalesced
    reads), slower than bf16 weights at decoding and far slower at prefill.
    """

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        w = weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
        self.register_buffer("weight", torch.round(w / scale[:, None]).to(torch.int8))
        self.register_buffer("scale", scale.to(dtype))
        self.packed = weight.device.type == "cpu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            flat = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), self.weight, self.scale)
            return flat.view(*x.shape[:-1], -1)
        return F.linear(x, self.weight.to(x.dtype)) * self.scale


# ---- logits processing: small pure functions ---------------------------------------------------

def mask_invalid(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Padded embedding rows (ids >= the tokenizer's vocabulary) can never be sampled."""
    if vocab_size >= logits.shape[-1]:
        return logits
    out = logits.clone()
    out[..., vocab_size:] = float("-inf")
    return out


def repetition_penalty(logits: torch.Tensor, seen: torch.Tensor | None, penalty: float) -> torch.Tensor:
    """CTRL's penalty: for tokens already in the text, divide positive logits and multiply negative ones."""
    if penalty == 1.0 or seen is None:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (0 = keep all)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p (at least one)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass of the tokens ranked above each one
    remove = torch.zeros_like(before, dtype=torch.bool).scatter(-1, order, before >= p)
    return logits.masked_fill(remove, float("-inf"))


def sampling_noise(cfg: SamplingConfig, rows: int, width: int, generator: torch.Generator) -> torch.Tensor | None:
    """The random draw of one sampling step: Exp(1) noise per row and token (None when greedy),
    drawn from the generator, outside any compiled graph (which cannot take a generator)."""
    if cfg.temperature == 0:
        return None
    return torch.empty((rows, width), device=generator.device).exponential_(generator=generator)


def next_tokens(logits: torch.Tensor, seen: torch.Tensor | None, cfg: SamplingConfig, vocab_size: int,
                generator: torch.Generator) -> torch.Tensor:
    """One token per row from the last position's logits (B, V); temperature 0 is greedy."""
    return pick_tokens(logits, seen, cfg, vocab_size, sampling_noise(cfg, *logits.shape, generator))


def pick_tokens(logits: torch.Tensor, seen: torch.Tensor | None, cfg: SamplingConfig, vocab_size: int,
                noise: torch.Tensor | None) -> torch.Tensor:
    """next_tokens with its random draw given (sampling_noise's). Sampling is the exponential
    race: the argmax of p / E with E ~ Exp(1) picks token i with probability p_i, as multinomial
    does, but in plain tensor ops that compile into the decoding step."""
    logits = repetition_penalty(mask_invalid(logits.float(), vocab_size), seen, cfg.repetition_penalty)
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    logits = top_p_filter(top_k_filter(logits / cfg.temperature, cfg.top_k), cfg.top_p)
    return (logits.softmax(dim=-1) / noise[:, :logits.shape[-1]]).argmax(dim=-1)


# ---- incremental decoding of text ---------------------------------------------------------------

@functools.cache
def _byte_of_char() -> dict[str, int]:
    """GPT-2's byte-level alphabet reversed: the printable character that stands for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:  # the other bytes are moved past 255, in order
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def tokens_as_bytes(tokenizer: Tokenizer) -> list[bytes]:
    """The bytes of each token id, as the byte-level decoder joins them before UTF-8 decoding.

    Like tokenizers' ByteLevel decoder: a token spelled in the byte alphabet is those bytes; any
    other (an added token such as end-of-text) is its own UTF-8 text.
    """
    table = _byte_of_char()
    out = []
    for i in range(tokenizer.vocab_size):
        piece = tokenizer.hf.id_to_token(i) or ""
        if all(c in table for c in piece):
            out.append(bytes(table[c] for c in piece))
        else:
            out.append(piece.encode("utf-8"))
    return out


class Detokenizer:
    """The text of a growing token sequence, released in pieces as they become final.

    A UTF-8 character split across tokens waits for its last byte; text that could still turn
    out to begin a stop string waits until it cannot. The joined pieces equal
    tokenizer.decode(ids), cut before the first stop string. Each token costs the same.
    """

    def __init__(self, token_bytes: list[bytes], stops: tuple[str, ...] = ()):
        self._bytes = token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # U+FFFD like the tokenizer
        self._stops = stops
        self._holdback = max((len(s) for s in stops), default=1) - 1
        self._pending = ""  # decoded, not yet released: never longer than holdback between calls
        self._pieces: list[str] = []
        self.stopped = False

    @property
    def text(self) -> str:
        """Everything released so far."""
        return "".join(self._pieces)

    def add(self, token: int) -> str:
        """Feed one token; return the text it made final (often '')."""
        return self._release(self._utf8.decode(self._bytes[token]), final=False)

    def finish(self) -> str:
        """No more tokens: release what is left (an unfinished character becomes U+FFFD)."""
        return self._release(self._utf8.decode(b"", final=True), final=True)

    def _release(self, new: str, final: bool) -> str:
        if self.stopped:
            return ""
        # A stop string that ends in `new` starts within the held-back tail, so this finds the first one.
        pending = self._pending + new
        cuts = [i for i in (pending.find(s) for s in self._stops) if i >= 0]
        if cuts:
            pending, self.stopped, final = pending[:min(cuts)], True, True
        end = len(pending) if final else max(0, len(pending) - self._holdback)
        piece, self._pending = pending[:end], pending[end:]
        self._pieces.append(piece)
        return piece


# ---- decoding -----------------------------------------------------------------------------------

# Decoded tokens are read back to the host (for end-of-text, stop strings and streaming) every
# this many steps on a GPU, so that the GPU runs ahead instead of waiting on the host each token;
# a finished text costs at most this many ignored steps. A CPU has nothing to run ahead of.
HOST_SYNC_EVERY = {"cuda": 8}


def _decode(model: GPT, tokens: torch.Tensor, state: DecodeState, noise: torch.Tensor | None,
            cfg: SamplingConfig, vocab_size: int) -> torch.Tensor:
    """One static decoding step, bookkeeping and sampling included: each row's token (B,) goes
    through the cache at state's slot, then the slot, positions and key mask advance and the
    next tokens (B,) are sampled (and marked seen, for the repetition penalty), all in tensors,
    so that the whole step is one graph."""
    state.key_mask.index_fill_(1, state.cache.slot, True)
    logits = model(tokens[:, None], cache=state.cache, positions=state.positions, key_mask=state.key_mask)[:, -1]
    state.cache.slot += 1
    state.positions += 1
    nxt = pick_tokens(logits, state.seen, cfg, vocab_size, noise)
    if state.seen is not None:
        state.seen.scatter_(1, nxt[:, None], True)
    return nxt


@dataclass
class DecodeState:
    """What a decoding step reads and updates in place: the KV cache (and its slot), the key
    mask, the next positions, the tokens already seen. Kept by the Decoder per batch size and
    cache length, so that a compiled step's CUDA graph finds them at the same addresses on every
    generate() call instead of recording a new graph."""

    cache: KVCache
    slot: torch.Tensor  # (1,): the cache slot of the next token (the cache's own while decoding)
    key_mask: torch.Tensor  # (B, slots) bool: which slots each row may attend to
    positions: torch.Tensor  # (B, 1): the position of each row's next token
    seen: torch.Tensor | None  # (B, padded vocab) bool, with a repetition penalty only


class Decoder:
    """A model's static decoding step, eager or compiled, with its persistent decoding states.

    Compiled, the step is traced once per batch size and sampling setting, with the cache length
    left dynamic, so that a longer text needs no new compilation; on CUDA with CUDA graphs
    ("reduce-overhead"), whose inputs that the step updates stay at fixed addresses (the states
    are kept and reused). Where compilation fails, one line is logged and the step runs eagerly
    (runtime.compile_function).
    """

    def __init__(self, model: GPT, compiled: bool = False, log: Callable[[str], None] = print):
        self.model, self.compiled, self.log = model, compiled, log
        self.states: dict[tuple[int, int, bool], DecodeState] = {}
        self.steps: dict[tuple, Callable] = {}

    def state(self, rows: int, slots: int, seen: bool) -> DecodeState:
        """The decoding state of this batch size and cache length, emptied (stale cache slots are
        masked out, never read)."""
        key = (rows, slots, seen)
        if key not in self.states:
            norm = self.model.norm.weight
            device = norm.device
            cache = KVCache(self.model.cfg, rows, slots, device=device, dtype=norm.dtype)
            state = DecodeState(cache, torch.zeros(1, dtype=torch.long, device=device),
                                torch.zeros((rows, slots), dtype=torch.bool, device=device),
                                torch.zeros((rows, 1), dtype=torch.long, device=device),
                                torch.zeros((rows, self.model.cfg.padded_vocab_size), dtype=torch.bool, device=device)
                                if seen else None)
            if self.compiled:  # CUDA graphs update them in place rather than through copies
                for t in [*cache.k, *cache.v, state.slot, state.key_mask, state.positions,
                          *([state.seen] if seen else [])]:
                    torch._dynamo.mark_static_address(t)
            self.states[key] = state
        state = self.states[key]
        state.key_mask.zero_()
        if state.seen is not None:
            state.seen.zero_()
        return state

    def __call__(self, tokens: torch.Tensor, state: DecodeState, noise: torch.Tensor | None, cfg: SamplingConfig,
                 vocab_size: int) -> torch.Tensor:
        """The next tokens (B,) after tokens (B,)."""
        if not self.compiled:
            return _decode(self.model, tokens, state, noise, cfg, vocab_size)
        key = (cfg.temperature, cfg.top_k, cfg.top_p, cfg.repetition_penalty, vocab_size)
        if key not in self.steps:  # the sampling setting is a constant of its graph (a closure's)
            def step(model, tokens, state, noise):
                return _decode(model, tokens, state, noise, cfg, vocab_size)

            cuda = self.model.norm.weight.device.type == "cuda"
            self.steps[key] = runtime.compile_function(step, self.log, dynamic=True,
                                                       mode="reduce-overhead" if cuda else None)
        torch.compiler.cudagraph_mark_step_begin()  # the previous step's tokens are consumed
        return self.steps[key](self.model, tokens, state, noise).clone()  # the graph's output is reused


def compile_decoder(lm: LoadedModel, log: Callable[[str], None] = print) -> None:
    """Give lm a compiled decoding step, warmed up at batch 1 past CUDA graphs' recording (the
    one-off compilation is logged with its time); where the device cannot compile, say so and
    keep decoding eagerly."""
    if lm.device.type == "cpu" and runtime.cpp_compiler() is None:
        log("no C++ compiler for torch.compile's CPU kernels (install g++ or set CXX): decoding eagerly")
        return
    lm.decoder = Decoder(lm.model, compiled=True, log=log)
    start = time.perf_counter()
    # cudagraph trees run a graph eagerly once, then record it, then replay: 4 tokens pass all three.
    generate_ids(lm.decoder, [[0]], SamplingConfig(temperature=0, max_tokens=4), vocab_size=lm.tokenizer.vocab_size,
                 eot_id=None)
    log(f"decoding step compiled and warmed up in {time.perf_counter() - start:.1f} s")


def cache_slots(needed: int, block_size: int) -> int:
    """KV cache length for a generation of `needed` tokens: the next power of two (at least 64),
    at most the context. Attention reads every slot, so it should not be much longer than the
    text; and few distinct lengths keep CUDA graphs few."""
    return min(block_size, max(64, 1 << (needed - 1).bit_length()))


class _ContextWindow:
    """The rows' token histories and a static decoding state over the newest of them (left-padded
    to one width)."""

    def __init__(self, decoder: Decoder, rows: list[list[int]], max_new: int, penalty: bool = False):
        self.model, self.decoder, self.rows = decoder.model, decoder, rows
        self.block = self.model.cfg.block_size
        width = max(len(r) for r in rows)
        # Only as many slots as this generation can fill; a slide needs the whole context.
        self.state = decoder.state(len(rows), cache_slots(width + max_new, self.block), penalty)
        self.cache = self.state.cache
        if penalty:
            device = self.cache.k[0].device
            for i, ids in enumerate(rows):
                self.state.seen[i, torch.tensor(ids, device=device)] = True

    @property
    def full(self) -> bool:
        """Whether the next step must first slide the context (see step)."""
        return self.cache.length == self.block

    def prefill(self, keep: int) -> torch.Tensor:
        """Run each row's last `keep` tokens through the emptied cache; the last position's logits."""
        tails = [row[-keep:] for row in self.rows]
        width = max(len(t) for t in tails)
        device = self.cache.k[0].device
        ids = torch.zeros((len(tails), width), dtype=torch.long)
        real = torch.zeros((len(tails), width), dtype=torch.bool)
        for i, tail in enumerate(tails):
            ids[i, width - len(tail):] = torch.tensor(tail)
            real[i, width - len(tail):] = True
        ids, real = ids.to(device), real.to(device)
        self.cache.slot, self.cache.length = None, 0  # reuse the buffers: stale slots are masked out
        positions = (real.cumsum(1) - 1).clamp(min=0)
        if real.all():
            logits = self.model(ids, cache=self.cache, last=True)[:, -1]
        else:
            logits = self.model(ids, cache=self.cache, positions=positions, key_mask=real, last=True)[:, -1]
        self.state.key_mask.zero_()
        self.state.key_mask[:, :width] = real
        self.state.positions.copy_(positions[:, -1:] + 1)
        self.state.slot.fill_(width)
        self.cache.slot = self.state.slot
        return logits

    def sample(self, logits: torch.Tensor, cfg: SamplingConfig, vocab_size: int, noise) -> torch.Tensor:
        """Eager sampling after a prefill (the step samples on its own), marking the tokens seen."""
        tokens = pick_tokens(logits, self.state.seen, cfg, vocab_size, noise)
        if self.state.seen is not None:
            self.state.seen.scatter_(1, tokens[:, None], True)
        return tokens

    def step(self, tokens: torch.Tensor, cfg: SamplingConfig, vocab_size: int, noise) -> torch.Tensor:
        """One token per row through the cache, and the next ones sampled; a full context first
        slides to its newest half (the rows' histories must then be up to date)."""
        if self.full:
            return self.sample(self.prefill(self.block // 2), cfg, vocab_size, noise)
        tokens = self.decoder(tokens, self.state, noise, cfg, vocab_size)
        self.cache.length += 1
        return tokens


@torch.inference_mode()
def generate_ids(model: GPT | Decoder, prompts: list[list[int]], cfg: SamplingConfig, *, vocab_size: int,
                 eot_id: int | None, generator: torch.Generator | None = None,
                 on_token: Callable[[int, int], bool] | None = None) -> list[list[int]]:
    """Token-level decoding of a batch of non-empty prompts: the new ids of each row.

    model: a model (decoded eagerly) or its Decoder. A prompt longer than the context is read
    from its newest block_size tokens. A row ends at eot_id (not included; None: never), after
    cfg.max_tokens, or when on_token(row, token) is true. Tokens reach the host (and on_token)
    every HOST_SYNC_EVERY steps on a GPU (the first one at once), every step elsewhere.
    generator: the random stream (default: seeded by cfg.seed).
    """
    decoder = model if isinstance(model, Decoder) else Decoder(model)
    model = decoder.model
    device = model.norm.weight.device
    if generator is None:
        generator = torch.Generator(device).manual_seed(cfg.seed)
    window = _ContextWindow(decoder, [list(p) for p in prompts], cfg.max_tokens, cfg.repetition_penalty != 1.0)
    generated: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    every = HOST_SYNC_EVERY.get(device.type, 1)
    width = model.cfg.padded_vocab_size

    def noise():
        return sampling_noise(cfg, len(prompts), width, generator)

    tokens = window.sample(window.prefill(model.cfg.block_size), cfg, vocab_size, noise())
    pending, produced = [tokens], 1
    while True:
        # The first token at once (time to first token); then every `every` steps, at the end, before a slide.
        if len(pending) == every or produced in (1, cfg.max_tokens) or window.full:
            for step_tokens in torch.stack(pending).tolist():  # one host sync for the pending steps
                for i, token in enumerate(step_tokens):
                    if done[i]:
                        continue
                    if token == eot_id:
                        done[i] = True
                        continue
                    window.rows[i].append(token)
                    generated[i].append(token)
                    if on_token is not None and on_token(i, token):
                        done[i] = True
            pending = []
            if all(done) or produced == cfg.max_tokens:
                break
        # Finished rows keep decoding their (ignored) tokens: rows never see each other.
        tokens = window.step(tokens, cfg, vocab_size, noise())
        pending.append(tokens)
        produced += 1
    return generated


def encode_prompts(tokenizer: Tokenizer, prompts: list[str], block_size: int) -> list[list[int]]:
    """Token ids of each prompt; an empty prompt or one longer than the context is refused."""
    out = []
    for prompt in prompts:
        if not prompt.strip():
            raise L1Error("empty prompt: give some text to continue")
        try:  # undecodable input bytes reach Python as lone surrogates, which are no text
            prompt.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise L1Error(f"the prompt holds bytes that are not UTF-8 text (at character {exc.start}); "
                          "give the prompt as UTF-8") from None
        ids = tokenizer.encode(prompt)
        if len(ids) > block_size:
            raise L1Error(f"the prompt is {len(ids)} tokens, longer than the model's context of "
                          f"{block_size} tokens; shorten it")
        out.append(ids)
    return out


@torch.inference_mode()
def generate(lm: LoadedModel, prompts: list[str], cfg: SamplingConfig, stop: tuple[str, ...] = (),
             on_piece: Callable[[int, str], None] | None = None, echo: bool = False) -> list[str]:
    """Continue each prompt cfg.num_samples times; returns the continuations, prompt excluded.

    Rows are the prompts, each repeated num_samples times, in order. A row's text is cut before
    the first of the stop strings. on_piece(row, text) receives each row's text as it becomes
    final; the pieces of a row join to its returned text, preceded by its prompt with echo (sent
    once the request is found valid, so that nothing is shown for a refused one).
    """
    if not prompts:
        raise L1Error("no prompt to continue")
    if any(not s for s in stop):
        raise L1Error("--stop must not be empty")
    ids = encode_prompts(lm.tokenizer, prompts, lm.cfg.block_size)
    rows = [p for p in ids for _ in range(cfg.num_samples)]
    streams = [Detokenizer(lm.token_bytes, tuple(stop)) for _ in rows]
    generator = torch.Generator(lm.device).manual_seed(cfg.seed)  # one stream for every chunk

    def emit(row: int, piece: str) -> None:
        if piece and on_piece is not None:
            on_piece(row, piece)

    if echo:
        for row in range(len(rows)):
            emit(row, prompts[row // cfg.num_samples])

    def on_token(first: int, i: int, token: int) -> bool:
        emit(first + i, streams[first + i].add(token))
        return streams[first + i].stopped

    for first in range(0, len(rows), ROWS_PER_BATCH):
        chunk = rows[first:first + ROWS_PER_BATCH]
        generate_ids(lm.decoder or lm.model, chunk, cfg, vocab_size=lm.tokenizer.vocab_size, eot_id=lm.tokenizer.eot_id,
                     generator=generator, on_token=functools.partial(on_token, first))
        for row in range(first, first + len(chunk)):
            emit(row, streams[row].finish())
    return [s.text for s in streams]


class Conversation:
    """A multi-turn chat with a model fine-tuned on the chat template (l1/chat.py): the history is
    kept and sent again each turn; when it outgrows the context, the oldest turns are dropped (the
    system message stays), which `log` is told once."""

    def __init__(self, lm: LoadedModel, cfg: SamplingConfig, system: str | None = None,
                 log: Callable[[str], None] = print):
        chat.require_template(lm.tokenizer, str(lm.path))
        if cfg.num_samples != 1:
            raise L1Error("--chat answers each turn once: leave out --num_samples")
        self.lm, self.cfg, self.log, self.dropped = lm, cfg, log, 0
        self.system = [{"role": "system", "content": system}] if system else []
        self.turns: list[dict] = []  # user and assistant messages, oldest first
        ids = chat.token_ids(lm.tokenizer)
        self.end_id = ids[chat.END]
        # A model that starts another turn (or a document) has ended its own.
        self.stop_ids = {lm.tokenizer.eot_id, *(ids[t] for t in chat.ROLE_TOKENS.values())}

    def _prompt(self) -> list[int]:
        """The ids of the conversation so far with room for a reply: the oldest turns dropped as needed."""
        room = self.lm.cfg.block_size - min(self.cfg.max_tokens, self.lm.cfg.block_size // 2)
        while True:
            ids = self.lm.tokenizer.encode(chat.render(self.system + self.turns, add_generation_prompt=True))
            if len(ids) <= room or len(self.turns) == 1:
                break
            self.turns = self.turns[2:] if self.turns[0]["role"] == "user" else self.turns[1:]
            if not self.dropped:
                self.log(f"the conversation outgrew the model's context of {self.lm.cfg.block_size} tokens: "
                         "its oldest turns are dropped from now on")
            self.dropped += 1
        if len(ids) > room:
            raise L1Error(f"this message and the system text are {len(ids)} tokens; with room for a reply the "
                          f"context holds {room}: shorten it")
        return ids

    @torch.inference_mode()
    def reply(self, text: str, on_piece: Callable[[str], None] | None = None) -> str:
        """The model's answer to the user's text (streamed to on_piece), added to the history."""
        if not text.strip():
            raise L1Error("empty message: type some text")
        self.turns.append({"role": "user", "content": text})
        try:
            prompt = self._prompt()
        except L1Error:
            self.turns.pop()
            raise
        stream = Detokenizer(self.lm.token_bytes)

        def on_token(_row: int, token: int) -> bool:
            if token in self.stop_ids:
                return True
            piece = stream.add(token)
            if piece and on_piece is not None:
                on_piece(piece)
            return False

        generate_ids(self.lm.decoder or self.lm.model, [prompt], self.cfg, vocab_size=self.lm.tokenizer.vocab_size,
                     eot_id=self.end_id, on_token=on_token)
        piece = stream.finish()
        if piece and on_piece is not None:
            on_piece(piece)
        self.turns.append({"role": "assistant", "content": stream.text})
        return stream.text
