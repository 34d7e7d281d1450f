"""Runtime helpers that do not need a GPU to be tested."""

import os
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
    """A GPU whose bf16 is only emulated (T4, V100, RTX 20xx: before compute capability 8.0)
    trains in fp16 with a GradScaler; one with native bf16 in bf16 without; --no-amp in fp32.
    Decided by the device actually used: --device cuda:1 asks GPU 1, not the current GPU 0."""
    asked = []

    def capability(device=None):
        asked.append(torch.device(device))
        return {0: (7, 5), 1: (8, 6)}[torch.device(device).index]

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    for index, dtype, scaled in ((0, torch.float16, True), (1, torch.bfloat16, False)):
        chosen = runtime.precision(torch.device("cuda", index), None)
        assert (chosen.compute_dtype, chosen.needs_grad_scaler, chosen.amp) == (dtype, scaled, True)
    assert asked == [torch.device("cuda", 0), torch.device("cuda", 1)]
    off = runtime.precision(torch.device("cuda", 1), False)
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


def _fake_gpu(monkeypatch, free_gib, total_gib, fraction=1.0):
    """torch.cuda's memory figures of a fake GPU: the peak reserved memory is what the test sets."""
    gib = 2 ** 30
    peak = {"bytes": 0}
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free_gib * gib, total_gib * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: type("Props", (), {"total_memory": total_gib * gib})())
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device=None: fraction)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: peak.update(bytes=0))
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: peak["bytes"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: peak["bytes"] / 2)
    return peak


def test_auto_batch_probe_uses_free_memory_and_drops_failed_gradients(monkeypatch):
    """A fake GPU: 10 GiB total, of which 2 GiB are taken by another program (a display); each
    sequence costs 1 GiB of reserved memory at peak (half of it allocated: the probe must go by
    what is reserved). The probe must fit in the free 8 GiB, not the total."""
    gib = 2 ** 30
    peak = _fake_gpu(monkeypatch, free_gib=8, total_gib=10)
    model = _tiny_gpt()

    def out_of_memory_in_backward(module, grad_input, grad_output):
        if grad_output[0].shape[0] * gib > 9 * gib:  # the head's and later blocks' gradients exist by now
            raise torch.cuda.OutOfMemoryError("fake")

    model.blocks[0].register_full_backward_hook(out_of_memory_in_backward)
    probe = runtime.probe_step(model, model, runtime.precision(torch.device("cpu"), False), 320, 8, torch.device("cpu"))

    def step(batch):
        probe(batch)
        peak["bytes"] = batch * gib

    fits = runtime.cuda_batch_fits(step, torch.device("cuda"), reserve_bytes=0, headroom=1.0)
    assert runtime.largest_batch(fits, limit=64) == 8  # 8 GiB free, not the 10 total
    assert not fits(12) and all(p.grad is None for p in model.parameters())


def test_auto_batch_probe_respects_the_per_process_cap(monkeypatch):
    """All 16 GiB are free, but this process is capped at 40% of the card (6.4 GiB)."""
    gib = 2 ** 30
    peak = _fake_gpu(monkeypatch, free_gib=16, total_gib=16, fraction=0.4)
    fits = runtime.cuda_batch_fits(lambda batch: peak.update(bytes=batch * gib), torch.device("cuda"),
                                   reserve_bytes=gib, headroom=1.0)
    assert runtime.largest_batch(fits, limit=64) == 5  # 5 GiB + 1 GiB of optimizer state <= 6.4 GiB


def test_probe_step_accumulates_two_micro_steps_through_the_training_forward():
    """The probe runs what training runs (the forward it is given, e.g. parallelize's compiled
    and checkpointed one) twice before dropping the gradients, as accumulation does."""
    model = _tiny_gpt()
    calls, grads_alive = [], []

    def forward(x, y):
        calls.append(x.shape)
        grads_alive.append(model.head.weight.grad is not None if hasattr(model, "head") else
                           any(p.grad is not None for p in model.parameters()))
        return model(x, y)

    runtime.probe_step(model, forward, runtime.precision(torch.device("cpu"), False), 320, 8,
                       torch.device("cpu"))(3)
    assert calls == [torch.Size([3, 8])] * 2 and grads_alive == [False, True]
    assert all(p.grad is None for p in model.parameters())


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


def test_rng_state_restores_every_ranks_own_stream(monkeypatch):
    """Under torchrun each rank saves and restores its own generator (gathered into the
    checkpoint); rank r > 0 of a run without its own saved state derives a stream of its own."""
    cpu = torch.device("cpu")
    states = []
    for rank in range(2):
        torch.manual_seed(11)
        runtime.seed_rank(11, runtime.Distributed(rank, 2, rank))
        states.append(runtime._own_rng_state(cpu))
    draws = []
    for state in states:
        torch.set_rng_state(state["cpu"])
        draws.append(torch.rand(4))
    assert not torch.equal(draws[0], draws[1])
    torch.manual_seed(11)
    assert torch.equal(torch.rand(4), draws[0])  # rank 0 keeps the single process's stream
    saved = {**states[0], "ranks": states}
    for rank in range(2):
        runtime.set_rng_state(saved, cpu, runtime.Distributed(rank, 2, rank))
        assert torch.equal(torch.rand(4), draws[rank])
    # Resumed on 3 ranks: rank 0 continues the saved main stream, the others differ from it.
    restored = []
    for rank in range(3):
        runtime.set_rng_state(saved, cpu, runtime.Distributed(rank, 3, rank))
        restored.append(torch.rand(4))
    assert torch.equal(restored[0], draws[0])
    assert not torch.equal(restored[1], restored[0]) and not torch.equal(restored[2], restored[1])


@pytest.mark.parametrize("name, dtype, tflops", [
    ("NVIDIA GeForce RTX 4060 Ti", torch.bfloat16, 44.1), ("NVIDIA GeForce RTX 4060", torch.float16, 30.2),
    ("NVIDIA GeForce RTX 5060 Ti", torch.bfloat16, 47.4), ("NVIDIA GeForce RTX 3090", torch.float32, 35.6),
    ("NVIDIA GeForce RTX 4070 Ti SUPER", torch.bfloat16, 88.2), ("NVIDIA GeForce RTX 4090", torch.bfloat16, 165.2),
    ("NVIDIA GeForce RTX 5090", torch.bfloat16, 209.5), ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312.0),
    ("NVIDIA A100 80GB PCIe", torch.float32, 156.0), ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.4),
    ("NVIDIA H100 PCIe", torch.bfloat16, 756.0), ("NVIDIA H200", torch.bfloat16, 989.4),
    ("NVIDIA L4", torch.bfloat16, 121.0), ("Tesla T4", torch.float16, 65.0), ("NVIDIA A10", torch.bfloat16, 125.0),
    # Not in the table: MFU falls back to the measured roofline.
    ("Tesla T4", torch.bfloat16, None), ("NVIDIA GeForce RTX 4060 Laptop GPU", torch.bfloat16, None),
    ("NVIDIA GeForce RTX 4090 D", torch.bfloat16, None), ("NVIDIA A10G", torch.bfloat16, None),
    ("NVIDIA Future GPU 9000", torch.bfloat16, None)])
def test_datasheet_peak_is_looked_up_by_device_name(name, dtype, tflops):
    peak = runtime.datasheet_peak(name, dtype)
    assert (peak if tflops is None else peak / 1e12) == (tflops if tflops is None else pytest.approx(tflops))


def test_mfu_is_quoted_against_the_datasheet_with_the_roofline_beside_it(monkeypatch):
    """A fake RTX 4060 Ti: MFU divides by its 44.1 TFLOP/s dense bf16 peak, the measured roofline
    is logged beside it; an unknown card (or a roofline above the datasheet) uses the roofline and
    the log line says why."""
    names = {0: "NVIDIA GeForce RTX 4060 Ti", 1: "NVIDIA Future GPU 9000"}
    roofline = {"flops": 30e12}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: names[torch.device(device).index])
    monkeypatch.setattr(runtime, "matmul_peak_flops", lambda device, dtype: roofline["flops"])
    known = runtime.mfu_peak(torch.device("cuda", 0), torch.bfloat16)
    assert (known.flops, known.roofline) == (pytest.approx(44.1e12), 30e12)
    assert known.describe() == ("MFU against NVIDIA GeForce RTX 4060 Ti's datasheet dense bf16 peak (44.1 TFLOP/s); "
                                "measured matmul roofline 30 TFLOP/s")
    unknown = runtime.mfu_peak(torch.device("cuda", 1), torch.bfloat16)
    assert unknown.flops == unknown.roofline == 30e12
    assert unknown.describe() == ("MFU against the measured bf16 matmul roofline (30 TFLOP/s): "
                                  "NVIDIA Future GPU 9000 is not in the datasheet table")
    roofline["flops"] = 50e12
    faster = runtime.mfu_peak(torch.device("cuda", 0), torch.bfloat16)
    assert faster.flops == 50e12 and "above NVIDIA GeForce RTX 4060 Ti's datasheet dense bf16 peak" in faster.describe()
    cpu = runtime.mfu_peak(torch.device("cpu"), torch.float32)
    assert cpu.flops == 50e12 and "no datasheet peak for cpu" in cpu.describe()


def test_memory_log_shows_peak_reserved_beside_allocated(monkeypatch):
    gib = 2 ** 30
    peak = _fake_gpu(monkeypatch, free_gib=16, total_gib=16)
    peak["bytes"] = 3 * gib
    memory = runtime.memory_in_use(torch.device("cuda", 0))
    assert memory == {"allocated": 1.5 * gib, "reserved": 3.0 * gib}
    assert runtime.memory_text(memory) == "mem 1.50GiB (reserved 3.00GiB)"
    assert runtime.memory_in_use(torch.device("cuda", 0)) == {"allocated": 0.0, "reserved": 0.0}  # reset per window
    cpu = runtime.memory_in_use(torch.device("cpu"))
    assert cpu["reserved"] is None and runtime.memory_text(cpu).startswith("mem ") and "reserved" not in \
        runtime.memory_text(cpu)


def test_per_block_compile_keeps_the_state_dict_names():
    """Under DDP/FSDP each block is compiled on its own (the all-reduce overlaps the backward);
    in one process the whole model. In place: checkpoints see the pure model's names."""
    model = _tiny_gpt()
    names = list(model.state_dict())
    runtime.apply_activation_checkpointing(model)
    compiled = runtime.compile_in_place(model, per_block=True)
    assert compiled == list(model.blocks) and all(b._compiled_call_impl is not None for b in model.blocks)
    assert model._compiled_call_impl is None and list(model.state_dict()) == names
    whole = _tiny_gpt()
    assert runtime.compile_in_place(whole, per_block=False) == [whole] and whole._compiled_call_impl is not None
    assert list(whole.state_dict()) == names


def test_sdpa_prefers_cudnn_then_flash_on_hopper_unless_deterministic(monkeypatch):
    from torch.nn.attention import SDPBackend

    capability = {"value": (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability["value"])
    cuda = torch.device("cuda", 0)
    order = runtime.attention_priority(cuda, deterministic=False)
    assert order[:2] == [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]
    assert runtime.attention_priority(cuda, deterministic=True) is None
    assert runtime.attention_priority(torch.device("cpu"), deterministic=False) is None
    capability["value"] = (8, 9)
    assert runtime.attention_priority(cuda, deterministic=False) is None
    before = torch._C._get_sdp_priority_order()
    seen = runtime.WithAttentionPriority(lambda: torch._C._get_sdp_priority_order(), order)()
    assert seen[:2] == [int(SDPBackend.CUDNN_ATTENTION), int(SDPBackend.FLASH_ATTENTION)]
    assert torch._C._get_sdp_priority_order() == before  # restored after the call


def test_fsdp_keeps_parameters_gathered_through_accumulation():
    """gradient_sync on an FSDP2 module: accumulation micro-steps neither reduce gradients nor
    reshard (after forward or backward); the last micro-step reduces and reshards after backward."""
    calls = []

    class FakeFSDP:
        def set_requires_gradient_sync(self, value):
            calls.append(("sync", value))

        def set_reshard_after_backward(self, value):
            calls.append(("after_backward", value))

        def set_reshard_after_forward(self, value):
            calls.append(("after_forward", value))

    model = FakeFSDP()
    for micro in range(2):
        with runtime.gradient_sync(model, enabled=micro == 1):
            pass
    assert calls == [("sync", False), ("after_backward", False), ("after_forward", False),
                     ("sync", True), ("after_backward", True)]
    calls.clear()
    with runtime.gradient_sync(model, enabled=True):  # no accumulation: resharded after forward as usual
        pass
    assert ("after_forward", False) not in calls


def test_model_state_stays_on_device_unless_sharded(monkeypatch):
    """Single GPU and DDP hand the live tensors to the checkpoint's snapshot (one copy into its
    pinned buffers); only FSDP's gathered tensors are offloaded to the CPU as they come."""
    import torch.distributed.checkpoint.state_dict as state_dict

    seen = []
    real = state_dict.get_model_state_dict
    monkeypatch.setattr(state_dict, "get_model_state_dict",
                        lambda model, options: seen.append(options.cpu_offload) or real(model, options=options))
    model = _tiny_gpt()
    state = runtime.model_state(model)
    assert seen == [False]
    assert state["norm.weight"].data_ptr() == model.norm.weight.data_ptr()  # not a copy


def test_deterministic_is_refused_once_cuda_runs_without_the_cublas_setting(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(L1Error, match="CUBLAS_WORKSPACE_CONFIG=:4096:8 before CUDA starts"):
        runtime._set_deterministic(torch.device("cuda", 0))
    from torch._inductor import config as inductor

    monkeypatch.setattr(inductor, "deterministic", False)
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda value: None)
    runtime._set_deterministic(torch.device("cpu"))  # before CUDA starts: set, with inductor's mode
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8" and inductor.deterministic


def test_ddp_wraps_a_model_compiled_block_by_block():
    """Under torchrun parallelize compiles each block (not the whole model) before DDP wraps it,
    so that the all-reduce of early gradients overlaps the rest of the backward; the pure model
    keeps its names. (A one-process gloo group stands in for the job.)"""
    import torch.distributed as dist

    model = _tiny_gpt()
    names = list(model.state_dict())
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        cpu = torch.device("cpu")
        rt = runtime.Runtime(runtime.Distributed(0, 2, 0), cpu, runtime.precision(cpu, False))
        outer, forward = runtime.parallelize(model, rt, grad_ckpt=False, compile=True, fsdp=False, log=print)
        assert isinstance(outer, torch.nn.parallel.DistributedDataParallel) and outer.module is model
        assert model._compiled_call_impl is None and all(b._compiled_call_impl is not None for b in model.blocks)
        assert list(model.state_dict()) == names
    finally:
        dist.destroy_process_group()
