"""The chunked head + cross-entropy against torch's own, and mixed precision against fp32."""

import pytest
import torch
import torch.nn.functional as F

from l1 import loss as loss_module
from l1.loss import linear_cross_entropy
from l1.model import GPT, causal_matmul_attention
from l1.runtime import precision

from tests.test_model import SMALL


def reference(x, weight, targets, z_loss, softcap=0.0):
    logits = F.linear(x, weight)
    if softcap:  # Gemma 2's soft cap, written out
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, targets) + z_loss * torch.logsumexp(logits, dim=-1).square().mean()


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 64 rows for a 300-word vocabulary: several per batch, the last one ragged."""
    monkeypatch.setitem(loss_module.CHUNK_BYTES, "cpu", 64 * 4 * 300)


@pytest.mark.parametrize("softcap", [0.0, 2.0], ids=["uncapped", "softcap"])
@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_loss_and_gradients_equal_cross_entropy_of_the_logits(small_chunks, z_loss, softcap):
    torch.manual_seed(0)
    x = torch.randn(200, 32, dtype=torch.float64, requires_grad=True)
    weight = (torch.randn(300, 32, dtype=torch.float64) * 0.3).requires_grad_()
    targets = torch.randint(0, 300, (200,))
    assert loss_module.chunk_rows(300, "cpu") == 64
    if softcap:  # the raw logits (std ~1.7) reach well into the cap's flat part
        assert F.linear(x, weight).abs().max() > 3 * softcap
    expected = reference(x, weight, targets, z_loss, softcap)
    got = linear_cross_entropy(x, weight, targets, z_loss, softcap)
    torch.testing.assert_close(got, expected)
    # A non-unit upstream gradient, as gradient accumulation gives (loss / accum).
    torch.testing.assert_close(torch.autograd.grad(got / 3, (x, weight)),
                               torch.autograd.grad(expected / 3, (x, weight)))
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(x, weight, targets, z_loss, softcap), expected)


def test_soft_cap_of_fp32_logits_is_the_loss_heads_own():
    """The forward pass's capped logits (l1.loss.soft_cap: bounded, 0 = the logits themselves) give
    the loss the chunked head computes with its in-place cap."""
    torch.manual_seed(0)
    x, weight, targets = torch.randn(50, 32), torch.randn(300, 32) * 0.3, torch.randint(0, 300, (50,))
    capped = loss_module.soft_cap(F.linear(x, weight), 2.0)
    assert capped.abs().max() < 2.0 and loss_module.soft_cap(capped, 0.0) is capped
    with torch.no_grad():
        total = loss_module._chunk_loss(x, weight, targets, 0.0, 2.0)[0]
    torch.testing.assert_close(total / 50, F.cross_entropy(capped, targets))


def test_chunks_fit_the_cpu_caches_and_stay_few_on_gpus():
    assert loss_module.chunk_rows(4096, "cpu") == 256  # 4 MiB of fp32 logits
    assert loss_module.chunk_rows(20544, "cpu") == 64  # never fewer rows than that
    assert loss_module.chunk_rows(20544, "cuda") * 3 >= 8 * 1024  # the flagship's micro-batch: 3 chunks


def test_bf16_autocast_stays_close_to_fp32(small_chunks):
    torch.manual_seed(0)
    x = torch.randn(200, 32, requires_grad=True)
    weight = (torch.randn(300, 32) * 0.3).requires_grad_()
    targets = torch.randint(0, 300, (200,))
    expected = reference(x, weight, targets, 0.0)
    grads = torch.autograd.grad(expected, (x, weight))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy(x, weight, targets)
    got_grads = torch.autograd.grad(got, (x, weight))
    assert got.dtype == torch.float32 and [g.dtype for g in got_grads] == [torch.float32] * 2
    assert abs(got.item() - expected.item()) < 0.01 * expected.item()
    for ours, theirs in zip(got_grads, grads):
        assert (ours - theirs).norm() < 0.02 * theirs.norm()


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_causal_matmul_attention_equals_sdpa(dtype, tolerance):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 40, 16, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(2, 3, 40, 16, dtype=dtype)
    ours = causal_matmul_attention(q, k, v)
    ours_grads = torch.autograd.grad(ours, (q, k, v), grad)
    wide = [t.detach().double().requires_grad_() for t in (q, k, v)]
    theirs = F.scaled_dot_product_attention(*wide, is_causal=True)
    theirs_grads = torch.autograd.grad(theirs, wide, grad.double())
    torch.testing.assert_close(ours.double(), theirs, rtol=tolerance, atol=tolerance)
    for a, b in zip(ours_grads, theirs_grads):
        torch.testing.assert_close(a.double(), b, rtol=tolerance, atol=tolerance)


def test_bf16_training_follows_the_fp32_loss_curve():
    """L1's mixed precision on CPU (bf16 autocast: the chunked loss, bf16 norms' outputs, the
    matmul attention) trains like fp32: 60 AdamW steps on a learnable sequence stay within 0.05
    nats of the fp32 curve at every step, and both curves fall by more than half."""
    curves = {}
    for amp in (False, True):
        torch.manual_seed(0)
        model = GPT(SMALL).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        generator = torch.Generator().manual_seed(1)
        curve = []
        for _ in range(60):
            # Each sequence counts up from a random start: predictable, so the loss falls far.
            start = torch.randint(0, SMALL.vocab_size, (8, 1), generator=generator)
            data = (start + torch.arange(33)) % SMALL.vocab_size
            with precision(torch.device("cpu"), amp).autocast():
                loss = model(data[:, :-1], data[:, 1:])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            curve.append(loss.item())
        curves[amp] = torch.tensor(curve)
    assert (curves[True] - curves[False]).abs().max() < 0.05
    assert curves[False][-1] < 0.5 * curves[False][0] and curves[True][-1] < 0.5 * curves[True][0]


def test_chunk_count_is_bounded_for_compile():
    """However large the batch (a big --batch_size auto), at most MAX_CHUNKS chunks: torch.compile
    unrolls the loop, so its compile time follows the chunk count."""
    vocab = 20032
    for rows in (1024, 8 * 1024, 135 * 1024, 1_000_003):
        size = loss_module.chunk_rows(vocab, "cuda", rows)
        assert -(-rows // size) <= loss_module.MAX_CHUNKS
        assert size == max(loss_module.chunk_rows(vocab, "cuda"), -(-rows // loss_module.MAX_CHUNKS))
    assert loss_module.chunk_rows(4096, "cpu", 2048) == 256  # the tiny preset's step is unchanged


def test_bounded_chunks_still_equal_cross_entropy(monkeypatch):
    monkeypatch.setattr(loss_module, "MAX_CHUNKS", 3)  # 200 rows -> 3 chunks of 67, the last ragged
    torch.manual_seed(0)
    x = torch.randn(200, 32, dtype=torch.float64, requires_grad=True)
    weight = (torch.randn(300, 32, dtype=torch.float64) * 0.3).requires_grad_()
    targets = torch.randint(0, 300, (200,))
    torch.testing.assert_close(loss_module.linear_cross_entropy(x, weight, targets),
                               reference(x, weight, targets, 0.0))


@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_masked_loss_and_gradients_equal_cross_entropy_of_the_kept_targets(small_chunks, z_loss):
    """The chat loss mask: the mean over the kept targets only, as F.cross_entropy's ignore_index,
    and no gradient through the rows left out (a chunk without any kept row included)."""
    torch.manual_seed(0)
    x = torch.randn(200, 32, dtype=torch.float64, requires_grad=True)
    weight = (torch.randn(300, 32, dtype=torch.float64) * 0.3).requires_grad_()
    targets = torch.randint(0, 300, (200,))
    mask = torch.rand(200) < 0.3
    mask[64:128] = False  # one whole chunk counts for nothing
    logits = F.linear(x, weight)
    expected = F.cross_entropy(logits, targets.masked_fill(~mask, -100)) \
        + z_loss * torch.logsumexp(logits, dim=-1)[mask].square().mean()
    got = linear_cross_entropy(x, weight, targets, z_loss, mask=mask)
    torch.testing.assert_close(got, expected)
    grads = torch.autograd.grad(got / 3, (x, weight))
    torch.testing.assert_close(grads, torch.autograd.grad(expected / 3, (x, weight)))
    assert grads[0][~mask].abs().max() == 0 and grads[0][mask].abs().min() > 0
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(x, weight, targets, z_loss, mask=mask), expected)
    nothing = linear_cross_entropy(x, weight, targets, mask=torch.zeros(200, dtype=torch.bool))
    assert nothing.item() == 0.0  # a batch with no assistant token: no loss, no NaN
