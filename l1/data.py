"""Text source -> prepared token files -> deterministic, resumable batches.

Sources, all read through `datasets` so that the hub and local files take one code path: Simple
English Wikipedia from the Hugging Face hub (the default), or local .parquet (the hub's schema),
.jsonl/.json (a `text` field) and .txt files, or a folder of them.

A corpus is prepared once into data/<name>/: train.bin and val.bin (flat token ids, one
end-of-text token after each document), tokenizer.json and meta.json. A later run reuses the
folder without reading the source again, as long as source and tokenizer settings are unchanged.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from l1.config import DataConfig
from l1.errors import L1Error
from l1.tokenizer import Tokenizer

FORMAT_VERSION = 1
HUB_HOST = "huggingface.co"
LOADERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".txt": "text"}
ENCODE_BATCH = 2000  # documents per encode_batch call: large enough to keep every core busy


@dataclass
class PreparedData:
    """A prepared corpus folder: token files, tokenizer and meta.json."""

    dir: Path
    meta: dict
    tokenizer: Tokenizer

    def tokens(self, split: str) -> np.ndarray:
        """The token ids of 'train' or 'val', memory-mapped."""
        return np.memmap(self.dir / f"{split}.bin", dtype=self.meta["dtype"], mode="r")

    def bytes_per_token(self, split: str) -> float:
        """UTF-8 bytes of text per token: converts a loss in nats/token into bits per byte."""
        return self.meta["splits"][split]["bytes_per_token"]


# ---- sources ------------------------------------------------------------------------------------

def _local_files(path: Path) -> list[Path]:
    if not path.exists():
        raise L1Error(f"--data {path} does not exist (expected a .parquet, .jsonl, .json or .txt file, "
                      "or a folder of them)")
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    files = [p for p in files if p.suffix.lower() in LOADERS]
    if not files:
        raise L1Error(f"--data {path} holds no .parquet, .jsonl, .json or .txt files")
    kinds = {LOADERS[p.suffix.lower()] for p in files}
    if len(kinds) > 1:
        raise L1Error(f"--data {path} mixes file kinds ({', '.join(sorted(kinds))}); point it at one kind")
    return files


def _source_identity(cfg: DataConfig) -> dict:
    """What the prepared folder was made from: a changed file (size or time) means a rebuild."""
    if cfg.data == "hub":
        return {"hub": cfg.hub_dataset, "config": cfg.hub_config, "max_docs": cfg.max_docs}
    files = _local_files(Path(cfg.data))
    return {"files": [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files],
            "max_docs": cfg.max_docs}


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    try:
        with socket.create_connection((HUB_HOST, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _load_documents(cfg: DataConfig, log) -> list[str]:
    """All non-empty documents of the source, in source order."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    if cfg.data == "hub":
        if not _hub_reachable():
            raise L1Error(f"cannot reach the Hugging Face hub to download {cfg.hub_dataset} ({cfg.hub_config}); "
                          "train on local files instead, e.g. --data ../shared/data/wikipedia-sample "
                          "(.parquet, .jsonl, .txt or a folder)")
        log(f"reading {cfg.hub_dataset} ({cfg.hub_config}) from the Hugging Face hub")
        dataset = datasets.load_dataset(cfg.hub_dataset, cfg.hub_config, split="train")
    else:
        files = _local_files(Path(cfg.data))
        kind = LOADERS[files[0].suffix.lower()]
        log(f"reading {len(files)} {kind} file(s) from {cfg.data}")
        options = {"sample_by": "document", "encoding_errors": "replace"} if kind == "text" else {}
        try:
            dataset = datasets.load_dataset(kind, data_files=[str(p) for p in files], split="train",
                                            cache_dir=str(Path(cfg.data_dir) / ".cache"), **options)
        except Exception as exc:  # datasets/pyarrow raise many types for unreadable files
            raise L1Error(f"cannot read --data {cfg.data}: {str(exc).strip().splitlines()[0][:300]}") from None
    if "text" not in dataset.column_names:
        raise L1Error(f"--data {cfg.data} has no 'text' column (found: {', '.join(dataset.column_names)})")
    if cfg.max_docs:
        dataset = dataset.select(range(min(cfg.max_docs, len(dataset))))
    docs = [text for text in dataset["text"] if text and text.strip()]
    if len(docs) == 1:  # one big file: its paragraphs become the documents, so a split exists
        docs = [p for p in re.split(r"\n\s*\n", docs[0]) if p.strip()]
    if not docs:
        raise L1Error(f"--data {cfg.data}: no text found")
    replaced = sum("\ufffd" in d for d in docs)
    if replaced:
        log(f"{replaced} document(s) held invalid UTF-8 (or U+FFFD); invalid bytes were replaced by U+FFFD")
    return docs


# ---- preparation --------------------------------------------------------------------------------

def _corpus_name(cfg: DataConfig, vocab_size: int) -> str:
    base = "simplewiki" if cfg.data == "hub" else Path(cfg.data).resolve().stem or "corpus"
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', base)}-bpe{vocab_size}"


def _split(n_docs: int, fraction: float, seed: int) -> np.ndarray:
    """A seeded by-document split (True = validation), with at least one document on each side."""
    is_val = np.random.default_rng(seed).random(n_docs) < fraction
    if n_docs >= 2 and not is_val.any():
        is_val[-1] = True
    if n_docs >= 2 and is_val.all():
        is_val[0] = False
    return is_val


def _write_tokens(tokenizer: Tokenizer, docs: list[str], path: Path, dtype) -> dict:
    """Tokenize documents in parallel batches, streaming ids (with end-of-text) to a flat file."""
    n_tokens = n_bytes = 0
    with open(path, "wb") as f:
        for start in range(0, len(docs), ENCODE_BATCH):
            batch = docs[start:start + ENCODE_BATCH]
            eot = np.array([tokenizer.eot_id], dtype=dtype)
            pieces = []
            for doc in tokenizer.encode_batch(batch):
                pieces += (np.array(doc, dtype=dtype), eot)
            ids = np.concatenate(pieces)
            f.write(ids.tobytes())
            n_tokens += len(ids)
            n_bytes += sum(len(d.encode("utf-8")) for d in batch)
    return {"documents": len(docs), "tokens": n_tokens, "bytes": n_bytes,
            "bytes_per_token": n_bytes / max(n_tokens, 1)}


def prepare(cfg: DataConfig, vocab_size: int, seed: int, log=print) -> PreparedData:
    """Prepare (or reuse) data/<name>/ for this source, tokenizer and split."""
    folder = Path(cfg.data_dir) / _corpus_name(cfg, vocab_size)
    given = Tokenizer.load(cfg.tokenizer) if cfg.tokenizer else None
    wanted = {"format": FORMAT_VERSION, "source": _source_identity(cfg), "vocab_size": vocab_size,
              "val_fraction": cfg.val_fraction, "seed": seed}
    meta_path = folder / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        same_tokenizer = (meta.get("tokenizer_fingerprint") == given.fingerprint if given
                          else meta.get("tokenizer_trained") is True)
        if same_tokenizer and {k: meta.get(k) for k in wanted} == json.loads(json.dumps(wanted)):
            log(f"reusing prepared corpus {folder} ({meta['splits']['train']['tokens']:,} train tokens)")
            return PreparedData(folder, meta, Tokenizer.load(folder / "tokenizer.json"))
        log(f"source or tokenizer changed: rebuilding {folder}")
    return _build(cfg, folder, wanted, given, vocab_size, seed, log)


def _build(cfg: DataConfig, folder: Path, wanted: dict, given: Tokenizer | None, vocab_size: int, seed: int,
           log) -> PreparedData:
    started = time.perf_counter()
    docs = _load_documents(cfg, log)
    is_val = _split(len(docs), cfg.val_fraction, seed)
    train_docs = [d for d, v in zip(docs, is_val) if not v]
    val_docs = [d for d, v in zip(docs, is_val) if v]
    if given:
        tokenizer = given
        if tokenizer.vocab_size > vocab_size:
            raise L1Error(f"tokenizer {cfg.tokenizer} has {tokenizer.vocab_size} tokens, more than the "
                          f"model's vocab_size {vocab_size}")
    else:
        log(f"training a {vocab_size}-token byte-level BPE on {len(train_docs):,} documents")
        t0 = time.perf_counter()
        tokenizer = Tokenizer.train(train_docs, vocab_size)
        log(f"tokenizer trained in {time.perf_counter() - t0:.1f}s")
    dtype = np.uint16 if vocab_size <= 2 ** 16 else np.uint32
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    splits = {"train": _write_tokens(tokenizer, train_docs, tmp / "train.bin", dtype),
              "val": _write_tokens(tokenizer, val_docs, tmp / "val.bin", dtype)}
    seconds = time.perf_counter() - t0
    text_mb = sum(s["bytes"] for s in splits.values()) / 1e6
    tokenizer.save(tmp / "tokenizer.json")
    meta = {**json.loads(json.dumps(wanted)), "tokenizer_fingerprint": tokenizer.fingerprint,
            "tokenizer_trained": given is None,
            "dtype": np.dtype(dtype).name, "splits": splits, "tokenize_seconds": seconds,
            "tokenize_mb_per_s": text_mb / max(seconds, 1e-9), "prepare_seconds": time.perf_counter() - started}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    if folder.exists():  # a stale build of the same name: replaced, it is derived data
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    log(f"prepared {folder}: {splits['train']['tokens']:,} train / {splits['val']['tokens']:,} val tokens "
        f"from {len(docs):,} documents, {text_mb:.1f} MB tokenized at {meta['tokenize_mb_per_s']:.1f} MB/s, "
        f"{splits['train']['bytes_per_token']:.2f} bytes/token")
    return PreparedData(folder, meta, tokenizer)


# ---- batches ------------------------------------------------------------------------------------

def _gather(tokens: np.ndarray, windows: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = np.stack([tokens[w * seq_len: w * seq_len + seq_len + 1] for w in windows]).astype(np.int64)
    batch = torch.from_numpy(rows)
    return batch[:, :-1], batch[:, 1:]


class BatchIterator:
    """Training batches of non-overlapping windows, shuffled per epoch; the position is two ints.

    Window w covers tokens [w*seq_len, w*seq_len + seq_len] (inputs and shifted targets). An epoch is
    a seeded permutation of all windows; each call takes the next global batch of
    batch_size x world_size windows, of which this rank gets its own slice.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.windows_per_epoch = (len(tokens) - 1) // seq_len
        self.global_batch = batch_size * world_size
        if self.windows_per_epoch < self.global_batch:
            raise L1Error(f"the training split has {len(tokens):,} tokens, fewer than one batch needs "
                          f"({self.global_batch * seq_len + 1:,}); lower --batch_size or --seq_len, or use more data")
        self.epoch, self.index = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.windows_per_epoch)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (inputs, targets) of this rank, int64 of shape (batch_size, seq_len)."""
        if self.index + self.global_batch > self.windows_per_epoch:  # drop the remainder
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._permutation()
        start = self.index + self.rank * self.batch_size
        windows = self._order[start:start + self.batch_size]
        self.index += self.global_batch
        return _gather(self.tokens, windows, self.seq_len)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._permutation()


def eval_batches(tokens: np.ndarray, seq_len: int, batch_size: int, max_batches: int,
                 rank: int = 0, world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The same validation batches every time: sequential windows, whole global batches only,
    so every rank runs the same number of forward passes."""
    n_windows = (len(tokens) - 1) // seq_len
    global_batch = batch_size * world_size
    for b in range(min(max_batches, n_windows // global_batch)):
        start = b * global_batch + rank * batch_size
        yield _gather(tokens, np.arange(start, start + batch_size), seq_len)
