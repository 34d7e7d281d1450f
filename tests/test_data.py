"""Data: sources through datasets, prepared files that decode to the source, resumable batches."""

import json
import time

import numpy as np
import pytest
import torch

import l1.data
from conftest import SHARED_SAMPLE, make_documents, write_parquet
from l1.config import DataConfig
from l1.data import BatchIterator, eval_batches, prepare
from l1.errors import L1Error


def decoded_documents(data, split: str) -> list[str]:
    """The documents of a prepared split: its ids cut at every end-of-text, decoded."""
    ids = np.asarray(data.tokens(split))
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


def test_prepared_splits_decode_to_the_source_documents(tmp_path):
    docs = make_documents(120)
    write_parquet(tmp_path / "src" / "a.parquet", docs[:70])
    write_parquet(tmp_path / "src" / "b.parquet", docs[70:])
    data, _ = prep(tmp_path / "src", tmp_path / "data", val_fraction=0.2)
    train, val = decoded_documents(data, "train"), decoded_documents(data, "val")
    assert sorted(train + val) == sorted(docs) and train and val
    assert not set(train) & set(val)
    assert set(val) != set(docs[-len(val):]), "the split is by random document, not a contiguous block"
    assert data.dir.name == "src-bpe400" and data.tokens("train").dtype == np.uint16
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["src-bpe400"], "no build or cache left"
    assert sorted(p.name for p in data.dir.iterdir()) == ["meta.json", "tokenizer.json", "train.bin", "val.bin"]
    meta = json.loads((data.dir / "meta.json").read_text())
    assert meta["splits"]["val"]["documents"] == len(val)
    assert meta["splits"]["train"]["text_bytes"] == sum(len(d.encode()) for d in train)
    assert data.bytes_per_token("train") == pytest.approx(
        meta["splits"]["train"]["text_bytes"] / len(data.tokens("train")))
    assert meta["tokenizer_fingerprint"] == data.tokenizer.fingerprint
    assert meta["seed"] == 1 and meta["vocab_size"] == 400 and meta["prepare_mb_per_s"] > 0


def test_split_depends_on_the_seed(tmp_path):
    write_parquet(tmp_path / "src" / "a.parquet", make_documents(100))
    a = decoded_documents(prep(tmp_path / "src", tmp_path / "d1", seed=1)[0], "val")
    b = decoded_documents(prep(tmp_path / "src", tmp_path / "d2", seed=1)[0], "val")
    c = decoded_documents(prep(tmp_path / "src", tmp_path / "d3", seed=2)[0], "val")
    assert a == b and a != c and a and c


def test_reuse_without_reading_the_source_and_rebuild_on_change(tmp_path, monkeypatch):
    path = write_parquet(tmp_path / "src" / "a.parquet", make_documents(60))
    data, _ = prep(tmp_path / "src", tmp_path / "data")
    stamps = {p.name: p.stat().st_mtime_ns for p in data.dir.iterdir()}
    with monkeypatch.context() as m:
        m.setattr(l1.data, "read_documents", lambda *a: pytest.fail("the source was read"))
        again, logs = prep(tmp_path / "src", tmp_path / "data")
        assert any("reusing prepared corpus" in line for line in logs)
        assert {p.name: p.stat().st_mtime_ns for p in again.dir.iterdir()} == stamps
        assert again.tokenizer.fingerprint == data.tokenizer.fingerprint
        # A resumed run passes the folder's own tokenizer explicitly: still a reuse.
        _, logs = prep(tmp_path / "src", tmp_path / "data", tokenizer=str(data.dir / "tokenizer.json"))
        assert any("reusing" in line for line in logs)
    for change in ({"seed": 2}, {"val_fraction": 0.2}):
        _, logs = prep(tmp_path / "src", tmp_path / "data", **change)
        assert any("rebuilding" in line for line in logs), change
    _, logs = prep(tmp_path / "src", tmp_path / "data", vocab=450)  # another vocabulary: another folder
    assert not any("reusing" in line for line in logs)
    prep(tmp_path / "src", tmp_path / "data")
    time.sleep(0.01)
    write_parquet(path, make_documents(60, seed=5))  # the source changed
    changed, logs = prep(tmp_path / "src", tmp_path / "data")
    assert any("rebuilding" in line for line in logs)
    assert all_documents(changed) == sorted(make_documents(60, seed=5))


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
    assert calls == [(("wikimedia/wikipedia", "20231101.simple"), {"split": "train"})]
    assert first.dir.name == "wikipedia-20231101.simple-first30-bpe400" and all_documents(first) == sorted(docs[:30])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # prepared once: no hub needed any more
    again, logs = prep("hub", tmp_path, max_docs=30)
    assert any("reusing" in line for line in logs) and again.dir == first.dir


def test_jsonl_and_txt_folder_and_max_docs(tmp_path):
    docs = make_documents(30)
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": d, "n": i}) for i, d in enumerate(docs)) + "\n")
    data, _ = prep(jsonl, tmp_path / "j")
    assert all_documents(data) == sorted(docs) and data.dir.name == "corpus-bpe400"
    folder = tmp_path / "texts"
    folder.mkdir()
    for i, d in enumerate(docs):
        (folder / f"{i:02d}.txt").write_text(d)
    data, _ = prep(folder, tmp_path / "t", max_docs=10)
    assert all_documents(data) == sorted(docs[:10]) and data.dir.name == "texts-first10-bpe400"


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


def test_a_failed_build_leaves_nothing_to_reuse(tmp_path, monkeypatch):
    write_parquet(tmp_path / "a.parquet", make_documents(30))
    monkeypatch.setattr(l1.data, "write_tokens", lambda *a: (_ for _ in ()).throw(RuntimeError("crash")))
    with pytest.raises(RuntimeError):
        prep(tmp_path / "a.parquet", tmp_path / "data")
    assert list((tmp_path / "data").iterdir()) == []


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


@pytest.mark.parametrize("k", [0, 5, 32, 33, 40])
def test_restored_position_gives_the_same_following_batches(k):
    straight = BatchIterator(POSITIONS, seq_len=10, batch_size=3, seed=7)  # 33 batches per epoch
    firsts(straight, k)
    state = straight.state_dict()
    assert set(state) == {"epoch", "index"} and all(type(v) is int for v in state.values())
    resumed = BatchIterator(POSITIONS, seq_len=10, batch_size=3, seed=7)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert firsts(resumed, 40) == firsts(straight, 40)  # crosses into the next epoch
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
    assert data.dir.name == "wikipedia-sample-first1500-bpe1024"
    assert 2.0 < data.bytes_per_token("train") < 5.0
