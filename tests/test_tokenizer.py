"""The byte-level BPE: lossless for any text, standard file format, stable fingerprint."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import make_documents
from tokenizers import pre_tokenizers
from l1.errors import L1Error
from l1.tokenizer import EOT, TRAIN_RUN_CHARS, Tokenizer, training_pre_tokenizer

SAMPLES = ["The king of the island 🚀 built a church.", "naïve café — 日本語のテキスト", "e\u0301 a\u0308\u0323",
           "  spaces\t\ttabs\n\n\nlines  ", f"one{EOT}two", ""]


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(make_documents(150) + ["naïve café — 日本語のテキスト 🚀🎉 Ελληνικά"] * 10, 600)


PIECES = ["🚀", "👩\u200d👩\u200d👧", "日本", "中文", "한국어", "é", "\u0301", "\u0308", " ", "   ", "\n\n", "\t",
          "\r\n", "\u00a0", EOT, "<|endoftext", "the ", "Ω", "\u200d", "\ufeff", "\U0010ffff"]


@settings(max_examples=300, deadline=None)
@given(text=st.one_of(
    st.text(),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=200),
    st.lists(st.sampled_from(PIECES), max_size=40).map("".join),
    st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=5)), max_size=20).map("".join),
))
def test_decode_encode_round_trip_is_lossless(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_document_encoding_keeps_a_literal_end_of_text_as_text(tokenizer):
    plain = [s for s in SAMPLES if EOT not in s]
    assert tokenizer.encode_documents(plain) == [tokenizer.encode(s) for s in plain]
    quoting = [f"one{EOT}two", EOT]
    ids = tokenizer.encode_documents(quoting)
    assert [tokenizer.decode(i) for i in ids] == quoting and tokenizer.eot_id not in sum(ids, [])


def test_training_sees_long_runs_without_whitespace_cut_into_bounded_words():
    rng = np.random.default_rng(0)
    huge = rng.integers(97, 107, 3_000_000, dtype=np.uint8).tobytes().decode()  # 3 MB, no whitespace
    words = training_pre_tokenizer().pre_tokenize_str("Some text " + huge + " and after")
    assert max(len(w) for w, _ in words) <= TRAIN_RUN_CHARS + 1  # + the leading space's symbol
    assert "".join(w for w, _ in words) == "".join(w for w, _ in pre_tokenizers.ByteLevel(
        add_prefix_space=False).pre_tokenize_str("Some text " + huge + " and after")), "cut, nothing lost"
    assert [w for w, _ in words[:2]] == ["Some", "Ġtext"], "ordinary words are split as before"
    trained = Tokenizer.train([huge[:300_000]] + make_documents(20), 400)
    assert trained.decode(trained.encode(huge[:300_000])) == huge[:300_000]
    assert trained.hf.pre_tokenizer.__class__.__name__ == "ByteLevel", "the saved tokenizer encodes whole words"


def test_training_reads_a_lazy_iterable_and_stops_on_a_failing_one():
    docs = make_documents(150)
    assert Tokenizer.train(iter(docs), 600).fingerprint == Tokenizer.train(docs, 600).fingerprint

    def failing():
        yield from docs[:10]
        raise L1Error("the source broke")

    with pytest.raises(L1Error, match="the source broke"):
        Tokenizer.train(failing(), 600)


def test_end_of_text_is_one_special_token(tokenizer):
    assert tokenizer.eot_id == tokenizer.hf.token_to_id(EOT)
    assert tokenizer.encode(EOT) == [tokenizer.eot_id]


def test_file_loads_in_tokenizers_and_transformers(tokenizer, tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import PreTrainedTokenizerFast

    path = tmp_path / "tokenizer.json"
    tokenizer.save(path)
    plain = HFTokenizer.from_file(str(path))
    fast = PreTrainedTokenizerFast(tokenizer_file=str(path))
    for text in SAMPLES:
        ids = tokenizer.encode(text)
        assert plain.encode(text).ids == ids
        assert fast(text)["input_ids"] == ids
        assert fast.decode(ids) == text


def test_fingerprint_identifies_the_tokenizer(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "a.json")
    loaded = Tokenizer.load(tmp_path / "a.json")
    assert loaded.fingerprint == tokenizer.fingerprint and loaded.content == tokenizer.content
    loaded.save(tmp_path / "b.json")
    assert Tokenizer.load(tmp_path / "b.json").fingerprint == tokenizer.fingerprint
    other = Tokenizer.train(make_documents(150, seed=1), 600)
    assert other.fingerprint != tokenizer.fingerprint


def test_too_small_vocab_and_bad_files_are_refused(tmp_path):
    with pytest.raises(L1Error, match="at least 257"):
        Tokenizer.train(["text"], 256)
    with pytest.raises(L1Error, match="not found"):
        Tokenizer.load(tmp_path / "missing.json")
    for name, content in [("bad.json", "{not json"), ("half.json", '{"version": "1.0", "model": '),
                          ("wrong.json", '{"version": "1.0"}')]:
        (tmp_path / name).write_text(content)
        with pytest.raises(L1Error, match="not a valid tokenizer.json") as err:
            Tokenizer.load(tmp_path / name)
        assert "\n" not in str(err.value)
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(L1Error, match="cannot read tokenizer"):
        Tokenizer.load(tmp_path / "binary.json")
