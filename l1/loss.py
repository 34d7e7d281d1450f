"""The training loss: the vocabulary head and cross-entropy in one pass over row chunks.

Materializing the (tokens x vocabulary) logits, their fp32 copy for the softmax, its output and
their gradients costs several buffers of tokens x vocab x 4 bytes per step: on a CPU the biggest
tensors of the step, freshly page-faulted each time, and on a 16 GB GPU a gigabyte at the
flagship shape. Here each chunk of rows goes through the head, the softmax and its gradient while
it is still in cache, and only the gradients of the head's input and weight are kept: the
backward has nothing left to compute but a scale.
"""

from __future__ import annotations

import torch

# fp32 bytes of one chunk's logits. On a CPU: small enough for its caches and for glibc to reuse
# the memory instead of mapping it anew, large enough for the chunk's matmuls to run at full
# rate (1-32 MiB measured alike). On a GPU caches do not decide: few, large chunks keep kernel
# launches (and torch.compile's unrolled loop) short at the cost of a few hundred MiB.
CHUNK_BYTES = {"cpu": 4 * 2**20}
GPU_CHUNK_BYTES = 256 * 2**20


# torch.compile unrolls the chunk loop: its compile time grows with the chunk count (measured on
# CPU: 3 / 12 / 42 chunks -> 8 / 23 / 58 s for the training graph), and a large --batch_size auto
# would reach ~42. Past this many chunks, chunks grow instead.
MAX_CHUNKS = 16


def chunk_rows(vocab: int, device_type: str = "cpu", rows: int = 0) -> int:
    """Rows per chunk for a vocabulary of this size on this kind of device, for `rows` rows in
    all: at most MAX_CHUNKS chunks."""
    by_size = max(64, CHUNK_BYTES.get(device_type, GPU_CHUNK_BYTES) // (4 * vocab))
    return max(by_size, -(-rows // MAX_CHUNKS))


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The matmul dtype autocast would pick for x's device, else x's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _chunks(x: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None, vocab: int):
    """(x, targets, mask as (n, 1) weights or None) of each chunk of rows."""
    rows = chunk_rows(vocab, x.device.type, len(x))
    masks = [None] * len(x.split(rows)) if mask is None else mask[:, None].to(torch.float32).split(rows)
    return zip(x.split(rows), targets.split(rows), masks)


def _count(targets: torch.Tensor, mask: torch.Tensor | None):
    """The number of targets the mean is over (at least 1: a batch without any gives a loss of 0)."""
    return len(targets) if mask is None else mask.sum().clamp(min=1)


def soft_cap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """cap x tanh(logits / cap): logits bounded smoothly to (-cap, cap), nearly unchanged near 0
    (Gemma 2); cap 0 = off. The tanh is computed in fp32 at least, the result in logits' dtype."""
    if not cap:
        return logits
    wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return (torch.tanh(wide / cap) * cap).to(logits.dtype)


def _chunk_loss(xc: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, z_loss: float, softcap: float,
                mc: torch.Tensor | None = None):
    """Summed loss of one chunk's logits xc @ w.T (soft-capped where softcap > 0; only the rows
    that the (n, 1) weights mc keep, where given), with
    exp(logits - max) (n, V, at least fp32), their row sums and log-normalizers (n, 1), and the
    tanh of the soft cap (n, V, None without one) for the gradient."""
    logits = xc @ w.t()
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    tanh = None
    if softcap:  # as soft_cap, in place: the tanh is kept for its derivative, 1 - tanh^2
        tanh = logits.div_(softcap).tanh_()
        logits = tanh * softcap
    target_logit = logits.gather(1, targets[:, None])
    row_max = logits.amax(dim=-1, keepdim=True)
    exps = logits.sub_(row_max).exp_()  # in the logits' buffer
    sums = exps.sum(dim=-1, keepdim=True)
    lse = sums.log() + row_max
    per_row = lse - target_logit
    if z_loss:
        per_row = per_row + z_loss * lse.square()
    total = (per_row if mc is None else per_row * mc).sum()
    return total, exps, sums, lse, tanh


class _LinearCrossEntropy(torch.autograd.Function):
    """The mean loss, the gradients of x and weight computed alongside it and kept for backward."""

    @staticmethod
    def forward(ctx, x, weight, targets, z_loss, softcap, dtype, mask):
        w = weight.to(dtype)
        grad_x = torch.empty(x.shape, dtype=dtype, device=x.device)
        grad_w = torch.zeros(weight.shape, dtype=torch.promote_types(dtype, torch.float32), device=x.device)
        total, start = 0.0, 0
        for xc, tc, mc in _chunks(x.to(dtype), targets, mask, weight.shape[0]):
            loss, exps, sums, lse, tanh = _chunk_loss(xc, w, tc, z_loss, softcap, mc)
            total = total + loss
            # d(loss sum)/d(logits) = softmax - onehot, the z-loss adding 2 z lse softmax.
            probs = exps.mul_((1 + 2 * z_loss * lse) / sums if z_loss else sums.reciprocal())
            probs.scatter_add_(1, tc[:, None], probs.new_full((len(tc), 1), -1.0))
            if tanh is not None:  # through the soft cap: d(cap tanh(l / cap))/dl = 1 - tanh^2
                probs.mul_(tanh.square_().neg_().add_(1.0))
            if mc is not None:  # rows the loss does not count have no gradient
                probs.mul_(mc)
            grad_logits = probs.to(dtype)
            grad_x[start:start + len(tc)] = grad_logits @ w
            grad_w.add_(grad_logits.t() @ xc)
            start += len(tc)
        ctx.save_for_backward(grad_x, grad_w)
        ctx.count, ctx.x_dtype, ctx.w_dtype = _count(targets, mask), x.dtype, weight.dtype
        return total / ctx.count

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        scale = grad_loss / ctx.count
        return (grad_x * scale).to(ctx.x_dtype), (grad_w * scale).to(ctx.w_dtype), None, None, None, None, None


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         z_loss: float = 0.0, softcap: float = 0.0, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy of the logits x @ weight.T (x: (N, C), weight: (V, C), targets: (N,) int64).

    Equal to F.cross_entropy(soft_cap(F.linear(x, weight), softcap), targets) (+ z_loss *
    mean(logsumexp^2) of those same logits), the matmuls in autocast's dtype, the softmax in fp32,
    without ever holding all N x V logits. mask (N,) bool: only the targets it keeps count, the
    mean is over them (F.cross_entropy's ignore_index, as a mask; default: every target counts).
    """
    dtype = compute_dtype(x)
    with torch.autocast(x.device.type, enabled=False):  # the casts are explicit here
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            return _LinearCrossEntropy.apply(x, weight, targets, z_loss, softcap, dtype, mask)
        w, total = weight.to(dtype), 0.0
        for xc, tc, mc in _chunks(x.to(dtype), targets, mask, weight.shape[0]):
            total = total + _chunk_loss(xc, w, tc, z_loss, softcap, mc)[0]
        return total / _count(targets, mask)
