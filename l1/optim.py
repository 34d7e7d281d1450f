"""torch's Muon with its Newton-Schulz iterations in a dtype of the caller's choosing.

torch.optim.Muon computes them in bf16, which a CPU without native bf16 (AVX2 only) emulates
several times slower than fp32. The update is otherwise torch's, step for step, and the
param groups and per-parameter state are torch's too, so checkpoints load either way.
"""

from __future__ import annotations

import torch
from torch.optim._muon import _adjust_lr
from torch.optim.optimizer import _to_scalar


def newton_schulz(matrix: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """torch's quintic Newton-Schulz orthogonalization of a 2-D matrix, computed in dtype (and
    returned in it): the same coefficients, normalization and transposition of tall matrices."""
    a, b, c = coefficients
    x = matrix.to(dtype)
    tall = matrix.size(0) > matrix.size(1)
    if tall:  # iterate on the wide side: the Gram matrix is the smaller square
        x = x.T
    # Spectral norm <= Frobenius norm <= 1. Out of place: x may be the caller's tensor (the
    # momentum buffer without nesterov, when it is already in dtype).
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


class Muon(torch.optim.Muon):
    """torch.optim.Muon whose Newton-Schulz iterations run in ns_dtype (torch's are always bf16);
    with ns_dtype=torch.bfloat16 its steps equal torch's bit for bit."""

    def __init__(self, params, ns_dtype: torch.dtype = torch.bfloat16, **kwargs):
        super().__init__(params, **kwargs)
        # An attribute, not a param-group key: the groups stay torch's, and a checkpoint made on a
        # machine with native bf16 resumes with the dtype that is fast on this one.
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        """One optimization step: torch's _single_tensor_muon with ns_dtype Newton-Schulz."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, buffers = [], [], []
            self._init_group(group, params, grads, buffers)
            lr, momentum = _to_scalar(group["lr"]), group["momentum"]
            for param, grad, buffer in zip(params, grads, buffers):
                buffer.lerp_(grad, 1 - momentum)
                update = grad.lerp(buffer, momentum) if group["nesterov"] else buffer
                update = newton_schulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"],
                                       self.ns_dtype)
                param.mul_(1 - lr * group["weight_decay"])
                param.add_(update, alpha=-_adjust_lr(lr, group["adjust_lr_fn"], param.shape))
        return loss
