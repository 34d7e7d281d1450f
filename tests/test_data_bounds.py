"""Data preparation whose memory does not grow with a document's length, a tokenizer-training child
that dies with its parent, and what preparation says about what it dropped or refused."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from tokenizers import pre_tokenizers

import l1.data
from conftest import REPO, make_documents, write_parquet
from l1.config import DataConfig
from l1.data import _cut, prepare
from l1.errors import L1Error
from l1.tokenizer import END_OF_TEXTS, training_pre_tokenizer
from test_data import all_documents, decoded_documents, prep, shard_bytes

# Characters around a cut: letters and digits of several scripts, contractions' quote, punctuation,
# every kind of whitespace (Unicode's and Python's), and symbols.
ALPHABET = list("aZé ß日本語١٢3٣'’.,-_!?()\"#"
                "\t\n\r\x0b\x0c\x1c\x1f\x85\xa0\u1680\u2000\u2028\u2029\u202f\u3000"
                "\u180e\u200b\ufeff😀½²")


def random_text(rng: random.Random, n: int) -> str:
    words = ["'s", "'re", "'ll", "don't", "x", "  ", " ", "\n\n"]
    return "".join(rng.choice(ALPHABET) if rng.random() < 0.7 else rng.choice(words) for _ in range(n))


def words(pre_tokenizer, text: str) -> list[str]:
    return [w for w, _ in pre_tokenizer.pre_tokenize_str(text)]


def test_a_cut_splits_text_into_the_words_of_the_whole_for_both_pre_tokenizers():
    rng = random.Random(0)
    encoding, training = pre_tokenizers.ByteLevel(add_prefix_space=False), training_pre_tokenizer()
    cuts = 0
    for _ in range(3000):
        text = random_text(rng, rng.randint(2, 40))
        start = rng.randrange(len(text) - 1)
        end = rng.randint(start + 1, len(text) - 1)
        cut = _cut(text, start, end)
        if cut == end:
            continue  # no space after a non-space character in the window: the forced cut
        cuts += 1
        assert start < cut < end and text[cut] == " " and not text[cut - 1].isspace()
        for pre in (encoding, training):
            assert words(pre, text[:cut]) + words(pre, text[cut:]) == words(pre, text), (repr(text), cut)
    assert cuts > 500
    # Every character of the Basic Multilingual Plane before the space, and after it.
    chars = [chr(c) for c in range(0x10000) if not 0xD800 <= c < 0xE000 and not chr(c).isspace()]
    for c in chars:
        for text in (f"a{c} b", f"{c}{c} {c}"):
            assert _cut(text, 0, len(text) - 1) == len(text) - 2
            assert words(encoding, text[:-2]) + words(encoding, text[-2:]) == words(encoding, text), repr(text)


def test_a_long_run_without_such_a_space_is_cut_at_the_limit():
    assert _cut("a" * 50, 0, 20) == 20
    assert _cut("a\t " * 10, 0, 20) == 20, "a space after whitespace is no cut"
    assert _cut("word " * 10, 5, 20) == 19, "the last cut before the limit"


def long_corpus(folder):
    """Documents much longer than a small PIECE_CHARS, in every kind of source: .txt files (one with
    Windows line ends and invalid UTF-8), parquet rows, and a lone .txt book split into paragraphs."""
    docs = make_documents(400, seed=7)
    (folder / "txt").mkdir(parents=True)
    for i in range(12):
        text = " ".join(docs[i * 20:(i + 1) * 20])
        raw = text.replace(". ", ".\r\n", 5).encode() + (b" \xff\xfe tail" if i == 3 else b"")
        (folder / "txt" / f"{i:02d}.txt").write_bytes(raw)
    write_parquet(folder / "txt" / "rows.parquet",  # read from Arrow's buffer in slices, multi-byte text too
                  [" ".join(docs[240 + i * 10:250 + i * 10]) + "\n\n  " * (i % 2) for i in range(10)]
                  + ["héllo wörld, 日本語の文 😀😀 ½ " * 40, None, "  "])
    (folder / "book").mkdir()
    paragraphs = [" ".join(docs[340 + i * 3:343 + i * 3]) for i in range(20)]
    (folder / "book" / "book.txt").write_text("\n \n\n".join(paragraphs[:10]) + "\n\n" + "\n\n".join(paragraphs[10:]))
    return paragraphs


@pytest.mark.parametrize("source", ["txt", "book"])
def test_documents_cut_into_small_pieces_prepare_the_same_bytes(tmp_path, monkeypatch, source):
    paragraphs = long_corpus(tmp_path)
    settings = {"vocab": 600, "shard_tokens": 1000, "val_fraction": 0.2}  # validation by draw, not by the last
    normal, _ = prep(tmp_path / source, tmp_path / "normal", **settings)
    with monkeypatch.context() as m:
        m.setattr(l1.data, "PIECE_CHARS", 97)
        m.setattr(l1.data, "ENCODE_BATCH_BYTES", 500)  # a document spans several encode batches
        cut, _ = prep(tmp_path / source, tmp_path / "cut", **settings)
    assert cut.tokenizer.fingerprint == normal.tokenizer.fingerprint, "the tokenizer trained on pieces is the same"
    assert shard_bytes(cut) == shard_bytes(normal) and cut.meta["splits"] == normal.meta["splits"]
    assert len(shard_bytes(cut)) > 2
    if source == "book":
        assert all_documents(cut) == sorted(paragraphs)


def test_a_preparation_stopped_inside_a_long_document_continues_to_the_same_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(l1.data, "PIECE_CHARS", 97)
    monkeypatch.setattr(l1.data, "ENCODE_BATCH_BYTES", 300)
    (tmp_path / "src").mkdir()
    for i in range(3):
        (tmp_path / "src" / f"{i}.txt").write_text(" ".join(make_documents(60, seed=i)))
    reference, _ = prep(tmp_path / "src", tmp_path / "ref", shard_tokens=500, val_fraction=0.3)
    saves, saving = [], l1.data._save_json

    def crash_after_four(path, value):
        saving(path, value)
        saves.append(path.name)
        if len(saves) == 5:  # the initial record, then four shards' worth
            raise RuntimeError("killed")

    with monkeypatch.context() as m:
        m.setattr(l1.data, "_save_json", crash_after_four)
        with pytest.raises(RuntimeError, match="killed"):
            prep(tmp_path / "src", tmp_path / "data", shard_tokens=500, val_fraction=0.3)
    data, logs = prep(tmp_path / "src", tmp_path / "data", shard_tokens=500, val_fraction=0.3)
    assert any(line.startswith("continuing an interrupted preparation") for line in logs)
    assert data.meta["resumed_from_document"] > 3, "the position counts pieces: it lies inside a document"
    assert shard_bytes(data) == shard_bytes(reference) and data.meta["splits"] == reference.meta["splits"]


def test_a_word_longer_than_a_piece_is_cut_inside_and_keeps_its_text(tmp_path, monkeypatch):
    monkeypatch.setattr(l1.data, "PIECE_CHARS", 97)
    docs = make_documents(20) + ["x" * 3000 + " the end", "-" * 500 + "\n" * 300 + "  " * 200]
    write_parquet(tmp_path / "a.parquet", docs)
    data, _ = prep(tmp_path / "a.parquet", tmp_path / "data")
    assert all_documents(data) == sorted(docs), "the same text and documents, if not the same ids"


def test_pieces_of_ordinary_text_give_the_shards_of_whole_documents(tmp_path, monkeypatch):
    (tmp_path / "src").mkdir()
    docs = make_documents(300, seed=3)
    for i in range(6):
        (tmp_path / "src" / f"{i}.txt").write_text(" ".join(docs[i * 50:(i + 1) * 50]))
    normal, _ = prep(tmp_path / "src", tmp_path / "normal", vocab=500, shard_tokens=2000)
    with monkeypatch.context() as m:
        m.setattr(l1.data, "PIECE_CHARS", 200)
        cut, _ = prep(tmp_path / "src", tmp_path / "cut", vocab=500, shard_tokens=2000)
    assert shard_bytes(cut) == shard_bytes(normal) and cut.meta["splits"] == normal.meta["splits"]
    assert cut.meta["splits"]["train"]["documents"] + cut.meta["splits"]["val"]["documents"] == 6


def test_the_last_document_goes_to_validation_even_when_longer_than_a_batch(tmp_path, monkeypatch):
    monkeypatch.setattr(l1.data, "PIECE_CHARS", 100)
    monkeypatch.setattr(l1.data, "ENCODE_BATCH_BYTES", 300)
    (tmp_path / "src").mkdir()
    short, long = make_documents(1)[0], " ".join(make_documents(40, seed=2))
    (tmp_path / "src" / "a.txt").write_text(short)
    (tmp_path / "src" / "b.txt").write_text(long)
    data, _ = prep(tmp_path / "src", tmp_path / "data")
    val = decoded_documents(data, "val")
    assert len(val) == 1 and long.endswith(val[0]) and 0 < len(val[0]) < len(long), "its last batch's pieces"
    train, eot = data.tokens("train")[:], data.tokenizer.eot_id
    assert (train == eot).sum() == 1 and train[-1] != eot, "the rest trains, ending the stream without end-of-text"
    first, head = np.split(train, [int(np.flatnonzero(train == eot)[0]) + 1])
    assert data.tokenizer.decode(first[:-1].tolist()) == short
    assert data.tokenizer.decode(head.tolist()) + val[0] == long


# ---- a long document in a real preparation, measured --------------------------------------------

PREPARE = """
import json, sys
from bench.common import peak_rss_bytes
from l1.config import DataConfig
from l1.data import prepare
settings = json.loads(sys.argv[1])
vocab = settings.pop("vocab")
prepare(DataConfig(**settings), vocab, seed=0, log=lambda line: print(line, flush=True))
print(json.dumps({"peak_rss": peak_rss_bytes()}))
"""


def long_line(path, megabytes: float, seed: int = 0) -> None:
    """One line of English-like words, no newline, written in slices (the test holds no copy)."""
    words = np.array(sorted(set(" ".join(make_documents(300, seed=seed)).split())))
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        written = 0
        while written < megabytes * 1e6:
            text = " ".join(words[rng.integers(0, len(words), 200_000)]) + " "
            f.write(text)
            written += len(text)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="the peak resident set is read from /proc")
def test_a_long_single_line_document_prepares_in_bounded_memory(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i, doc in enumerate(make_documents(50)):
        (src / f"a{i:02d}.txt").write_text(doc)
    long_line(src / "z.txt", 25)
    settings = {"vocab": 1000, "data": str(src), "data_dir": str(tmp_path / "data"), "tokenizer_sample_mb": 0.002}
    proc = subprocess.Popen([sys.executable, "-c", PREPARE, json.dumps(settings)], cwd=REPO, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    out = proc.communicate()[0]
    assert proc.returncode == 0, out
    peak_mib = json.loads(out.splitlines()[-1])["peak_rss"] / 2**20  # its own and its tokenizer-training child's
    assert peak_mib < 1536, f"peak RSS {peak_mib:.0f} MiB for a 25 MB line"
    data = prepare(DataConfig(data=str(src), data_dir=str(tmp_path / "data"), tokenizer_sample_mb=0.002), 1000,
                   seed=0, log=lambda line: None)
    splits = data.meta["splits"]
    assert splits["train"]["documents"] + splits["val"]["documents"] == 51
    assert splits["train"]["text_bytes"] + splits["val"]["text_bytes"] == sum(p.stat().st_size for p in src.iterdir())
    eot = data.tokenizer.eot_id
    assert sum(int((data.tokens(s)[:] == eot).sum()) for s in ("train", "val")) == 51, "one end-of-text a document"


# ---- the tokenizer-training child dies with its parent -------------------------------------------

def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie (an orphan is reaped by whoever adopted it, if ever)."""
    state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
    return bool(state) and not state.startswith("Z")


def test_a_sigkilled_preparation_leaves_no_tokenizer_training_child(tmp_path):
    # One 16 MB document without whitespace at this vocabulary: minutes of BPE merges in the child.
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_bytes(np.random.default_rng(0).integers(97, 107, 16 << 20, dtype=np.uint8).tobytes())
    (src / "b.txt").write_text(make_documents(1)[0])
    settings = {"vocab": 20000, "data": str(src), "data_dir": str(tmp_path / "data")}
    proc = subprocess.Popen([sys.executable, "-c", PREPARE, json.dumps(settings)], cwd=REPO, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    child = None
    try:
        while "training a" not in proc.stdout.readline():
            assert proc.poll() is None, "the preparation ended before training a tokenizer"
        deadline = time.monotonic() + 60
        while not children(proc.pid):
            assert time.monotonic() < deadline, "no tokenizer-training child started"
            time.sleep(0.1)
        child = children(proc.pid)[0]
        time.sleep(2)  # reading the documents, or training
        assert alive(child)
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 10
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(child), "the tokenizer-training child outlived its SIGKILLed parent"
    finally:  # nothing left behind, whatever failed
        proc.kill()
        proc.wait()
        if child and alive(child):
            os.kill(child, signal.SIGKILL)


def test_the_training_child_trains_nothing_when_its_documents_end_early():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-c", "from l1.tokenizer import _train_child; _train_child()", "300", str(os.getpid())]
    record = b"some text to train on"
    whole = subprocess.run(command, input=len(record).to_bytes(8, "little") + record + END_OF_TEXTS, env=env,
                           capture_output=True, timeout=120)
    assert whole.returncode == 0 and json.loads(whole.stdout)["model"]["type"] == "BPE"
    cut = subprocess.run(command, input=len(record).to_bytes(8, "little") + record[:5], env=env,
                         capture_output=True, timeout=120)
    assert cut.returncode == 1 and cut.stdout == b"", "a parent that died mid-stream wants no tokenizer"
    orphan = subprocess.run(command[:-1] + ["1"], input=END_OF_TEXTS, env=env, capture_output=True, timeout=120)
    assert orphan.returncode == 1 and orphan.stdout == b"", "a child whose parent is gone already ends at once"


# ---- what preparation says ----------------------------------------------------------------------

def test_a_txt_of_one_document_per_line_is_refused_with_how_txt_files_are_split(tmp_path):
    (tmp_path / "lines.txt").write_text("\n".join(make_documents(30)) + "\n")
    with pytest.raises(L1Error) as err:
        prep(tmp_path / "lines.txt", tmp_path / "data")
    message = str(err.value)
    assert "\n" not in message and "holds a single document" in message
    assert "L1 reads each .txt file as one document" in message and "at blank lines" in message
    assert "put a blank line between documents" in message and ".jsonl" in message
    # Doing what it says works: a blank line between the documents.
    (tmp_path / "lines.txt").write_text("\n\n".join(make_documents(30)))
    data, _ = prep(tmp_path / "lines.txt", tmp_path / "data")
    assert all_documents(data) == sorted(make_documents(30))
    write_parquet(tmp_path / "one.parquet", ["a single row of text without paragraphs"])
    with pytest.raises(L1Error, match="holds a single document without blank lines") as err:
        prep(tmp_path / "one.parquet", tmp_path / "data")
    assert ".txt" not in str(err.value)


def test_rows_without_text_are_counted_in_the_log(tmp_path):
    docs = make_documents(40)
    write_parquet(tmp_path / "src" / "a.parquet", docs[:20] + [None, "", "  \n ", None] + docs[20:])
    (tmp_path / "src" / "b.txt").write_text(" \n\t ")
    (tmp_path / "src" / "c.txt").write_text(docs[0])
    data, logs = prep(tmp_path / "src", tmp_path / "data")
    assert "skipped 5 row(s) without text (none, empty or only whitespace)" in logs
    assert all_documents(data) == sorted(docs + docs[:1])
    write_parquet(tmp_path / "blank.parquet", [None, " ", ""])
    with pytest.raises(L1Error, match=r"no text found \(3 row\(s\) without text: none, empty or only whitespace\)$"):
        prep(tmp_path / "blank.parquet", tmp_path / "d3")
    write_parquet(tmp_path / "clean.parquet", docs)
    assert not any("skipped" in line for line in prep(tmp_path / "clean.parquet", tmp_path / "d2")[1])


def test_a_vocabulary_smaller_than_asked_is_logged_with_its_size(tmp_path):
    write_parquet(tmp_path / "a.parquet", make_documents(20))
    data, logs = prep(tmp_path / "a.parquet", tmp_path / "data", vocab=20000)
    line = next(line for line in logs if line.startswith("the trained vocabulary has"))
    assert f"has {data.tokenizer.vocab_size:,} tokens, fewer than --vocab_size 20,000" in line
    assert data.tokenizer.vocab_size < 20000
    _, logs = prep(tmp_path / "a.parquet", tmp_path / "small", vocab=300)
    assert not any(line.startswith("the trained vocabulary has") for line in logs)
