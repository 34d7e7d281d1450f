"""A byte-level BPE tokenizer: a thin wrapper over Hugging Face `tokenizers`.

Saved as a standard tokenizer.json (loads with tokenizers.Tokenizer.from_file and transformers'
PreTrainedTokenizerFast). Its fingerprint, a hash of that file's content, identifies it in
prepared corpora and checkpoints.

The long calls into Rust (training, encoding a batch) run in a worker thread while the main thread
waits in short slices: Python delivers Ctrl-C (KeyboardInterrupt) to the main thread only between
bytecodes, so waiting inside one long Rust call would ignore it until the call returns.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Callable, Iterable

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

from l1.config import MIN_VOCAB
from l1.errors import L1Error

EOT = "<|endoftext|>"  # separates documents
# BPE training touches every word that holds a merged pair, so one long word costs its length at
# every merge: a 3 MB run without whitespace took over 5 minutes. The trainer sees such runs cut into
# words of at most this many characters; encoding is unaffected (it applies the merges to any word).
TRAIN_RUN_CHARS = 128


def fingerprint_of(content: str) -> str:
    """Short content hash of a serialized tokenizer."""
    return hashlib.sha256(content.encode("utf-8")).hexdigest()[:16]


class Background:
    """fn(*args) in a daemon thread; result() waits for it in slices of 0.1 s, so that Ctrl-C stops
    the wait at once (the abandoned daemon thread ends with the process)."""

    def __init__(self, fn: Callable, *args):
        self._value = self._error = None
        self._thread = threading.Thread(target=self._run, args=(fn, *args), daemon=True)
        self._thread.start()

    def _run(self, fn, *args):
        try:
            self._value = fn(*args)
        except BaseException as exc:  # handed to the waiting thread by result()
            self._error = exc

    def result(self):
        """fn's return value, or its exception raised here."""
        while self._thread.is_alive():
            self._thread.join(0.1)
        if self._error is not None:
            raise self._error
        return self._value


def training_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """What the BPE trainer splits words with: the byte-level split, after cutting every run of
    TRAIN_RUN_CHARS non-space characters off the text before it (so no word is longer)."""
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(rf"\S{{{TRAIN_RUN_CHARS}}}"), "merged_with_previous"),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])


class Tokenizer:
    """Byte-level BPE with an end-of-text token; decode(encode(text)) == text for any text."""

    def __init__(self, hf: HFTokenizer, content: str | None = None):
        self.hf = hf
        self.content = content if content is not None else hf.to_str()
        self.fingerprint = fingerprint_of(self.content)
        self.eot_id = hf.token_to_id(EOT)
        self._documents_hf = None  # a copy that encodes special tokens' text as text, made on first use
        if self.eot_id is None:
            raise L1Error(f"tokenizer has no {EOT} token; train one with L1")

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "Tokenizer":
        """Learn merges from an iterable of documents, read lazily (runs on all cores in Rust)."""
        if vocab_size < MIN_VOCAB:
            raise L1Error(f"vocab_size must be at least {MIN_VOCAB} for a byte-level BPE "
                          f"(256 bytes + end-of-text), got {vocab_size}")
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = training_pre_tokenizer()
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        Background(hf.train_from_iterator, texts, trainer).result()
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
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

    def encode_documents(self, documents: list[str]) -> list[list[int]]:
        """The ids of each document, encoded in parallel on every core. A literal "<|endoftext|>"
        inside a document is text, not a document boundary: only the caller puts end-of-text ids."""
        if self._documents_hf is None:
            self._documents_hf = HFTokenizer.from_str(self.content)
            self._documents_hf.encode_special_tokens = True
        return [enc.ids for enc in self._documents_hf.encode_batch_fast(documents)]

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=False)
