"""Runtime helpers that do not need a GPU to be tested."""

import re

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
    assert runtime.precision(cpu, None).amp == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert runtime.precision(cpu, False).amp is False and runtime.precision(cpu, True).amp is True
    forced = runtime.precision(cpu, True)
    assert forced.compute_dtype == torch.bfloat16 and not forced.needs_grad_scaler


def test_emulated_bf16_gets_fp16_with_loss_scaling(monkeypatch):
    """A GPU whose bf16 is only emulated (T4, V100, RTX 20xx) trains in fp16 with a GradScaler;
    one with native bf16 in bf16 without; --no-amp in fp32. Decided on native support alone."""
    cuda = torch.device("cuda")
    asked = []

    def is_bf16_supported(including_emulation=True):
        asked.append(including_emulation)
        return including_emulation or native  # emulation "supports" bf16 everywhere

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    for native, dtype, scaled in ((False, torch.float16, True), (True, torch.bfloat16, False)):
        chosen = runtime.precision(cuda, None)
        assert (chosen.compute_dtype, chosen.needs_grad_scaler, chosen.amp) == (dtype, scaled, True)
    assert asked and not any(asked)
    off = runtime.precision(cuda, False)
    assert off.compute_dtype == torch.float32 and not off.needs_grad_scaler and off.name == "fp32"


def test_precision_autocast_computes_in_its_dtype():
    x = torch.randn(4, 8)
    for amp, dtype in ((False, torch.float32), (True, torch.bfloat16)):
        with runtime.precision(torch.device("cpu"), amp).autocast():
            assert (x @ x.T).dtype == dtype


def test_roofline_probe_leaves_the_global_rng_alone():
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    # __wrapped__: the measurement itself, never a cached result of an earlier call.
    runtime.matmul_peak_flops.__wrapped__(torch.device("cpu"), torch.float32, seconds=0.01, windows=1)
    assert torch.equal(torch.rand(3), expected)


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


def _tiny_gpt():
    from l1.config import ModelConfig
    from l1.model import GPT

    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=320, n_layer=2, n_head=2, n_embd=64, block_size=32))


def test_activation_checkpointing_is_applied_from_outside_and_keeps_names():
    model = _tiny_gpt()
    names = list(model.state_dict())
    rt = runtime.setup("cpu", amp=False)
    outer, forward = runtime.parallelize(model, rt, grad_ckpt=True, compile=False, fsdp=False, log=print)
    assert outer is model and forward is model
    assert all(type(block).__name__ == "CheckpointWrapper" for block in model.blocks)
    assert list(model.state_dict()) == names  # checkpoints cannot tell the difference
    plain = _tiny_gpt()
    idx = torch.randint(0, 320, (2, 16))
    model(idx, idx).backward()
    plain(idx, idx).backward()
    for (name, p), q in zip(model.state_dict(keep_vars=True).items(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_a_failed_compilation_falls_back_to_eager_once():
    model = _tiny_gpt()
    idx = torch.randint(0, 320, (1, 8))
    with torch.no_grad():
        expected = model(idx)
    lines = []
    outer, forward = runtime.parallelize(model, runtime.setup("cpu", amp=False), grad_ckpt=False,
                                         compile=True, fsdp=False, log=lines.append)
    assert model._compiled_call_impl is not None  # compiled in place: no wrapper, same names

    def broken(*args, **kwargs):
        raise torch._dynamo.exc.Unsupported("a construct inductor cannot lower")

    model._compiled_call_impl = broken
    with torch.no_grad():
        torch.testing.assert_close(forward(idx), expected)
        torch.testing.assert_close(forward(idx), expected)
    assert len(lines) == 1 and "continuing eagerly" in lines[0] and "inductor cannot lower" in lines[0]


@pytest.mark.parametrize("batch, accum, world, expected", [
    (8, 1, 1, (8, 1)), (8, 1, 2, (4, 1)), (8, 8, 8, (8, 1)), (8, 8, 1, (8, 8)), (16, 4, 2, (16, 2)),
    (4, 2, 2, (4, 1)), (6, 1, 4, None), (8, 3, 2, (6, 2))])
def test_every_world_size_trains_on_the_same_global_batch(batch, accum, world, expected):
    if expected is None:
        with pytest.raises(L1Error, match="cannot be shared evenly by 4 processes"):
            runtime.split_batch(batch, accum, world)
        return
    micro, steps = runtime.split_batch(batch, accum, world)
    assert (micro, steps) == expected
    assert micro * steps * world == batch * accum and micro <= batch


@pytest.mark.parametrize("fits, wanted, expected", [(135, 64, (64, 1)), (27, 64, (16, 4)), (512, 8, (8, 1)),
                                                    (1, 64, (1, 64)), (7, 48, (6, 8))])
def test_auto_batch_keeps_the_presets_sequences_per_step(fits, wanted, expected):
    assert runtime.fit_global_batch(fits, wanted) == expected


def test_auto_batch_probe_uses_free_memory_and_drops_failed_gradients(monkeypatch):
    """A fake GPU: 10 GiB total, of which 2 GiB are taken by another program (a display); each
    sequence costs 1 GiB at peak. The probe must fit in the free 8 GiB, not the total."""
    gib = 2 ** 30
    peak = {"bytes": 0}
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8 * gib, 10 * gib))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: peak.update(bytes=0))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: peak["bytes"])
    model = _tiny_gpt()

    def out_of_memory_in_backward(module, grad_input, grad_output):
        if grad_output[0].shape[0] * gib > 9 * gib:  # the head's and later blocks' gradients exist by now
            raise torch.cuda.OutOfMemoryError("fake")

    model.blocks[0].register_full_backward_hook(out_of_memory_in_backward)
    probe = runtime.probe_step(model, runtime.precision(torch.device("cpu"), False), 320, 8, torch.device("cpu"))

    def step(batch):
        probe(batch)
        peak["bytes"] = batch * gib

    fits = runtime.cuda_batch_fits(step, torch.device("cuda"), reserve_bytes=0, headroom=1.0)
    assert runtime.largest_batch(fits, limit=64) == 8  # 8 GiB free, not the 10 total
    assert not fits(12) and all(p.grad is None for p in model.parameters())


def test_too_old_torch_is_refused_in_one_line():
    runtime.check_torch_version(torch.__version__)  # the one installed here is new enough
    runtime.check_torch_version("2.9.0+cu128")
    for old in ("2.4.1", "2.8.0+cpu"):
        with pytest.raises(L1Error, match=re.escape(f"L1 needs torch >= {runtime.MIN_TORCH}, found {old}:")):
            runtime.check_torch_version(old)


def test_rng_state_is_this_devices_only_and_restores(monkeypatch):
    """A checkpoint holds the CPU generator and this process's own GPU's (never one per visible
    GPU, which a machine with fewer GPUs could not restore); old checkpoints with a list still load."""
    cpu = torch.device("cpu")
    torch.manual_seed(5)
    state = runtime.rng_state(cpu)
    assert set(state) == {"cpu", "cuda"} and state["cuda"] is None
    expected = torch.rand(4)
    runtime.set_rng_state(state, cpu)
    assert torch.equal(torch.rand(4), expected)

    restored = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: restored.append((s, device)))
    gpu_states = [torch.full((8,), i, dtype=torch.uint8) for i in range(8)]  # an 8-GPU run's old format
    runtime.set_rng_state({"cpu": state["cpu"], "cuda": gpu_states}, torch.device("cuda", 0))
    runtime.set_rng_state({"cpu": state["cpu"], "cuda": gpu_states[3]}, torch.device("cuda", 0))
    assert [(int(s[0]), str(d)) for s, d in restored] == [(0, "cuda:0"), (3, "cuda:0")]
