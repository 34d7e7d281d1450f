"""Corpus preparation speed against raw `tokenizers`, and the data loader's share of a step.

    python -m bench.data [--source ../shared/data/wikipedia-sample] [--max_docs 5000] [--repeats 3]

`prepare` (read the source, split, tokenize, write the token files) runs with an already trained
tokenizer, so it is compared like with like against `tokenizers`' own encode_batch (and its
encode_batch_fast, which skips offsets) on the same documents; tokenizer training is timed once and
reported apart. The loader's share: BatchIterator.next() for the tiny preset's batch (16 x 256)
against a forward + backward of the tiny preset's GPT. Prints one JSON object per measurement.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import tempfile
import time
from pathlib import Path

from bench.common import emit, interleaved, machine
from l1.config import DataConfig, resolve
from l1.data import ENCODE_BATCH, BatchIterator, prepare, read_documents
from l1.model import GPT
from l1.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default="../shared/data/wikipedia-sample",
                        help="a relative path is taken from the repository root")
    parser.add_argument("--max_docs", type=int, default=5000, help="first N documents (0 = all)")
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="l1-bench-data-"))
    try:
        run(args, work)
    finally:
        shutil.rmtree(work)


def run(args, work: Path) -> None:
    cfg = DataConfig(data=str(REPO / args.source), data_dir=str(work / "data"), max_docs=args.max_docs)
    docs = read_documents(cfg, work / "cache", log=lambda line: None)
    megabytes = sum(len(d.encode("utf-8")) for d in docs) / 1e6

    started = time.perf_counter()
    tokenizer = Tokenizer.train(docs, args.vocab_size)
    emit(kind="setup", **machine(), source=args.source, documents=len(docs), text_mb=round(megabytes, 2),
         vocab_size=args.vocab_size, tokenizer_training_s=round(time.perf_counter() - started, 2))
    tokenizer.save(work / "tokenizer.json")
    cfg = dataclasses.replace(cfg, tokenizer=str(work / "tokenizer.json"))
    prepared = []

    def raw(method):
        def run():
            encode = getattr(tokenizer.hf, method)
            for start in range(0, len(docs), ENCODE_BATCH):
                [e.ids for e in encode(docs[start:start + ENCODE_BATCH])]
        return run

    def l1_prepare():
        fresh = dataclasses.replace(cfg, data_dir=str(work / f"data{len(prepared)}"))  # a build, not a reuse
        prepared.append(prepare(fresh, args.vocab_size, seed=0, log=lambda line: None))

    seconds = interleaved({"encode_batch": raw("encode_batch"), "encode_batch_fast": raw("encode_batch_fast"),
                           "prepare": l1_prepare}, args.repeats)
    tokenize_mb_per_s = sorted(p.meta["tokenize_mb_per_s"] for p in prepared)[len(prepared) // 2]
    emit(kind="prepare", repeats=args.repeats,
         raw_encode_batch_mb_per_s=round(megabytes / seconds["encode_batch"], 3),
         raw_encode_batch_fast_mb_per_s=round(megabytes / seconds["encode_batch_fast"], 3),
         prepare_mb_per_s=round(megabytes / seconds["prepare"], 3),
         prepare_tokenize_only_mb_per_s=round(tokenize_mb_per_s, 3),
         ratio_prepare_vs_encode_batch=round(seconds["encode_batch"] / seconds["prepare"], 3),
         ratio_prepare_vs_encode_batch_fast=round(seconds["encode_batch_fast"] / seconds["prepare"], 3),
         bytes_per_token=round(prepared[0].bytes_per_token("train"), 3))
    loader_share(prepared[0].tokens("train"), args.repeats)


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
