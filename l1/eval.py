"""Held-out loss, perplexity and bits per byte of trained runs on any text the trainer reads.

    python -m l1.eval models/tiny [models/other ...] --data ../shared/data/wikitext-2/wiki.test.tokens
                      [--max_tokens N] [--batch_size 8] [--device auto] [--text_column text]

Each RUN is a run folder (its best checkpoint, else its latest) or a checkpoint file. The text
(a .parquet/.jsonl/.json/.txt/.tokens file or a folder of them, or 'hub') is read as the trainer
reads it and tokenized as the trainer tokenizes it, with each run's own tokenizer: an end-of-text
token after each document (a text of one document is one document here: there is no split to make).
One JSON object per run is printed, one per line.

- The token stream is cut into non-overlapping windows of the model's block_size, each window
  predicting its own tokens only (the last one may be shorter): the same windows as the trainer's
  validation, so the numbers compare with its val loss. A sliding window would score every token
  with a full context and give a lower loss, at block_size times the work.
- loss is nats per predicted token; perplexity is exp(loss).
- bits_per_byte is total nats / ln 2 / UTF-8 bytes of the evaluated text. Unlike loss per token, it
  does not depend on the tokenizer, so runs with different tokenizers (and published models)
  compare on it. With --max_tokens the evaluated prefix is charged the source's mean bytes per token.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from l1 import checkpoint, runtime
from l1.cli import entry_point
from l1.config import DataConfig
from l1.data import batched, documents, end_of_text_joined
from l1.errors import L1Error
from l1.tokenizer import Tokenizer


def tokenize(docs: list[str], tokenizer: Tokenizer) -> tuple[np.ndarray, int]:
    """The documents' token ids as the trainer writes them (end-of-text after each), and their UTF-8 bytes."""
    streams = [end_of_text_joined(tokenizer.encode_documents(batch), tokenizer.eot_id, np.int64)
               for batch in batched(iter(docs))]
    return np.concatenate([np.zeros(0, np.int64), *streams]), sum(len(d.encode("utf-8")) for d in docs)


@torch.no_grad()
def evaluate(model: torch.nn.Module, tokens: np.ndarray, rt: runtime.Runtime, batch_size: int,
             max_tokens: int = 0) -> tuple[float, int]:
    """(total nats, predicted tokens) over non-overlapping windows of the model's block_size."""
    block = model.cfg.block_size
    targets = len(tokens) - 1 if not max_tokens else min(len(tokens) - 1, max_tokens)
    if targets < 1:
        raise L1Error("the text holds fewer than 2 tokens: nothing to evaluate")
    ids = torch.from_numpy(tokens[:targets + 1].astype(np.int64))
    full, tail = divmod(targets, block)
    windows = [ids[:full * block].view(full, block), ids[1:full * block + 1].view(full, block)]
    batches = [(windows[0][i:i + batch_size], windows[1][i:i + batch_size]) for i in range(0, full, batch_size)]
    if tail:
        batches.append((ids[None, full * block:targets], ids[None, full * block + 1:targets + 1]))
    total = 0.0
    for x, y in batches:
        with rt.precision.autocast():
            loss = model(x.to(rt.device), y.to(rt.device))
        total += loss.double().item() * y.numel()  # the model returns the mean over the batch's tokens
    return total, targets


def eval_run(source: str, docs: list[str], rt: runtime.Runtime, batch_size: int = 8, max_tokens: int = 0) -> dict:
    """The JSON-ready numbers of one run (or checkpoint file) on the documents."""
    run = checkpoint.load_run(source)
    tokens, text_bytes = tokenize(docs, run.tokenizer)
    model = run.model().to(rt.device).eval()
    nats, count = evaluate(model, tokens, rt, batch_size, max_tokens)
    # A prefix (--max_tokens) is charged the mean bytes per token, as the trainer's validation is.
    evaluated_bytes = text_bytes if count == len(tokens) - 1 else text_bytes * count / len(tokens)
    loss = nats / count
    return {"run": source, "checkpoint": str(run.path), "step": run.step, "tokens": count,
            "bytes": round(evaluated_bytes), "loss": loss, "perplexity": math.exp(min(loss, 50.0)),
            "bits_per_byte": nats / math.log(2) / evaluated_bytes, "block_size": model.cfg.block_size,
            "tokenizer": run.tokenizer.fingerprint, "parameters": run.model_config.num_params,
            "device": str(rt.device), "precision": str(rt.precision.compute_dtype)}


@entry_point
def main(argv: list[str] | None = None) -> int:
    """The command line (through l1.cli.entry_point: one error line, exit status 2)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders (best, else latest) or checkpoint files")
    parser.add_argument("--data", required=True, help="text to evaluate on: a .parquet/.jsonl/.json/.txt/.tokens "
                                                      "file or a folder of them, or 'hub'")
    parser.add_argument("--text_column", default=DataConfig.text_column,
                        help="column (parquet, hub) or field (jsonl) holding the text (default: text)")
    parser.add_argument("--max_tokens", type=int, default=0, help="evaluate at most this many tokens (0 = all)")
    parser.add_argument("--batch_size", type=int, default=8, help="windows per forward pass")
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, cuda:N, mps or cpu")
    args = parser.parse_args(argv)
    if args.max_tokens < 0 or args.batch_size < 1:
        raise L1Error("--max_tokens must be >= 0 (0 = all) and --batch_size >= 1")
    for source in args.runs:  # a mistyped run fails now, not after the others' work
        checkpoint.find_for_inference(source)
    rt = runtime.setup(args.device)
    with tempfile.TemporaryDirectory(prefix="l1-eval-") as tmp:
        source = DataConfig(data=args.data, text_column=args.text_column)
        docs = list(documents(source, Path(tmp), log=lambda line: print(line, file=sys.stderr), split=False))
    for source in args.runs:
        print(json.dumps({"data": args.data, **eval_run(source, docs, rt, args.batch_size, args.max_tokens)}),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
