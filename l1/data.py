"""Text source -> prepared token shards -> deterministic, resumable batches.

Sources, all read streamed in Arrow batches: any hub dataset, config and split (Simple English
Wikipedia by default), or local .parquet, .jsonl/.json (a text column or field) and .txt files
(one file, one document), or a folder of them; through `datasets`, but for parquet files, which
pyarrow reads itself (so that a machine without `datasets` trains on them).

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

import abc
import contextlib
import errno
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
import pyarrow.compute as pc
import torch

from l1 import chat
from l1.config import DataConfig
from l1.errors import L1Error
from l1.lock import FolderLock, remove_temporaries
from l1.tokenizer import Tokenizer

FORMAT_VERSION = 3
HUB_HOST = "huggingface.co"
LOADERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".txt": "text", ".tokens": "text"}
KINDS = ".parquet, .jsonl, .json or .txt"  # .tokens: WikiText's plain text, read as .txt
SPLITS = ("train", "val")
ENCODE_BATCH_BYTES = 4 << 20  # text per encode call: thousands of documents for every core, a bounded buffer
SPLIT_BLOCK = 4096  # documents per seeded draw of the split
PIECE_CHARS = 1 << 20  # a longer document is read, encoded and written in pieces (_cut): memory stays bounded
PARAGRAPH_BREAK = re.compile(r"\n\s*\n")  # where a lone document is split into documents
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

    @property
    def digest(self) -> str:
        """A hash of the token ids of both splits (from the shards' checksums): equal digests, the
        same tokens and the same split, wherever the folder lies and whatever its name."""
        shards = [[split, s["tokens"], s["sha256"]] for split in SPLITS for s in self.meta["splits"][split]["shards"]]
        return hashlib.sha256(json.dumps([self.meta["dtype"], shards]).encode()).hexdigest()[:16]


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


def _parquet_tables(paths: list[str]) -> Iterator[pa.Table]:
    """Local parquet files in Arrow batches of 1024 rows, read by pyarrow itself: a machine
    without the `datasets` package (bench.gpu's) still reads them."""
    import pyarrow.parquet as pq

    for path in paths:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            yield pa.Table.from_batches([batch])


def _dataset_tables(open_dataset) -> Iterator[pa.Table]:
    """A streamed `datasets` dataset in Arrow batches of 1024 rows."""
    return open_dataset().with_format("arrow").iter(batch_size=1024)


def _datasets():
    """The `datasets` package, quiet; imported only for the sources that need it (the hub,
    json and text files)."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


def _readers(cfg: DataConfig, cache_dir: Path, log) -> list[tuple[str, str, partial]]:
    """(origin, text column, opener of its Arrow batches) for each part of the source: the hub
    dataset, or each run of consecutive local files of one kind."""
    if cfg.data == "hub":
        reason = _hub_unreachable_reason()
        if reason:
            raise L1Error(f"cannot reach the Hugging Face hub ({reason}) to download {cfg.hub_dataset} "
                          f"({cfg.hub_config}); use local files instead, e.g. {LOCAL_EXAMPLE} ({KINDS} or a folder)")
        log(f"reading {cfg.hub_dataset} ({cfg.hub_config}, split {cfg.hub_split}) from the Hugging Face hub, streamed")
        # Streamed: nothing is kept but the hub's own small cache of file lists.
        return [(f"{cfg.hub_dataset} ({cfg.hub_config})", cfg.text_column,
                 partial(_dataset_tables, partial(_datasets().load_dataset, cfg.hub_dataset, cfg.hub_config,
                                                  split=cfg.hub_split, streaming=True)))]
    files = [p for p in _local_files(Path(cfg.data)) if p.stat().st_size > 0]  # datasets fails on empty json
    log(f"reading {len(files)} file(s) from {cfg.data}")
    readers = []
    for kind, group in itertools.groupby(files, key=lambda p: LOADERS[p.suffix.lower()]):
        group = [str(p) for p in group]
        origin = group[0] if len(group) == 1 else f"{len(group)} {kind} files of {cfg.data}"
        if kind == "text":  # not datasets' reader: it holds a whole file in memory (three times)
            readers.append((origin, None, partial(map, TextFile, group)))
        elif kind == "parquet":  # pyarrow reads it itself: no `datasets` needed (a GPU box may lack it)
            readers.append((origin, cfg.text_column, partial(_parquet_tables, group)))
        else:
            readers.append((origin, cfg.text_column,
                            partial(_dataset_tables, partial(_datasets().load_dataset, kind, data_files=group,
                                                             split="train", streaming=True, cache_dir=str(cache_dir)))))
    return readers


class LongText(abc.ABC):
    """A document read in chunks, never as one Python str: a .txt file (TextFile), or a long value of
    a text column (ArrowText)."""

    @abc.abstractmethod
    def chunks(self) -> Iterator[str]:
        """The document's text, in order, in chunks of at most PIECE_CHARS characters."""

    def blank(self) -> bool:
        """Whether the document holds only whitespace (read up to its first other character)."""
        return all(chunk.isspace() for chunk in self.chunks())


class TextFile(LongText):
    """A .txt file: one document. Decoded as datasets' text reader decodes it (UTF-8, invalid bytes
    replaced by U+FFFD, universal newlines), so the prepared bytes are those that reader gave."""

    def __init__(self, path: str):
        self.path = path

    def chunks(self) -> Iterator[str]:
        try:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                while chunk := f.read(PIECE_CHARS):
                    yield chunk
        except OSError as exc:
            raise L1Error(f"cannot read {self.path}: {exc.strerror or exc}") from None


class ArrowText(LongText):
    """A text value of an Arrow column longer than PIECE_CHARS bytes, decoded from Arrow's buffer a
    slice at a time (Arrow holds valid UTF-8; a slice ends before a continuation byte)."""

    def __init__(self, value: pa.Scalar):
        self.value = value

    def chunks(self) -> Iterator[str]:
        data = memoryview(self.value.as_buffer())
        start = 0
        while start < len(data):
            end = min(start + PIECE_CHARS, len(data))
            while end < len(data) and data[end] & 0xC0 == 0x80:
                end -= 1
            yield str(data[start:end], "utf-8")
            start = end


def _values(column: pa.ChunkedArray) -> Iterator:
    """A text column's values: str (or None), and an ArrowText for each longer than PIECE_CHARS bytes."""
    for array in column.chunks:
        if pa.types.is_null(array.type) or (pc.max(pc.binary_length(array)).as_py() or 0) <= PIECE_CHARS:
            yield from array.to_pylist()
        else:
            for value in array:
                yield ArrowText(value) if value.is_valid and len(value.as_buffer()) > PIECE_CHARS else value.as_py()


def _texts(cfg: DataConfig, cache_dir: Path, log) -> Iterator:
    """The documents of the source: the values of the text column (str or None; ArrowText if long),
    streamed in Arrow batches (no per-row formatting of the other columns), and a TextFile for each
    .txt file."""
    for origin, column, open_tables in _readers(cfg, cache_dir, log):
        if column is None:
            yield from open_tables()
            continue
        try:
            row = 0
            for table in open_tables():
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
                yield from _values(table.column(column))
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

    with tempfile.TemporaryDirectory() as cache:  # datasets' lock files: no debris
        origin, column, open_tables = _readers(cfg, Path(cache), lambda line: None)[0]
        if column is None:  # .txt files hold text
            return False
        try:
            columns = next(iter(open_tables())).column_names
        except StopIteration:
            return False
        except Exception as exc:  # datasets, pyarrow and the network raise many types
            raise L1Error(f"cannot read {origin}: {str(exc).strip().splitlines()[0][:300]}") from None
    return CHAT_COLUMN in columns and cfg.text_column not in columns


def _pieces(chunks: Iterator[str]) -> Iterator[str]:
    """A document's text (given in chunks) in pieces of at most PIECE_CHARS characters, cut where the
    tokenizer's pre-tokenizer starts a new word anyway (see _cut)."""
    rest = ""
    for chunk in chunks:
        text, start = rest + chunk, 0  # text is chunk itself (no copy) for a document given whole
        while len(text) - start > PIECE_CHARS:
            cut = _cut(text, start, start + PIECE_CHARS)
            yield text[start:cut]
            start = cut
        rest = text[start:]
    if rest:
        yield rest


def _cut(text: str, start: int, end: int) -> int:
    r"""Where the piece from `start` ends: before the last space in text[start + 1:end] that follows a
    character other than whitespace; `end` if there is none (a 'word' of PIECE_CHARS characters).

    GPT-2's pattern ('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+), the
    encoding pre-tokenizer, always ends a word after a character X other than whitespace when a space
    follows: no alternative holds a space after another character (a space only leads ' ?...', and the
    two whitespace alternatives hold no X). Its next match starts at that space (one of the ' ?...'
    alternatives or a whitespace one), and no alternative looks behind, so both halves split into the
    same words as the whole. BPE merges within words only, so the pieces encode to the ids of the
    whole. The trainer's pre-tokenizer (training_pre_tokenizer) first cuts runs of non-space
    characters, which a space bounds, so it splits the halves into the same words too. A cut at `end`
    (no such space within PIECE_CHARS characters) may encode differently; the whole document would have
    needed about 100 bytes of memory per character to encode."""
    pos = text.rfind(" ", start + 1, end)
    while pos > start and text[pos - 1].isspace():  # isspace() covers every character \s matches
        pos = text.rfind(" ", start + 1, pos)
    return pos if pos > start else end


def _ended(pieces: Iterator[str]) -> Iterator[tuple[str, bool]]:
    """Each piece of one document with whether it is the last."""
    held = next(pieces, None)
    for piece in pieces:
        yield held, False
        held = piece
    if held is not None:
        yield held, True


def _paragraphs(pieces: Iterator[str]) -> Iterator[tuple[str, bool]]:
    """The non-blank paragraphs (split at blank lines: PARAGRAPH_BREAK) of one document given in pieces, in
    pieces: (text, whether it ends its paragraph). A blank line is whitespace, which _cut never cuts
    (it cuts after a character other than whitespace), so each one lies within a piece."""
    held, text_seen = [], False  # the paragraph's pieces not yet yielded; whether one is not blank
    for piece in pieces:
        for k, part in enumerate(PARAGRAPH_BREAK.split(piece)):
            if k and held:  # a blank line: the paragraph before it is complete
                if text_seen:
                    yield held[-1], True
                held, text_seen = [], False
            if part:
                held.append(part)
                text_seen = text_seen or not part.isspace()
            if text_seen:  # all but the last, which may yet end the paragraph
                yield from ((p, False) for p in held[:-1])
                del held[:-1]
    if text_seen:
        yield held[-1], True


def _chunks(doc) -> Iterator[str]:
    return doc.chunks() if isinstance(doc, LongText) else iter((doc,))


def pieces(cfg: DataConfig, cache_dir: Path, log, split: bool = True) -> Iterator[tuple[str, bool]]:
    """The non-empty documents of the source in source order, streamed, at most max_docs (datasets
    keeps its lock files of local sources in cache_dir), each in pieces of at most PIECE_CHARS
    characters: (text, whether it ends its document). For a split (training), a source of a single
    document yields its paragraphs instead, so that a split exists; split=False (evaluation) takes any
    text as it is. Memory does not grow with a document's length."""
    skipped = 0

    def with_text():
        nonlocal skipped
        for text in _texts(cfg, cache_dir, log):
            if text.blank() if isinstance(text, LongText) else not text or text.isspace():
                skipped += 1
            else:
                yield text

    docs = with_text()
    if cfg.max_docs:
        docs = itertools.islice(docs, cfg.max_docs)
    head = list(itertools.islice(docs, 2))
    if len(head) < 2 and cfg.text_column == CHAT_COLUMN:  # a conversation is not cut into paragraphs
        raise L1Error(f"--data {cfg.data} holds {len(head)} conversation(s); at least 2 are needed for a "
                      "validation split")
    if len(head) < 2:
        if not head:
            raise L1Error(f"--data {cfg.data}: no text found" + (f" ({skipped} row(s) without text: none, empty or "
                                                                 "only whitespace)" if skipped else ""))
        if not split:
            stream = _ended(_pieces(_chunks(head[0])))
        else:
            ends = (e for _, e in _paragraphs(_pieces(_chunks(head[0]))) if e)
            if sum(1 for _ in itertools.islice(ends, 2)) < 2:
                raise L1Error(_single_document(cfg, isinstance(head[0], TextFile)))
            stream = _paragraphs(_pieces(_chunks(head[0])))
    else:
        stream = (p for doc in itertools.chain(head, docs) for p in _ended(_pieces(_chunks(doc))))
    replaced, fffd = 0, False
    for piece, end in stream:
        fffd = fffd or "\ufffd" in piece
        yield piece, end
        if end:
            replaced, fffd = replaced + fffd, False
    if skipped:
        log(f"skipped {skipped} row(s) without text (none, empty or only whitespace)")
    if replaced:
        log(f"{replaced} document(s) contain U+FFFD, the replacement character (e.g. for invalid UTF-8)")


def _single_document(cfg: DataConfig, text_file: bool) -> str:
    """Why a source of one document without paragraphs cannot be split, and what to do."""
    if text_file:
        return (f"--data {cfg.data} holds a single document: L1 reads each .txt file as one document and "
                "splits a lone document into paragraphs at blank lines, and this one has none; at least 2 "
                "are needed for a validation split: for one document per line, put a blank line between "
                "documents, or one document per .txt file, or write them as .jsonl (one {\"text\": ...} per line)")
    return (f"--data {cfg.data} holds a single document without blank lines to split it into paragraphs; "
            "at least 2 are needed for a validation split")


def documents(cfg: DataConfig, cache_dir: Path, log, split: bool = True) -> Iterator[str]:
    """The documents of pieces(), each whole: for a tool that holds its text in memory anyway (l1.eval)."""
    parts = []
    for piece, end in pieces(cfg, cache_dir, log, split):
        parts.append(piece)
        if end:
            yield "".join(parts)
            parts = []


def batched(items: Iterator, size=len) -> Iterator[list]:
    """Consecutive items (documents, or pieces with size=...) in lists of about ENCODE_BATCH_BYTES
    characters of text."""
    batch, total = [], 0
    for item in items:
        batch.append(item)
        total += size(item)
        if total >= ENCODE_BATCH_BYTES:
            yield batch
            batch, total = [], 0
    if batch:
        yield batch


def end_of_text_joined(ids: list[list[int]], eot_id: int, dtype, ends: np.ndarray | None = None) -> np.ndarray:
    """The documents' ids as one stream, an end-of-text id after each: the trainer's token stream. With
    `ends` the ids are pieces, and only those where ends is True close their document."""
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum()))
    positions = np.cumsum(lengths)
    return np.insert(flat, positions if ends is None else positions[ends], eot_id)


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
    """Consecutive pieces of the source's documents (one piece each, unless a document is longer than
    PIECE_CHARS), each marked for validation or not."""

    first: int  # the index of docs[0] among the source's pieces: where preparing it again starts
    docs: list[str]
    is_val: np.ndarray
    ends: np.ndarray  # True where a piece is its document's last (an end-of-text follows)


def split_batches(cfg: DataConfig, seed: int, cache_dir: Path, log) -> Iterator[Batch]:
    """The documents in batches of pieces, split by document index: all pieces of a document go to
    one split. If no document drew validation, the last one goes there (a small corpus), so both splits
    hold one; hence each batch is handed on once the next is read (of a last document longer than a
    batch, only its pieces in that batch)."""
    pending, first, doc, any_val = None, 0, 0, False
    for group in batched(pieces(cfg, cache_dir, log), size=lambda piece: len(piece[0])):
        if pending:
            yield pending
        ends = np.fromiter((end for _, end in group), dtype=bool, count=len(group))
        index = np.concatenate([[0], np.cumsum(ends[:-1])])  # each piece's document, counted from `doc`
        pending = Batch(first, [text for text, _ in group],
                        split_mask(doc, int(index[-1]) + 1, cfg.val_fraction, seed)[index], ends)
        first, doc = first + len(group), doc + int(ends.sum())
        any_val = any_val or bool(pending.is_val.any())
    if not any_val:
        pending.is_val[index == index[-1]] = True
    yield pending


def _tokenizer_sample(batches: Iterator[Batch], megabytes: float) -> Iterator[str]:
    """The first training documents, in pieces, up to `megabytes` of UTF-8 text (and the rest of the
    document that crosses it)."""
    budget = megabytes * 1e6
    for batch in batches:
        for doc, is_val, end in zip(batch.docs, batch.is_val, batch.ends):
            if not is_val:
                yield doc
                budget -= len(doc.encode("utf-8"))
                if budget <= 0 and end:
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

    def write(self, docs: list[str], ids: list[list[int]], ends: np.ndarray, eot_id: int) -> bool:
        """Append the pieces' ids, an end-of-text id after each that ends its document; True if a shard
        was completed."""
        flat = end_of_text_joined(ids, eot_id, self.dtype, ends)
        self.documents += int(ends.sum())
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


def _verified(folder: Path, identity: dict | None = None) -> dict:
    """meta.json of a finished folder, once every shard matches its size and checksum (and, given
    the identity its name was made from, once meta.json agrees with it)."""
    def damaged(why: str) -> L1Error:
        return L1Error(f"prepared corpus {folder} is damaged ({why}); delete the folder and run again to prepare it anew")

    try:
        meta = json.loads((folder / "meta.json").read_text())
        itemsize = np.dtype(meta["dtype"]).itemsize
        shards = [(folder / s["file"], s["tokens"] * itemsize, s["sha256"])
                  for split in SPLITS for s in meta["splits"][split]["shards"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise damaged(f"meta.json: {exc}") from None
    if identity and any(meta.get(k) != v for k, v in identity.items()):
        raise damaged("meta.json does not match the folder's name")
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        bad = [s[0].name for s, ok in zip(shards, pool.map(_intact, shards)) if not ok]
    if bad:
        raise damaged(f"{bad[0]}{f' and {len(bad) - 1} more' if len(bad) > 1 else ''} do not match meta.json")
    return meta


@contextlib.contextmanager
def _locked(work: Path, log):
    """Hold an exclusive lock on the work folder, waiting for another process that holds it; the OS
    releases it when the process dies. The temporary files of a killed write in it are removed."""
    work.mkdir(parents=True, exist_ok=True)
    name = work.parent / work.name.removesuffix(".partial")[1:]
    lock = FolderLock(work).acquire(lambda: log(f"waiting for another process that is preparing {name}"))
    try:
        if lock.intact():  # else the holder before finished and renamed it: its path may be another's now
            remove_temporaries(work)
        yield
    finally:
        lock.release()


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


def open_prepared(folder: Path, log=print) -> PreparedData:
    """A prepared folder by its path, verified, without its source: how a run resumes on the corpus
    it started with (the source may have changed or gone since)."""
    started = time.perf_counter()
    meta = _verified(folder)
    data = PreparedData(folder, meta, Tokenizer.load(folder / "tokenizer.json"))
    log(f"reusing the run's prepared corpus {folder} ({meta['splits']['train']['tokens']:,} train / "
        f"{meta['splits']['val']['tokens']:,} val tokens, verified in {time.perf_counter() - started:.1f}s)")
    return data


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
            if tokenizer.vocab_size < vocab_size:  # BPE stops when no pair is left to merge
                log(f"the trained vocabulary has {tokenizer.vocab_size:,} tokens, fewer than --vocab_size "
                    f"{vocab_size:,}: its sample has no more pairs to merge (use more text, or a smaller --vocab_size)")
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
                completed |= writer.write([batch.docs[i] for i in mine], [ids[i] for i in mine], batch.ends[mine],
                                          tokenizer.eot_id)
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

    def position_problem(self, state) -> str | None:
        """Why `state` is no position of this iterator (wrong types, out of range), or None."""
        if not isinstance(state, dict) or not all(type(state.get(k)) is int for k in ("epoch", "index")):
            return f"its data position {state!r} is not two whole numbers (epoch, index)"
        epoch, index = state["epoch"], state["index"]
        windows = self._count(self._offset(max(epoch, 0)))
        if epoch < 0 or not 0 <= index <= windows:
            return (f"its data position epoch {epoch}, window {index} does not fit this training split "
                    f"({windows} windows of {self.seq_len} tokens)")
        return None

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where an iterator over the same tokens and seed left off."""
        problem = self.position_problem(state)
        if problem:
            raise L1Error(problem)
        self._order = None
        self._seek(state["epoch"], state["index"])


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
