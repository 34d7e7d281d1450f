"""Load a trained run for inference and generate text with the model's KV cache.

The prompt is processed once (prefill); each new token is then one forward pass of a single
position through the cache, so the cost per token does not grow with the text already generated
beyond attention itself. Several prompts decode together, left-padded, with an attention mask.
When the text outgrows the context, the newest half of the window is kept and re-prefilled.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from l1 import checkpoint, runtime
from l1.config import SamplingConfig, model_config_from_dict
from l1.errors import L1Error
from l1.model import GPT, KVCache
from l1.tokenizer import Tokenizer


@dataclass
class LoadedModel:
    """A model ready for inference, with its own tokenizer."""

    model: GPT
    tokenizer: Tokenizer
    path: Path
    step: int
    device: torch.device


def load(model_path: str | None = None, device: str = "auto", models_root: Path = Path("models")) -> LoadedModel:
    """Load a checkpoint (a file, a run folder's best else latest, or the newest run under models/)."""
    path = checkpoint.find_for_inference(model_path, models_root)
    state = checkpoint.load_file(path)
    for key in ("model", "model_config", "tokenizer_fingerprint"):
        if key not in state:
            raise L1Error(f"{path} has no {key!r}: not a checkpoint L1 can sample from")
    tokenizer_path = path.parent / "tokenizer.json"
    tokenizer = Tokenizer.load(tokenizer_path)
    if tokenizer.fingerprint != state["tokenizer_fingerprint"]:
        raise L1Error(f"{tokenizer_path} (fingerprint {tokenizer.fingerprint}) is not the tokenizer this model "
                      f"was trained with ({state['tokenizer_fingerprint']}); restore the run's own tokenizer.json")
    cfg = model_config_from_dict(state["model_config"], origin=str(path))
    target = runtime.pick_device(device)
    model = GPT(cfg)
    model.load_state_dict(state["model"])
    dtype = torch.bfloat16 if target.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    model = model.to(device=target, dtype=dtype).eval()
    return LoadedModel(model, tokenizer, path, int(state.get("step", 0)), target)


# ---- logits processing: small pure functions ---------------------------------------------------

def mask_invalid(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Padded embedding rows (and ids past the tokenizer's vocabulary) can never be sampled."""
    logits[..., vocab_size:] = float("-inf")
    return logits


def repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty: for tokens already in the text, divide positive logits and multiply negative ones."""
    if penalty == 1.0:
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
    remove_sorted = before >= p
    remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def next_tokens(logits: torch.Tensor, seen: torch.Tensor, cfg: SamplingConfig, vocab_size: int,
                generator: torch.Generator) -> torch.Tensor:
    """One token per row from the last position's logits (B, V)."""
    logits = mask_invalid(logits.float(), vocab_size)
    logits = repetition_penalty(logits, seen, cfg.repetition_penalty)
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    logits = top_p_filter(top_k_filter(logits / cfg.temperature, cfg.top_k), cfg.top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


# ---- decoding -----------------------------------------------------------------------------------

class _Batch:
    """Token histories of the rows, and the padded tensors one forward pass needs."""

    def __init__(self, rows: list[list[int]], pad_id: int, block_size: int, device):
        self.rows, self.pad_id, self.block_size, self.device = rows, pad_id, block_size, device

    def window(self, keep: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Left-padded ids of each row's last `keep` tokens, with positions and key mask (None if unpadded)."""
        tails = [row[-keep:] for row in self.rows]
        width = max(len(t) for t in tails)
        ids = torch.full((len(tails), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(tails), width), dtype=torch.bool)
        for i, tail in enumerate(tails):
            ids[i, width - len(tail):] = torch.tensor(tail)
            mask[i, width - len(tail):] = True
        ids, mask = ids.to(self.device), mask.to(self.device)
        if mask.all():
            return ids, None, None
        return ids, (mask.cumsum(1) - 1).clamp(min=0), mask


class _Streamer:
    """Turns a growing list of ids into text pieces, holding back what may still change."""

    def __init__(self, tokenizer: Tokenizer, stops: tuple[str, ...]):
        self.tokenizer, self.stops = tokenizer, stops
        self.holdback = max((len(s) for s in stops), default=1) - 1
        self.emitted = 0

    def text(self, ids: list[int]) -> tuple[str, bool]:
        """The decoded text, cut before the first stop string, and whether a stop string was hit."""
        text = self.tokenizer.decode(ids)
        cuts = [text.find(s) for s in self.stops if s and s in text]
        return (text[:min(cuts)], True) if cuts else (text, False)

    def piece(self, ids: list[int], final: bool) -> str:
        """New stable text since the last piece (an unfinished UTF-8 character waits)."""
        text, _ = self.text(ids)
        end = len(text) if final else len(text) - self.holdback
        if not final and text.endswith("\ufffd"):
            end = min(end, len(text.rstrip("\ufffd")))
        piece = text[self.emitted:end] if end > self.emitted else ""
        self.emitted += len(piece)
        return piece


@torch.inference_mode()
def generate(lm: LoadedModel, prompts: list[str], cfg: SamplingConfig, stop: tuple[str, ...] = (),
             on_piece: Callable[[int, str], None] | None = None) -> list[str]:
    """Continue each prompt (num_samples times); returns the continuations, prompt excluded.

    on_piece(row, text) receives the text of each row as it is generated (rows are prompts
    repeated num_samples times, in order).
    """
    tok, block = lm.tokenizer, lm.model.cfg.block_size
    rows = []
    for prompt in prompts:
        if not prompt.strip():
            raise L1Error("empty prompt: give some text to continue")
        ids = tok.encode(prompt)
        if len(ids) >= block:
            raise L1Error(f"the prompt is {len(ids)} tokens, but the model's context is {block}; shorten it")
        rows += [ids] * cfg.num_samples
    streamers = [_Streamer(tok, stop) for _ in rows]

    def on_token(row: int, generated: list[int]) -> bool:
        if stop and streamers[row].text(generated)[1]:
            return True
        if on_piece:
            on_piece(row, streamers[row].piece(generated, final=False))
        return False

    generated = generate_ids(lm.model, rows, cfg, vocab_size=tok.vocab_size, eot_id=tok.eot_id,
                             device=lm.device, on_token=on_token)
    texts = [s.text(g)[0] for s, g in zip(streamers, generated)]
    if on_piece:
        for i, g in enumerate(generated):
            on_piece(i, streamers[i].piece(g, final=True))
    return texts


@torch.inference_mode()
def generate_ids(model: GPT, prompts: list[list[int]], cfg: SamplingConfig, *, vocab_size: int,
                 eot_id: int | None, device: torch.device,
                 on_token: Callable[[int, list[int]], bool] | None = None) -> list[list[int]]:
    """Token-level decoding of a batch: the new ids of each row (end-of-text excluded).

    A row ends at eot_id (None: never), after cfg.max_tokens, or when on_token(row, ids) is true.
    """
    block = model.cfg.block_size
    pad_id = eot_id if eot_id is not None else 0
    batch = _Batch([list(ids) for ids in prompts], pad_id, block, device)
    generated = [[] for _ in prompts]
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    seen = torch.zeros(len(prompts), model.cfg.padded_vocab_size, dtype=torch.bool, device=device)
    for i, ids in enumerate(prompts):
        seen[i, ids] = True
    generator = torch.Generator(device).manual_seed(cfg.seed)
    logits, state = _prefill(model, batch, block)
    for _ in range(cfg.max_tokens):
        token = next_tokens(logits, seen, cfg, vocab_size, generator)
        token = torch.where(done, pad_id, token)
        seen[torch.arange(len(prompts)), token] = True
        for i, t in enumerate(token.tolist()):
            if done[i]:
                continue
            batch.rows[i].append(t)
            if t == eot_id:
                done[i] = True
                continue
            generated[i].append(t)
            if on_token and on_token(i, generated[i]):
                done[i] = True
        if done.all():
            break
        logits, state = _decode_one(model, batch, block, token, state)
    return generated


def _prefill(model: GPT, batch: _Batch, keep: int):
    """Run the last `keep` tokens of every row through a fresh cache; logits of the last position."""
    ids, positions, key_mask = batch.window(keep)
    cache = KVCache(model.cfg, ids.shape[0], model.cfg.block_size, device=ids.device,
                    dtype=next(model.parameters()).dtype)
    logits = model(ids, cache=cache, positions=positions, key_mask=key_mask)[:, -1]
    return logits, (cache, positions, key_mask)


def _decode_one(model: GPT, batch: _Batch, block: int, token: torch.Tensor, state):
    """One token per row through the cache; a full cache first slides to the newest half window."""
    cache, positions, key_mask = state
    if cache.length == block:
        return _prefill(model, batch, block // 2)
    if key_mask is None:
        logits = model(token[:, None], cache=cache)[:, -1]
        return logits, state
    positions = positions[:, -1:] + 1
    key_mask = torch.cat([key_mask, key_mask.new_ones(key_mask.shape[0], 1)], dim=1)
    logits = model(token[:, None], cache=cache, positions=positions, key_mask=key_mask)[:, -1]
    return logits, (cache, positions, key_mask)
