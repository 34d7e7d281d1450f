"""l1.export: a run becomes a Hugging Face folder that transformers loads and runs exactly like L1."""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO, train_briefly
from l1 import checkpoint, export
from l1.config import ModelConfig
from l1.model import GPT
from l1.tokenizer import EOT, Tokenizer

SENTENCE = "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat. "
PROMPT = "The quick brown"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder holding a briefly trained model whose padded vocabulary rows would win argmax."""
    folder = tmp_path_factory.mktemp("run")
    tok = Tokenizer.train([SENTENCE * 5, "Hello world, 123 numbers and ünïcödé text.\nNew lines too."], 300)
    cfg = ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=64, block_size=64)
    torch.manual_seed(0)
    model = GPT(cfg)
    train_briefly(model, tok.encode(SENTENCE * 40))  # so greedy decoding has a clear answer
    with torch.no_grad():
        # Make the padded rows dominate L1's raw logits: the export must still never emit them.
        hidden = model.norm(model.embed(torch.tensor([tok.encode(PROMPT)])))[0, -1]
        model.embed.weight[tok.vocab_size:] = 50 * hidden / hidden.norm()
    checkpoint.save_file({"model": model.state_dict(), "model_config": dataclasses.asdict(cfg),
                          "tokenizer_fingerprint": tok.fingerprint, "step": 150, "epoch": 0,
                          "tokens_seen": 150 * 8 * 32, "best_val_loss": 0.5, "train_config": {}},
                         folder / checkpoint.BEST)
    tok.save(folder / "tokenizer.json")
    return folder, model, tok


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = run[0]
    out = export.export(str(folder), str(tmp_path_factory.mktemp("hf") / "out"))
    hf_model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    hf_tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    return out, hf_model, hf_tok


def l1_greedy(model: GPT, ids: list[int], vocab_size: int, new_tokens: int) -> list[int]:
    """L1's own greedy decoding: the most likely real token (never a padded id), one at a time."""
    idx = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(new_tokens):
            nxt = model(idx)[:, -1, :vocab_size].argmax(-1, keepdim=True)
            idx = torch.cat([idx, nxt], dim=1)
    return idx[0, len(ids):].tolist()


def test_folder_holds_a_tied_unpadded_llama(run, exported):
    from safetensors import safe_open

    _, _, tok = run
    out = exported[0]
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json"} <= {p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True
    assert config["vocab_size"] == tok.vocab_size  # the padded rows are gone
    assert config["bos_token_id"] == config["eos_token_id"] == config["pad_token_id"] == tok.eot_id
    assert config["torch_dtype"] == "float32" and config["rope_theta"] == 10000.0
    with safe_open(out / "model.safetensors", "pt") as f:
        names = set(f.keys())
        assert f.get_tensor("model.embed_tokens.weight").shape == (tok.vocab_size, 64)
    assert "lm_head.weight" not in names  # the tied embedding is stored once
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tok.eot_id and generation["max_length"] == 64


def test_logits_match_l1(run, exported):
    _, model, tok = run
    hf_model = exported[1]
    assert hf_model.lm_head.weight.data_ptr() == hf_model.model.embed_tokens.weight.data_ptr()
    idx = torch.randint(0, tok.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(idx)
        theirs = hf_model(idx).logits
    assert theirs.shape == (2, 48, tok.vocab_size)
    torch.testing.assert_close(theirs, ours[..., :tok.vocab_size], rtol=1e-5, atol=1e-5)


def test_greedy_generation_matches_l1_and_never_picks_padding(run, exported):
    _, model, tok = run
    hf_model, hf_tok = exported[1], exported[2]
    prompt = tok.encode(PROMPT)
    with torch.no_grad():
        assert model(torch.tensor([prompt]))[0, -1].argmax() >= tok.vocab_size  # the trap is armed
    expected = l1_greedy(model, prompt, tok.vocab_size, 20)
    inputs = hf_tok(PROMPT, return_tensors="pt")
    with torch.no_grad():
        generated = hf_model.generate(**inputs, do_sample=False, max_new_tokens=20)
    assert generated[0, :len(prompt)].tolist() == prompt
    assert generated[0, len(prompt):].tolist() == expected
    assert tok.decode(expected).startswith(" fox jumps over the lazy dog")  # it did learn the sentence


@pytest.mark.parametrize("text", [SENTENCE, "Hello world, 123 numbers", "ünïcödé \n\n  spaces\ttabs",
                                  f"two{EOT}documents", "", "🙂 emoji bytes"])
def test_tokenizer_encodes_and_decodes_identically(run, exported, text):
    tok, hf_tok = run[2], exported[2]
    ids = tok.encode(text)
    assert hf_tok(text).input_ids == ids
    assert hf_tok.decode(ids) == tok.decode(ids) == text
    assert hf_tok.eos_token == hf_tok.bos_token == hf_tok.pad_token == EOT and hf_tok.padding_side == "left"


def test_checkpoint_file_source_and_force(run, tmp_path):
    folder = run[0]
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert export.main([str(folder / checkpoint.BEST), str(out)]) == 2
    assert export.main([str(folder / checkpoint.BEST), str(out), "--force"]) == 0
    assert (out / "model.safetensors").is_file() and (out / "notes.txt").read_text() == "keep me"
    assert not list(tmp_path.glob(".out.export-*"))  # no staging folder left behind


def _one_line_error(capsys, argv) -> str:
    assert export.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


def test_bad_inputs_are_one_line_errors(run, tmp_path, capsys):
    folder = run[0]
    assert "does not exist" in _one_line_error(capsys, [tmp_path / "missing", tmp_path / "o1"])
    (tmp_path / "empty").mkdir()
    assert "no checkpoint" in _one_line_error(capsys, [tmp_path / "empty", tmp_path / "o2"])
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    data = bytearray((folder / checkpoint.BEST).read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = bytes(64)
    (corrupt / checkpoint.BEST).write_bytes(bytes(data))
    assert "corrupt" in _one_line_error(capsys, [corrupt, tmp_path / "o3"])
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    assert "--force" in _one_line_error(capsys, [folder, busy])
    assert "run folder itself" in _one_line_error(capsys, [folder, folder, "--force"])
    other = tmp_path / "other"
    other.mkdir()
    (other / checkpoint.BEST).write_bytes((folder / checkpoint.BEST).read_bytes())
    Tokenizer.train(["a different corpus entirely"], 260).save(other / "tokenizer.json")
    assert "not the tokenizer" in _one_line_error(capsys, [other, tmp_path / "o4"])
    state = checkpoint.load_file(folder / checkpoint.BEST)
    for i, (knob, flag) in enumerate([({"mlp": "relu2"}, "--mlp relu2"), ({"logit_softcap": 30.0}, "--logit_softcap 30")]):
        unfit = tmp_path / f"unfit{i}"  # a model neither the Llama nor the Qwen3 format can hold
        unfit.mkdir()
        cfg = ModelConfig(**{**state["model_config"], **knob})
        checkpoint.save_file({**state, "model": GPT(cfg).state_dict(), "model_config": dataclasses.asdict(cfg)},
                             unfit / checkpoint.BEST)
        (unfit / "tokenizer.json").write_bytes((folder / "tokenizer.json").read_bytes())
        err = _one_line_error(capsys, [unfit, tmp_path / f"o5-{i}"])
        assert flag in err and "neither the Llama nor the Qwen3 format can hold" in err
        assert not (tmp_path / f"o5-{i}").exists()


def _variant(folder, model: GPT, dest):
    """A run folder at dest holding model, with folder's checkpoint fields and tokenizer."""
    dest.mkdir()
    state = checkpoint.load_file(folder / checkpoint.BEST)
    checkpoint.save_file({**state, "model": model.state_dict(), "model_config": dataclasses.asdict(model.cfg)},
                         dest / checkpoint.BEST)
    (dest / "tokenizer.json").write_bytes((folder / "tokenizer.json").read_bytes())
    return dest


def test_untied_head_is_exported_as_lm_head_and_matches_l1(run, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    folder, tied, tok = run
    cfg = dataclasses.replace(tied.cfg, tie_embeddings=False)
    torch.manual_seed(1)
    model = GPT(cfg).eval()
    with torch.no_grad():  # the trained weights, and a head that differs from the embedding
        model.load_state_dict({**tied.state_dict(), "lm_head.weight": tied.embed.weight * 0.5 + 0.01})
        model.lm_head.weight[tok.vocab_size:] = 1e3  # padded rows that would win if exported
    out = export.export(str(_variant(folder, model, tmp_path / "untied")), str(tmp_path / "hf"))
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.get_tensor("lm_head.weight").shape == f.get_tensor("model.embed_tokens.weight").shape \
            == (tok.vocab_size, 64)
    hf_model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert hf_model.lm_head.weight.data_ptr() != hf_model.model.embed_tokens.weight.data_ptr()
    idx = torch.randint(0, tok.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf_model(idx).logits, model(idx)[..., :tok.vocab_size], rtol=1e-5, atol=1e-5)


def test_qk_norm_model_is_exported_as_qwen3_and_matches_l1(run, tmp_path):
    from transformers import AutoModelForCausalLM

    folder, trained, tok = run
    cfg = dataclasses.replace(trained.cfg, qk_norm=True)
    torch.manual_seed(2)
    model = GPT(cfg).eval()
    with torch.no_grad():  # the trained weights, and per-head norms far from identity
        model.load_state_dict(trained.state_dict(), strict=False)
        for block in model.blocks:
            for norm in (block.attn.q_norm, block.attn.k_norm):
                norm.weight.copy_(torch.rand(cfg.head_dim) * 2)
    out = export.export(str(_variant(folder, model, tmp_path / "qk")), str(tmp_path / "hf"))
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["head_dim"] == cfg.head_dim
    hf_model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert type(hf_model).__name__ == "Qwen3ForCausalLM"
    idx = torch.randint(0, tok.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf_model(idx).logits, model(idx)[..., :tok.vocab_size], rtol=1e-5, atol=1e-5)


def test_command_line_exit_status(tmp_path):
    result = subprocess.run([sys.executable, "-m", "l1.export", str(tmp_path / "nope"), str(tmp_path / "out")],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "does not exist" in result.stderr
