"""l1.eval: the trainer's own validation numbers from outside, bits per byte, the command line."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest

import l1.data
import train_gpu_compatible
from conftest import REPO, make_documents, tiny_args, write_parquet
from l1 import eval as l1_eval
from l1.checkpoint import load_file
from l1.config import DataConfig
from l1.data import prepare, split_mask
from l1.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory):
    """A tiny run trained on windows of its whole block_size, and its validation documents as a file."""
    tmp = tmp_path_factory.mktemp("eval")
    assert train_gpu_compatible.main([str(a) for a in tiny_args(corpus, tmp, seq_len=64, max_steps=8)]) == 0
    docs = make_documents()  # the corpus fixture's documents, split as the trainer split them
    val_docs = [d for d, is_val in zip(docs, split_mask(0, len(docs), 0.1, 1337)) if is_val]
    return tmp / "run", write_parquet(tmp / "val" / "val.parquet", val_docs), val_docs


def outputs(capsys, *argv) -> list[dict]:
    assert l1_eval.main([str(a) for a in argv]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_eval_matches_the_trainers_validation(run, capsys):
    """On the run's own validation text, the windows the trainer evaluated (2 batches of 4 x 64)
    give the trainer's val loss and bits per byte for the checkpoint it judged best."""
    folder, val_file, val_docs = run
    val_bin = next((folder.parent / "data").glob("*/val-000000.bin"))
    tokens, _ = l1_eval.tokenize(val_docs, Tokenizer.load(folder / "tokenizer.json"))
    stored = np.fromfile(val_bin, dtype=json.loads((val_bin.parent / "meta.json").read_text())["dtype"])
    assert np.array_equal(tokens, stored.astype(np.int64)), "the same text, tokenized alike"
    best = load_file(folder / "best_checkpoint.pt")["step"]
    record = next(r for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())
                  if r["kind"] == "eval" and r["step"] == best)
    [got] = outputs(capsys, folder, "--data", val_file, "--max_tokens", 2 * 4 * 64, "--batch_size", 4,
                    "--device", "cpu")
    assert (got["step"], got["tokens"], got["checkpoint"]) == (best, 512, str(folder / "best_checkpoint.pt"))
    assert got["loss"] == pytest.approx(record["val_loss"], rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(record["val_bpb"], rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(got["loss"]))


def test_tokenize_is_the_prepared_validation_stream_across_batches_and_shards(tmp_path, monkeypatch):
    """Encoded a few documents per batch and written into many shards, the trainer's validation
    stream is l1.eval's tokens of the same documents, id for id (a literal end-of-text is text)."""
    monkeypatch.setattr(l1.data, "ENCODE_BATCH_BYTES", 1000)
    docs = [d + " <|endoftext|> inside" if i % 7 == 3 else d for i, d in enumerate(make_documents(200))]
    write_parquet(tmp_path / "src" / "a.parquet", docs)
    data = prepare(DataConfig(data=str(tmp_path / "src"), data_dir=str(tmp_path / "data"), val_fraction=0.3,
                              shard_tokens=500), 400, seed=7, log=lambda line: None)
    val_docs = [d for d, is_val in zip(docs, split_mask(0, len(docs), 0.3, 7)) if is_val]
    tokens, text_bytes = l1_eval.tokenize(val_docs, data.tokenizer)
    assert len(data.meta["splits"]["val"]["shards"]) > 3 and sum(map(len, val_docs)) > 5 * 1000
    assert tokens.dtype == np.int64 and np.array_equal(tokens, data.tokens("val")[:].astype(np.int64))
    assert text_bytes == data.meta["splits"]["val"]["text_bytes"]


def test_whole_text_bits_per_byte_and_runs_side_by_side(run, capsys):
    """Without --max_tokens every token but the first is predicted (a shorter last window included),
    bits per byte divide by the text's own UTF-8 bytes, and batching changes nothing."""
    folder, val_file, val_docs = run
    one, latest = outputs(capsys, folder, folder / "latest_checkpoint.pt", "--data", val_file, "--batch_size", 1,
                          "--device", "cpu")
    [three] = outputs(capsys, folder, "--data", val_file, "--batch_size", 3, "--device", "cpu")
    tokens, text_bytes = l1_eval.tokenize(val_docs, Tokenizer.load(folder / "tokenizer.json"))
    assert (len(tokens) - 1) % 64, "the test needs a shorter last window"
    assert one["tokens"] == len(tokens) - 1 and one["bytes"] == text_bytes == sum(len(d.encode()) for d in val_docs)
    assert one["bits_per_byte"] == pytest.approx(one["loss"] * one["tokens"] / math.log(2) / text_bytes)
    assert three["loss"] == pytest.approx(one["loss"], rel=1e-4)
    assert latest["step"] == 8 and latest["checkpoint"].endswith("latest_checkpoint.pt")
    assert set(one) == {"data", "run", "checkpoint", "step", "tokens", "bytes", "loss", "perplexity",
                        "bits_per_byte", "block_size", "tokenizer", "parameters", "device", "precision"}


def test_command_line_output_and_bad_input(run, tmp_path):
    folder, val_file, _ = run
    base = [sys.executable, "-m", "l1.eval"]
    good = subprocess.run(base + [str(folder), "--data", str(val_file), "--max_tokens", "64", "--device", "cpu"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert good.returncode == 0, good.stderr
    assert json.loads(good.stdout)["tokens"] == 64
    for args, says in (([str(tmp_path / "nope"), "--data", str(val_file)], "does not exist"),
                       ([str(folder), "--data", str(tmp_path / "missing.txt")], "does not exist"),
                       ([str(folder), "--data", str(val_file), "--max_tokens", "-1"], "--max_tokens")):
        bad = subprocess.run(base + args, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert bad.returncode == 2 and bad.stdout == ""
        assert bad.stderr.startswith("error: ") and says in bad.stderr and "Traceback" not in bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1
