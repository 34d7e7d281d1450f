"""A byte-level BPE tokenizer: a thin wrapper over Hugging Face `tokenizers`.

Saved as a standard tokenizer.json (loads with tokenizers.Tokenizer.from_file and transformers'
PreTrainedTokenizerFast). Its fingerprint, a hash of that file's content, identifies it in
prepared corpora and checkpoints.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from l1.errors import L1Error

EOT = "<|endoftext|>"  # separates documents
MIN_VOCAB = 257  # 256 byte symbols + the end-of-text token


def fingerprint_of(content: str) -> str:
    """Short content hash of a serialized tokenizer."""
    return hashlib.sha256(content.encode("utf-8")).hexdigest()[:16]


class Tokenizer:
    """Byte-level BPE with an end-of-text token; decode(encode(text)) == text for any text."""

    def __init__(self, hf: HFTokenizer, content: str | None = None):
        self.hf = hf
        self.content = content if content is not None else hf.to_str()
        self.fingerprint = fingerprint_of(self.content)
        self.eot_id = hf.token_to_id(EOT)
        if self.eot_id is None:
            raise L1Error(f"tokenizer has no {EOT} token; train one with L1")

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "Tokenizer":
        """Learn merges from an iterator of documents (runs on all cores in Rust)."""
        if vocab_size < MIN_VOCAB:
            raise L1Error(f"vocab_size must be at least {MIN_VOCAB} for a byte-level BPE "
                          f"(256 bytes + end-of-text), got {vocab_size}")
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf)

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """Load a tokenizer.json, with one clear line if it is missing or unreadable."""
        path = Path(path)
        try:
            content = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise L1Error(f"tokenizer not found: {path}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise L1Error(f"cannot read tokenizer {path}: {exc}") from None
        try:
            hf = HFTokenizer.from_str(content)
        except Exception as exc:  # tokenizers raises a plain Exception for a malformed file
            raise L1Error(f"{path} is not a valid tokenizer.json: {str(exc).splitlines()[0]}") from None
        return cls(hf, content)

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json atomically; its content (and so the fingerprint) is unchanged."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(self.content, encoding="utf-8")
        os.replace(tmp, path)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many documents in parallel (the Rust side uses every core)."""
        return [enc.ids for enc in self.hf.encode_batch_fast(texts)]

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=False)
