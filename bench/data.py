"""Corpus preparation speed against raw `tokenizers`, and the data loader's share of a step.

    python -m bench.data [--source ../shared/data/wikipedia-sample] [--max_docs 5000] [--repeats 3]

Tokenizer training is timed once and reported apart; the comparison uses the same trained
tokenizer, the same documents and the same threads. Prints one JSON object per measurement.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import emit, interleaved, machine
from l1.config import resolve
from l1.data import BatchIterator, _load_documents, _write_tokens
from l1.config import DataConfig
from l1.model import GPT
from l1.tokenizer import Tokenizer


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default="../shared/data/wikipedia-sample")
    parser.add_argument("--max_docs", type=int, default=5000)
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp())
    docs = _load_documents(DataConfig(data=args.source, data_dir=str(tmp), max_docs=args.max_docs), log=lambda m: None)
    megabytes = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    started = time.perf_counter()
    tokenizer = Tokenizer.train(docs, args.vocab_size)
    emit(kind="setup", **machine(), documents=len(docs), text_mb=megabytes,
         tokenizer_training_s=time.perf_counter() - started)

    def raw():
        for start in range(0, len(docs), 2000):
            [e.ids for e in tokenizer.hf.encode_batch(docs[start:start + 2000])]

    def l1_prepare():
        _write_tokens(tokenizer, docs, tmp / "train.bin", np.uint16)

    seconds = interleaved({"raw_encode_batch": raw, "l1_prepare": l1_prepare}, args.repeats)
    emit(kind="prepare", raw_mb_per_s=megabytes / seconds["raw_encode_batch"],
         l1_mb_per_s=megabytes / seconds["l1_prepare"],
         ratio_l1_vs_raw=seconds["raw_encode_batch"] / seconds["l1_prepare"])

    cfg = resolve({"preset": "tiny"})
    tokens = np.memmap(tmp / "train.bin", dtype=np.uint16, mode="r")
    batches = BatchIterator(tokens, cfg.context, cfg.batch_size, seed=0)
    model = GPT(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)

    def step():
        x, y = batches.next()
        model(x, y).backward()
        optimizer.step()
        optimizer.zero_grad()

    step()
    seconds = interleaved({"loader": batches.next, "train_step": step}, args.repeats * 3)
    emit(kind="loader_share", preset="tiny", loader_ms=seconds["loader"] * 1e3,
         step_ms=seconds["train_step"] * 1e3, loader_share=seconds["loader"] / seconds["train_step"])


if __name__ == "__main__":
    main()
