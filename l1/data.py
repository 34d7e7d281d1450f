"""Text source -> prepared token files -> deterministic, resumable batches.

Sources, all read through `datasets` so that the hub and local files take one code path: Simple
English Wikipedia from the Hugging Face hub (the default), or local .parquet (the hub's schema),
.jsonl/.json (a `text` field) and .txt files (one file, one document), or a folder of them.

A corpus is prepared once into <data_dir>/<name>/: train.bin and val.bin (flat token ids, an
end-of-text token after each document), tokenizer.json and meta.json. A later run reuses the folder
without reading the source, as long as the source, tokenizer and split settings are unchanged.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import torch
from tokenizers import Tokenizer as HFTokenizer

from l1.config import DataConfig
from l1.errors import L1Error
from l1.tokenizer import Tokenizer

FORMAT_VERSION = 2
HUB_HOST = "huggingface.co"
LOADERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".txt": "text", ".tokens": "text"}
KINDS = ".parquet, .jsonl, .json or .txt"  # .tokens: WikiText's plain text, read as .txt
ENCODE_BATCH = 2000  # documents per encode_batch call: enough to keep every core busy
LOCAL_EXAMPLE = "--data ../shared/data/wikipedia-sample"


@dataclass
class PreparedData:
    """A prepared corpus folder: token files, tokenizer and meta.json."""

    dir: Path
    meta: dict
    tokenizer: Tokenizer

    def tokens(self, split: str) -> np.ndarray:
        """The token ids of 'train' or 'val', memory-mapped read-only."""
        return np.memmap(self.dir / f"{split}.bin", dtype=self.meta["dtype"], mode="r")

    def bytes_per_token(self, split: str) -> float:
        """UTF-8 bytes of text per token: turns a loss in nats/token into bits per byte."""
        return self.meta["splits"][split]["bytes_per_token"]


# ---- sources ------------------------------------------------------------------------------------

def _local_files(path: Path) -> list[Path]:
    """The source's files of supported kinds, sorted (hidden files and other kinds are ignored)."""
    if not path.exists():
        raise L1Error(f"--data {path} does not exist (expected a {KINDS} file, or a folder of them)")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
    else:
        files = [path]
    files = [p for p in files if p.suffix.lower() in LOADERS]
    if not files:
        raise L1Error(f"--data {path} holds no {KINDS} files")
    return files


def _source_identity(cfg: DataConfig) -> dict:
    """What a prepared folder was made from; a changed file (size or mtime) means a rebuild."""
    if cfg.data == "hub":
        return {"hub": cfg.hub_dataset, "config": cfg.hub_config, "max_docs": cfg.max_docs}
    files = [(p.resolve(), p.stat()) for p in _local_files(Path(cfg.data))]
    return {"files": [[str(p), s.st_size, s.st_mtime_ns] for p, s in files], "max_docs": cfg.max_docs}


def _hub_unreachable_reason(timeout: float = 3.0) -> str | None:
    """Why the hub cannot be used now, or None. Bounded in time even if DNS hangs."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").lower() in ("1", "true", "yes", "on"):
            return f"{var} is set"
    reached = []

    def probe():
        try:
            socket.create_connection((HUB_HOST, 443), timeout=timeout).close()
            reached.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return None if reached else f"no connection to {HUB_HOST}:443"


def _texts(dataset, origin: str, limit: int) -> list:
    """The `text` column, at most `limit` values (0 = all). Arrow batches skip the per-row Python
    formatting of the other columns, and reading stops once `limit` values are in."""
    texts: list = []
    for table in dataset.with_format("arrow").iter(batch_size=4096):
        if "text" not in table.column_names:
            raise L1Error(f"{origin} has no 'text' column (found: {', '.join(table.column_names) or 'none'})")
        kind = table.schema.field("text").type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)):
            raise L1Error(f"the 'text' column of {origin} holds {kind}, not text")
        texts += table.column("text").to_pylist()
        if limit and len(texts) >= limit:
            return texts[:limit]
    return texts


def _read_hub(cfg: DataConfig, log) -> list:
    """Texts of the hub dataset, after a quick check that the hub can be reached at all."""
    import datasets

    reason = _hub_unreachable_reason()
    if reason:
        raise L1Error(f"cannot reach the Hugging Face hub ({reason}) to download {cfg.hub_dataset} "
                      f"({cfg.hub_config}); use local files instead, e.g. {LOCAL_EXAMPLE} ({KINDS} or a folder)")
    log(f"reading {cfg.hub_dataset} ({cfg.hub_config}) from the Hugging Face hub")
    try:  # the download is kept in the user's Hugging Face cache, outside the project
        dataset = datasets.load_dataset(cfg.hub_dataset, cfg.hub_config, split="train")
    except Exception as exc:  # network and hub errors come in many types
        raise L1Error(f"cannot load {cfg.hub_dataset} ({cfg.hub_config}) from the hub: "
                      f"{str(exc).strip().splitlines()[0][:300]}; or use {LOCAL_EXAMPLE}") from None
    return _texts(dataset, cfg.hub_dataset, cfg.max_docs)


def _read_local(cfg: DataConfig, cache_dir: Path, log) -> list:
    """Texts of the files in sorted order; consecutive files of one kind share one loader call."""
    import datasets

    files = [p for p in _local_files(Path(cfg.data)) if p.stat().st_size > 0]  # datasets fails on empty json
    log(f"reading {len(files)} file(s) from {cfg.data}")
    texts: list = []
    for kind, group in itertools.groupby(files, key=lambda p: LOADERS[p.suffix.lower()]):
        group = [str(p) for p in group]
        origin = group[0] if len(group) == 1 else f"{len(group)} {kind} files of {cfg.data}"
        options = {"sample_by": "document", "encoding_errors": "replace"} if kind == "text" else {}
        try:  # streamed: no copy of the text into datasets' cache, and max_docs stops the reading early
            dataset = datasets.load_dataset(kind, data_files=group, split="train", streaming=True,
                                            cache_dir=str(cache_dir), **options)
            texts += _texts(dataset, origin, cfg.max_docs - len(texts) if cfg.max_docs else 0)
        except L1Error:
            raise
        except Exception as exc:  # datasets and pyarrow raise many types for unreadable files
            raise L1Error(f"cannot read {origin}: {str(exc).strip().splitlines()[0][:300]}") from None
        if cfg.max_docs and len(texts) >= cfg.max_docs:
            break
    return texts


def read_documents(cfg: DataConfig, cache_dir: Path, log) -> list[str]:
    """The non-empty documents of the source, in source order (datasets keeps its lock files of
    local sources in cache_dir)."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    texts = _read_hub(cfg, log) if cfg.data == "hub" else _read_local(cfg, cache_dir, log)
    docs = [t for t in texts if t and not t.isspace()]
    if len(docs) == 1:  # a single document: its paragraphs become the documents, so a split exists
        docs = [p for p in re.split(r"\n\s*\n", docs[0]) if p.strip()]
    if not docs:
        raise L1Error(f"--data {cfg.data}: no text found")
    if len(docs) < 2:
        raise L1Error(f"--data {cfg.data} holds a single document; at least 2 are needed for a validation split")
    replaced = sum("\ufffd" in d for d in docs)
    if replaced:
        log(f"{replaced} document(s) contain U+FFFD, the replacement character (e.g. for invalid UTF-8)")
    return docs


# ---- preparation --------------------------------------------------------------------------------

def corpus_name(cfg: DataConfig, vocab_size: int) -> str:
    """The prepared folder's name: a slug of the source, e.g. wikipedia-sample-bpe4096."""
    if cfg.data == "hub":
        base = f"{cfg.hub_dataset.rsplit('/', 1)[-1]}-{cfg.hub_config}"
    else:
        path = Path(cfg.data).resolve()
        base = path.name if path.is_dir() else path.stem
    first = f"-first{cfg.max_docs}" if cfg.max_docs else ""
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', base).strip('-.') or 'corpus'}{first}-bpe{vocab_size}"


def split_mask(n_docs: int, fraction: float, seed: int) -> np.ndarray:
    """Seeded by-document split (True = validation), at least one document on each side."""
    is_val = np.random.default_rng(seed).random(n_docs) < fraction
    if not is_val.any():
        is_val[-1] = True
    if is_val.all():
        is_val[0] = False
    return is_val


def _encoded(tokenizer: Tokenizer, docs: list[str]) -> Iterator[tuple[list[str], list[list[int]]]]:
    """(documents, ids) per batch. The next batch is encoded in Rust, which releases the GIL, while
    the caller converts and writes this one."""
    # Literal "<|endoftext|>" in a document is text, not a document boundary.
    hf = HFTokenizer.from_str(tokenizer.content)
    hf.encode_special_tokens = True

    def encode(batch):
        return [e.ids for e in hf.encode_batch_fast(batch)]

    batches = [docs[i:i + ENCODE_BATCH] for i in range(0, len(docs), ENCODE_BATCH)]
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(encode, batches[0]) if batches else None
        for i, batch in enumerate(batches):
            ids = pending.result()
            if i + 1 < len(batches):
                pending = pool.submit(encode, batches[i + 1])
            yield batch, ids


def write_tokens(tokenizer: Tokenizer, docs: list[str], path: Path, dtype) -> dict:
    """Tokenize documents and stream their ids, end-of-text after each, to a flat file."""
    n_tokens = n_bytes = 0
    with open(path, "wb") as f:
        for batch, ids in _encoded(tokenizer, docs):
            lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
            flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum()))
            flat = np.insert(flat, np.cumsum(lengths), tokenizer.eot_id)
            f.write(flat.tobytes())
            n_tokens += flat.size
            n_bytes += sum(len(d.encode("utf-8")) for d in batch)
    return {"documents": len(docs), "tokens": n_tokens, "text_bytes": n_bytes,
            "bytes_per_token": n_bytes / max(n_tokens, 1)}


def _reusable(folder: Path, wanted: dict, given: Tokenizer | None) -> dict | None:
    """meta.json of a complete folder made from the same source, settings and tokenizer, or None."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        complete = all((folder / f"{s}.bin").stat().st_size == meta["splits"][s]["tokens"]
                       * np.dtype(meta["dtype"]).itemsize for s in ("train", "val"))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    same_tokenizer = (meta.get("tokenizer_fingerprint") == given.fingerprint if given
                      else meta.get("tokenizer_trained") is True)
    same = all(meta.get(k) == v for k, v in wanted.items())
    return meta if complete and same and same_tokenizer else None


def prepare(cfg: DataConfig, vocab_size: int, seed: int, log=print) -> PreparedData:
    """Prepare <data_dir>/<name>/ for this source, tokenizer and split, or reuse it if it exists."""
    folder = Path(cfg.data_dir) / corpus_name(cfg, vocab_size)
    given = Tokenizer.load(cfg.tokenizer) if cfg.tokenizer else None
    if given and given.vocab_size > vocab_size:
        raise L1Error(f"tokenizer {cfg.tokenizer} has {given.vocab_size} tokens, more than vocab_size {vocab_size}")
    # A JSON round trip makes the settings compare equal to what meta.json holds (lists, not tuples).
    wanted = json.loads(json.dumps({"format": FORMAT_VERSION, "source": _source_identity(cfg),
                                     "vocab_size": vocab_size, "val_fraction": cfg.val_fraction, "seed": seed}))
    meta = _reusable(folder, wanted, given)
    if meta:
        log(f"reusing prepared corpus {folder} ({meta['splits']['train']['tokens']:,} train / "
            f"{meta['splits']['val']['tokens']:,} val tokens)")
        return PreparedData(folder, meta, Tokenizer.load(folder / "tokenizer.json"))
    if (folder / "meta.json").exists():
        log(f"source, tokenizer or split settings changed: rebuilding {folder}")
    # Built beside its final place and renamed at the end: a crash never leaves a folder to reuse.
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a crashed build of an earlier process of this pid
    tmp.mkdir(parents=True)
    try:
        meta, tokenizer = _build(cfg, tmp, wanted, given, vocab_size, seed, log)
        shutil.rmtree(tmp / "cache", ignore_errors=True)
        if folder.exists():  # stale derived data of the same name
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return PreparedData(folder, meta, tokenizer)


def _build(cfg: DataConfig, tmp: Path, wanted: dict, given: Tokenizer | None, vocab_size: int, seed: int,
           log) -> tuple[dict, Tokenizer]:
    """Read, split, train or take the tokenizer, and write every file of the folder into tmp."""
    started = time.perf_counter()
    docs = read_documents(cfg, tmp / "cache", log)  # datasets' cache lives (and dies) in the build folder
    is_val = split_mask(len(docs), cfg.val_fraction, seed)
    train_docs = [d for d, v in zip(docs, is_val) if not v]
    val_docs = [d for d, v in zip(docs, is_val) if v]
    train_seconds = 0.0
    tokenizer = given
    if tokenizer is None:
        log(f"training a {vocab_size}-token byte-level BPE on {len(train_docs):,} training documents")
        t0 = time.perf_counter()
        tokenizer = Tokenizer.train(train_docs, vocab_size)
        train_seconds = time.perf_counter() - t0
        log(f"tokenizer trained in {train_seconds:.1f}s")
    dtype = np.uint16 if vocab_size <= 2 ** 16 else np.uint32
    t0 = time.perf_counter()
    splits = {"train": write_tokens(tokenizer, train_docs, tmp / "train.bin", dtype),
              "val": write_tokens(tokenizer, val_docs, tmp / "val.bin", dtype)}
    tokenize_seconds = time.perf_counter() - t0
    tokenizer.save(tmp / "tokenizer.json")
    text_mb = sum(s["text_bytes"] for s in splits.values()) / 1e6
    seconds = time.perf_counter() - started
    meta = {**wanted, "tokenizer_fingerprint": tokenizer.fingerprint, "tokenizer_trained": given is None,
            "tokenizer_vocab_size": tokenizer.vocab_size, "dtype": np.dtype(dtype).name, "splits": splits,
            "tokenizer_train_seconds": train_seconds, "tokenize_seconds": tokenize_seconds,
            "tokenize_mb_per_s": text_mb / max(tokenize_seconds, 1e-9), "prepare_seconds": seconds,
            "prepare_mb_per_s": text_mb / max(seconds, 1e-9)}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    for name, split in splits.items():
        log(f"{name}: {split['documents']:,} documents, {split['tokens']:,} tokens, "
            f"{split['bytes_per_token']:.2f} bytes/token")
    log(f"tokenized {text_mb:.1f} MB of text at {meta['tokenize_mb_per_s']:.1f} MB/s; "
        f"prepared in {seconds:.1f}s")
    return meta, tokenizer


# ---- batches ------------------------------------------------------------------------------------

def _gather(tokens: np.ndarray, windows: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) int64 of the given windows: window w covers tokens[w*seq_len : w*seq_len + seq_len + 1]."""
    rows = np.stack([tokens[w * seq_len:w * seq_len + seq_len + 1] for w in windows]).astype(np.int64)
    return torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(rows[:, 1:].copy())


def _too_small(split: str, tokens: np.ndarray, seq_len: int, batch_size: int, world_size: int) -> L1Error:
    needed = batch_size * world_size * seq_len + 1
    return L1Error(f"the {split} split has {len(tokens):,} tokens; one batch of {batch_size * world_size} x "
                   f"{seq_len} tokens needs at least {needed:,}: lower --batch_size or --seq_len, or use more data")


class BatchIterator:
    """Training batches of non-overlapping windows, shuffled per epoch; its position is two ints.

    An epoch is a seeded permutation of all windows; each next() takes the next global batch of
    batch_size x world_size windows, of which this rank gets its own slice. A remainder smaller
    than a global batch is dropped.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.windows_per_epoch = (len(tokens) - 1) // seq_len
        self.global_batch = batch_size * world_size
        if self.windows_per_epoch < self.global_batch:
            raise _too_small("training", tokens, seq_len, batch_size, world_size)
        self.epoch, self.index, self._order = 0, 0, None
        self._seek(0, 0)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next (inputs, targets), int64 of shape (batch_size, seq_len)."""
        start = self.index + self.rank * self.batch_size
        windows = self._order[start:start + self.batch_size]
        self._seek(self.epoch, self.index + self.global_batch)
        return _gather(self.tokens, windows, self.seq_len)

    def _seek(self, epoch: int, index: int) -> None:
        """Go to a position. With less than a global batch left, that is the next epoch's start, so
        `epoch` always names the epoch of the next batch."""
        if index + self.global_batch > self.windows_per_epoch:
            epoch, index = epoch + 1, 0
        if self._order is None or epoch != self.epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.windows_per_epoch)
        self.epoch, self.index = epoch, index

    def state_dict(self) -> dict:
        """The position: the epoch and the windows of it consumed so far (plain ints)."""
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where an iterator over the same tokens and seed left off."""
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index <= self.windows_per_epoch:
            raise L1Error(f"data position epoch {epoch}, window {index} does not fit this training split "
                          f"({self.windows_per_epoch} windows of {self.seq_len} tokens)")
        self._order = None
        self._seek(epoch, index)


def eval_batches(tokens: np.ndarray, seq_len: int, batch_size: int, max_batches: int,
                 rank: int = 0, world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The same validation batches on every call: sequential windows, whole global batches only (so
    every rank runs as many forward passes), each rank its own slice, at most max_batches."""
    n_windows = (len(tokens) - 1) // seq_len
    global_batch = batch_size * world_size
    if n_windows < global_batch:  # checked here, not at the first batch: this is not a generator
        raise _too_small("validation", tokens, seq_len, batch_size, world_size)
    starts = [b * global_batch + rank * batch_size for b in range(min(max_batches, n_windows // global_batch))]
    return (_gather(tokens, np.arange(s, s + batch_size), seq_len) for s in starts)
