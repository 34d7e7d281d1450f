"""Corpus preparation at growing sizes: peak memory, speed against raw `tokenizers`, a killed
preparation resumed, one long document, and the data loader's share of a training step.

    python -m bench.data                                  # 100, 500 and 2000 MB corpora, 50 and 500 MB documents
    python -m bench.data --sizes_mb 5 10 --kill_mb 10 --long_mb 2     # smoke run: a minute

Each corpus is the shared Wikipedia sample repeated (each copy's documents get new ids) up to the
size, written as parquet into a temporary folder that is deleted at the end. Each preparation runs
in its own process, as `train_gpu_compatible.py` would run it (tokenizer trained on the default
sample, then streamed tokenization into shards), and its peak RSS is that process's (VmHWM) or its
tokenizer-training child's, whichever is larger (bench.common.peak_rss_bytes). Its tokenization
speed (read, encode, write) is compared with raw `encode_batch` (and `encode_batch_fast`, which
skips offsets) of the same tokenizer on the same documents, in the same batches, timing the encode
calls only. Then the --kill_mb preparation is run again into a fresh folder, SIGKILLed at a random
instant, and run once more: its shards must equal the uninterrupted preparation's and decode to the
source documents exactly. Last, the loader's share: BatchIterator.next() over the shards at the tiny
preset's batch (16 x 256) against a forward + backward of the tiny preset's GPT. Prints one JSON
object per measurement.

    python -m bench.data --long_mb 50 500 --sizes_mb     # only the long documents

A long document (--long_mb): one .txt file of that many MB on a single line (the sample's documents
joined by spaces, repeated), beside 1,000 of the sample's documents, prepared with the default
settings as above (the tokenizer's sample ends with the document that crosses it: the whole long
one); its peak RSS and time, with the documents and text bytes it counted. --long_kinds parquet jsonl
gives the long document as a parquet row or a .jsonl line instead.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench.common import emit, interleaved, machine, peak_rss_bytes
from l1.config import DataConfig, resolve
from l1.data import BatchIterator, PreparedData, batched, documents, prepare, split_mask
from l1.model import GPT
from l1.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default="../shared/data/wikipedia-sample",
                        help="a folder of parquet files; a relative path is taken from the repository root")
    parser.add_argument("--sizes_mb", type=float, nargs="*", default=[100, 500, 2000], help="corpus sizes (MB of text)")
    parser.add_argument("--long_mb", type=float, nargs="*", default=[50, 500],
                        help="sizes of a single-line document (MB) prepared beside a few short ones")
    parser.add_argument("--long_kinds", nargs="+", default=["txt"], choices=["txt", "parquet", "jsonl"],
                        help="the long document as a .txt file, a parquet row or a .jsonl line")
    parser.add_argument("--kill_mb", type=float, default=500, help="the size whose preparation is killed and resumed")
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument("--shard_tokens", type=int, default=DataConfig.shard_tokens,
                        help="tokens per shard (smaller: more resume points in a small corpus)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the loader-share timing")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: one preparation, its settings as JSON
    args = parser.parse_args(argv)
    if args.child:
        settings = json.loads(args.child)
        vocab_size = settings.pop("vocab_size")
        prepare(DataConfig(**settings), vocab_size, seed=0, log=lambda line: print(line, file=sys.stderr, flush=True))
        print(json.dumps({"peak_rss": peak_rss_bytes()}))  # its own and the tokenizer-training child's
        return
    if args.sizes_mb and args.kill_mb not in args.sizes_mb:
        parser.error("--kill_mb must be one of --sizes_mb (its uninterrupted preparation is the reference)")
    work = Path(tempfile.mkdtemp(prefix="l1-bench-data-"))
    try:
        run(args, work)
    finally:
        shutil.rmtree(work)


def make_corpus(source: Path, folder: Path, megabytes: float) -> int:
    """Parquet files of the source's documents, repeated with distinct ids up to `megabytes` of text;
    returns the bytes of text written."""
    folder.mkdir(parents=True)
    files = sorted(source.glob("*.parquet"))
    if not files:
        raise SystemExit(f"{source} holds no parquet files")
    budget, written, copy = int(megabytes * 1e6), 0, 0
    while written < budget:
        for file in files:
            table = pq.read_table(file, columns=["id", "text"])
            sizes = np.cumsum([len(t.encode("utf-8")) for t in table.column("text").to_pylist()])
            rows = int(np.searchsorted(sizes, budget - written)) + 1
            table = table.slice(0, min(rows, len(table)))
            table = table.set_column(0, "id", pa.array([f"{copy}-{i}" for i in table.column("id").to_pylist()]))
            pq.write_table(table, folder / f"part-{copy:04d}-{file.stem}.parquet")
            written += int(sizes[min(rows, len(sizes)) - 1])
            if written >= budget:
                break
        copy += 1
    return written


def make_long_document(source: Path, folder: Path, megabytes: float, kind: str) -> int:
    """1,000 of the source's documents as parquet and one document of `megabytes` MB of their text on a
    single line (no newline): a .txt file (written in slices), a parquet row or a .jsonl line; returns
    the long document's bytes."""
    folder.mkdir(parents=True)
    table = pq.read_table(sorted(source.glob("*.parquet"))[0], columns=["id", "text"])
    pq.write_table(table.slice(0, 1000), folder / "a.parquet")
    text = " ".join(" ".join(table.column("text").to_pylist()).split())  # about 30 MB, whitespace made single spaces
    budget, written = int(megabytes * 1e6), 0
    with open(folder / "long.txt", "w", encoding="utf-8") as f:
        while written < budget:
            data = text.encode("utf-8")[:budget - written].decode("utf-8", "ignore") + " "
            f.write(data)
            written += len(data.encode("utf-8"))
    if kind != "txt":
        long = (folder / "long.txt").read_text(encoding="utf-8")
        (folder / "long.txt").unlink()
        if kind == "parquet":
            pq.write_table(pa.table({"text": [long]}), folder / "long.parquet")
        else:
            (folder / "long.jsonl").write_text(json.dumps({"text": long}) + "\n")
    return written


def settings_for(args, corpus: Path, data_dir: Path) -> dict:
    return {"data": str(corpus), "data_dir": str(data_dir), "shard_tokens": args.shard_tokens,
            "vocab_size": args.vocab_size}


def prepare_in_child(settings: dict, kill_after: float | None = None) -> tuple[float, int | None, int]:
    """(seconds, peak RSS in bytes or None if killed, exit status) of one preparation in its own process."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "bench.data", "--child", json.dumps(settings)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    if kill_after is not None:
        time.sleep(kill_after)
        os.kill(proc.pid, signal.SIGKILL)  # not Popen's send_signal, which may reap the child first
    out = proc.stdout.read()
    proc.wait()
    peak = json.loads(out.splitlines()[-1])["peak_rss"] if proc.returncode == 0 else None
    return time.perf_counter() - started, peak, proc.returncode


def prepared_in_child(settings: dict, what: str) -> tuple[float, int]:
    """(seconds, peak RSS in bytes) of one preparation in its own process, which must succeed."""
    seconds, peak_rss, status = prepare_in_child(settings)
    if status != 0:
        raise SystemExit(f"preparing {what} failed (exit {status})")
    return seconds, peak_rss


def raw_encode(tokenizer: Tokenizer, cfg: DataConfig, work: Path) -> dict:
    """MB/s of the tokenizer's own encode_batch and encode_batch_fast on the corpus, in the preparation's
    batches, counting only the time inside the encode calls."""
    seconds = {"encode_batch": 0.0, "encode_batch_fast": 0.0}
    text_bytes = 0
    for batch in batched(documents(cfg, work / "cache", log=lambda line: None)):
        text_bytes += sum(len(d.encode("utf-8")) for d in batch)
        for method in seconds:
            started = time.perf_counter()
            [e.ids for e in getattr(tokenizer.hf, method)(batch)]
            seconds[method] += time.perf_counter() - started
    return {f"raw_{method}_mb_per_s": round(text_bytes / 1e6 / s, 3) for method, s in seconds.items()}


def opened(settings: dict) -> PreparedData:
    """The finished preparation of these settings (a reuse: nothing is prepared here)."""
    settings = dict(settings)
    vocab_size = settings.pop("vocab_size")
    return prepare(DataConfig(**settings), vocab_size, seed=0, log=lambda line: None)


def run(args, work: Path) -> None:
    source = (REPO / args.source).resolve()
    emit(kind="setup", **machine(), source=args.source, sizes_mb=args.sizes_mb, vocab_size=args.vocab_size,
         shard_tokens=args.shard_tokens, cpus=os.cpu_count())
    prepared = {}
    for megabytes in args.sizes_mb:
        corpus = work / f"corpus-{megabytes:g}"
        text_bytes = make_corpus(source, corpus, megabytes)
        settings = settings_for(args, corpus, work / "data")
        seconds, peak_rss = prepared_in_child(settings, f"{megabytes:g} MB")
        data = prepared[megabytes] = opened(settings)
        meta = data.meta
        raw = raw_encode(data.tokenizer, DataConfig(data=str(corpus)), work)
        emit(kind="prepare", size_mb=round(text_bytes / 1e6, 1), peak_rss_mb=round(peak_rss / 2**20, 1),
             seconds=round(seconds, 1), prepare_mb_per_s=round(text_bytes / 1e6 / seconds, 3),
             tokenizer_train_s=round(meta["tokenizer_train_seconds"], 1),
             tokenize_mb_per_s=round(meta["tokenize_mb_per_s"], 3), **raw,
             ratio_tokenize_vs_encode_batch=round(meta["tokenize_mb_per_s"] / raw["raw_encode_batch_mb_per_s"], 3),
             tokens=meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"],
             shards=len(meta["splits"]["train"]["shards"]) + len(meta["splits"]["val"]["shards"]),
             bytes_per_token=round(data.bytes_per_token("train"), 3))
        if megabytes == args.kill_mb:
            kill_and_resume(args, corpus, data, seconds, work)
    for kind in args.long_kinds:
        for megabytes in args.long_mb:
            long_document(args, source, megabytes, kind, work)
    if prepared:
        loader_share(prepared[max(prepared)].tokens("train"), args.repeats)


def long_document(args, source: Path, megabytes: float, kind: str, work: Path) -> None:
    """Peak RSS and time of preparing a corpus with one single-line document of `megabytes` MB."""
    corpus = work / f"long-{megabytes:g}"
    long_bytes = make_long_document(source, corpus, megabytes, kind)
    settings = settings_for(args, corpus, work / "data-long")
    seconds, peak_rss = prepared_in_child(settings, f"a {megabytes:g} MB document")
    meta = opened(settings).meta
    splits = meta["splits"]
    emit(kind="long_document", format=kind, document_mb=round(long_bytes / 1e6, 1),
         peak_rss_mb=round(peak_rss / 2**20, 1),
         seconds=round(seconds, 1), tokenizer_train_s=round(meta["tokenizer_train_seconds"], 1),
         tokenize_mb_per_s=round(meta["tokenize_mb_per_s"], 3),
         documents=splits["train"]["documents"] + splits["val"]["documents"],
         text_mb=round((splits["train"]["text_bytes"] + splits["val"]["text_bytes"]) / 1e6, 1),
         tokens=splits["train"]["tokens"] + splits["val"]["tokens"])
    shutil.rmtree(corpus)
    shutil.rmtree(work / "data-long")


def kill_and_resume(args, corpus: Path, reference: PreparedData, seconds: float, work: Path) -> None:
    """SIGKILL a preparation at a random instant, run it again: the same shards, decoding to the source."""
    settings = settings_for(args, corpus, work / "data-killed")
    kill_after = random.uniform(0, seconds)
    _, _, killed_status = prepare_in_child(settings, kill_after)
    resumed_seconds, _, status = prepare_in_child(settings)
    data = opened(settings)
    cfg = DataConfig(data=str(corpus))
    # Every source document, in order, against the ids between end-of-text tokens of its split.
    ids = {split: data.tokens(split)[:] for split in ("train", "val")}
    ends = {split: iter(np.flatnonzero(ids[split] == data.tokenizer.eot_id).tolist()) for split in ids}
    starts = {split: 0 for split in ids}
    decoded_equal, first = True, 0
    for batch in batched(documents(cfg, work / "cache", log=lambda line: None)):
        for doc, is_val in zip(batch, split_mask(first, len(batch), cfg.val_fraction, 0)):
            split = "val" if is_val else "train"
            end = next(ends[split], None)
            decoded_equal &= end is not None and data.tokenizer.decode(ids[split][starts[split]:end].tolist()) == doc
            starts[split] = (end or 0) + 1
        first += len(batch)
    decoded_equal &= all(starts[s] == len(ids[s]) for s in ids)
    emit(kind="kill_resume", size_mb=args.kill_mb, killed_after_s=round(kill_after, 2), killed_status=killed_status,
         resumed_from_document=data.meta["resumed_from_document"], resume_seconds=round(resumed_seconds, 1),
         exit_status=status, shards_equal_uninterrupted=data.meta["splits"] == reference.meta["splits"],
         decodes_to_source=bool(decoded_equal))


def loader_share(tokens, repeats: int) -> None:
    """Time of BatchIterator.next() against a forward + backward, at the tiny preset's shape."""
    cfg = resolve({"preset": "tiny"})
    batches = BatchIterator(tokens, cfg.context, cfg.batch_size, seed=0)
    model = GPT(cfg.model).train()
    x, y = batches.next()
    calls = 200

    def loader():
        started = time.perf_counter()
        for _ in range(calls):
            batches.next()
        return (time.perf_counter() - started) / calls

    def step():
        model(x, y).backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up: first-call allocations
    seconds = interleaved({"loader": loader, "step": step}, repeats * 2)
    emit(kind="loader_share", preset="tiny", batch_size=cfg.batch_size, seq_len=cfg.context,
         loader_ms=round(seconds["loader"] * 1e3, 4), forward_backward_ms=round(seconds["step"] * 1e3, 1),
         loader_share=round(seconds["loader"] / (seconds["loader"] + seconds["step"]), 6))


if __name__ == "__main__":
    main()
