"""Sampling: KV-cache decoding equals full recomputation, batching, sliding window, logits processing,
incremental text, loading and validation."""

import dataclasses
import random

import pytest
import torch

from conftest import make_documents
from l1 import sampler
from l1.checkpoint import CheckpointError, save_file
from l1.config import ModelConfig, SamplingConfig
from l1.errors import L1Error
from l1.model import GPT
from l1.tokenizer import Tokenizer

GREEDY = SamplingConfig(temperature=0, max_tokens=20)
UNICODE = "héllo wörld — 日本語 🚀"


def save_run(run, model: GPT, tokenizer: Tokenizer, step: int = 7) -> None:
    """A run folder as the trainer leaves it: best checkpoint and tokenizer.json."""
    save_file({"model": model.state_dict(), "model_config": dataclasses.asdict(model.cfg),
               "tokenizer_fingerprint": tokenizer.fingerprint, "step": step}, run / "best_checkpoint.pt")
    tokenizer.save(run / "tokenizer.json")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lm(one_thread, tmp_path_factory):
    """A small random model with a real tokenizer, saved as a run folder and loaded back."""
    run = tmp_path_factory.mktemp("run")
    tokenizer = Tokenizer.train(make_documents(100) + [UNICODE] * 20, 400)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2, n_embd=64, block_size=32)
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():  # sharpen the random model so that greedy choices are well separated
        model.lm_head.weight.mul_(20)
    save_run(run, model, tokenizer)
    return sampler.load(str(run), device="cpu")


def reference_greedy(lm, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding by full recomputation of the window, with the sampler's policy: when the
    window is full, keep its newest half."""
    block = lm.cfg.block_size
    history, window, out = list(prompt), list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logits = lm.model(torch.tensor([window]))[0, -1]
            logits[lm.tokenizer.vocab_size:] = float("-inf")
            token = int(logits.argmax())
            out.append(token)
            history.append(token)
            window = history[-(block // 2):] if len(window) == block else window + [token]
    return out


def greedy_ids(lm, prompts: list[list[int]], n: int) -> list[list[int]]:
    """The sampler's greedy tokens, with end-of-text disabled so that all n are produced."""
    return sampler.generate_ids(lm.model, prompts, dataclasses.replace(GREEDY, max_tokens=n),
                                vocab_size=lm.tokenizer.vocab_size, eot_id=None)


def test_loads_run_folder(lm):
    assert lm.step == 7 and lm.path.name == "best_checkpoint.pt" and not lm.model.training
    assert lm.cfg.block_size == 32 and lm.device.type == "cpu"


def test_greedy_with_cache_equals_full_recomputation(lm):
    prompt = lm.tokenizer.encode("The city river was")
    assert greedy_ids(lm, [prompt], 12) == [reference_greedy(lm, prompt, 12)]


def test_prefill_once_then_one_token_per_forward(lm, monkeypatch):
    lengths = []
    forward = lm.model.forward
    monkeypatch.setattr(lm.model, "forward", lambda idx, **kw: lengths.append(idx.shape[1]) or forward(idx, **kw))
    prompt = lm.tokenizer.encode("The city river was")
    greedy_ids(lm, [prompt], 10)
    assert lengths == [len(prompt)] + [1] * 9


def test_sliding_window_runs_past_the_context_and_matches_reference(lm):
    prompt = lm.tokenizer.encode("The king of the island")
    ours = greedy_ids(lm, [prompt], 80)[0]  # 80 > block_size 32: the window slides several times
    assert len(ours) == 80
    assert ours == reference_greedy(lm, prompt, 80)


def test_prompt_filling_the_whole_context_is_accepted(lm):
    prompt = lm.tokenizer.encode(" ".join(make_documents(3)))[:lm.cfg.block_size]
    assert greedy_ids(lm, [prompt], 5) == [reference_greedy(lm, prompt, 5)]


def test_batched_left_padding_equals_one_at_a_time(lm):
    prompts = ["The", "A city of the river and the king", "Music album song"]
    batched = sampler.generate(lm, prompts, GREEDY)
    alone = [sampler.generate(lm, [p], GREEDY)[0] for p in prompts]
    assert batched == alone


def test_rows_beyond_one_batch_are_decoded_in_chunks(lm, monkeypatch):
    prompts = ["The", "A city of the river and the king", "Music album song"]
    whole = sampler.generate(lm, prompts, GREEDY)
    monkeypatch.setattr(sampler, "ROWS_PER_BATCH", 2)
    assert sampler.generate(lm, prompts, GREEDY) == whole


def test_seeded_sampling_is_reproducible(lm):
    cfg = SamplingConfig(temperature=20.0, top_k=0, max_tokens=15, seed=3)
    first = sampler.generate(lm, ["The war"], cfg)
    assert sampler.generate(lm, ["The war"], cfg) == first
    others = {tuple(sampler.generate(lm, ["The war"], dataclasses.replace(cfg, seed=s))) for s in range(4, 9)}
    assert len(others | {tuple(first)}) > 1
    samples = sampler.generate(lm, ["The war"], dataclasses.replace(cfg, num_samples=4))
    assert len(samples) == 4 and len(set(samples)) > 1


def test_end_of_text_ends_a_row(lm):
    prompt = lm.tokenizer.encode("The city")
    first = greedy_ids(lm, [prompt], 8)[0]
    cut = sampler.generate_ids(lm.model, [prompt], dataclasses.replace(GREEDY, max_tokens=8),
                               vocab_size=lm.tokenizer.vocab_size, eot_id=first[3])
    assert cut == [first[:first.index(first[3])]]


def test_stop_strings_cut_the_output(lm):
    cfg = dataclasses.replace(GREEDY, max_tokens=30)
    full = sampler.generate(lm, ["The team"], cfg)[0]
    assert len(full) > 6
    stop = full[3:6]
    assert sampler.generate(lm, ["The team"], cfg, stop=(stop,))[0] == full[:full.find(stop)]
    assert sampler.generate(lm, ["The team"], cfg, stop=("no such text", stop))[0] == full[:full.find(stop)]


def test_streamed_pieces_join_to_the_final_text(lm):
    pieces = []
    cfg = SamplingConfig(temperature=20.0, top_k=0, max_tokens=40, seed=11)
    text = sampler.generate(lm, [UNICODE], cfg, on_piece=lambda row, piece: pieces.append(piece))[0]
    assert "".join(pieces) == text
    pieces.clear()
    sampler.generate(lm, [UNICODE], cfg, on_piece=lambda row, piece: pieces.append(piece), echo=True)
    assert pieces[0] == UNICODE and "".join(pieces[1:]) == text


def test_refused_request_streams_nothing(lm):
    pieces = []
    with pytest.raises(L1Error, match="longer than the model's context"):
        sampler.generate(lm, ["fine", "river " * 100], GREEDY, on_piece=lambda row, p: pieces.append(p), echo=True)
    assert pieces == []


def stream(lm, ids: list[int], stops=()) -> list[str]:
    detok = sampler.Detokenizer(lm.token_bytes, stops)
    return [detok.add(t) for t in ids] + [detok.finish()]


def test_multibyte_characters_are_released_whole(lm):
    ids = lm.tokenizer.encode(UNICODE)
    pieces = stream(lm, ids)
    assert "".join(pieces) == UNICODE
    assert not any("\ufffd" in p for p in pieces)
    split = [lm.tokenizer.decode(ids[:i]) for i in range(len(ids))]
    assert any(s.endswith("\ufffd") for s in split)  # the text does split characters across tokens


def test_incremental_text_equals_decode_of_any_ids(lm):
    rng = random.Random(0)
    for _ in range(50):  # random ids: broken UTF-8 sequences included
        ids = [rng.randrange(lm.tokenizer.vocab_size) for _ in range(rng.randint(1, 30))]
        assert "".join(stream(lm, ids)) == lm.tokenizer.decode(ids)


def test_stop_string_across_tokens_is_never_streamed(lm):
    ids = lm.tokenizer.encode("the river and the king of the city")
    pieces = stream(lm, ids, stops=("king", "e c"))
    assert "".join(pieces) == "the river and the "
    assert not any("k" in p for p in pieces)


def test_padded_ids_are_never_produced(lm):
    logits = torch.zeros(2, lm.cfg.padded_vocab_size)
    logits[:, -1] = 100.0  # a padded row that would win
    assert lm.cfg.padded_vocab_size > lm.tokenizer.vocab_size
    for cfg in (GREEDY, SamplingConfig(temperature=1.0, top_k=0)):
        token = sampler.next_tokens(logits, None, cfg, lm.tokenizer.vocab_size, torch.Generator())
        assert (token < lm.tokenizer.vocab_size).all()
    assert (logits[:, -1] == 100.0).all()  # the caller's logits are left alone


def test_temperature_zero_is_argmax_and_top_k_one_is_too():
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    assert sampler.next_tokens(logits, None, SamplingConfig(temperature=0), 4, g).item() == 1
    picks = {sampler.next_tokens(logits, None, SamplingConfig(temperature=5, top_k=1), 4, g).item()
             for _ in range(20)}
    assert picks == {1}


def test_top_k_keeps_exactly_k():
    out = sampler.top_k_filter(torch.tensor([[0.1, 0.5, 0.3, 0.9]]), 2)
    assert torch.isfinite(out).tolist() == [[False, True, False, True]]
    assert torch.equal(sampler.top_k_filter(out, 0), out)


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.tensor([[0.05, 0.5, 0.15, 0.3]]).log()  # not sorted: the filter sorts
    assert torch.isfinite(sampler.top_p_filter(logits, 0.5)).tolist() == [[False, True, False, False]]
    assert torch.isfinite(sampler.top_p_filter(logits, 0.79)).tolist() == [[False, True, False, True]]
    assert torch.isfinite(sampler.top_p_filter(logits, 0.81)).tolist() == [[False, True, True, True]]
    assert torch.isfinite(sampler.top_p_filter(logits, 0.01)).sum() == 1  # always at least one
    assert torch.equal(sampler.top_p_filter(logits, 1.0), logits)


def test_repetition_penalty_follows_ctrl():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert sampler.repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 2.0, -2.0]]
    assert sampler.repetition_penalty(logits, seen, 1.0).tolist() == logits.tolist()


def test_repetition_penalty_steers_greedy_decoding(lm):
    prompt = lm.tokenizer.encode("The city")
    plain = greedy_ids(lm, [prompt], 30)[0]
    cfg = dataclasses.replace(GREEDY, max_tokens=30, repetition_penalty=50.0)
    penalized = sampler.generate_ids(lm.model, [prompt], cfg, vocab_size=lm.tokenizer.vocab_size, eot_id=None)[0]
    assert len(set(plain)) < len(plain)  # the plain model repeats itself
    assert len(set(penalized)) == len(penalized) and not set(penalized) & set(prompt)


def test_temperature_sharpens_and_flattens():
    logits = torch.tensor([[2.0, 1.0, 0.0]])

    def frequency_of_top(temperature):
        g = torch.Generator().manual_seed(0)
        cfg = SamplingConfig(temperature=temperature, top_k=0)
        picks = [sampler.next_tokens(logits, None, cfg, 3, g).item() for _ in range(400)]
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


def test_empty_and_too_long_prompts_and_empty_stops_are_refused(lm):
    with pytest.raises(L1Error, match="empty prompt"):
        sampler.generate(lm, ["   "], GREEDY)
    with pytest.raises(L1Error, match="longer than the model's context of 32"):
        sampler.generate(lm, ["river " * 100], GREEDY)
    with pytest.raises(L1Error, match="--stop"):
        sampler.generate(lm, ["river"], GREEDY, stop=("",))


def test_tokenizer_that_does_not_match_the_checkpoint_is_refused(lm, tmp_path):
    (tmp_path / "best_checkpoint.pt").write_bytes(lm.path.read_bytes())
    Tokenizer.train(["other words entirely"] * 50, 300).save(tmp_path / "tokenizer.json")
    with pytest.raises(L1Error, match="not the tokenizer this model was trained with"):
        sampler.load(str(tmp_path), device="cpu")


def test_weights_that_do_not_fit_the_config_are_refused(lm, tmp_path):
    model = GPT(dataclasses.replace(lm.cfg, n_layer=1))
    save_run(tmp_path, model, lm.tokenizer)
    state = torch.load(tmp_path / "best_checkpoint.pt", weights_only=True)
    state.pop("checksum")
    state["model_config"]["n_layer"] = 2
    save_file(state, tmp_path / "best_checkpoint.pt")
    with pytest.raises(CheckpointError, match="do not fit its model_config") as info:
        sampler.load(str(tmp_path), device="cpu")
    assert "\n" not in str(info.value)


def test_missing_model_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        sampler.load(str(tmp_path / "nowhere"), device="cpu")
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        sampler.load(None, device="cpu", models_root=tmp_path)
