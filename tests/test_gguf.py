"""l1.export to GGUF, proven by llama.cpp itself (llama-cpp-python): the file's tokenizer gives L1's
token ids on real text (and on any text hypothesis draws), its logits equal L1's, greedy decoding gives L1's tokens, and the 8-bit
file stays within a stated bits-per-byte margin. Files made wrong on purpose (the query/key rows
in Hugging Face's order, another pre-tokenizer's name) fail the same checks.

Tolerances, measured on this fixture (2 layers x 128, logits up to ~8, 3 bits per byte): f32
weights agree with L1's fp32 logits to 1.0e-5 (allowed: 1e-4), f16 weights to 4.5e-3 (allowed:
2e-2); bf16 and q8_0 may lose 0.01 bits per byte against f32 (measured: 1.1e-4 and 0.9e-4; their
logits differ by up to 0.03 and 0.08). llama.cpp runs with a float32 KV cache, so that the
comparison is of the file and not of a cache's rounding.
"""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import llama_cpp
from conftest import SHARED_SAMPLE, make_documents, train_briefly
from l1 import chat, checkpoint, export
from l1 import gguf as gguf_file
from l1.config import ModelConfig
from l1.errors import L1Error
from l1.model import GPT
from l1.tokenizer import EOT, Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

TOLERANCE = {"f32": 1e-4, "f16": 2e-2}  # max |logit difference| against L1's fp32 model
BPB_MARGIN = 0.01  # bits per byte that bf16 and q8_0 may lose against f32
GREEDY_TOKENS = 32
WINDOW = 128  # tokens per logits comparison (the model's whole context)
# Text that probes the split rules: contractions, digit runs, whitespace runs, punctuation, bytes
# of every UTF-8 length, and the end-of-text token written out.
TRICKY = ["Hello world, 123456 numbers and ünïcödé text.\nNew   lines  too.\t\ttabs  ",
          f"two{EOT}documents", "🙂 emoji's I'm we'll they'd THEY'LL", "  leading spaces\n\n\n  and trailing   ",
          "a\u00a0non-breaking space, 3.14159, $1,000,000 and 50%!", "日本語のテキスト и кириллица", ""]


def corpus() -> tuple[list[str], list[str]]:
    """Training and held-out documents: the shared Wikipedia sample beside the checkout where it
    is (real text), else the synthetic English-like documents of the other tests."""
    if SHARED_SAMPLE.is_dir():
        import pyarrow.parquet as pq

        def read(shard: str, n: int) -> list[str]:
            table = pq.read_table(SHARED_SAMPLE / shard, columns=["text"])
            return table.slice(0, n).column("text").to_pylist()

        return read("train-00000-of-00003.parquet", 300), read("train-00001-of-00003.parquet", 60)
    docs = make_documents(400, seed=3)
    return docs[:300], docs[300:]


def save_run(folder, model: GPT, tok: Tokenizer):
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint.save_file({"model": model.state_dict(), "model_config": dataclasses.asdict(model.cfg),
                          "tokenizer_fingerprint": tok.fingerprint, "step": 300, "epoch": 0, "tokens_seen": 0,
                          "best_val_loss": 0.5, "train_config": {}}, folder / checkpoint.BEST)
    tok.save(folder / "tokenizer.json")
    return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder holding a model trained briefly on real text, its vocabulary padded (1000 -> 1024)."""
    train_docs, held_out = corpus()
    tok = Tokenizer.train(train_docs, 1000)
    cfg = ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_embd=128, block_size=WINDOW)
    assert cfg.padded_vocab_size > tok.vocab_size  # the padded rows must be left out
    torch.manual_seed(0)
    model = GPT(cfg)
    ids = [i for doc in train_docs for i in tok.encode(doc) + [tok.eot_id]]
    train_briefly(model, ids, steps=200, seq_len=64)
    return save_run(tmp_path_factory.mktemp("run") / "run", model, tok), model, tok, held_out


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    """The run exported through the command line at every --outtype, each in its own folder."""
    out = {}
    for outtype in gguf_file.OUTTYPES:
        path = tmp_path_factory.mktemp(outtype) / f"tiny-{outtype}.gguf"
        assert export.main([str(run[0]), str(path), "--outtype", outtype]) == 0
        out[outtype] = path
    return out


def load(path, vocab_only: bool = False) -> llama_cpp.Llama:
    return llama_cpp.Llama(str(path), n_ctx=WINDOW, n_batch=WINDOW, logits_all=True, vocab_only=vocab_only,
                           n_threads=1, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32,
                           flash_attn=False, verbose=False)


@pytest.fixture
def llama(request):
    """llama.cpp over a GGUF file: opened by the test, closed after it (not at interpreter exit)."""
    opened = []

    def open_(path, vocab_only=False):
        opened.append(load(path, vocab_only))
        return opened[-1]

    yield open_
    for llm in opened:
        llm.close()


def windows(tok: Tokenizer, held_out: list[str], n: int) -> list[list[int]]:
    """n windows of WINDOW tokens of held-out text (the end-of-text token between documents)."""
    ids = [i for doc in held_out for i in tok.encode(doc) + [tok.eot_id]]
    assert len(ids) >= n * WINDOW
    return [ids[k * WINDOW:(k + 1) * WINDOW] for k in range(n)]


def llama_logits(llm: llama_cpp.Llama, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)])


def l1_logits(model: GPT, ids: list[int], vocab_size: int) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0, :, :vocab_size].numpy()


def check_token_ids(llm: llama_cpp.Llama, tok: Tokenizer, texts: list[str]) -> None:
    """llama.cpp's tokenizer gives L1's ids for every text, and its pieces give the text back."""
    for text in texts:
        ids = tok.encode(text)
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids, text[:200]
        assert llm.detokenize(ids, special=True) == text.encode()


def check_logits(llm: llama_cpp.Llama, model: GPT, tok: Tokenizer, ids: list[int], tolerance: float) -> None:
    theirs, ours = llama_logits(llm, ids), l1_logits(model, ids, tok.vocab_size)
    assert theirs.shape == ours.shape
    gap = np.abs(theirs - ours).max()
    assert gap <= tolerance, f"logits differ by up to {gap:.3g} (allowed {tolerance:g})"


def bits_per_byte(logits: np.ndarray, ids: list[int], tok: Tokenizer) -> float:
    """Bits per byte of the text of ids[1:] under logits (the prediction of each next token)."""
    logp = torch.from_numpy(logits[:-1]).double().log_softmax(-1)
    nll = -logp.gather(1, torch.tensor(ids[1:])[:, None]).sum().item()
    return nll / math.log(2) / len(tok.decode(ids[1:]).encode())


def test_file_holds_the_model_the_tokenizer_and_a_modelfile(run, exported):
    from gguf import GGUFReader

    _, model, tok, _ = run
    for outtype, path in exported.items():
        reader = GGUFReader(path)
        field = lambda key: reader.fields[key].contents()  # noqa: E731
        assert field("general.architecture") == "llama" and field("tokenizer.ggml.pre") == "gpt-2"
        assert field("llama.vocab_size") == tok.vocab_size and field("llama.context_length") == WINDOW
        assert field("tokenizer.ggml.tokens") == [tok.hf.id_to_token(i) for i in range(tok.vocab_size)]
        assert field("tokenizer.ggml.eos_token_id") == field("tokenizer.ggml.bos_token_id") == tok.eot_id
        assert field("tokenizer.ggml.add_bos_token") is False  # L1 adds nothing to a prompt
        tensors = {t.name: t for t in reader.tensors}
        assert "output.weight" not in tensors  # the tied embedding is stored once
        assert list(tensors["token_embd.weight"].shape) == [128, tok.vocab_size]  # the padded rows are gone
        assert tensors["blk.0.attn_q.weight"].tensor_type.name == {"f32": "F32", "f16": "F16", "bf16": "BF16",
                                                                    "q8_0": "Q8_0"}[outtype]
        assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
        modelfile = (path.parent / "Modelfile").read_text()
        assert f"FROM ./{path.name}\n" in modelfile and "PARAMETER temperature 0.8\n" in modelfile
        assert "PARAMETER top_k 50\n" in modelfile and f"PARAMETER num_ctx {WINDOW}\n" in modelfile
        assert 'TEMPLATE """{{ .Prompt }}"""' in modelfile  # a base model continues the text as it is
        assert not list(path.parent.glob(".*"))  # no staging debris


def test_token_ids_equal_l1_on_real_text(run, exported, llama):
    _, _, tok, held_out = run
    check_token_ids(llama(exported["f16"], vocab_only=True), tok, TRICKY + held_out)


@pytest.fixture(scope="module")
def vocabulary(exported):
    """llama.cpp's tokenizer of the f16 file, for the property test (hypothesis wants no per-test fixture)."""
    llm = load(exported["f16"], vocab_only=True)
    yield llm
    llm.close()


# Characters where split rules differ between implementations: every kind of Unicode space and
# line break, contraction letters in both cases, digits and other numbers, a combining mark, emoji.
SPLIT_PROBES = list(" \t\n\r\x0b\x0c\x1c\x85\xa0\u1680\u2000\u2028\u3000\u200b\ufeff'sdtlmvreSDTLMVRE0123"
                    "aZ\u00e9\u0301\u00b2\u2167.,!\U0001f642") + [EOT]


@settings(max_examples=300, deadline=None)
@given(text=st.one_of(st.text(max_size=60), st.lists(st.sampled_from(SPLIT_PROBES), max_size=30).map("".join)))
def test_token_ids_equal_l1_on_any_text(run, vocabulary, text):
    assert vocabulary.tokenize(text.encode(), add_bos=False, special=True) == run[2].encode(text)


@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_logits_equal_l1(run, exported, llama, outtype):
    _, model, tok, held_out = run
    llm = llama(exported[outtype])
    assert llm.n_vocab() == tok.vocab_size
    for ids in windows(tok, held_out, 3):
        check_logits(llm, model, tok, ids, TOLERANCE[outtype])


def test_greedy_continuation_is_l1s(run, exported, llama):
    _, model, tok, held_out = run
    prompt = windows(tok, held_out, 1)[0][:WINDOW - GREEDY_TOKENS]
    ours = prompt[:]
    with torch.no_grad():
        for _ in range(GREEDY_TOKENS):
            top2 = model(torch.tensor([ours]))[0, -1, :tok.vocab_size].topk(2)
            assert top2.values[0] - top2.values[1] > 1e-3  # no near-tie that float rounding could flip
            ours.append(int(top2.indices[0]))
    llm = llama(exported["f32"])
    theirs = []
    for token in llm.generate(prompt, top_k=1, temp=0.0, reset=True):  # llama.cpp's own greedy sampler
        theirs.append(token)
        if len(theirs) == GREEDY_TOKENS:
            break
    assert theirs == ours[len(prompt):]


def test_bits_per_byte_of_bf16_and_q8_0_stay_near_f32(run, exported, llama):
    _, model, tok, held_out = run
    texts = windows(tok, held_out, 3)
    bpb = {}
    for outtype in ("f32", "bf16", "q8_0"):
        llm = llama(exported[outtype])
        bpb[outtype] = np.mean([bits_per_byte(llama_logits(llm, ids), ids, tok) for ids in texts])
    l1 = np.mean([bits_per_byte(l1_logits(model, ids, tok.vocab_size), ids, tok) for ids in texts])
    assert abs(bpb["f32"] - l1) < 1e-4, (bpb, l1)
    assert bpb["f32"] < 8 * 0.75  # the model did learn: well below a uniform byte's 8 bits
    for outtype in ("bf16", "q8_0"):
        assert abs(bpb[outtype] - bpb["f32"]) < BPB_MARGIN, bpb


def test_query_key_rows_in_hugging_faces_order_fail_the_logits_check(run, llama, tmp_path):
    folder, model, tok, held_out = run
    wrong = export.export_gguf(str(folder), str(tmp_path / "wrong.gguf"), outtype="f32", _interleave_rope=False)
    with pytest.raises(AssertionError, match="logits differ"):
        check_logits(llama(wrong), model, tok, windows(tok, held_out, 1)[0], TOLERANCE["f32"])


def test_another_pre_tokenizer_name_fails_the_token_check(run, llama, tmp_path):
    folder, _, tok, held_out = run
    wrong = export.export_gguf(str(folder), str(tmp_path / "wrong.gguf"), outtype="f32", _pre_tokenizer="llama3")
    with pytest.raises(AssertionError):
        check_token_ids(llama(wrong, vocab_only=True), tok, TRICKY + held_out)


def test_qk_norm_and_untied_head_export_as_qwen3_that_llama_cpp_runs_like_l1(run, llama, tmp_path):
    from gguf import GGUFReader

    _, trained, tok, held_out = run
    cfg = dataclasses.replace(trained.cfg, qk_norm=True, tie_embeddings=False)
    torch.manual_seed(1)
    model = GPT(cfg).eval()
    with torch.no_grad():  # the trained weights, a head of its own, per-head norms far from identity
        model.load_state_dict({**trained.state_dict(), "lm_head.weight": trained.embed.weight * 0.5 + 0.01},
                              strict=False)
        for block in model.blocks:
            for norm in (block.attn.q_norm, block.attn.k_norm):
                norm.weight.copy_(torch.rand(cfg.head_dim) * 2)
    folder = save_run(tmp_path / "qk", model, tok)
    path = export.export_gguf(str(folder), str(tmp_path / "qk.gguf"), outtype="f32")
    reader = GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == "qwen3"
    assert {"output.weight", "blk.0.attn_q_norm.weight", "blk.1.attn_k_norm.weight"} <= {t.name for t in reader.tensors}
    llm = llama(path)
    for ids in windows(tok, held_out, 2):
        check_logits(llm, model, tok, ids, TOLERANCE["f32"])


def _one_line_error(capsys, argv) -> str:
    assert export.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


def test_refusals_are_one_line_and_write_nothing(run, exported, tmp_path, capsys):
    folder = run[0]
    existing = exported["f16"]
    before = existing.read_bytes()
    assert "--force" in _one_line_error(capsys, [folder, existing])
    assert existing.read_bytes() == before
    (tmp_path / "dir.gguf").mkdir()
    assert "is a folder" in _one_line_error(capsys, [folder, tmp_path / "dir.gguf"])
    checkpoint_file = tmp_path / "precious.pt"  # --force replaces a GGUF, never another file
    checkpoint_file.write_bytes(b"weights")
    assert "not a GGUF" in _one_line_error(capsys, [folder, checkpoint_file, "--format", "gguf", "--force"])
    assert checkpoint_file.read_bytes() == b"weights"
    assert "--outtype applies to GGUF" in _one_line_error(capsys, [folder, tmp_path / "hf", "--outtype", "q8_0"])
    assert "name of the Ollama file" in _one_line_error(capsys, [folder, tmp_path / "Modelfile", "--format", "gguf"])
    unfit = tmp_path / "unfit"  # a model neither llama.cpp architecture written here can hold
    state = checkpoint.load_file(folder / checkpoint.BEST)
    cfg = ModelConfig(**{**state["model_config"], "mlp": "relu2"})
    save_run(unfit, GPT(cfg), run[2])
    assert "--mlp relu2" in _one_line_error(capsys, [unfit, tmp_path / "unfit.gguf"])
    assert not (tmp_path / "unfit.gguf").exists() and not (tmp_path / "Modelfile").exists()
    assert not list(tmp_path.glob(".*"))
    # --force replaces the file and its Modelfile; a checkpoint file is a source as good as its run folder
    assert export.main([str(folder / checkpoint.BEST), str(existing), "--force"]) == 0
    assert existing.read_bytes() == before


@pytest.mark.parametrize("change", [{"normalizer": {"type": "NFC"}},
                                    {"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": True, "use_regex": True}},
                                    {"pre_tokenizer": {"type": "Metaspace"}}, {"model": {"type": "BPE", "ignore_merges": True}}])
def test_a_tokenizer_no_llama_cpp_pre_tokenizer_matches_is_refused(run, change):
    content = json.loads(run[2].content)
    assert gguf_file.llama_cpp_pre_tokenizer(content) == "gpt-2"
    for key, value in change.items():
        content[key] = {**(content[key] or {}), **value}
    with pytest.raises(L1Error, match="no GGUF was written") as err:
        gguf_file.llama_cpp_pre_tokenizer(content)
    assert "\n" not in str(err.value)


def test_a_chat_template_in_the_tokenizer_files_reaches_the_gguf(run, llama, tmp_path, monkeypatch):
    """The GGUF reads its special tokens and chat template from the tokenizer files the HF export
    writes: a template there (as a chat run's) is the file's tokenizer.chat_template, which
    llama.cpp reads, and the Modelfile carries l1/chat.py's template in Ollama's Go form."""
    template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
    write_tokenizer = export._write_tokenizer

    def with_template(folder, *args):
        write_tokenizer(folder, *args)
        config = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))

    monkeypatch.setattr(export, "_write_tokenizer", with_template)
    path = export.export_gguf(str(run[0]), str(tmp_path / "chat.gguf"), outtype="q8_0")
    assert llama(path, vocab_only=True).metadata["tokenizer.chat_template"] == template
    modelfile = (tmp_path / "Modelfile").read_text()  # the template in Ollama's language, and its stop
    assert f'TEMPLATE """{chat.OLLAMA_TEMPLATE}"""' in modelfile and 'PARAMETER stop "<|end|>"' in modelfile
    assert "{{ .Prompt }}" not in modelfile
