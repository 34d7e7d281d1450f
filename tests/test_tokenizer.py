"""The byte-level BPE: lossless for any text, standard file format, stable fingerprint."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import make_documents
from l1.errors import L1Error
from l1.tokenizer import EOT, Tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(make_documents(150) + ["naïve café — 日本語のテキスト 🚀🎉 Ελληνικά"] * 10, 600)


@settings(max_examples=300, deadline=None)
@given(text=st.one_of(
    st.text(),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=200),
    st.lists(st.sampled_from(["🚀", "日本", "é", "\u0301", " ", "\n\n", "\t", EOT, "the ", "Ω", "\u200d"]),
             max_size=40).map("".join),
))
def test_decode_encode_round_trip_is_lossless(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_batch_encoding_equals_single(tokenizer):
    docs = ["The river city.", "日本語 🚀", ""]
    assert tokenizer.encode_batch(docs) == [tokenizer.encode(d) for d in docs]


def test_file_loads_in_tokenizers_and_transformers(tokenizer, tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import PreTrainedTokenizerFast

    path = tmp_path / "tokenizer.json"
    tokenizer.save(path)
    text = "The king of the island 🚀 built a church."
    assert HFTokenizer.from_file(str(path)).encode(text).ids == tokenizer.encode(text)
    fast = PreTrainedTokenizerFast(tokenizer_file=str(path))
    assert fast(text)["input_ids"] == tokenizer.encode(text)
    assert fast.decode(tokenizer.encode(text)) == text


def test_fingerprint_identifies_the_tokenizer(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "a.json")
    assert Tokenizer.load(tmp_path / "a.json").fingerprint == tokenizer.fingerprint
    other = Tokenizer.train(make_documents(150, seed=1), 600)
    assert other.fingerprint != tokenizer.fingerprint
    assert tokenizer.eot_id == tokenizer.hf.token_to_id(EOT)


def test_too_small_vocab_and_bad_files_are_refused(tmp_path):
    with pytest.raises(L1Error, match="at least 257"):
        Tokenizer.train(["text"], 100)
    with pytest.raises(L1Error, match="not found"):
        Tokenizer.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(L1Error, match="not a valid tokenizer.json"):
        Tokenizer.load(tmp_path / "bad.json")
