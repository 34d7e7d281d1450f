"""Sampling: KV-cache decoding equals full recomputation, batching, sliding window, logits processing."""

import dataclasses

import pytest
import torch

from conftest import make_documents
from l1 import sampler
from l1.checkpoint import save_file
from l1.config import ModelConfig, SamplingConfig
from l1.errors import L1Error
from l1.model import GPT
from l1.tokenizer import Tokenizer

GREEDY = SamplingConfig(temperature=0, max_tokens=20)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A small random model with a real tokenizer, saved as a run folder and loaded back."""
    run = tmp_path_factory.mktemp("run")
    tokenizer = Tokenizer.train(make_documents(100) + ["héllo wörld — 日本語 🚀"] * 20, 400)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2, n_embd=64, block_size=32)
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():  # sharpen the random model so that greedy choices are well separated
        model.lm_head.weight.mul_(20)
    save_file({"model": model.state_dict(), "model_config": dataclasses.asdict(cfg),
               "tokenizer_fingerprint": tokenizer.fingerprint, "step": 7}, run / "best_checkpoint.pt")
    tokenizer.save(run / "tokenizer.json")
    return sampler.load(str(run), device="cpu")


def reference_greedy(lm, prompt: str, n: int) -> list[int]:
    """Greedy decoding by full recomputation, with the sampler's window policy (keep the newest half)."""
    block = lm.model.cfg.block_size
    ctx = lm.tokenizer.encode(prompt)
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = lm.model(torch.tensor([ctx]))[0, -1]
            logits[lm.tokenizer.vocab_size:] = float("-inf")
            token = int(logits.argmax())
            out.append(token)
            history = lm.tokenizer.encode(prompt) + out
            ctx = history[-(block // 2):] if len(ctx) == block else ctx + [token]
    return out


def ids_of(lm, text: str) -> list[int]:
    return lm.tokenizer.encode(text)


def test_loads_run_folder(lm):
    assert lm.step == 7 and lm.path.name == "best_checkpoint.pt" and not lm.model.training


def greedy_tokens(lm, prompt: str, n: int, monkeypatch) -> list[int]:
    """The tokens the sampler picks greedily, with end-of-text disabled so that all n are produced."""
    monkeypatch.setattr(lm.tokenizer, "eot_id", -1)
    captured = []
    original = sampler.next_tokens
    monkeypatch.setattr(sampler, "next_tokens", lambda *a, **k: captured.append(original(*a, **k)) or captured[-1])
    sampler.generate(lm, [prompt], dataclasses.replace(GREEDY, max_tokens=n))
    monkeypatch.undo()
    return [int(t) for t in torch.cat(captured)]


def test_greedy_with_cache_equals_full_recomputation(lm, monkeypatch):
    prompt = "The city river was"
    assert greedy_tokens(lm, prompt, 12, monkeypatch) == reference_greedy(lm, prompt, 12)


def test_sliding_window_runs_past_the_context_and_matches_reference(lm, monkeypatch):
    prompt = "The king of the island"
    ours = greedy_tokens(lm, prompt, 80, monkeypatch)  # 80 > block_size 32: the window slides several times
    assert len(ours) == 80
    assert ours == reference_greedy(lm, prompt, 80)


def test_seeded_sampling_is_reproducible(lm):
    cfg = SamplingConfig(temperature=20.0, top_k=0, max_tokens=15, seed=3)
    first = sampler.generate(lm, ["The war"], cfg)
    assert sampler.generate(lm, ["The war"], cfg) == first
    others = {tuple(sampler.generate(lm, ["The war"], dataclasses.replace(cfg, seed=s))) for s in range(4, 9)}
    assert len(others | {tuple(first)}) > 1
    samples = sampler.generate(lm, ["The war"], dataclasses.replace(cfg, num_samples=4))
    assert len(samples) == 4 and len(set(samples)) > 1


def test_batched_left_padding_equals_one_at_a_time(lm):
    prompts = ["The", "A city of the river and the king", "Music album song"]
    batched = sampler.generate(lm, prompts, GREEDY)
    alone = [sampler.generate(lm, [p], GREEDY)[0] for p in prompts]
    assert batched == alone


def test_stop_strings_cut_the_output(lm):
    full = sampler.generate(lm, ["The team"], dataclasses.replace(GREEDY, max_tokens=30))[0]
    assert len(full) > 6
    stop = full[3:6]
    cut = sampler.generate(lm, ["The team"], dataclasses.replace(GREEDY, max_tokens=30), stop=(stop,))[0]
    assert cut == full[:full.find(stop)]


def test_streamed_pieces_join_to_the_final_text(lm):
    pieces = []
    cfg = SamplingConfig(temperature=20.0, top_k=0, max_tokens=40, seed=11)
    text = sampler.generate(lm, ["héllo"], cfg, on_piece=lambda row, piece: pieces.append(piece))[0]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces) or "\ufffd" in text


def test_padded_ids_are_never_produced(lm):
    logits = torch.zeros(2, lm.model.cfg.padded_vocab_size)
    logits[:, -1] = 100.0  # a padded row that would win
    seen = torch.zeros_like(logits, dtype=torch.bool)
    token = sampler.next_tokens(logits, seen, GREEDY, lm.tokenizer.vocab_size, torch.Generator())
    assert (token < lm.tokenizer.vocab_size).all()


def test_temperature_zero_is_argmax_and_top_k_one_is_too():
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0]])
    seen = torch.zeros_like(logits, dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    assert sampler.next_tokens(logits.clone(), seen, SamplingConfig(temperature=0), 4, g).item() == 1
    picks = {sampler.next_tokens(logits.clone(), seen, SamplingConfig(temperature=5, top_k=1), 4, g).item()
             for _ in range(20)}
    assert picks == {1}


def test_top_k_keeps_exactly_k():
    out = sampler.top_k_filter(torch.tensor([[0.1, 0.5, 0.3, 0.9]]), 2)
    assert torch.isfinite(out).tolist() == [[False, True, False, True]]


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    assert torch.isfinite(sampler.top_p_filter(logits, 0.5)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(sampler.top_p_filter(logits, 0.8)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(sampler.top_p_filter(logits, 0.81)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(sampler.top_p_filter(logits, 0.01)).sum() == 1  # always at least one


def test_repetition_penalty_follows_ctrl():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = sampler.repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 2.0, -2.0]]


def test_temperature_sharpens_and_flattens():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    seen = torch.zeros_like(logits, dtype=torch.bool)

    def frequency_of_top(temperature):
        g = torch.Generator().manual_seed(0)
        cfg = SamplingConfig(temperature=temperature, top_k=0)
        picks = [sampler.next_tokens(logits.clone(), seen, cfg, 3, g).item() for _ in range(400)]
        return picks.count(0) / len(picks)

    assert frequency_of_top(0.2) > frequency_of_top(1.0) > frequency_of_top(5.0)


@pytest.mark.parametrize("values, message", [
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 10**7}, "max_tokens"),
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"), ({"repetition_penalty": 0}, "repetition_penalty"), ({"num_samples": 0}, "num_samples"),
])
def test_bad_sampling_values_are_refused(values, message):
    with pytest.raises(L1Error, match=message):
        SamplingConfig(**values)


def test_empty_and_too_long_prompts_are_refused(lm):
    with pytest.raises(L1Error, match="empty prompt"):
        sampler.generate(lm, ["   "], GREEDY)
    with pytest.raises(L1Error, match="context is 32"):
        sampler.generate(lm, ["river " * 100], GREEDY)


def test_tokenizer_that_does_not_match_the_checkpoint_is_refused(lm, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "best_checkpoint.pt").write_bytes(lm.path.read_bytes())
    Tokenizer.train(["other words entirely"] * 50, 300).save(run / "tokenizer.json")
    with pytest.raises(L1Error, match="not the tokenizer this model was trained with"):
        sampler.load(str(run), device="cpu")
