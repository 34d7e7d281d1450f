"""Data: sources through datasets, prepared shards that decode to the source, resumable batches."""

import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pytest
import torch

import l1.data
from conftest import REPO, SHARED_SAMPLE, make_documents, write_parquet
from l1.config import DataConfig
from l1.data import BatchIterator, ShardWriter, WindowOrder, eval_batches, prepare, split_mask
from l1.errors import L1Error
from l1.tokenizer import Tokenizer


def decoded_documents(data, split: str) -> list[str]:
    """The documents of a prepared split: its ids cut at every end-of-text, decoded."""
    ids = data.tokens(split)[:]
    ends = np.flatnonzero(ids == data.tokenizer.eot_id)
    assert len(ids) and ends[-1] == len(ids) - 1, "every document ends with end-of-text"
    return [data.tokenizer.decode(part[:-1].tolist()) for part in np.split(ids, ends + 1)[:-1]]


def all_documents(data) -> list[str]:
    return sorted(decoded_documents(data, "train") + decoded_documents(data, "val"))


def prep(source, data_dir, vocab=400, seed=1, **kwargs):
    logs = []
    data = prepare(DataConfig(data=str(source), data_dir=str(data_dir), **kwargs), vocab, seed=seed,
                   log=logs.append)
    return data, logs


def shard_bytes(data) -> dict:
    """Every shard file's bytes, by name."""
    return {p.name: p.read_bytes() for p in sorted(data.dir.glob("*.bin"))}


def test_prepared_splits_decode_to_the_source_documents(tmp_path):
    docs = make_documents(120)
    write_parquet(tmp_path / "src" / "a.parquet", docs[:70])
    write_parquet(tmp_path / "src" / "b.parquet", docs[70:])
    data, _ = prep(tmp_path / "src", tmp_path / "data", val_fraction=0.2)
    train, val = decoded_documents(data, "train"), decoded_documents(data, "val")
    assert sorted(train + val) == sorted(docs) and train and val
    assert not set(train) & set(val)
    assert set(val) != set(docs[-len(val):]), "the split is by random document, not a contiguous block"
    assert train == [d for d in docs if d in set(train)], "each split keeps the source order"
    assert data.dir.name.startswith("src-bpe400-") and data.tokens("train").dtype == np.uint16
    assert [p.name for p in (tmp_path / "data").iterdir()] == [data.dir.name], "no work folder or cache left"
    assert sorted(p.name for p in data.dir.iterdir()) == ["meta.json", "tokenizer.json", "train-000000.bin",
                                                          "val-000000.bin"]
    meta = json.loads((data.dir / "meta.json").read_text())
    assert meta["splits"]["val"]["documents"] == len(val)
    assert meta["splits"]["train"]["text_bytes"] == sum(len(d.encode()) for d in train)
    assert data.bytes_per_token("train") == pytest.approx(
        meta["splits"]["train"]["text_bytes"] / len(data.tokens("train")))
    assert meta["tokenizer_fingerprint"] == data.tokenizer.fingerprint
    assert meta["seed"] == 1 and meta["vocab_size"] == 400 and meta["tokenize_mb_per_s"] > 0


def test_shards_hold_fixed_token_counts_with_checksums_and_read_as_one_stream(tmp_path):
    write_parquet(tmp_path / "a.parquet", make_documents(200))
    whole, _ = prep(tmp_path / "a.parquet", tmp_path / "d1")
    sharded, _ = prep(tmp_path / "a.parquet", tmp_path / "d2", shard_tokens=1000)
    assert sharded.tokenizer.fingerprint == whole.tokenizer.fingerprint
    for split in ("train", "val"):
        shards = sharded.meta["splits"][split]["shards"]
        assert [s["tokens"] for s in shards[:-1]] == [1000] * (len(shards) - 1) and 0 < shards[-1]["tokens"] <= 1000
        for s in shards:
            content = (sharded.dir / s["file"]).read_bytes()
            assert len(content) == 2 * s["tokens"] and hashlib.sha256(content).hexdigest() == s["sha256"]
        stream = sharded.tokens(split)
        assert len(stream) == len(whole.tokens(split)) == sharded.meta["splits"][split]["tokens"]
        assert (stream[:] == whole.tokens(split)[:]).all()
        assert (stream[990:2010] == whole.tokens(split)[990:2010]).all(), "a slice across two shard boundaries"
    assert len(sharded.meta["splits"]["train"]["shards"]) > 10
    # Windows that span shards: the batches are those of the same ids in one file, bit for bit.
    a = BatchIterator(sharded.tokens("train"), seq_len=33, batch_size=4, seed=3)
    b = BatchIterator(whole.tokens("train"), seq_len=33, batch_size=4, seed=3)
    for _ in range(2 * a.windows_per_epoch // 4):
        assert all(torch.equal(u, v) for u, v in zip(a.next(), b.next()))
    assert all(torch.equal(u[0], v[0]) for u, v in zip(eval_batches(sharded.tokens("val"), 33, 2, 9),
                                                      eval_batches(whole.tokens("val"), 33, 2, 9)))


def test_split_is_a_seeded_draw_per_document_index():
    whole = split_mask(0, 10_000, 0.1, seed=3)
    pieces = np.concatenate([split_mask(0, 1, 0.1, 3), split_mask(1, 4500, 0.1, 3), split_mask(4501, 5499, 0.1, 3)])
    assert (whole == pieces).all(), "a document's side depends on its index, not on the batching"
    assert not whole[0] and 800 < whole.sum() < 1200
    assert (split_mask(0, 10_000, 0.1, seed=4) != whole).any()


def test_split_depends_on_the_seed_and_each_seed_has_its_own_folder(tmp_path):
    write_parquet(tmp_path / "src" / "a.parquet", make_documents(100))
    a = decoded_documents(prep(tmp_path / "src", tmp_path / "d1", seed=1)[0], "val")
    b = decoded_documents(prep(tmp_path / "src", tmp_path / "d2", seed=1)[0], "val")
    c = prep(tmp_path / "src", tmp_path / "d1", seed=2)[0]
    assert a == b and a != decoded_documents(c, "val") and a
    assert len(list((tmp_path / "d1").iterdir())) == 2, "another seed, another folder beside the first"


def test_reuse_without_reading_the_source_and_a_new_folder_for_any_change(tmp_path, monkeypatch):
    path = write_parquet(tmp_path / "src" / "a.parquet", make_documents(60))
    data, _ = prep(tmp_path / "src", tmp_path / "data")
    stamps = {p.name: p.stat().st_mtime_ns for p in data.dir.iterdir()}
    with monkeypatch.context() as m:
        m.setattr(l1.data, "_texts", lambda *a: pytest.fail("the source was read"))
        again, logs = prep(tmp_path / "src", tmp_path / "data")
        assert any("reusing prepared corpus" in line for line in logs) and again.dir == data.dir
        assert again.tokenizer.fingerprint == data.tokenizer.fingerprint
        # A resumed run passes the folder's own tokenizer explicitly: still a reuse.
        _, logs = prep(tmp_path / "src", tmp_path / "data", tokenizer=str(data.dir / "tokenizer.json"))
        assert any("reusing" in line for line in logs)
    folders = {data.dir}
    for change in ({"seed": 2}, {"val_fraction": 0.2}, {"vocab": 450}, {"max_docs": 50}, {"shard_tokens": 500},
                   {"tokenizer_sample_mb": 0.001}):
        other, logs = prep(tmp_path / "src", tmp_path / "data", **change)
        assert not any("reusing" in line for line in logs) and other.dir not in folders, change
        folders.add(other.dir)
    time.sleep(0.01)
    write_parquet(path, make_documents(60, seed=5))  # the source changed
    changed, _ = prep(tmp_path / "src", tmp_path / "data")
    assert changed.dir not in folders and all_documents(changed) == sorted(make_documents(60, seed=5))
    assert {p.name: p.stat().st_mtime_ns for p in data.dir.iterdir()} == stamps, "the first folder was never touched"


def test_a_small_tokenizer_sample_trains_on_the_first_training_documents(tmp_path):
    docs = make_documents(300)
    write_parquet(tmp_path / "a.parquet", docs)
    sampled, logs = prep(tmp_path / "a.parquet", tmp_path / "d", tokenizer_sample_mb=0.002)
    assert any("first 0.002 MB at most" in line for line in logs)
    train = [d for d, v in zip(docs, split_mask(0, len(docs), 0.01, 1)) if not v]
    sample, size = [], 0
    while size < 2000:
        sample.append(train[len(sample)])
        size += len(sample[-1].encode())
    assert sampled.tokenizer.fingerprint == Tokenizer.train(sample, 400).fingerprint
    assert all_documents(sampled) == sorted(docs)


def test_hub_source_then_offline_reuse(tmp_path, monkeypatch):
    import datasets

    docs = make_documents(40)
    calls = []

    def fake_hub(*args, **kwargs):  # stands in for the download: the hub's schema, one empty row
        calls.append((args, kwargs))
        return datasets.Dataset.from_dict({"id": [str(i) for i in range(41)], "text": docs + [""]})

    with monkeypatch.context() as m:
        m.setattr(l1.data, "_hub_unreachable_reason", lambda: None)
        m.setattr(datasets, "load_dataset", fake_hub)
        first, logs = prep("hub", tmp_path, max_docs=30)
    assert calls == [(("wikimedia/wikipedia", "20231101.simple"), {"split": "train", "streaming": True})] * 2, \
        "one streamed read for the tokenizer's sample, one to tokenize"
    assert first.dir.name.startswith("wikipedia-20231101.simple-first30-bpe400-")
    assert all_documents(first) == sorted(docs[:30])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # prepared once: no hub needed any more
    again, logs = prep("hub", tmp_path, max_docs=30)
    assert any("reusing" in line for line in logs) and again.dir == first.dir


def test_jsonl_and_txt_folder_and_max_docs(tmp_path):
    docs = make_documents(30)
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": d, "n": i}) for i, d in enumerate(docs)) + "\n")
    data, _ = prep(jsonl, tmp_path / "j")
    assert all_documents(data) == sorted(docs) and data.dir.name.startswith("corpus-bpe400-")
    folder = tmp_path / "texts"
    folder.mkdir()
    for i, d in enumerate(docs):
        (folder / f"{i:02d}.txt").write_text(d)
    data, _ = prep(folder, tmp_path / "t", max_docs=10)
    assert all_documents(data) == sorted(docs[:10]) and data.dir.name.startswith("texts-first10-bpe400-")


def test_folder_of_mixed_files_in_sorted_order(tmp_path):
    docs = make_documents(50)
    src = tmp_path / "src"
    write_parquet(src / "a.parquet", docs[:20])
    (src / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[20:35]))
    (src / "sub").mkdir()
    for i, d in enumerate(docs[35:]):
        (src / "sub" / f"c{i:02d}.txt").write_text(d)
    (src / "README.md").write_text("not a document")
    (src / "notes.csv").write_text("not,a,document")
    (src / ".hidden.txt").write_text("not a document either")
    (src / "empty.jsonl").write_text("")
    data, _ = prep(src, tmp_path / "all")
    assert all_documents(data) == sorted(docs)
    data, _ = prep(src, tmp_path / "some", max_docs=27)  # the parquet file, then the jsonl's first 7
    assert all_documents(data) == sorted(docs[:27])


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    for i, d in enumerate(make_documents(20)):
        (folder / f"{i:02d}.txt").write_bytes(d.encode() + (b" \xff\xfe end" if i < 3 else b""))
    data, logs = prep(folder, tmp_path / "data")
    assert any(line.startswith("3 document(s) contain U+FFFD") for line in logs)
    assert sum("\ufffd" in d for d in all_documents(data)) == 3


def test_single_document_is_split_into_paragraphs(tmp_path):
    paragraphs = make_documents(12)
    (tmp_path / "book.txt").write_text("\n\n\n".join(paragraphs))
    data, _ = prep(tmp_path / "book.txt", tmp_path / "data", val_fraction=0.2)
    assert all_documents(data) == sorted(paragraphs)
    assert decoded_documents(data, "train") and decoded_documents(data, "val")


def test_literal_end_of_text_in_a_document_is_text(tmp_path):
    docs = make_documents(20) + ["A document that quotes <|endoftext|> in its text."]
    write_parquet(tmp_path / "a.parquet", docs)
    data, _ = prep(tmp_path / "a.parquet", tmp_path / "data")
    assert all_documents(data) == sorted(docs)


def test_given_tokenizer_is_reused_and_checked(tmp_path):
    docs = make_documents(40)
    write_parquet(tmp_path / "a.parquet", docs)
    small, _ = prep(tmp_path / "a.parquet", tmp_path / "d1")
    given = str(small.dir / "tokenizer.json")
    big, logs = prep(tmp_path / "a.parquet", tmp_path / "d2", vocab=70_000, tokenizer=given)
    assert not any("training" in line for line in logs)
    assert big.tokens("train").dtype == np.uint32 and big.tokenizer.fingerprint == small.tokenizer.fingerprint
    assert all_documents(big) == sorted(docs)
    with pytest.raises(L1Error, match="more than vocab_size 300"):
        prep(tmp_path / "a.parquet", tmp_path / "d3", vocab=300, tokenizer=given)


def test_hub_split_and_text_column_are_flags(tmp_path, monkeypatch):
    import datasets

    calls = []

    def fake_hub(*args, **kwargs):
        calls.append(kwargs["split"])
        return datasets.Dataset.from_dict({"content": make_documents(20), "text": ["not this"] * 20})

    with monkeypatch.context() as m:
        m.setattr(l1.data, "_hub_unreachable_reason", lambda: None)
        m.setattr(datasets, "load_dataset", fake_hub)
        data, _ = prep("hub", tmp_path, hub_dataset="org/set", hub_config="cfg", hub_split="test",
                       text_column="content")
    assert set(calls) == {"test"} and data.dir.name.startswith("set-cfg-test-bpe400-")
    assert all_documents(data) == sorted(make_documents(20))
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("".join(json.dumps({"body": d}) + "\n" for d in make_documents(20)))
    assert all_documents(prep(jsonl, tmp_path / "j", text_column="body")[0]) == sorted(make_documents(20))


def test_a_failed_build_leaves_nothing_to_reuse_and_the_next_run_completes_it(tmp_path, monkeypatch):
    write_parquet(tmp_path / "a.parquet", make_documents(30))
    with monkeypatch.context() as m:
        m.setattr(ShardWriter, "write", lambda *a: (_ for _ in ()).throw(RuntimeError("crash")))
        with pytest.raises(RuntimeError):
            prep(tmp_path / "a.parquet", tmp_path / "data")
    assert [p.name[0] for p in (tmp_path / "data").iterdir()] == ["."], "only the hidden work folder"
    data, _ = prep(tmp_path / "a.parquet", tmp_path / "data")
    assert all_documents(data) == sorted(make_documents(30))
    assert [p.name for p in (tmp_path / "data").iterdir()] == [data.dir.name]


# ---- resuming, checking, interrupting ------------------------------------------------------------

CHILD = """
import json, sys
import l1.data
from l1.config import DataConfig
from l1.data import prepare
settings = json.loads(sys.argv[1])
vocab = settings.pop("vocab")
l1.data.ENCODE_BATCH_BYTES = settings.pop("batch_bytes")
print("started", flush=True)
try:
    prepare(DataConfig(**settings), vocab, seed=1, log=lambda line: print(line, flush=True))
except KeyboardInterrupt:  # as the scripts' wrapper does
    sys.exit(130)
"""


@pytest.fixture
def small_batches(monkeypatch):
    """Encode batches of a few documents, so that a small corpus passes many progress records."""
    monkeypatch.setattr(l1.data, "ENCODE_BATCH_BYTES", SMALL_BATCH)


SMALL_BATCH = 4000


def child(vocab=400, batch_bytes=SMALL_BATCH, **settings) -> subprocess.Popen:
    """prepare() in a fresh process, as the training script would run it; its log on stdout."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    settings = {"vocab": vocab, "batch_bytes": batch_bytes, **settings}
    return subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(settings)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(proc: subprocess.Popen, text: str) -> list[str]:
    """Read the child's log up to the first line containing `text`."""
    lines = []
    while not lines or text not in lines[-1]:
        line = proc.stdout.readline()
        assert line, f"the child ended before printing {text!r}: {lines}"
        lines.append(line)
    return lines


def test_a_preparation_stopped_after_some_shards_continues_to_the_same_bytes(tmp_path, monkeypatch, small_batches):
    write_parquet(tmp_path / "a.parquet", make_documents(400))
    reference, _ = prep(tmp_path / "a.parquet", tmp_path / "ref", shard_tokens=1000)
    saves = []

    def crash_after_three(path, value):
        saving(path, value)
        saves.append(path.name)
        if saves.count("progress.json") == 4:  # the initial record, then three shards' worth
            raise RuntimeError("killed")

    saving = l1.data._save_json
    with monkeypatch.context() as m:
        m.setattr(l1.data, "_save_json", crash_after_three)
        with pytest.raises(RuntimeError, match="killed"):
            prep(tmp_path / "a.parquet", tmp_path / "data", shard_tokens=1000)
    data, logs = prep(tmp_path / "a.parquet", tmp_path / "data", shard_tokens=1000)
    assert any(line.startswith("continuing an interrupted preparation from document") for line in logs)
    assert not any("training" in line for line in logs), "the saved tokenizer is kept"
    assert 0 < data.meta["resumed_from_document"] < 400
    assert shard_bytes(data) == shard_bytes(reference) and data.meta["splits"] == reference.meta["splits"]


def test_sigkill_at_a_random_instant_then_the_same_command(tmp_path, small_batches):
    docs = make_documents(1200)
    write_parquet(tmp_path / "src" / "a.parquet", docs)
    settings = {"data": str(tmp_path / "src"), "data_dir": str(tmp_path / "data"), "shard_tokens": 2000}
    started = time.perf_counter()
    reference, _ = prep(tmp_path / "src", tmp_path / "ref", shard_tokens=2000)
    duration = time.perf_counter() - started
    delays = []
    for _ in range(2):  # killed twice: the second run continues from the first one's progress
        proc = child(**settings)
        wait_for(proc, "started")
        delays.append(random.uniform(0, duration))
        time.sleep(delays[-1])
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    proc = child(**settings)
    out = proc.communicate()[0]
    assert proc.returncode == 0, out
    data, logs = prep(tmp_path / "src", tmp_path / "data", shard_tokens=2000)
    assert any("reusing" in line for line in logs)
    assert shard_bytes(data) == shard_bytes(reference), f"killed after {delays} s"
    assert all_documents(data) == sorted(docs)
    assert [p.name for p in (tmp_path / "data").iterdir()] == [data.dir.name], "no work folder left"


def test_a_damaged_shard_is_refused_at_reuse_in_one_line(tmp_path):
    write_parquet(tmp_path / "a.parquet", make_documents(100))
    data, _ = prep(tmp_path / "a.parquet", tmp_path / "data", shard_tokens=1000)
    shard = data.dir / "train-000001.bin"
    ids = np.fromfile(shard, dtype=np.uint16)
    ids[10:20] = 65535  # ids past the vocabulary, same size
    ids.tofile(shard)
    with pytest.raises(L1Error, match=r"is damaged \(train-000001.bin do not match meta.json\); delete") as err:
        prep(tmp_path / "a.parquet", tmp_path / "data", shard_tokens=1000)
    assert "\n" not in str(err.value)
    (data.dir / "val-000000.bin").write_bytes(b"")
    with pytest.raises(L1Error, match="train-000001.bin and 1 more"):
        prep(tmp_path / "a.parquet", tmp_path / "data", shard_tokens=1000)


def test_disk_full_while_writing_shards_gives_one_line_and_the_same_command_continues(tmp_path, monkeypatch,
                                                                                   small_batches):
    write_parquet(tmp_path / "a.parquet", make_documents(300))
    reference, _ = prep(tmp_path / "a.parquet", tmp_path / "ref", shard_tokens=1000)
    completed = []

    def full_after_two_shards(self):
        completed.append(1)
        if len(completed) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        complete(self)

    complete = ShardWriter._complete
    with monkeypatch.context() as m:
        m.setattr(ShardWriter, "_complete", full_after_two_shards)
        with pytest.raises(L1Error, match="no space left on the device of .* run the same command again") as err:
            prep(tmp_path / "a.parquet", tmp_path / "data", shard_tokens=1000)
    assert "\n" not in str(err.value)
    assert not list((tmp_path / "data").rglob("*.tmp")), "no temporary file left"
    data, logs = prep(tmp_path / "a.parquet", tmp_path / "data", shard_tokens=1000)
    assert any("continuing" in line for line in logs) and shard_bytes(data) == shard_bytes(reference)


def interrupted(proc: subprocess.Popen, after: str) -> tuple[float, float, str]:
    """Ctrl-C the child once it prints `after`; the child must exit 130. Returns the seconds from its
    start to `after` (its start-up: how loaded the machine is), from Ctrl-C to its exit, and its log."""
    started = time.monotonic()
    log = "".join(wait_for(proc, after))
    startup = time.monotonic() - started
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    signalled = time.monotonic()
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 130, out
    return startup, time.monotonic() - signalled, log + out


def test_ctrl_c_stops_tokenizer_training_at_once(tmp_path):
    # One 16 MB document without whitespace, at this vocabulary: minutes of BPE merges in one Rust call.
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_bytes(np.random.default_rng(0).integers(97, 107, 16 << 20, dtype=np.uint8).tobytes())
    (src / "b.txt").write_text(make_documents(1)[0])
    proc = child(vocab=20000, data=str(src), data_dir=str(tmp_path / "data"))
    startup, stop, _ = interrupted(proc, "training a")
    assert stop < max(30.0, 3 * startup)  # minutes of merges were left; a loaded machine slows both alike
    assert [p.name[0] for p in (tmp_path / "data").iterdir()] == ["."], "no prepared folder, only the work folder"


SLOW_ENCODE = """
import time
from l1.tokenizer import Tokenizer
encode = Tokenizer.encode_documents
def slow(self, docs):  # each batch's call into Rust lasts at least 0.5 s, with the GIL released
    print("encoding", flush=True)
    time.sleep(0.5)
    return encode(self, docs)
Tokenizer.encode_documents = slow
"""


def test_ctrl_c_stops_tokenization_within_one_batch_and_the_next_run_continues(tmp_path):
    docs = make_documents(2000)
    write_parquet(tmp_path / "a.parquet", docs)
    Tokenizer.train(docs, 400).save(tmp_path / "tokenizer.json")
    settings = {"data": str(tmp_path / "a.parquet"), "data_dir": str(tmp_path / "data"), "shard_tokens": 1000,
                "tokenizer": str(tmp_path / "tokenizer.json")}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_ENCODE + CHILD, json.dumps({"vocab": 400, "batch_bytes": 2000,
                            **settings})], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = interrupted(proc, "encoding")[2]
    assert log.count("encoding") <= 5  # within a batch or two of the signal: some 200 batches were left
    assert [p.name[0] for p in (tmp_path / "data").iterdir()] == ["."]
    data, logs = prep(tmp_path / "a.parquet", tmp_path / "data", shard_tokens=1000, tokenizer=settings["tokenizer"])
    assert all_documents(data) == sorted(docs)


def test_two_processes_preparing_one_corpus_take_turns(tmp_path):
    write_parquet(tmp_path / "a.parquet", make_documents(800))
    settings = {"data": str(tmp_path / "a.parquet"), "data_dir": str(tmp_path / "data"), "shard_tokens": 5000}
    procs = [child(**settings) for _ in range(2)]
    outs = [p.communicate()[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sum("tokenized" in out for out in outs) == 1, "one prepares, the other waits for it and reuses"
    assert any("reusing" in out for out in outs)
    assert len(list((tmp_path / "data").iterdir())) == 1


def test_an_old_one_file_folder_is_named_and_prepared_again_once(tmp_path):
    write_parquet(tmp_path / "a.parquet", make_documents(40))
    old = tmp_path / "data" / "a-bpe400"
    old.mkdir(parents=True)
    (old / "train.bin").write_bytes(b"\0\0")
    _, logs = prep(tmp_path / "a.parquet", tmp_path / "data")
    assert any(f"{old} holds this corpus in the older one-file format" in line for line in logs)
    _, logs = prep(tmp_path / "a.parquet", tmp_path / "data")
    assert not any("one-file format" in line for line in logs) and any("reusing" in line for line in logs)


def test_data_dir_that_is_a_file_or_not_writable_gives_one_line(tmp_path, monkeypatch):
    write_parquet(tmp_path / "a.parquet", make_documents(20))
    (tmp_path / "file").write_text("")
    with pytest.raises(L1Error, match="is a file, not a folder"):
        prep(tmp_path / "a.parquet", tmp_path / "file")

    def refused(path, *args, **kwargs):  # what a read-only folder answers (this suite may run as root)
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(l1.data.Path, "mkdir", refused)
    with pytest.raises(L1Error, match=r"cannot write the prepared corpus in .*ro: Permission denied \(.*\.partial\)"):
        prep(tmp_path / "a.parquet", tmp_path / "ro")


def _write(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: _write(p / "docs" / "README.md", "hello").parent, "holds no .parquet, .jsonl, .json or .txt"),
    (lambda p: (_write(p / "e" / "a.txt", ""), _write(p / "e" / "b.txt", " \n\n "))[0].parent, "no text found"),
    (lambda p: _write(p / "x.jsonl", '{"body": "no text field"}\n'), "no 'text' column"),
    (lambda p: _write(p / "x.json", "{not json"), "cannot read"),
])
def test_bad_sources_give_one_line(tmp_path, make, message):
    with pytest.raises(L1Error, match=message) as err:
        prep(make(tmp_path), tmp_path / "data")
    assert "\n" not in str(err.value)


def test_parquet_without_text_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ["1", "2"], "body": ["a", "b"]}), tmp_path / "x.parquet")
    with pytest.raises(L1Error, match=r"x.parquet has no 'text' column \(found: id, body\)") as err:
        prep(tmp_path / "x.parquet", tmp_path / "data")
    assert "\n" not in str(err.value)


def test_hub_offline_fails_fast_and_clearly(tmp_path, monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    started = time.monotonic()
    with pytest.raises(L1Error, match="--data ../shared/data/wikipedia-sample") as err:
        prep("hub", tmp_path)  # for real: this machine has no route to the hub
    assert time.monotonic() - started < 10 and "\n" not in str(err.value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(L1Error, match=r"cannot reach the Hugging Face hub \(HF_HUB_OFFLINE is set\)"):
        prep("hub", tmp_path)


# ---- batches ------------------------------------------------------------------------------------

POSITIONS = np.arange(1001, dtype=np.uint32)  # token value = position: windows are identifiable


def firsts(it, n_batches) -> list[int]:
    """The window index of each row of the next n batches."""
    return [int(v) // it.seq_len for _ in range(n_batches) for v in it.next()[0][:, 0]]


def test_batches_are_shifted_windows_and_epochs_advance():
    it = BatchIterator(np.arange(1001, dtype=np.uint16) % 500, seq_len=10, batch_size=4, seed=0)
    assert it.windows_per_epoch == 100 and it.epoch == 0
    for _ in range(24):
        x, y = it.next()
        assert x.shape == y.shape == (4, 10) and x.dtype == y.dtype == torch.int64
        assert (y[:, :-1] == x[:, 1:]).all() and ((x + 1) % 500 == y).all()
    assert it.epoch == 0
    it.next()
    assert it.epoch == 1 and it.state_dict() == {"epoch": 1, "index": 0}


def test_epoch_visits_every_window_once_in_a_seeded_order():
    it = BatchIterator(POSITIONS, seq_len=10, batch_size=3, seed=0)  # 33 batches, 1 window dropped
    epoch = firsts(it, 33)
    assert len(set(epoch)) == 99 and set(epoch) <= set(range(100))
    assert firsts(BatchIterator(POSITIONS, seq_len=10, batch_size=3, seed=0), 33) == epoch
    assert firsts(BatchIterator(POSITIONS, seq_len=10, batch_size=3, seed=1), 33) != epoch
    assert firsts(it, 33) != epoch, "each epoch has its own order"


def starts(it, n_batches) -> list[int]:
    """The first token position of each row of the next n batches."""
    return [int(v) for _ in range(n_batches) for v in it.next()[0][:, 0]]


def epoch_offsets(seed: int, n_epochs: int) -> list[int]:
    """Each epoch's cut, checked on the way: one offset per epoch, below seq_len, every window of
    the epoch once, none past the end."""
    it, offsets = BatchIterator(POSITIONS, seq_len=10, batch_size=3, seed=seed), []
    for epoch in range(n_epochs):
        assert it.epoch == epoch
        windows = it.windows_per_epoch
        epoch_starts = starts(it, windows // 3)
        offset = epoch_starts[0] % 10
        assert {s % 10 for s in epoch_starts} == {offset}
        assert len(set(epoch_starts)) == len(epoch_starts) and max(epoch_starts) + 10 < len(POSITIONS)
        assert windows == (1000 - offset) // 10
        offsets.append(offset)
    return offsets


def test_later_epochs_cut_the_stream_at_a_seeded_offset():
    offsets = epoch_offsets(seed=0, n_epochs=8)
    assert offsets[0] == 0 and len(set(offsets[1:])) > 1, offsets
    assert epoch_offsets(seed=0, n_epochs=8) == offsets and epoch_offsets(seed=1, n_epochs=8) != offsets


@pytest.mark.parametrize("length", [41, 45])
def test_an_offset_leaves_room_for_a_global_batch(length):
    ranks = [BatchIterator(POSITIONS[:length], seq_len=10, batch_size=2, seed=0, rank=r, world_size=2)
             for r in range(2)]  # 4 windows of 10: one global batch per epoch
    seen = set()
    for _ in range(50):
        x, y = (torch.cat(t) for t in zip(*(it.next() for it in ranks)))
        assert y.max() < length and (y == x + 1).all()
        assert len({int(v) % 10 for v in x[:, 0]}) == 1, "the ranks cut at the same offset"
        seen.add(int(x[0, 0]) % 10)
    assert seen == ({0} if length == 41 else set(range(5)))  # room for offsets up to 0, or up to 4


@pytest.mark.parametrize("k", [0, 5, 32, 33, 40])
def test_restored_position_gives_the_same_following_batches(k):
    straight = BatchIterator(POSITIONS, seq_len=10, batch_size=3, seed=7)  # 33 batches per epoch
    firsts(straight, k)
    state = straight.state_dict()
    assert set(state) == {"epoch", "index"} and all(type(v) is int for v in state.values())
    resumed = BatchIterator(POSITIONS, seq_len=10, batch_size=3, seed=7)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert starts(resumed, 40) == starts(straight, 40)  # crosses into the next epoch
    assert resumed.epoch == straight.epoch >= 1


def test_a_position_outside_the_split_is_refused():
    it = BatchIterator(POSITIONS, seq_len=10, batch_size=3, seed=0)
    with pytest.raises(L1Error, match="does not fit"):
        it.load_state_dict({"epoch": 0, "index": 500})


def test_ranks_take_disjoint_slices_of_the_global_batch():
    single = BatchIterator(POSITIONS, seq_len=10, batch_size=4, seed=0)
    ranks = [BatchIterator(POSITIONS, seq_len=10, batch_size=2, seed=0, rank=r, world_size=2) for r in range(2)]
    for _ in range(30):  # crosses an epoch boundary (25 global batches per epoch)
        whole = single.next()[0].numpy()
        parts = [it.next()[0].numpy() for it in ranks]
        assert (np.concatenate(parts) == whole).all()
        assert not set(parts[0][:, 0]) & set(parts[1][:, 0])


@pytest.mark.parametrize("n", [1, 2, 3, 5, 64, 1000, 4097])
def test_window_order_is_a_seeded_permutation(n):
    order = WindowOrder(n, [0, 0])[np.arange(n)]
    assert sorted(order.tolist()) == list(range(n))
    if n >= 64:
        assert (order != np.arange(n)).mean() > 0.9 and (WindowOrder(n, [0, 1])[np.arange(n)] != order).any()


def test_batch_iterator_memory_does_not_grow_with_the_number_of_windows():
    class Huge:  # 10B tokens, i.e. ~10M windows of 1024, read by value = position
        def __len__(self):
            return 10 ** 10

        def __getitem__(self, key):
            return np.arange(key.start, key.stop, dtype=np.int64)

    tracemalloc.start()
    try:
        it = BatchIterator(Huge(), seq_len=1024, batch_size=8, seed=0)
        firsts(it, 3)
        state = it.state_dict()
        it.load_state_dict({"epoch": 5, "index": 4_000_000})
        firsts(it, 3)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"{peak:,} bytes for {it.windows_per_epoch:,} windows"  # a permutation: 78 MB
    assert state == {"epoch": 0, "index": 24}


def test_too_small_split_is_refused():
    with pytest.raises(L1Error, match=r"has 50 tokens.* needs at least 81.*--batch_size or --seq_len"):
        BatchIterator(np.zeros(50, dtype=np.uint16), seq_len=10, batch_size=4, seed=0, world_size=2)


def test_eval_batches_are_sequential_fixed_and_split_over_ranks():
    first = list(eval_batches(POSITIONS, 10, 4, max_batches=5))
    assert [x[:, 0].tolist() for x, _ in first] == [[w * 10 for w in range(b * 4, b * 4 + 4)] for b in range(5)]
    again = list(eval_batches(POSITIONS, 10, 4, max_batches=5))
    assert all((a[0] == b[0]).all() and (a[1] == b[1]).all() for a, b in zip(first, again))
    assert len(list(eval_batches(POSITIONS, 10, 4, max_batches=100))) == 25
    per_rank = [list(eval_batches(POSITIONS, 10, 2, max_batches=5, rank=r, world_size=2)) for r in range(2)]
    for b, whole in enumerate(first):
        assert (np.concatenate([per_rank[r][b][0] for r in range(2)]) == whole[0].numpy()).all()


def test_eval_batches_refuse_a_too_small_split():
    with pytest.raises(L1Error, match="validation split has 8 tokens"):
        eval_batches(np.zeros(8, dtype=np.uint16), seq_len=10, batch_size=1, max_batches=1)


@pytest.mark.skipif(not SHARED_SAMPLE.is_dir(), reason="the shared Wikipedia sample is not beside this checkout")
def test_shared_wikipedia_sample_round_trips(tmp_path):
    import pyarrow.dataset as ds

    files = sorted(SHARED_SAMPLE.glob("*.parquet"))
    source = ds.dataset([str(f) for f in files], format="parquet").head(1500).column("text").to_pylist()
    data, _ = prep(SHARED_SAMPLE, tmp_path, vocab=1024, max_docs=1500)
    assert all_documents(data) == sorted(source)
    assert data.dir.name.startswith("wikipedia-sample-first1500-bpe1024-")
    assert 2.0 < data.bytes_per_token("train") < 5.0
