"""Runtime helpers that do not need a GPU to be tested."""

import pytest
import torch

from l1 import runtime
from l1.errors import L1Error


@pytest.mark.parametrize("capacity", [0, 1, 2, 3, 7, 8, 100, 512, 1024, 5000])
def test_largest_batch_finds_the_capacity(capacity):
    tried = []

    def fits(batch):
        tried.append(batch)
        return batch <= capacity

    assert runtime.largest_batch(fits, limit=1024) == min(capacity, 1024)
    assert len(tried) <= 2 * 11  # doubling then bisection: logarithmic in the limit


def test_unknown_or_missing_devices_are_refused():
    assert runtime.pick_device("cpu") == torch.device("cpu")
    with pytest.raises(L1Error, match="unknown device"):
        runtime.pick_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(L1Error, match="CUDA is not available"):
            runtime.pick_device("cuda")


def test_amp_defaults_follow_the_hardware():
    cpu = torch.device("cpu")
    assert runtime.use_amp(cpu, None) == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert runtime.use_amp(cpu, False) is False and runtime.use_amp(cpu, True) is True
    assert runtime.amp_dtype(cpu) == torch.bfloat16 and not runtime.needs_grad_scaler(cpu, True)


def test_compile_defaults_to_where_it_pays(monkeypatch):
    cpu, cuda, mps = torch.device("cpu"), torch.device("cuda"), torch.device("mps")
    long, short = 2 * runtime.CPU_COMPILE_PAYS_AFTER_S, runtime.CPU_COMPILE_PAYS_AFTER_S / 2
    assert runtime.use_compile(cuda, None, short) and not runtime.use_compile(cuda, False, long)
    assert not runtime.use_compile(mps, None, long) and runtime.use_compile(cpu, True, short)
    monkeypatch.setenv("CXX", "g++")
    monkeypatch.setattr(runtime.shutil, "which", lambda name: f"/usr/bin/{name}")
    assert runtime.use_compile(cpu, None, long) and not runtime.use_compile(cpu, None, short)
    monkeypatch.setattr(runtime.shutil, "which", lambda name: None)  # no C++ compiler: inductor cannot run
    assert runtime.cpp_compiler() is None and not runtime.use_compile(cpu, None, long)
