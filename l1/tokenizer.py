"""A byte-level BPE tokenizer: a thin wrapper over Hugging Face `tokenizers`.

Saved as a standard tokenizer.json (loads with tokenizers.Tokenizer.from_file and transformers'
PreTrainedTokenizerFast). Its fingerprint, a hash of that file's content, identifies it in
prepared corpora and checkpoints.

Training runs in a child process: the Rust trainer is one call of minutes that Python cannot
interrupt (Ctrl-C is seen only between bytecodes, and a thread left inside it aborts the interpreter's
exit), while a process can be killed at once. The child dies with its parent, SIGKILL included.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

from l1 import files
from l1.config import MIN_VOCAB
from l1.errors import L1Error

EOT = "<|endoftext|>"  # separates documents
# BPE training touches every word that holds a merged pair, so one long word costs its length at
# every merge: a 3 MB run without whitespace took over 5 minutes. The trainer sees such runs cut into
# words of at most this many characters; encoding is unaffected (it applies the merges to any word).
TRAIN_RUN_CHARS = 128
END_OF_TEXTS = b"\xff" * 8  # the parent's last record to the training child: no document is that long
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def fingerprint_of(content: str) -> str:
    """Short content hash of a serialized tokenizer."""
    return hashlib.sha256(content.encode("utf-8")).hexdigest()[:16]


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
        """Learn merges from an iterable of documents, read lazily and streamed to a child process that
        trains on all cores in Rust; Ctrl-C (KeyboardInterrupt here) kills it at once."""
        if vocab_size < MIN_VOCAB:
            raise L1Error(f"vocab_size must be at least {MIN_VOCAB} for a byte-level BPE "
                          f"(256 bytes + end-of-text), got {vocab_size}")
        package_root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        child = subprocess.Popen([sys.executable, "-c", "from l1.tokenizer import _train_child; _train_child()",
                                  str(vocab_size), str(os.getpid())], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 env=env)
        try:
            try:
                for text in texts:
                    data = text.encode("utf-8", "surrogatepass")
                    child.stdin.write(len(data).to_bytes(8, "little") + data)
                child.stdin.write(END_OF_TEXTS)
                child.stdin.close()
            except BrokenPipeError:  # the child failed; its exit code says so below
                pass
            content = child.stdout.read().decode("utf-8")
            if child.wait() != 0:
                raise L1Error(f"tokenizer training failed (its process exited with code {child.returncode})")
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            child.stdout.close()
        return cls(HFTokenizer.from_str(content), content)

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
        files.write_atomic(path, self.content.encode("utf-8"))

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


def _die_with_parent(parent: int) -> None:
    """End this process as soon as process `parent` ends, however it ends (SIGKILL included), so that a
    killed trainer leaves no child training for minutes: Linux sends this process SIGKILL when its
    parent dies (prctl PR_SET_PDEATHSIG; strictly, when the thread that started it ends, and that one
    waits for this process in Tokenizer.train); elsewhere a thread notices that the parent's id changed (a
    process whose parent died is adopted by another; the trainer runs in Rust with the GIL released)."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    else:
        def watch():
            while os.getppid() == parent:
                time.sleep(0.5)
            os._exit(1)

        threading.Thread(target=watch, daemon=True).start()
    if os.getppid() != parent:  # it died before the signal was armed
        os._exit(1)


def _train_child() -> None:
    """Tokenizer.train's child process: length-prefixed UTF-8 documents on stdin, then END_OF_TEXTS;
    the trained tokenizer.json on stdout. Its arguments: the vocabulary size and the parent's pid."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it kills this process
    _die_with_parent(int(sys.argv[2]))
    stdin = sys.stdin.buffer

    def texts():
        while (header := stdin.read(8)) != END_OF_TEXTS:
            size = int.from_bytes(header, "little")
            data = stdin.read(size)
            if len(header) < 8 or len(data) < size:  # the parent ended before sending all: train nothing
                os._exit(1)
            yield data.decode("utf-8", "surrogatepass")

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = training_pre_tokenizer()
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=int(sys.argv[1]), special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(texts(), trainer=trainer)
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    sys.stdout.write(hf.to_str())
