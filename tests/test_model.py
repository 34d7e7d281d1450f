"""The GPT against its references (transformers' Llama, and Qwen3 for --qk_norm) and its own invariants."""

import dataclasses
import itertools

import pytest
import torch
import torch.nn.functional as F

from l1.config import ModelConfig, resolve
from l1.errors import L1Error
from l1.hf import to_hf, to_llama
from l1 import runtime
from l1.model import GPT, KVCache, ReLU2, _RMSNormFunction

SMALL = ModelConfig(vocab_size=300, n_layer=2, n_head=4, n_embd=64, block_size=64)


def small_model(seed=0, cfg=SMALL):
    torch.manual_seed(seed)
    return GPT(cfg).eval()


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_logits_match_llama_for_causal_lm(tie):
    cfg = dataclasses.replace(SMALL, tie_embeddings=tie)
    model = small_model(cfg=cfg)
    with torch.no_grad():  # random init is too gentle a test: make every weight matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    llama = to_llama(model)
    assert (llama.lm_head.weight.data_ptr() == llama.model.embed_tokens.weight.data_ptr()) == tie
    idx = torch.randint(0, SMALL.vocab_size, (3, 40))
    with torch.no_grad():
        ours = model(idx)
        theirs = llama(idx).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_qk_norm_logits_match_qwen3_for_causal_lm(tie):
    cfg = dataclasses.replace(SMALL, qk_norm=True, tie_embeddings=tie)
    model = small_model(cfg=cfg)
    with torch.no_grad():  # the norms' weights too, so a missing or misplaced one shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    qwen3 = to_hf(model)
    assert type(qwen3).__name__ == "Qwen3ForCausalLM"
    idx = torch.randint(0, SMALL.vocab_size, (3, 40))
    with torch.no_grad():
        ours = model(idx)
        theirs = qwen3(idx).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("knob, flag", [({"qk_norm": True}, "--qk_norm"), ({"mlp": "relu2"}, "--mlp relu2"),
                                        ({"logit_softcap": 15.0}, "--logit_softcap 15")])
def test_llama_refuses_what_it_cannot_hold_in_one_line(knob, flag):
    with pytest.raises(L1Error, match=flag) as err:
        to_llama(small_model(cfg=dataclasses.replace(SMALL, **knob)))
    assert "\n" not in str(err.value) and "Llama format cannot hold" in str(err.value)


@pytest.mark.parametrize("knob, flag", [({"mlp": "relu2"}, "--mlp relu2"), ({"logit_softcap": 15.0}, "--logit_softcap 15")])
def test_neither_llama_nor_qwen3_holds_the_other_knobs(knob, flag):
    with pytest.raises(L1Error, match=flag) as err:
        to_hf(small_model(cfg=dataclasses.replace(SMALL, qk_norm=True, **knob)))
    assert "\n" not in str(err.value) and "--qk_norm" not in str(err.value)
    assert "neither the Llama nor the Qwen3 format" in str(err.value)


def test_untied_head_is_its_own_parameter():
    tied, untied = small_model(), small_model(cfg=dataclasses.replace(SMALL, tie_embeddings=False))
    assert untied.lm_head.weight is not untied.embed.weight
    assert untied.lm_head.weight.data_ptr() != untied.embed.weight.data_ptr()
    assert untied.num_params() == tied.num_params() + untied.lm_head.weight.numel()
    assert untied.lm_head.weight.std().item() == pytest.approx(SMALL.init_std, rel=0.1)  # GPT-2 init
    assert not torch.equal(untied.lm_head.weight, untied.embed.weight)
    # The head's matmul counts once either way; the untied head adds no FLOPs.
    assert untied.flops_per_token(64) == tied.flops_per_token(64)
    idx, targets = torch.randint(0, SMALL.vocab_size, (2, 2, 16))
    untied.train()(idx, targets).backward()
    assert untied.lm_head.weight.grad is not None and untied.embed.weight.grad is not None
    assert not torch.equal(untied.lm_head.weight.grad, untied.embed.weight.grad)


def test_relu2_mlp_matches_its_formula():
    cfg = dataclasses.replace(SMALL, mlp="relu2")
    model = small_model(cfg=cfg)
    mlp = model.blocks[0].mlp
    assert isinstance(mlp, ReLU2) and cfg.mlp_hidden == 4 * cfg.n_embd
    assert [p.shape for p in mlp.parameters()] == [(4 * 64, 64), (64, 4 * 64)]
    x = torch.randn(2, 5, 64)
    hidden = x @ mlp.up.weight.T
    expected = torch.where(hidden > 0, hidden * hidden, torch.zeros_like(hidden)) @ mlp.down.weight.T
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), expected)
        # The whole model: each block's MLP output is the formula's; the loss is the logits'.
        idx, targets = torch.randint(0, cfg.vocab_size, (2, 2, 16))
        logits = model(idx)
        torch.testing.assert_close(model(idx, targets), F.cross_entropy(logits.flatten(0, 1), targets.flatten()))
    assert dataclasses.replace(cfg, intermediate_size=200).mlp_hidden == 200  # an explicit width holds


@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_soft_capped_logits_in_forward_and_loss(z_loss):
    cap = 0.5  # below the raw logits' range, so the cap bites
    capped, plain = small_model(cfg=dataclasses.replace(SMALL, logit_softcap=cap)), small_model()
    idx, targets = torch.randint(0, SMALL.vocab_size, (2, 2, 16))
    with torch.no_grad():
        raw = plain(idx)
        assert raw.abs().max() > 2 * cap
        logits = capped(idx)
        torch.testing.assert_close(logits, cap * torch.tanh(raw / cap))
        assert logits.abs().max() < cap
        # Decoding goes through the same logits: the last position's, with a cache.
        cache = KVCache(SMALL, batch_size=2, max_len=16)
        capped(idx[:, :10], cache=cache)
        torch.testing.assert_close(capped(idx[:, 10:], cache=cache, last=True), logits[:, -1:], rtol=1e-5, atol=1e-5)
    flat = logits.flatten(0, 1)
    expected = F.cross_entropy(flat, targets.flatten()) + z_loss * torch.logsumexp(flat, -1).square().mean()
    torch.testing.assert_close(capped(idx, targets, z_loss=z_loss), expected)


def test_loss_is_cross_entropy_of_logits():
    model = small_model()
    idx, targets = torch.randint(0, SMALL.vocab_size, (2, 2, 16))
    with torch.no_grad():
        logits = model(idx)
        expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        torch.testing.assert_close(model(idx, targets), expected)


def test_z_loss_adds_the_squared_log_normalizer():
    model = small_model()
    idx, targets = torch.randint(0, SMALL.vocab_size, (2, 2, 16))
    with torch.no_grad():
        logits = model(idx).flatten(0, 1)
        normalizer = torch.logsumexp(logits, dim=-1)
        expected = torch.nn.functional.cross_entropy(logits, targets.flatten()) + 1e-2 * normalizer.square().mean()
        torch.testing.assert_close(model(idx, targets, z_loss=1e-2), expected)


def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys():
    cfg = ModelConfig(**{**SMALL.__dict__, "qk_norm": True})
    model = small_model(cfg=cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        before = model(idx)
        for block in model.blocks:  # the q and k rows of the fused projection, scaled 10x
            block.attn.qkv.weight[:2 * cfg.n_embd] *= 10.0
        after = model(idx)
        assert sum(p.numel() for n, p in model.named_parameters() if "q_norm" in n or "k_norm" in n) \
            == 2 * cfg.n_layer * cfg.head_dim
        plain = small_model(cfg=SMALL)
        for block in plain.blocks:
            block.attn.qkv.weight[:2 * SMALL.n_embd] *= 10.0
        assert not torch.allclose(plain(idx), small_model(cfg=SMALL)(idx), atol=1e-3)  # without: it matters
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_dropout_acts_in_training_only():
    cfg = ModelConfig(**{**SMALL.__dict__, "dropout": 0.3})
    model, plain = small_model(cfg=cfg), small_model(cfg=SMALL)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in plain.parameters())
    idx = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        assert torch.equal(model(idx), plain(idx)), "in eval mode the model is the plain one"
        model.train()
        torch.manual_seed(1)
        first = model(idx)
        assert not torch.allclose(first, plain(idx), atol=1e-3) and not torch.allclose(first, model(idx), atol=1e-3)
        torch.manual_seed(1)
        assert torch.equal(model(idx), first), "its masks come from torch's RNG (saved with a checkpoint)"


def test_rmsnorm_backward_passes_gradcheck():
    x = torch.randn(2, 3, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_RMSNormFunction.apply, (x, weight, 1e-5, torch.float64))


@pytest.mark.parametrize("knobs", [dict(qk_norm=True),
                                   dict(tie_embeddings=False, mlp="relu2", logit_softcap=1.0)], ids=["qk_norm", "knobs"])
def test_compiled_training_step_matches_eager(knobs):
    cfg = dataclasses.replace(SMALL, **knobs)
    idx, targets = torch.randint(0, cfg.vocab_size, (2, 2, 32))
    losses, grads = [], []
    for compiled in (False, True):
        model = small_model(cfg=cfg).train()
        forward = torch.compile(model, fullgraph=True) if compiled else model
        loss = forward(idx, targets, z_loss=1e-4)
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad for p in model.parameters()])
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    for compiled_grad, eager_grad in zip(*grads[::-1]):
        torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-4, atol=1e-5)


def test_preset_parameter_counts():
    counts = {name: GPT(resolve({"preset": name}).model).num_params() for name in ("l1-gpu-compatible", "l1-v1", "tiny")}
    assert counts == {"l1-gpu-compatible": 155_804_672, "l1-v1": 20_978_176, "tiny": 836_448}


KNOBS = [dict(tie_embeddings=tie, mlp=mlp, qk_norm=qk, intermediate_size=hidden, logit_softcap=cap)
         for tie, mlp, qk, hidden, cap in itertools.product([True, False], ["swiglu", "relu2"], [False, True],
                                                            [0, 200], [0.0, 15.0])]


@pytest.mark.parametrize("shape", [dict(vocab_size=300, pad_vocab_to=128), dict(intermediate_size=200, n_layer=3),
                                   dict(vocab_size=300, pad_vocab_to=128, tie_embeddings=False), *KNOBS])
def test_config_parameter_count_matches_the_built_model(shape):
    """ModelConfig's arithmetic (used by the trainer's log and l1.info) against the real tensors."""
    cfg = ModelConfig(**{**dict(vocab_size=320, n_layer=2, n_head=4, n_embd=64, block_size=32), **shape})
    with torch.device("meta"):
        model = GPT(cfg)
    assert cfg.num_params == model.num_params()
    assert cfg.num_params_unpadded == model.num_params(exclude_padding=True)


def test_embedding_rows_are_padded_and_tied():
    model = small_model()
    assert model.embed.weight.shape[0] == 320 and model.lm_head.weight is model.embed.weight


def test_incremental_decoding_with_cache_matches_full_forward():
    model = small_model()
    idx = torch.randint(0, SMALL.vocab_size, (2, 30))
    cache = KVCache(SMALL, batch_size=2, max_len=30)
    with torch.no_grad():
        full = model(idx)
        pieces = [model(idx[:, :11], cache=cache)]  # prefill, then a chunk, then single tokens
        pieces.append(model(idx[:, 11:17], cache=cache))
        pieces += [model(idx[:, t:t + 1], cache=cache) for t in range(17, 30)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.length == 30


def test_left_padded_batch_matches_unpadded_rows():
    model = small_model()
    short, long = torch.randint(0, SMALL.vocab_size, (5,)), torch.randint(0, SMALL.vocab_size, (9,))
    pad = 4
    idx = torch.stack([torch.cat([torch.zeros(pad, dtype=torch.long), short]), long])
    key_mask = torch.ones(2, 9, dtype=torch.bool)
    key_mask[0, :pad] = False
    positions = (key_mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        batched = model(idx, positions=positions, key_mask=key_mask)
        torch.testing.assert_close(batched[0, pad:], model(short[None])[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(batched[1], model(long[None])[0], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(batched).all()


def test_gradient_checkpointing_gives_the_same_gradients():
    idx, targets = torch.randint(0, SMALL.vocab_size, (2, 2, 32))
    grads = []
    for ckpt in (False, True):
        model = small_model().train()
        if ckpt:
            runtime.apply_activation_checkpointing(model)
        model(idx, targets).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(plain, recomputed)


def test_residual_projections_start_smaller():
    model = GPT(ModelConfig(vocab_size=320, n_layer=8, n_head=4, n_embd=128, block_size=32))
    proj_std = model.blocks[0].attn.proj.weight.std().item()
    qkv_std = model.blocks[0].attn.qkv.weight.std().item()
    assert proj_std == pytest.approx(0.02 / 4, rel=0.1) and qkv_std == pytest.approx(0.02, rel=0.1)


def test_too_long_input_is_refused():
    with pytest.raises(ValueError, match="exceed the context"):
        small_model()(torch.zeros(1, 65, dtype=torch.long))
