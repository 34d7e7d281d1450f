"""The benches' own logic: the analytic memory model against a measured training step."""

import pytest
import torch

from bench.memory import estimate_training_bytes, measure
from l1.config import ModelConfig

SMALL = ModelConfig(vocab_size=1000, n_layer=2, n_head=4, n_embd=128, block_size=128)


@pytest.mark.parametrize("grad_ckpt", [False, True])
def test_memory_model_agrees_with_a_measured_step(grad_ckpt):
    measured = measure(SMALL, batch=4, seq=128, amp=False, grad_ckpt=grad_ckpt, flash=True,
                       device=torch.device("cpu"))
    estimate = estimate_training_bytes(SMALL, 4, 128, None, grad_ckpt, attention="flash")
    assert estimate["total"] == pytest.approx(measured["measured"], rel=0.01)
    assert estimate["activations"] == pytest.approx(measured["saved_for_backward"], rel=0.01)
