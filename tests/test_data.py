"""Data: sources through datasets, prepared files that decode to the source, resumable batches."""

import json
import time

import numpy as np
import pytest

from conftest import SHARED_SAMPLE, make_documents, write_parquet
from l1.config import DataConfig
from l1.data import BatchIterator, eval_batches, prepare
from l1.errors import L1Error


def decoded_documents(data, split: str) -> list[str]:
    ids = np.asarray(data.tokens(split)).tolist()
    eot = data.tokenizer.eot_id
    docs, start = [], 0
    for i, t in enumerate(ids):
        if t == eot:
            docs.append(data.tokenizer.decode(ids[start:i]))
            start = i + 1
    assert start == len(ids), "every document ends with end-of-text"
    return docs


def prep(source, tmp_path, vocab=400, **kwargs):
    logs = []
    data = prepare(DataConfig(data=str(source), data_dir=str(tmp_path / "data"), **kwargs), vocab, seed=1,
                   log=logs.append)
    return data, logs


def test_prepared_splits_decode_to_the_source_documents(tmp_path):
    docs = make_documents(120)
    write_parquet(tmp_path / "src" / "a.parquet", docs[:70])
    write_parquet(tmp_path / "src" / "b.parquet", docs[70:])
    data, _ = prep(tmp_path / "src", tmp_path, val_fraction=0.2)
    train, val = decoded_documents(data, "train"), decoded_documents(data, "val")
    assert sorted(train + val) == sorted(docs) and train and val
    assert set(val) != set(docs[-len(val):]), "the split is by random document, not a contiguous block"
    meta = json.loads((data.dir / "meta.json").read_text())
    assert meta["splits"]["val"]["documents"] == len(val)
    assert meta["splits"]["train"]["bytes"] == sum(len(d.encode()) for d in train)
    assert data.bytes_per_token("train") == pytest.approx(meta["splits"]["train"]["bytes"] / len(data.tokens("train")))


def test_split_depends_on_the_seed_only(tmp_path):
    write_parquet(tmp_path / "src" / "a.parquet", make_documents(100))
    cfg = DataConfig(data=str(tmp_path / "src"), data_dir=str(tmp_path / "d1"), val_fraction=0.2)
    a = decoded_documents(prepare(cfg, 400, seed=1, log=lambda m: None), "val")
    b = decoded_documents(prepare(DataConfig(**{**cfg.__dict__, "data_dir": str(tmp_path / "d2")}), 400, seed=1,
                                  log=lambda m: None), "val")
    c = decoded_documents(prepare(DataConfig(**{**cfg.__dict__, "data_dir": str(tmp_path / "d3")}), 400, seed=2,
                                  log=lambda m: None), "val")
    assert a == b and a != c


def test_reuse_and_rebuild(tmp_path):
    path = write_parquet(tmp_path / "src" / "a.parquet", make_documents(60))
    data, _ = prep(tmp_path / "src", tmp_path)
    stamp = (data.dir / "train.bin").stat().st_mtime_ns
    again, logs = prep(tmp_path / "src", tmp_path)
    assert any("reusing prepared corpus" in m for m in logs)
    assert (again.dir / "train.bin").stat().st_mtime_ns == stamp
    assert again.tokenizer.fingerprint == data.tokenizer.fingerprint
    time.sleep(0.01)
    write_parquet(path, make_documents(60, seed=5))  # the source changed
    _, logs = prep(tmp_path / "src", tmp_path)
    assert any("rebuilding" in m for m in logs)
    _, logs = prep(tmp_path / "src", tmp_path, vocab=450)  # another vocabulary: another folder
    assert not any("reusing" in m for m in logs)
    _, logs = prep(tmp_path / "src", tmp_path, tokenizer=str(data.dir / "tokenizer.json"))
    assert any("reusing" in m for m in logs)  # the folder's own tokenizer, given explicitly (a resume)


def test_jsonl_txt_and_max_docs(tmp_path):
    docs = make_documents(30)
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": d, "meta": i}) for i, d in enumerate(docs)) + "\n")
    data, _ = prep(jsonl, tmp_path / "j", val_fraction=0.2)
    assert sorted(decoded_documents(data, "train") + decoded_documents(data, "val")) == sorted(docs)
    folder = tmp_path / "texts"
    folder.mkdir()
    for i, d in enumerate(docs):
        (folder / f"{i:02d}.txt").write_text(d)
    (folder / "README.md").write_text("ignored")
    data, _ = prep(folder, tmp_path / "t", val_fraction=0.2, max_docs=10)
    assert sorted(decoded_documents(data, "train") + decoded_documents(data, "val")) == sorted(docs[:10])


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    for i, d in enumerate(make_documents(20)):
        (folder / f"{i:02d}.txt").write_bytes(d.encode() + (b" \xff\xfe end" if i < 3 else b""))
    data, logs = prep(folder, tmp_path, val_fraction=0.2)
    assert any(m.startswith("3 document(s) held invalid UTF-8") for m in logs)
    assert sum("\ufffd" in d for d in decoded_documents(data, "train") + decoded_documents(data, "val")) == 3


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: ((p / "empty_dir").mkdir(), p / "empty_dir")[1], "holds no .parquet"),
    (lambda p: ((p / "e.txt").write_text(""), p / "e.txt")[1], "no text found"),
    (lambda p: ((p / "x.jsonl").write_text('{"body": "no text field"}\n'), p / "x.jsonl")[1], "no 'text' column"),
])
def test_bad_sources_give_one_line(tmp_path, make, message):
    with pytest.raises(L1Error, match=message) as err:
        prep(make(tmp_path), tmp_path)
    assert "\n" not in str(err.value)


def test_hub_offline_fails_fast_and_clearly(tmp_path, monkeypatch):
    started = time.monotonic()
    with pytest.raises(L1Error, match="--data") as err:
        prepare(DataConfig(data="hub", data_dir=str(tmp_path)), 400, seed=1, log=lambda m: None)
    assert time.monotonic() - started < 30 and "\n" not in str(err.value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(L1Error, match="cannot reach the Hugging Face hub"):
        prepare(DataConfig(data="hub", data_dir=str(tmp_path)), 400, seed=1, log=lambda m: None)


def tokens(n=1000):
    return np.arange(n, dtype=np.uint16) % 500


def test_batches_are_shifted_windows_and_epochs_advance():
    it = BatchIterator(tokens(1001), seq_len=10, batch_size=4, seed=0)
    assert it.windows_per_epoch == 100
    for _ in range(25):
        x, y = it.next()
        assert x.shape == (4, 10) and (y[:, :-1] == x[:, 1:]).all()
    assert it.epoch == 0
    it.next()
    assert it.epoch == 1


def test_epoch_visits_every_window_exactly_once():
    data = np.arange(1001, dtype=np.uint32)  # token value = position: windows are identifiable
    it = BatchIterator(data, seq_len=10, batch_size=4, seed=0)
    firsts = [int(v) for _ in range(25) for v in it.next()[0][:, 0]]
    assert sorted(firsts) == list(range(0, 1000, 10))
    again = BatchIterator(data, seq_len=10, batch_size=4, seed=0)
    assert [int(v) for _ in range(25) for v in again.next()[0][:, 0]] == firsts
    other = BatchIterator(data, seq_len=10, batch_size=4, seed=1)
    assert [int(v) for _ in range(25) for v in other.next()[0][:, 0]] != firsts


def test_restored_position_gives_the_same_following_batches_across_epochs():
    data = np.arange(1001, dtype=np.uint32)
    straight = BatchIterator(data, seq_len=10, batch_size=3, seed=0)  # 33 batches per epoch, 1 window dropped
    for _ in range(30):
        straight.next()
    state = straight.state_dict()
    assert set(state) == {"epoch", "index"} and all(isinstance(v, int) for v in state.values())
    resumed = BatchIterator(data, seq_len=10, batch_size=3, seed=0)
    resumed.load_state_dict(state)
    for _ in range(10):  # crosses into epoch 1
        a, b = straight.next(), resumed.next()
        assert (a[0] == b[0]).all()
    assert resumed.epoch == 1


def test_ranks_take_disjoint_slices_of_the_global_batch():
    data = np.arange(1001, dtype=np.uint32)
    single = BatchIterator(data, seq_len=10, batch_size=4, seed=0)
    ranks = [BatchIterator(data, seq_len=10, batch_size=2, seed=0, rank=r, world_size=2) for r in range(2)]
    for _ in range(5):
        whole = single.next()[0]
        parts = [it.next()[0] for it in ranks]
        assert (np.concatenate(parts) == whole.numpy()).all()


def test_too_small_split_is_refused():
    with pytest.raises(L1Error, match="fewer than one batch"):
        BatchIterator(tokens(50), seq_len=10, batch_size=8, seed=0)


def test_eval_batches_are_fixed_and_equal_per_rank():
    data = np.arange(1001, dtype=np.uint32)
    first = [x for x, _ in eval_batches(data, 10, 4, max_batches=5)]
    assert len(first) == 5 and [int(x[0, 0]) for x in first] == [0, 40, 80, 120, 160]
    per_rank = [list(eval_batches(data, 10, 4, max_batches=100, rank=r, world_size=2)) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 12


@pytest.mark.skipif(not SHARED_SAMPLE.is_dir(), reason="the shared Wikipedia sample is not beside this checkout")
def test_shared_wikipedia_sample_round_trips(tmp_path):
    import pyarrow.dataset as ds

    files = sorted(SHARED_SAMPLE.glob("*.parquet"))
    source = ds.dataset([str(f) for f in files], format="parquet").head(1500).column("text").to_pylist()
    data, _ = prep(SHARED_SAMPLE, tmp_path, vocab=1024, max_docs=1500)
    assert sorted(decoded_documents(data, "train") + decoded_documents(data, "val")) == sorted(source)
    assert 2.0 < data.bytes_per_token("train") < 5.0
