"""Load a trained run for inference and generate text with the model's KV cache.

The prompt is processed once (prefill); each new token is then one forward pass of a single
position through the cache, so the cost per token does not grow with the text already generated
beyond attention itself. Several prompts decode together, left-padded, with a key mask and
per-row positions. When the text outgrows the context, the newest half of the context is kept
and re-prefilled into the same cache. A prompt longer than the context is refused rather than
cut, since cutting would silently change what is continued. Text is decoded incrementally from the tokens' bytes, so
streaming and stop strings cost the same for every token.
"""

from __future__ import annotations

import codecs
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from l1 import checkpoint, runtime
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

    @property
    def cfg(self) -> ModelConfig:
        return self.model.cfg

    @functools.cached_property
    def token_bytes(self) -> list[bytes]:
        """The bytes each token id stands for (see tokens_as_bytes())."""
        return tokens_as_bytes(self.tokenizer)


def load(model_path: str | None = None, device: str = "auto", models_root: Path = Path("models")) -> LoadedModel:
    """Load a run for sampling (see checkpoint.load_run) onto the device."""
    rt = runtime.setup(device)  # a bad --device fails before the checkpoint is read
    run = checkpoint.load_run(model_path, models_root)
    return LoadedModel(prepare(run.model(), rt.device), run.tokenizer, run.path, run.step, rt.device)


def prepare(model: GPT, device: torch.device) -> GPT:
    """The model in eval mode on the device: bf16 weights on CUDA where supported, else fp32.

    On CPU the matmul weights are also stored column-major (same values, transposed strides):
    a single decoding row then multiplies through MKL's streaming gemv variant, measured ~30%
    faster at batch 1 than the row-major dot-product one, and no different for larger batches.
    """
    dtype = torch.bfloat16 if device.type == "cuda" and runtime.native_bf16(device) else torch.float32
    model = model.to(device=device, dtype=dtype).eval()
    if device.type == "cpu":
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight.data = module.weight.data.t().contiguous().t()
    return model


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


def next_tokens(logits: torch.Tensor, seen: torch.Tensor | None, cfg: SamplingConfig, vocab_size: int,
                generator: torch.Generator) -> torch.Tensor:
    """One token per row from the last position's logits (B, V); temperature 0 is greedy."""
    logits = repetition_penalty(mask_invalid(logits.float(), vocab_size), seen, cfg.repetition_penalty)
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    logits = top_p_filter(top_k_filter(logits / cfg.temperature, cfg.top_k), cfg.top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


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

class _Window:
    """The rows' token histories and a KV cache over the newest of them (left-padded to one width)."""

    def __init__(self, model: GPT, rows: list[list[int]], max_new: int):
        self.model, self.rows = model, rows
        self.block = model.cfg.block_size
        param = next(model.parameters())
        width = max(len(r) for r in rows)
        # Only as many slots as this generation can fill; a slide needs the whole context.
        length = min(self.block, width + max_new)
        self.cache = KVCache(model.cfg, len(rows), length, device=param.device, dtype=param.dtype)
        self.key_mask: torch.Tensor | None = None  # (B, cache slots), None when no row is padded
        self.positions: torch.Tensor | None = None  # (B, 1): each row's position of the next token

    def prefill(self, keep: int) -> torch.Tensor:
        """Run each row's last `keep` tokens through the emptied cache; the last position's logits."""
        tails = [row[-keep:] for row in self.rows]
        width = max(len(t) for t in tails)
        device = self.cache.k.device
        ids = torch.zeros((len(tails), width), dtype=torch.long)
        real = torch.zeros((len(tails), width), dtype=torch.bool)
        for i, tail in enumerate(tails):
            ids[i, width - len(tail):] = torch.tensor(tail)
            real[i, width - len(tail):] = True
        ids, real = ids.to(device), real.to(device)
        self.cache.length = 0  # reuse the buffers: stale slots past length are never read
        if real.all():
            self.key_mask = self.positions = None
            return self.model(ids, cache=self.cache)[:, -1]
        # Built once per prefill: later tokens are real in every row, so decoding only slices it.
        self.key_mask = torch.ones((len(tails), self.cache.max_len), dtype=torch.bool, device=device)
        self.key_mask[:, :width] = real
        positions = (real.cumsum(1) - 1).clamp(min=0)
        logits = self.model(ids, cache=self.cache, positions=positions, key_mask=real)[:, -1]
        self.positions = positions[:, -1:] + 1
        return logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One token per row through the cache; a full context first slides to its newest half."""
        if self.cache.length == self.block:
            return self.prefill(self.block // 2)
        if self.key_mask is None:
            return self.model(tokens[:, None], cache=self.cache)[:, -1]
        key_mask = self.key_mask[:, :self.cache.length + 1]
        logits = self.model(tokens[:, None], cache=self.cache, positions=self.positions, key_mask=key_mask)[:, -1]
        self.positions += 1
        return logits


@torch.inference_mode()
def generate_ids(model: GPT, prompts: list[list[int]], cfg: SamplingConfig, *, vocab_size: int,
                 eot_id: int | None, generator: torch.Generator | None = None,
                 on_token: Callable[[int, int], bool] | None = None) -> list[list[int]]:
    """Token-level decoding of a batch of non-empty prompts: the new ids of each row.

    A prompt longer than the context is read from its newest block_size tokens. A row ends at
    eot_id (not included; None: never), after cfg.max_tokens, or when on_token(row, token) is true.
    generator: the random stream (default: seeded by cfg.seed).
    """
    device = next(model.parameters()).device
    if generator is None:
        generator = torch.Generator(device).manual_seed(cfg.seed)
    window = _Window(model, [list(p) for p in prompts], cfg.max_tokens)
    generated: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    seen = _seen(prompts, model.cfg.padded_vocab_size, device) if cfg.repetition_penalty != 1.0 else None
    row_index = torch.arange(len(prompts), device=device)
    logits = window.prefill(model.cfg.block_size)
    for step in range(cfg.max_tokens):
        tokens = next_tokens(logits, seen, cfg, vocab_size, generator)
        for i, token in enumerate(tokens.tolist()):
            if done[i]:
                continue
            if token == eot_id:
                done[i] = True
                continue
            window.rows[i].append(token)
            generated[i].append(token)
            if on_token is not None and on_token(i, token):
                done[i] = True
        if all(done) or step + 1 == cfg.max_tokens:
            break
        if seen is not None:
            seen[row_index, tokens] = True
        # Finished rows keep decoding their (ignored) tokens: rows never see each other.
        logits = window.step(tokens)
    return generated


def _seen(prompts: list[list[int]], width: int, device) -> torch.Tensor:
    """(B, width) bool: the ids already in each row's text, for the repetition penalty."""
    seen = torch.zeros((len(prompts), width), dtype=torch.bool, device=device)
    for i, ids in enumerate(prompts):
        seen[i, ids] = True
    return seen


def encode_prompts(tokenizer: Tokenizer, prompts: list[str], block_size: int) -> list[list[int]]:
    """Token ids of each prompt; an empty prompt or one longer than the context is refused."""
    out = []
    for prompt in prompts:
        if not prompt.strip():
            raise L1Error("empty prompt: give some text to continue")
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
        generate_ids(lm.model, chunk, cfg, vocab_size=lm.tokenizer.vocab_size, eot_id=lm.tokenizer.eot_id,
                     generator=generator, on_token=functools.partial(on_token, first))
        for row in range(first, first + len(chunk)):
            emit(row, streams[row].finish())
    return [s.text for s in streams]
