"""Text source -> prepared token shards -> deterministic, resumable batches.

Sources, all read streamed through `datasets` so that the hub and local files take one code path:
any hub dataset, config and split (Simple English Wikipedia by default), or local .parquet,
.jsonl/.json (a text column or field) and .txt files (one file, one document), or a folder of them.

A corpus is prepared once into <data_dir>/<name>/, in two streamed passes whose memory does not
grow with the corpus:
1. the tokenizer is trained on the first tokenizer_sample_mb of the training documents (unless one
   is given);
2. the documents are encoded in batches on every core and appended, an end-of-text id after each,
   to their split's shards: train-000000.bin, ... and val-000000.bin, ..., shard_tokens ids each
   (the last one shorter), uint16, or uint32 for a vocabulary over 65,536 ids. meta.json lists every
   shard with its token count and SHA-256.
The split is by document: document i goes to validation when a seeded draw that depends only on i
falls under val_fraction, so deciding it never needs the rest of the corpus.

The work happens in .<name>.partial/, locked against a second process. Each time a shard is complete,
progress.json records how far the source has been read; the same command after a kill continues
from there, cutting the open shard back to its recorded length, so the result is byte-identical to
an uninterrupted preparation. The finished folder is renamed into place and never changed again: its
name carries a hash of every setting that decides its bytes (source, split seed and fraction,
tokenizer, vocabulary, shard size), so other settings make another folder and a folder that a run
reads is never rewritten. A reused folder's shards are checked against their sizes and checksums.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
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
from functools import partial
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import torch

from l1 import chat
from l1.config import DataConfig
from l1.errors import L1Error
from l1.tokenizer import Tokenizer

FORMAT_VERSION = 3
HUB_HOST = "huggingface.co"
LOADERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".txt": "text", ".tokens": "text"}
KINDS = ".parquet, .jsonl, .json or .txt"  # .tokens: WikiText's plain text, read as .txt
SPLITS = ("train", "val")
ENCODE_BATCH_BYTES = 4 << 20  # text per encode call: thousands of documents for every core, a bounded buffer
SPLIT_BLOCK = 4096  # documents per seeded draw of the split
LOCAL_EXAMPLE = "--data ../shared/data/wikipedia-sample"
CHAT_COLUMN = "messages"  # a chat corpus: rows of {role, content} lists (l1/chat.py)


@dataclass
class PreparedData:
    """A prepared corpus folder: token shards, tokenizer and meta.json."""

    dir: Path
    meta: dict
    tokenizer: Tokenizer

    def tokens(self, split: str) -> "Tokens":
        """The token ids of 'train' or 'val': its shards, memory-mapped read-only, as one stream."""
        shards = self.meta["splits"][split]["shards"]
        return Tokens([self.dir / s["file"] for s in shards], [s["tokens"] for s in shards], self.meta["dtype"])

    def bytes_per_token(self, split: str) -> float:
        """UTF-8 bytes of text per token: turns a loss in nats/token into bits per byte."""
        return self.meta["splits"][split]["bytes_per_token"]


class Tokens:
    """Shard files seen as one flat array of token ids: len() and slices tokens[a:b] (what
    BatchIterator and eval_batches use), a slice may span shards. Each shard is memory-mapped on
    first use."""

    def __init__(self, paths: list[Path], counts: list[int], dtype):
        self.paths, self.dtype = list(paths), np.dtype(dtype)
        self.starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self._maps: dict[int, np.memmap] = {}

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, key: slice) -> np.ndarray:
        start, stop, step = key.indices(len(self))
        if step != 1:
            raise ValueError("Tokens supports contiguous slices only")
        parts = []
        while start < stop:
            shard = int(np.searchsorted(self.starts, start, side="right")) - 1
            offset, end = int(self.starts[shard]), min(stop, int(self.starts[shard + 1]))
            if shard not in self._maps:
                self._maps[shard] = np.memmap(self.paths[shard], dtype=self.dtype, mode="r")
            parts.append(self._maps[shard][start - offset:end - offset])
            start = end
        return parts[0] if len(parts) == 1 else np.concatenate(parts or [np.empty(0, self.dtype)])


class Background:
    """fn(*args) in a thread. result() waits in slices of 0.1 s, so that Ctrl-C is seen at once even
    while fn runs in Rust; then it still waits for fn (one encode batch, about a second) before
    raising, because a thread that returns from Rust while the interpreter exits aborts the exit."""

    def __init__(self, fn, *args):
        self._value = self._error = None
        self._thread = threading.Thread(target=self._run, args=(fn, *args), daemon=True)
        self._thread.start()

    def _run(self, fn, *args):
        try:
            self._value = fn(*args)
        except BaseException as exc:  # handed to the waiting thread by result()
            self._error = exc

    def join(self) -> None:
        """Wait for fn to end (a second Ctrl-C leaves at once)."""
        self._thread.join()

    def result(self):
        """fn's return value, or its exception raised here."""
        try:
            while self._thread.is_alive():
                self._thread.join(0.1)
        except KeyboardInterrupt:
            self.join()
            raise
        if self._error is not None:
            raise self._error
        return self._value


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
    """What a prepared folder is made from; a changed file (size or mtime) makes another folder."""
    if cfg.data == "hub":
        source = {"hub": cfg.hub_dataset, "config": cfg.hub_config, "split": cfg.hub_split}
    else:
        files = [(p.resolve(), p.stat()) for p in _local_files(Path(cfg.data))]
        source = {"files": [[str(p), s.st_size, s.st_mtime_ns] for p, s in files]}
    return {**source, "text_column": cfg.text_column, "max_docs": cfg.max_docs}


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


def _readers(cfg: DataConfig, cache_dir: Path, log) -> list[tuple[str, str, partial]]:
    """(origin, text column, opener of a streamed dataset) for each part of the source: the hub
    dataset, or each run of consecutive local files of one kind."""
    import datasets

    if cfg.data == "hub":
        reason = _hub_unreachable_reason()
        if reason:
            raise L1Error(f"cannot reach the Hugging Face hub ({reason}) to download {cfg.hub_dataset} "
                          f"({cfg.hub_config}); use local files instead, e.g. {LOCAL_EXAMPLE} ({KINDS} or a folder)")
        log(f"reading {cfg.hub_dataset} ({cfg.hub_config}, split {cfg.hub_split}) from the Hugging Face hub, streamed")
        # Streamed: nothing is kept but the hub's own small cache of file lists.
        return [(f"{cfg.hub_dataset} ({cfg.hub_config})", cfg.text_column,
                 partial(datasets.load_dataset, cfg.hub_dataset, cfg.hub_config, split=cfg.hub_split, streaming=True))]
    files = [p for p in _local_files(Path(cfg.data)) if p.stat().st_size > 0]  # datasets fails on empty json
    log(f"reading {len(files)} file(s) from {cfg.data}")
    readers = []
    for kind, group in itertools.groupby(files, key=lambda p: LOADERS[p.suffix.lower()]):
        group = [str(p) for p in group]
        origin = group[0] if len(group) == 1 else f"{len(group)} {kind} files of {cfg.data}"
        options = {"sample_by": "document", "encoding_errors": "replace"} if kind == "text" else {}
        readers.append((origin, "text" if kind == "text" else cfg.text_column,
                        partial(datasets.load_dataset, kind, data_files=group, split="train", streaming=True,
                                cache_dir=str(cache_dir), **options)))
    return readers


def _texts(cfg: DataConfig, cache_dir: Path, log) -> Iterator:
    """The values of the text column, streamed in Arrow batches (no per-row formatting of the other
    columns)."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    for origin, column, open_dataset in _readers(cfg, cache_dir, log):
        try:
            row = 0
            for table in open_dataset().with_format("arrow").iter(batch_size=1024):
                if column not in table.column_names:
                    hint = (f"; chat rows ({CHAT_COLUMN}) are for fine-tuning a base model: --init_from RUN"
                            if CHAT_COLUMN in table.column_names else "")
                    raise L1Error(f"{origin} has no '{column}' column (found: {', '.join(table.column_names) or 'none'}); "
                                  f"name it with --text_column{hint}")
                kind = table.schema.field(column).type
                if column == CHAT_COLUMN:
                    yield from _conversations(table.column(column).to_pylist(), origin, row)
                    row += len(table)
                    continue
                if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)):
                    raise L1Error(f"the '{column}' column of {origin} holds {kind}, not text")
                yield from table.column(column).to_pylist()
        except L1Error:
            raise
        except Exception as exc:  # datasets, pyarrow and the network raise many types
            hint = f"; or use {LOCAL_EXAMPLE}" if cfg.data == "hub" else ""
            raise L1Error(f"cannot read {origin}: {str(exc).strip().splitlines()[0][:300]}{hint}") from None


def _conversations(rows: list, origin: str, first: int) -> Iterator[str]:
    """Chat rows as the chat template's text (l1/chat.py); a malformed row is one L1Error naming
    the file and the row (counted from 1), never skipped."""
    for i, messages in enumerate(rows, first + 1):
        if isinstance(messages, list):  # datasets' JSON reader turns rows of mixed fields into JSON text
            messages = [_json_object(m) for m in messages]
        yield chat.render(chat.check(messages, f"{origin}, row {i}"))


def _json_object(value):
    """value, or the object it is the JSON text of."""
    if isinstance(value, str) and value.startswith("{"):
        with contextlib.suppress(ValueError):
            return json.loads(value)
    return value


def chat_source(cfg: DataConfig) -> bool:
    """Whether the source holds conversations: --text_column messages, or a first table with a
    messages column and no text column (one table is read)."""
    if cfg.text_column == CHAT_COLUMN:
        return True
    import tempfile

    import datasets

    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory() as cache:  # datasets' lock files: no debris
        origin, _, open_dataset = _readers(cfg, Path(cache), lambda line: None)[0]
        try:
            columns = next(iter(open_dataset().with_format("arrow").iter(batch_size=1))).column_names
        except StopIteration:
            return False
        except Exception as exc:  # datasets, pyarrow and the network raise many types
            raise L1Error(f"cannot read {origin}: {str(exc).strip().splitlines()[0][:300]}") from None
    return CHAT_COLUMN in columns and cfg.text_column not in columns


def documents(cfg: DataConfig, cache_dir: Path, log) -> Iterator[str]:
    """The non-empty documents of the source in source order, streamed, at most max_docs (datasets
    keeps its lock files of local sources in cache_dir). A source of a single document yields its
    paragraphs instead, so that a split exists."""
    texts = (t for t in _texts(cfg, cache_dir, log) if t and not t.isspace())
    if cfg.max_docs:
        texts = itertools.islice(texts, cfg.max_docs)
    head = list(itertools.islice(texts, 2))
    if len(head) < 2 and cfg.text_column == CHAT_COLUMN:  # a conversation is not cut into paragraphs
        raise L1Error(f"--data {cfg.data} holds {len(head)} conversation(s); at least 2 are needed for a "
                      "validation split")
    if len(head) < 2:
        head = [p for p in re.split(r"\n\s*\n", head[0]) if p.strip()] if head else []
        if not head:
            raise L1Error(f"--data {cfg.data}: no text found")
        if len(head) < 2:
            raise L1Error(f"--data {cfg.data} holds a single document; at least 2 are needed for a validation split")
    replaced = 0
    for doc in itertools.chain(head, texts):
        replaced += "\ufffd" in doc
        yield doc
    if replaced:
        log(f"{replaced} document(s) contain U+FFFD, the replacement character (e.g. for invalid UTF-8)")


def batched(docs: Iterator[str]) -> Iterator[list[str]]:
    """Consecutive documents in lists of about ENCODE_BATCH_BYTES of text."""
    batch, size = [], 0
    for doc in docs:
        batch.append(doc)
        size += len(doc)
        if size >= ENCODE_BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def end_of_text_joined(ids: list[list[int]], eot_id: int, dtype) -> np.ndarray:
    """The documents' ids as one stream, an end-of-text id after each: the trainer's token stream."""
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum()))
    return np.insert(flat, np.cumsum(lengths), eot_id)


# ---- the split ----------------------------------------------------------------------------------

def split_mask(first: int, n: int, fraction: float, seed: int) -> np.ndarray:
    """Which of documents first .. first+n-1 go to validation (True): a seeded uniform draw per
    document index under `fraction`, the draws made SPLIT_BLOCK indices at a time. Document 0 always
    trains."""
    blocks = range(first // SPLIT_BLOCK, (first + n - 1) // SPLIT_BLOCK + 1)
    draws = np.concatenate([np.random.default_rng([seed, block]).random(SPLIT_BLOCK) for block in blocks])
    offset = first - blocks[0] * SPLIT_BLOCK
    is_val = draws[offset:offset + n] < fraction
    if first == 0:
        is_val[0] = False
    return is_val


@dataclass
class Batch:
    """Consecutive documents of the source, from index `first`, each marked for validation or not."""

    first: int
    docs: list[str]
    is_val: np.ndarray


def split_batches(cfg: DataConfig, seed: int, cache_dir: Path, log) -> Iterator[Batch]:
    """The documents in batches, split. If no document drew validation, the last one goes there
    (a small corpus), so both splits hold one; hence each batch is handed on once the next is read."""
    pending, first, any_val = None, 0, False
    for docs in batched(documents(cfg, cache_dir, log)):
        if pending:
            yield pending
        pending = Batch(first, docs, split_mask(first, len(docs), cfg.val_fraction, seed))
        first += len(docs)
        any_val = any_val or bool(pending.is_val.any())
    if not any_val:
        pending.is_val[-1] = True
    yield pending


def _tokenizer_sample(batches: Iterator[Batch], megabytes: float) -> Iterator[str]:
    """The first training documents, up to `megabytes` of UTF-8 text."""
    budget = megabytes * 1e6
    for batch in batches:
        for doc, is_val in zip(batch.docs, batch.is_val):
            if not is_val:
                yield doc
                budget -= len(doc.encode("utf-8"))
                if budget <= 0:
                    return


def _encoded(tokenizer: Tokenizer, batches: Iterator[Batch]) -> Iterator[tuple[Batch, list[list[int]]]]:
    """Each batch with its documents' ids. While one batch is encoded in Rust (every core, the GIL
    released), the next is read from the source, then encoded while the caller writes this one."""
    batch = next(batches, None)
    pending = Background(tokenizer.encode_documents, batch.docs) if batch else None
    try:
        while batch is not None:
            following = next(batches, None)
            ids = pending.result()
            pending = Background(tokenizer.encode_documents, following.docs) if following else None
            yield batch, ids
            batch = following
    finally:  # the caller failed or stopped: no thread may be left inside Rust when the process exits
        if pending is not None:
            pending.join()


# ---- shards -------------------------------------------------------------------------------------

def _save_json(path: Path, value: dict) -> None:
    """Write a JSON file atomically and durably (a kill leaves the old one or the new one)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(value, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)  # releases the GIL: shards hash in parallel threads
    return digest.hexdigest()


class ShardWriter:
    """One split's shards: ids are appended to the open shard, which is complete at shard_tokens ids.

    Built from a state (a fresh one or progress.json's): shards past the open one are removed and the
    open one is cut back to the recorded length, which undoes whatever a killed run wrote after it.
    """

    def __init__(self, folder: Path, split: str, dtype, shard_tokens: int, state: dict):
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, np.dtype(dtype), shard_tokens
        self.shards = list(state["shards"])
        self.documents, self.text_bytes = state["documents"], state["text_bytes"]
        for path in folder.glob(f"{split}-*.bin"):
            if int(path.stem.rsplit("-", 1)[1]) > len(self.shards):
                path.unlink()
        self.open_tokens = state["open_tokens"]
        self.file = open(self._path(len(self.shards)), "a+b")
        self.file.truncate(self.open_tokens * self.dtype.itemsize)
        self.file.seek(0)
        self.hash = hashlib.sha256(self.file.read())  # at most one shard, once per resume

    @staticmethod
    def fresh() -> dict:
        return {"shards": [], "open_tokens": 0, "documents": 0, "text_bytes": 0}

    def _path(self, index: int) -> Path:
        return self.folder / f"{self.split}-{index:06d}.bin"

    def write(self, docs: list[str], ids: list[list[int]], eot_id: int) -> bool:
        """Append the documents' ids, an end-of-text id after each; True if a shard was completed."""
        flat = end_of_text_joined(ids, eot_id, self.dtype)
        self.documents += len(docs)
        self.text_bytes += sum(len(d.encode("utf-8")) for d in docs)
        completed = False
        while flat.size:
            room = self.shard_tokens - self.open_tokens
            data = flat[:room].tobytes()
            self.file.write(data)
            self.hash.update(data)
            self.open_tokens += min(room, flat.size)
            flat = flat[room:]
            if self.open_tokens == self.shard_tokens:
                self._complete()
                self.file = open(self._path(len(self.shards)), "w+b")
                completed = True
        return completed

    def _complete(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        self.shards.append({"file": self._path(len(self.shards)).name, "tokens": self.open_tokens,
                            "sha256": self.hash.hexdigest()})
        self.hash, self.open_tokens = hashlib.sha256(), 0

    def state(self) -> dict:
        """The position to resume from, with the open shard's ids durably on disk."""
        self.file.flush()
        os.fsync(self.file.fileno())
        return {"shards": self.shards, "open_tokens": self.open_tokens, "documents": self.documents,
                "text_bytes": self.text_bytes}

    def finish(self) -> dict:
        """Complete the last (shorter) shard; the split's entry of meta.json."""
        if self.open_tokens:
            self._complete()
        else:
            self.file.close()
            self._path(len(self.shards)).unlink()
        tokens = sum(s["tokens"] for s in self.shards)
        return {"documents": self.documents, "tokens": tokens, "text_bytes": self.text_bytes,
                "bytes_per_token": self.text_bytes / max(tokens, 1), "shards": self.shards}

    def close(self) -> None:
        self.file.close()


# ---- preparation --------------------------------------------------------------------------------

def _slug(cfg: DataConfig, vocab_size: int) -> str:
    """A readable name of the source, e.g. wikipedia-sample-bpe4096."""
    if cfg.data == "hub":
        base = f"{cfg.hub_dataset.rsplit('/', 1)[-1]}-{cfg.hub_config}"
        base += "" if cfg.hub_split == "train" else f"-{cfg.hub_split}"
    else:
        path = Path(cfg.data).resolve()
        base = path.name if path.is_dir() else path.stem
    first = f"-first{cfg.max_docs}" if cfg.max_docs else ""
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', base).strip('-.') or 'corpus'}{first}-bpe{vocab_size}"


def corpus_name(cfg: DataConfig, vocab_size: int, identity: dict) -> str:
    """The prepared folder's name: the source's slug and a hash of everything that decides its bytes."""
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
    return f"{_slug(cfg, vocab_size)}-{digest}"


def _identity(cfg: DataConfig, vocab_size: int, seed: int, tokenizer: dict) -> dict:
    # A JSON round trip makes it compare equal to what meta.json holds (lists, not tuples).
    return json.loads(json.dumps({
        "format": FORMAT_VERSION, "source": _source_identity(cfg), "vocab_size": vocab_size,
        "val_fraction": cfg.val_fraction, "seed": seed, "shard_tokens": cfg.shard_tokens, "tokenizer": tokenizer}))


def _intact(shard: tuple[Path, int, str]) -> bool:
    path, size, sha256 = shard
    return path.is_file() and path.stat().st_size == size and _sha256(path) == sha256


def _verified(folder: Path, identity: dict) -> dict:
    """meta.json of a finished folder, once every shard matches its size and checksum."""
    def damaged(why: str) -> L1Error:
        return L1Error(f"prepared corpus {folder} is damaged ({why}); delete the folder and run again to prepare it anew")

    try:
        meta = json.loads((folder / "meta.json").read_text())
        itemsize = np.dtype(meta["dtype"]).itemsize
        shards = [(folder / s["file"], s["tokens"] * itemsize, s["sha256"])
                  for split in SPLITS for s in meta["splits"][split]["shards"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise damaged(f"meta.json: {exc}") from None
    if any(meta.get(k) != v for k, v in identity.items()):
        raise damaged("meta.json does not match the folder's name")
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        bad = [s[0].name for s, ok in zip(shards, pool.map(_intact, shards)) if not ok]
    if bad:
        raise damaged(f"{bad[0]}{f' and {len(bad) - 1} more' if len(bad) > 1 else ''} do not match meta.json")
    return meta


@contextlib.contextmanager
def _locked(work: Path, log):
    """Hold an exclusive lock on the work folder; the kernel releases it when the process dies."""
    work.mkdir(parents=True, exist_ok=True)
    fd = os.open(work, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another process that is preparing {work.parent / work.name.removesuffix('.partial')[1:]}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write_error(exc: OSError, data_dir: Path) -> L1Error:
    if exc.errno == errno.ENOSPC:
        return L1Error(f"no space left on the device of {data_dir} while preparing the corpus (shards take "
                       "2 bytes per token, 4 for a vocabulary over 65,536); free some space and run the same "
                       "command again: it continues from the last complete shard")
    where = f" ({exc.filename})" if exc.filename else ""
    return L1Error(f"cannot write the prepared corpus in {data_dir}: {exc.strerror or exc}{where}")


def prepare(cfg: DataConfig, vocab_size: int, seed: int, log=print, tokenizer: Tokenizer | None = None) -> PreparedData:
    """Prepare <data_dir>/<name>/ for this source, tokenizer and split, or reuse it if it exists.

    tokenizer: use this one (a fine-tune run's) instead of cfg.tokenizer or training one."""
    data_dir = Path(cfg.data_dir)
    if data_dir.exists() and not data_dir.is_dir():
        raise L1Error(f"--data_dir {data_dir} is a file, not a folder")
    given = tokenizer or (Tokenizer.load(cfg.tokenizer) if cfg.tokenizer else None)
    if cfg.text_column == CHAT_COLUMN and not (given and chat.has_template(given)):
        raise L1Error(f"--data {cfg.data} holds chat rows ({CHAT_COLUMN}), which teach a base model to chat: "
                      "fine-tune one with --init_from RUN (README, 'Chat')")
    if given and given.vocab_size > vocab_size:
        raise L1Error(f"tokenizer {cfg.tokenizer} has {given.vocab_size} tokens, more than vocab_size {vocab_size}")
    # A resumed run passes its own tokenizer: the folder that trained it serves as well as one made with it.
    identities = [_identity(cfg, vocab_size, seed, {"trained_on_mb": cfg.tokenizer_sample_mb})]
    if given:
        identities.append(_identity(cfg, vocab_size, seed, {"fingerprint": given.fingerprint}))

    def reusable() -> PreparedData | None:
        for identity in identities:
            folder = data_dir / corpus_name(cfg, vocab_size, identity)
            if folder.is_dir():
                started = time.perf_counter()
                meta = _verified(folder, identity)
                if given is None or meta["tokenizer_fingerprint"] == given.fingerprint:
                    train, val = (meta["splits"][s] for s in SPLITS)
                    log(f"reusing prepared corpus {folder} ({train['tokens']:,} train / {val['tokens']:,} val "
                        f"tokens, {len(train['shards']) + len(val['shards'])} shards verified in "
                        f"{time.perf_counter() - started:.1f}s)")
                    return PreparedData(folder, meta, Tokenizer.load(folder / "tokenizer.json"))
        return None

    found = reusable()
    if found:
        return found
    identity = identities[-1]
    folder = data_dir / corpus_name(cfg, vocab_size, identity)
    work = folder.with_name(f".{folder.name}.partial")
    old = data_dir / _slug(cfg, vocab_size)
    if (old / "train.bin").is_file():
        log(f"{old} holds this corpus in the older one-file format; preparing it once more as shards in "
            f"{folder} (delete {old} when no run uses it)")
    try:
        with _locked(work, log):
            found = reusable()  # another process may have finished it while this one waited
            if found:
                shutil.rmtree(work, ignore_errors=True)
                return found
            meta, tokenizer = _build(cfg, work, identity, given, vocab_size, seed, log)
            os.replace(work, folder)
    except OSError as exc:
        raise _write_error(exc, data_dir) from None
    return PreparedData(folder, meta, tokenizer)


def _progress(work: Path, identity: dict) -> dict | None:
    """The recorded state of an earlier, killed preparation in this work folder, if it is usable."""
    try:
        progress = json.loads((work / "progress.json").read_text())
        tokenizer = Tokenizer.load(work / "tokenizer.json")
        usable = (progress["identity"] == identity and progress["tokenizer_fingerprint"] == tokenizer.fingerprint
                  and all((work / s["file"]).is_file() for split in SPLITS for s in progress["splits"][split]["shards"]))
    except (OSError, ValueError, KeyError, TypeError, L1Error):
        return None
    return progress if usable else None


def _build(cfg: DataConfig, work: Path, identity: dict, given: Tokenizer | None, vocab_size: int, seed: int,
           log) -> tuple[dict, Tokenizer]:
    """Train or take the tokenizer, then tokenize the source into shards, all inside `work`; continue
    a killed preparation there if progress.json allows."""
    started = time.perf_counter()
    cache = work / "cache"  # datasets' lock files of local sources live (and die) in the work folder
    progress = _progress(work, identity)
    train_seconds = 0.0
    if progress:
        tokenizer = Tokenizer.load(work / "tokenizer.json")
        log(f"continuing an interrupted preparation from document {progress['next_doc']:,} "
            f"({sum(len(progress['splits'][s]['shards']) for s in SPLITS)} shards already complete)")
    else:
        for child in work.iterdir():  # what a run killed before its first progress record left
            shutil.rmtree(child) if child.is_dir() else child.unlink()
        tokenizer = given
        if tokenizer is None:
            log(f"training a {vocab_size}-token byte-level BPE on the training documents (their first "
                f"{cfg.tokenizer_sample_mb:g} MB at most)")
            sample = _tokenizer_sample(split_batches(cfg, seed, cache, lambda line: None), cfg.tokenizer_sample_mb)
            tokenizer = Tokenizer.train(sample, vocab_size)
            train_seconds = time.perf_counter() - started
            log(f"tokenizer trained in {train_seconds:.1f}s")
        tokenizer.save(work / "tokenizer.json")
        progress = {"identity": identity, "tokenizer_fingerprint": tokenizer.fingerprint, "next_doc": 0,
                    "splits": {s: ShardWriter.fresh() for s in SPLITS}}
        _save_json(work / "progress.json", progress)
    dtype = np.uint16 if vocab_size <= 2 ** 16 else np.uint32
    t0 = time.perf_counter()
    writers = {s: ShardWriter(work, s, dtype, cfg.shard_tokens, progress["splits"][s]) for s in SPLITS}
    text_bytes = -sum(w.text_bytes for w in writers.values())  # this session's share, for its speed
    try:
        batches = (b for b in split_batches(cfg, seed, cache, log) if b.first >= progress["next_doc"])
        for batch, ids in _encoded(tokenizer, batches):
            completed = False
            for split, writer in writers.items():
                mine = np.flatnonzero(batch.is_val == (split == "val"))
                completed |= writer.write([batch.docs[i] for i in mine], [ids[i] for i in mine], tokenizer.eot_id)
            if completed:
                _save_json(work / "progress.json", {**progress, "next_doc": batch.first + len(batch.docs),
                                                     "splits": {s: w.state() for s, w in writers.items()}})
        splits = {s: w.finish() for s, w in writers.items()}
    finally:
        for writer in writers.values():
            writer.close()
    tokenize_seconds = time.perf_counter() - t0
    seconds = time.perf_counter() - started
    text_mb = (text_bytes + sum(s["text_bytes"] for s in splits.values())) / 1e6
    meta = {**identity, "tokenizer_fingerprint": tokenizer.fingerprint, "tokenizer_vocab_size": tokenizer.vocab_size,
            "dtype": np.dtype(dtype).name, "splits": splits, "resumed_from_document": progress["next_doc"],
            "tokenizer_train_seconds": train_seconds, "tokenize_seconds": tokenize_seconds,
            "tokenize_mb_per_s": text_mb / max(tokenize_seconds, 1e-9), "prepare_seconds": seconds}
    _save_json(work / "meta.json", meta)
    (work / "progress.json").unlink()
    shutil.rmtree(cache, ignore_errors=True)
    for name, split in splits.items():
        log(f"{name}: {split['documents']:,} documents, {split['tokens']:,} tokens in {len(split['shards'])} "
            f"shard(s), {split['bytes_per_token']:.2f} bytes/token")
    log(f"tokenized {text_mb:.1f} MB of text at {meta['tokenize_mb_per_s']:.1f} MB/s; prepared in {seconds:.1f}s")
    return meta, tokenizer


# ---- batches ------------------------------------------------------------------------------------

def _gather(tokens, windows: np.ndarray, seq_len: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) int64 of the given windows: window w covers tokens[offset + w*seq_len : ... + seq_len + 1]."""
    rows = np.stack([tokens[offset + w * seq_len:offset + w * seq_len + seq_len + 1] for w in windows])
    rows = rows.astype(np.int64)
    return torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(rows[:, 1:].copy())


def _too_small(split: str, tokens, seq_len: int, batch_size: int, world_size: int) -> L1Error:
    needed = batch_size * world_size * seq_len + 1
    return L1Error(f"the {split} split has {len(tokens):,} tokens; one batch of {batch_size * world_size} x "
                   f"{seq_len} tokens needs at least {needed:,}: lower --batch_size or --seq_len, or use more data")


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer: a fast bijection of uint64 whose output bits all depend on every input bit."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class WindowOrder:
    """A seeded permutation of range(n), computed per position rather than stored.

    A materialised permutation costs 8 bytes per window (80 MB for the 10M windows of a 10B-token
    corpus, rebuilt each epoch). Here position p maps through a 6-round Feistel network over the
    smallest even number of bits that holds n (a bijection of that power of two; round keys drawn
    from the seed); a value >= n goes through again until it falls below n ("cycle walking", under 4
    passes on average), which keeps the map a bijection of range(n). Memory is a few ints.
    """

    ROUNDS = 6

    def __init__(self, n: int, seed: list[int]):
        self.n = n
        self.half = (max(1, (n - 1).bit_length()) + 1) // 2
        self.mask = np.uint64((1 << self.half) - 1)
        self.keys = np.random.default_rng(seed).integers(0, 2 ** 63, self.ROUNDS, dtype=np.uint64)

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        half = np.uint64(self.half)
        left, right = x >> half, x & self.mask
        for key in self.keys:
            left, right = right, left ^ (_mix(right ^ key) & self.mask)
        return (left << half) | right

    def __getitem__(self, positions: np.ndarray) -> np.ndarray:
        x = self._feistel(np.asarray(positions, dtype=np.uint64))
        outside = x >= self.n
        while outside.any():
            x[outside] = self._feistel(x[outside])
            outside = x >= self.n
        return x.astype(np.int64)


class BatchIterator:
    """Training batches of non-overlapping windows, shuffled per epoch; its position is two ints.

    `tokens` is a split's Tokens (or any array): its shards are one stream, so a window may span two.
    An epoch is a seeded permutation of all windows (WindowOrder: memory does not grow with their
    number); each next() takes the next global batch of batch_size x world_size windows, of which this
    rank gets its own slice. A remainder smaller than a global batch is dropped.

    Epoch 0 cuts the stream at multiples of seq_len; every later epoch at a seeded offset into the
    first window, so that repeated passes see the text cut at other places, as random crops would
    (at 16 passes over bench.recipe's replica of the flagship's regime, the last model came out 2.8%
    better in bits per byte than with a fixed grid: RECIPE.md).
    """

    def __init__(self, tokens, seq_len: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.global_batch = batch_size * world_size
        if self._count(0) < self.global_batch:
            raise _too_small("training", tokens, seq_len, batch_size, world_size)
        self.epoch, self.index, self._order = 0, 0, None
        self._seek(0, 0)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next (inputs, targets), int64 of shape (batch_size, seq_len)."""
        start = self.index + self.rank * self.batch_size
        windows, offset = self._order[np.arange(start, start + self.batch_size)], self.offset
        self._seek(self.epoch, self.index + self.global_batch)
        return _gather(self.tokens, windows, self.seq_len, offset)

    def _offset(self, epoch: int) -> int:
        """Where the epoch's first window starts: 0 in epoch 0, then drawn from the seed and the epoch,
        below seq_len and small enough that a global batch still fits."""
        if epoch == 0:
            return 0
        room = min(self.seq_len - 1, len(self.tokens) - 1 - self.global_batch * self.seq_len)
        return int(np.random.default_rng([self.seed, epoch, 1]).integers(0, room + 1))

    def _count(self, offset: int) -> int:
        """The number of whole windows (each with its next-token target) from `offset` on."""
        return (len(self.tokens) - 1 - offset) // self.seq_len

    def _seek(self, epoch: int, index: int) -> None:
        """Go to a position. With less than a global batch left, that is the next epoch's start, so
        `epoch` always names the epoch of the next batch."""
        if self._order is None or epoch != self.epoch:
            self._enter(epoch)
        if index + self.global_batch > self.windows_per_epoch:
            epoch, index = epoch + 1, 0
            self._enter(epoch)
        self.epoch, self.index = epoch, index

    def _enter(self, epoch: int) -> None:
        """Set up the epoch: its cut, its number of windows and their order."""
        self.offset = self._offset(epoch)
        self.windows_per_epoch = self._count(self.offset)
        self._order = WindowOrder(self.windows_per_epoch, [self.seed, epoch])

    def state_dict(self) -> dict:
        """The position: the epoch and the windows of it consumed so far (plain ints)."""
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where an iterator over the same tokens and seed left off."""
        epoch, index = int(state["epoch"]), int(state["index"])
        windows = self._count(self._offset(max(epoch, 0)))
        if epoch < 0 or not 0 <= index <= windows:
            raise L1Error(f"data position epoch {epoch}, window {index} does not fit this training split "
                          f"({windows} windows of {self.seq_len} tokens)")
        self._order = None
        self._seek(epoch, index)


def eval_batches(tokens, seq_len: int, batch_size: int, max_batches: int,
                 rank: int = 0, world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The same validation batches on every call: sequential windows, whole global batches only (so
    every rank runs as many forward passes), each rank its own slice, at most max_batches."""
    n_windows = (len(tokens) - 1) // seq_len
    global_batch = batch_size * world_size
    if n_windows < global_batch:  # checked here, not at the first batch: this is not a generator
        raise _too_small("validation", tokens, seq_len, batch_size, world_size)
    starts = [b * global_batch + rank * batch_size for b in range(min(max_batches, n_windows // global_batch))]
    return (_gather(tokens, np.arange(s, s + batch_size), seq_len) for s in starts)
