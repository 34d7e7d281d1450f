import copy

import pytest
import torch
from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, EPS

from l1 import runtime, trainer
from l1.optim import Muon, newton_schulz

SHAPES = [(24, 8), (8, 24), (16, 16)]  # tall (transposed inside), wide, square
COEFFICIENTS = (DEFAULT_A, DEFAULT_B, DEFAULT_C)


def _params(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in SHAPES]


def _run(optimizer, params, steps, seed=1):
    """steps optimizer steps on fixed random gradients (the same for every optimizer)."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step()


def _buffers(optimizer, params):
    return [optimizer.state[p]["momentum_buffer"] for p in params]


@pytest.mark.parametrize("nesterov", [True, False])
def test_bf16_steps_equal_torchs_muon_bitwise(nesterov):
    options = dict(lr=0.02, weight_decay=0.1, nesterov=nesterov, adjust_lr_fn="match_rms_adamw")
    ours, theirs = _params(), _params()
    ours_opt, theirs_opt = Muon(ours, ns_dtype=torch.bfloat16, **options), torch.optim.Muon(theirs, **options)
    _run(ours_opt, ours, 5)
    _run(theirs_opt, theirs, 5)
    for a, b in zip(ours + _buffers(ours_opt, ours), theirs + _buffers(theirs_opt, theirs)):
        assert torch.equal(a, b)
    assert ours_opt.state_dict()["param_groups"] == theirs_opt.state_dict()["param_groups"]


def test_fp32_steps_move_the_same_momentum_and_differ_only_by_rounding():
    """The momentum buffers do not depend on the Newton-Schulz dtype (fp32 must not write into the
    buffer it orthogonalizes, which it is handed as is without nesterov)."""
    fp32, bf16 = _params(), _params()
    fp32_opt = Muon(fp32, ns_dtype=torch.float32, nesterov=False, lr=0.02)
    bf16_opt = Muon(bf16, ns_dtype=torch.bfloat16, nesterov=False, lr=0.02)
    _run(fp32_opt, fp32, 3)
    _run(bf16_opt, bf16, 3)
    for a, b in zip(_buffers(fp32_opt, fp32), _buffers(bf16_opt, bf16)):
        assert torch.equal(a, b)
    for a, b in zip(fp32, bf16):
        assert not torch.equal(a, b)
        torch.testing.assert_close(a, b, rtol=0, atol=0.02 * 3 * 0.05)  # lr x steps x bf16's error


@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_newton_schulz_is_closer_to_float64_than_bf16(shape):
    matrix = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    reference = newton_schulz(matrix.double(), COEFFICIENTS, 5, EPS, torch.float64)
    fp32 = newton_schulz(matrix, COEFFICIENTS, 5, EPS, torch.float32)
    bf16 = newton_schulz(matrix, COEFFICIENTS, 5, EPS, torch.bfloat16)
    assert fp32.dtype == torch.float32 and bf16.dtype == torch.bfloat16 and fp32.shape == shape
    fp32_error = (fp32.double() - reference).abs().max()
    bf16_error = (bf16.double() - reference).abs().max()
    assert fp32_error < 1e-5 < bf16_error


@pytest.mark.parametrize("source, target", [(torch.optim.Muon, Muon), (Muon, torch.optim.Muon)],
                         ids=["torch-to-ours", "ours-to-torch"])
def test_state_dicts_load_across_torchs_muon_and_ours(source, target):
    """A checkpoint of either optimizer resumes in the other, then both step alike bit for bit."""
    options = dict(lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    saved = _params()
    saved_opt = source(saved, **options)
    _run(saved_opt, saved, 2)
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in saved]
    resumed_opt = target(resumed, **options)
    resumed_opt.load_state_dict(copy.deepcopy(saved_opt.state_dict()))  # as through a file
    _run(saved_opt, saved, 2, seed=3)
    _run(resumed_opt, resumed, 2, seed=3)
    for a, b in zip(saved + _buffers(saved_opt, saved), resumed + _buffers(resumed_opt, resumed)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("native", [True, False])
def test_the_trainer_runs_newton_schulz_in_bf16_only_where_it_is_native(monkeypatch, native):
    from l1.config import resolve
    from l1.model import GPT

    monkeypatch.setattr(runtime, "native_bf16", lambda device: native)
    cfg = resolve({"preset": "tiny", "optimizer": "muon", "model": {"n_layer": 1, "n_embd": 32, "n_head": 2}})
    _, muon = trainer._optimizers(GPT(cfg.model), cfg, torch.device("cpu"))
    assert isinstance(muon, Muon)
    assert muon.ns_dtype == (torch.bfloat16 if native else torch.float32)
