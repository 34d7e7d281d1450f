"""Peak memory of one training step: measured, next to an analytic model, and the 16 GB plan.

    python -m bench.memory [--sizes tiny l1-v1 l1-gpu-compatible] [--budget_gib 15] [--seq 1024]
                           [--device cuda --flagship --cap_gib 15]

Every configuration (model, micro-batch x sequence, fp32 or bf16 autocast, gradient checkpointing
off/on, flash or math attention) runs in a fresh subprocess, so peaks never mix: a small step
creates the AdamW state, then one full step (forward, loss, backward, fused AdamW) is measured.
On CPU the peak is the bytes that live in tensors: weights and optimizer state before the step
plus the peak of torch's CPU allocator during it (recorded by the profiler); the peak resident
set (VmHWM) of the step is printed beside it. On CUDA it is torch.cuda.max_memory_allocated,
with max_memory_reserved (what the card must hold) beside it. Attention runs SDPA's fused kernel
for the dtype, as training does: flash in bf16, the memory-efficient kernel in fp32 on CUDA
(flash takes only half precision there); both save the same tensors for backward.
The tensors autograd saves for backward are also counted exactly, by saved-tensor hooks, and
checked against the model's activation term. Then the model, trusted where it was measured,
gives the largest micro-batch of l1-gpu-compatible that fits a 16 GB GPU; --flagship then
measures that plan on the GPU (the preset's micro-batch and the plan's largest, bf16, with and
without checkpointing) with each child capped at --cap_gib, as a 16 GB card would cap it.
A child that fails (an error, a timeout) is reported and makes the exit status 1.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import traceback

import torch

from bench.common import emit, machine
from l1.config import ModelConfig, resolve
from l1.loss import chunk_rows
from l1.model import GPT, matmul_attention_pays
from l1.runtime import Precision, apply_activation_checkpointing

GIB = 2.0 ** 30
ADAMW_MOMENTS = 2  # exp_avg and exp_avg_sq, fp32 like the weights


# ---- the analytic model ---------------------------------------------------------------------------

def _param_counts(cfg: ModelConfig) -> tuple[int, int]:
    """(all parameters, matmul weights): the tied embedding counts once, as the head's matmul."""
    C, H, L = cfg.n_embd, cfg.mlp_hidden, cfg.n_layer
    matmul = L * (4 * C * C + 3 * C * H) + cfg.padded_vocab_size * C
    norms = (2 * L + 1) * C
    return matmul + norms, matmul


def attention_path(device_type: str, amp_dtype: torch.dtype | None, seq: int, flash: bool) -> str:
    """Which attention L1 runs in training: 'flash' (SDPA), 'math' (SDPA's math kernel, when
    flash is switched off) or 'matmul' (the model's own, where it pays: CPU, bf16, short contexts)."""
    if matmul_attention_pays(device_type, amp_dtype or torch.float32, seq):
        return "matmul"
    return "flash" if flash else "math"


def layer_activation_bytes(cfg: ModelConfig, tokens: int, seq: int, act_bytes: int, attention: str) -> float:
    """Bytes one block saves for backward in L1's eager autograd graph (as saved-tensor hooks count them).

    Always, in the activation dtype: the two RMSNorms' normalized inputs and outputs (the latter
    being the inputs of qkv and gate_up), the attention output (proj's input), the SwiGLU gate/up
    output, silu(gate) and the product (down's input). Flash attention keeps the qkv output (v is
    a view of it), the RoPE'd q and k and one fp32 logsumexp per head and query. The math path
    keeps none of those but contiguous, scaled fp32 copies of q, k and v and the fp32 softmax,
    B x H x T x T (CPU upcasts bf16 there). The matmul path keeps contiguous copies of q, k and v
    (reshaping them for its batched matmuls makes them; at batch 1 they stay views of the RoPE'd
    q and k and of the qkv output) and the softmax, B x H x T x T in the activation dtype.
    """
    C, H = cfg.n_embd, cfg.mlp_hidden
    per_token = 2 * C * act_bytes + 3 * C * act_bytes + 4 * H * act_bytes
    if attention == "flash":
        per_token += 5 * C * act_bytes + cfg.n_head * 4
    elif attention == "matmul":  # at batch 1 q, k and v stay views of the RoPE'd qk and of qkv
        per_token += (3 if tokens > seq else 5) * C * act_bytes + cfg.n_head * seq * act_bytes
    else:
        per_token += 3 * C * 4 + cfg.n_head * seq * 4
    return float(tokens * per_token)


def estimate_training_bytes(cfg: ModelConfig, batch: int, seq: int, amp_dtype: torch.dtype | None = None,
                            grad_ckpt: bool = False, attention: str = "flash",
                            device_type: str = "cpu") -> dict[str, float]:
    """Peak bytes of one training step (fp32 weights, fused AdamW, eager autograd), by part.

    Weights, gradients and the two AdamW moments are fp32; under autocast every block's matmul
    weight is also cast once to amp_dtype for the step. Activations are what autograd saves: per
    block layer_activation_bytes, or with checkpointing only the block's fp32 input (the block is
    recomputed in backward, one at a time). The loss (l1/loss.py) computes its gradients in the
    forward pass, a chunk of rows at a time, and keeps the head input's gradient (tokens x width)
    and the head weight's (fp32); its forward holds, besides, the head input and weight in the
    matmul dtype and one chunk's buffers. Backward then frees activations block by block while
    gradients appear, so the peak is the largest of: the loss's forward, the start of backward,
    the first or the last block's backward (saved or recomputed activations, the gradients so
    far, the block's working buffers), and its end (all gradients while the tied embedding's two
    partial gradients are summed). 'total' is that peak.
    """
    L, C, H, V = cfg.n_layer, cfg.n_embd, cfg.mlp_hidden, cfg.padded_vocab_size
    N = batch * seq
    s = torch.finfo(amp_dtype).bits // 8 if amp_dtype is not None else 4
    params, matmul = _param_counts(cfg)
    layer = layer_activation_bytes(cfg, N, seq, s, attention)
    kept = N * C * 4.0 if grad_ckpt else layer  # what each block keeps until its backward
    ids = N * 8.0  # token ids (int64), kept to the end for the embedding's backward
    head_grad = 4.0 * V * C
    head = N * C * s + ids + N * C * s + head_grad  # final norm, ids, the loss's saved gradients
    rows = min(chunk_rows(V, device_type, N), N)
    cast = s if amp_dtype is not None else 0
    # The loss's forward: its input (the final norm's output) and the head weight in the matmul
    # dtype, then per chunk the logits in fp32 and (briefly) in the matmul dtype, their gradient
    # in that dtype, and the weight gradient's chunk from one matmul (under autocast also its
    # fp32 copy, made to add it up).
    loss_work = N * C * s + cast * V * C + rows * V * (4 + cast) + s * V * C + (4 * V * C if cast else 0)
    layer_grads = 4.0 * (4 * C * C + 3 * C * H + 2 * C)
    # A block's backward peaks in its SwiGLU product's backward (the profiler's live tensors
    # there): the residual stream's gradient (fp32) and three hidden-sized gradients (down's
    # input, gate's and up's) are alive, and down's fp32 weight gradient; down's input itself
    # has just been freed. With checkpointing, the recomputed block's activations too.
    work = N * (C * 4 + 2 * H * s) + 4.0 * C * H + (layer if grad_ckpt else 0.0)
    # bf16 copies of the block weights (autocast casts each once per forward and backward keeps
    # them): all of them at the start of backward, fewer as it proceeds; with checkpointing only
    # those of the block being recomputed.
    block_matmul = 4 * C * C + 3 * C * H
    amp_start = cast * (0 if grad_ckpt else matmul - V * C)
    amp_first = cast * (block_matmul if grad_ckpt else matmul - V * C)
    parts = {
        "weights": 4.0 * params,
        "adamw": 4.0 * ADAMW_MOMENTS * params,
        "grads": 4.0 * params,
        "amp_weights": float(amp_start),
        "activations": L * kept + head,
        "loss_forward": loss_work,
        "loss_backward": N * C * (4 + s) + head_grad,
        "block_backward": work,
    }
    phases = {
        "loss": amp_start + L * kept + head + loss_work,
        "backward_start": amp_start + L * kept + head + parts["loss_backward"],
        "first_block": amp_first + L * kept + ids + head_grad + work,
        "last_block": cast * block_matmul + kept + ids + head_grad + (L - 1) * layer_grads + work,
        # The tied weight's second gradient (the embedding's) is summed into the first at the very end.
        "backward_end": parts["grads"] + head_grad,
    }
    parts.update(phases)
    parts["total"] = parts["weights"] + parts["adamw"] + max(phases.values())
    return parts


def largest_batch(cfg: ModelConfig, seq: int, budget_bytes: float, **kwargs) -> int:
    """The largest micro-batch whose estimated peak fits the budget (0 if none does)."""
    batch = 0
    while estimate_training_bytes(cfg, batch + 1, seq, **kwargs)["total"] <= budget_bytes:
        batch += 1
    return batch


# ---- measurement -------------------------------------------------------------------------------

def _status_kib(field: str) -> int:
    """A field of /proc/self/status (VmRSS, VmHWM), in KiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _allocator_peak(step) -> float:
    """Peak bytes that torch's CPU allocator handed out during step() (its allocations only)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    totals, stack = [0], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == torch._C._profiler._EventType.Allocation:
            totals.append(node.extra_fields.total_allocated)
        stack.extend(node.children)
    return float(max(totals))


def _saved_bytes(model, idx, targets, amp) -> float:
    """Bytes of the tensors one forward saves for backward (each storage once, weights excluded)."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), amp:
        model(idx, targets)
    return float(sum(seen.values()))


def fused_backend(device: torch.device, amp: bool):
    """SDPA's fused kernel for this dtype: flash, except fp32 on CUDA, which only the
    memory-efficient kernel takes (CUDA's flash kernel is fp16/bf16 only)."""
    from torch.nn.attention import SDPBackend

    return SDPBackend.EFFICIENT_ATTENTION if device.type == "cuda" and not amp else SDPBackend.FLASH_ATTENTION


def measure(cfg: ModelConfig, batch: int, seq: int, amp: bool, grad_ckpt: bool, flash: bool,
            device: torch.device) -> dict:
    """Peak bytes of one full training step of a fresh model (run it in a fresh process)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    model = GPT(cfg).to(device).train()
    if grad_ckpt:
        apply_activation_checkpointing(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    autocast = Precision(device.type, torch.bfloat16 if amp else torch.float32).autocast
    backend = fused_backend(device, amp) if flash else SDPBackend.MATH

    def batch_of(b: int, t: int):
        data = torch.randint(0, cfg.vocab_size, (b, t + 1), device=device)
        return data[:, :-1].contiguous(), data[:, 1:].contiguous()

    def step(idx, targets) -> None:
        with autocast(), sdpa_kernel(backend):
            loss = model(idx, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(*batch_of(1, 8))  # creates the AdamW state
    idx, targets = batch_of(batch, seq)
    start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step(idx, targets)
        peak = float(torch.cuda.max_memory_allocated())
        reserved = float(torch.cuda.max_memory_reserved())
        rss_peak = float("nan")
    else:
        rss_before = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        step(idx, targets)
        rss_peak = 1024.0 * (_status_kib("VmHWM") - rss_before)
        tensors = [*model.parameters(), *model.buffers(), idx, targets]
        tensors += [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
        persistent = float(sum(t.numel() * t.element_size() for t in tensors))
        peak = persistent + _allocator_peak(lambda: step(idx, targets))
        rss_peak += persistent
        reserved = float("nan")
    step_s = time.perf_counter() - start
    with sdpa_kernel(backend):
        saved = _saved_bytes(model, idx, targets, autocast())
    return {"measured": peak, "measured_reserved": reserved, "measured_rss": rss_peak, "saved_for_backward": saved,
            "seconds": step_s}


# ---- driver ---------------------------------------------------------------------------------------

# Measured here: (micro-batch, sequence) per model, fp32 and (smaller, bf16 being slow on CPUs
# without native bf16) under bf16 autocast; l1-gpu-compatible only at a reduced size.
SIZES = {
    "tiny": {"fp32": (16, 256), "bf16": (8, 256)},
    "l1-v1": {"fp32": (8, 512), "bf16": (2, 256)},
    "l1-gpu-compatible": {"fp32": (2, 512), "bf16": (1, 128)},
}


CHILD_TIMEOUT_S = 600


def _run_child(spec: dict) -> dict:
    """measure() in a fresh interpreter, so each configuration's peak is its own; a child that
    fails or runs past CHILD_TIMEOUT_S gives {"error": its last line} instead."""
    try:
        out = subprocess.run([sys.executable, "-m", "bench.memory", "--child", json.dumps(spec)],
                             capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {CHILD_TIMEOUT_S} s"}
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        last = (out.stderr.strip().splitlines() or [f"exit status {out.returncode}"])[-1]
        return {"error": last[:300]}
    return json.loads(lines[-1])


def _child(spec: dict) -> None:
    """One measurement, under the memory cap on CUDA; running out of memory there is a result
    (the size does not fit under the cap), not a failure."""
    device = torch.device(spec["device"])
    if device.type == "cuda" and spec.get("cap_gib"):
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, spec["cap_gib"] * GIB / total), device)
    cfg = resolve({"preset": spec["preset"]}).model
    try:
        result = measure(cfg, spec["batch"], spec["seq"], spec["dtype"] == "bf16", spec["grad_ckpt"],
                         spec["flash"], device)
    except torch.cuda.OutOfMemoryError:
        traceback.print_exc()
        result = {"out_of_memory": True}
    print(json.dumps(result))


def plan(budget_gib: float, seq: int) -> list[dict]:
    """The largest micro-batches of l1-gpu-compatible that fit the budget, bf16 autocast, flash attention."""
    cfg = resolve({"preset": "l1-gpu-compatible"})
    gpu = dict(attention="flash", device_type="cuda")
    rows = []
    for grad_ckpt in (False, True):
        batch = largest_batch(cfg.model, seq, budget_gib * GIB, amp_dtype=torch.bfloat16, grad_ckpt=grad_ckpt, **gpu)
        preset = estimate_training_bytes(cfg.model, cfg.batch_size, seq, torch.bfloat16, grad_ckpt, **gpu)
        rows.append(dict(kind="plan", model="l1-gpu-compatible", seq=seq, budget_gib=budget_gib,
                         dtype="bf16", flash=True, grad_ckpt=grad_ckpt, max_micro_batch=batch,
                         tokens_per_micro_batch=batch * seq,
                         estimate_gib_at_max=estimate_training_bytes(cfg.model, batch, seq, torch.bfloat16,
                                                                     grad_ckpt, **gpu)["total"] / GIB if batch else 0.0,
                         preset_batch=cfg.batch_size, preset_estimate_gib=preset["total"] / GIB,
                         preset_fits=preset["total"] <= budget_gib * GIB))
    return rows


def flagship(budget_gib: float, seq: int, cap_gib: float, device: str) -> int:
    """Measure the 16 GB plan on the GPU under the cap: l1-gpu-compatible at its preset micro-batch
    and at the plan's largest, bf16 flash attention, with and without checkpointing. One
    "flagship" line each; returns how many failed to run or to fit under the cap."""
    cfg = resolve({"preset": "l1-gpu-compatible"})
    failures = 0
    for row in plan(budget_gib, seq):
        for batch in sorted({cfg.batch_size, row["max_micro_batch"]} - {0}):
            spec = dict(preset="l1-gpu-compatible", dtype="bf16", batch=batch, seq=seq, grad_ckpt=row["grad_ckpt"],
                        flash=True, device=device, cap_gib=cap_gib)
            result = _run_child(spec)
            estimate = estimate_training_bytes(cfg.model, batch, seq, torch.bfloat16, row["grad_ckpt"], "flash",
                                               "cuda")["total"]
            fits = "measured" in result  # the cap bounds what the allocator reserves: past it, out of memory
            failures += not fits
            emit(kind="flagship", **{k: v for k, v in spec.items() if k != "device"},
                 plan_max=batch == row["max_micro_batch"], fits_under_cap=fits, estimate_gib=estimate / GIB,
                 measured_gib=result["measured"] / GIB if "measured" in result else None,
                 reserved_gib=result["measured_reserved"] / GIB if "measured" in result else None,
                 out_of_memory=result.get("out_of_memory", False), error=result.get("error"))
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="*", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--dtypes", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    parser.add_argument("--math", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure tiny with the math attention path (B x H x T x T saved)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--budget_gib", type=float, default=15.0, help="usable memory of the 16 GB GPU")
    parser.add_argument("--seq", type=int, default=1024, help="sequence length of the 16 GB plan")
    parser.add_argument("--flagship", action="store_true", help="measure the 16 GB plan on the GPU under --cap_gib")
    parser.add_argument("--cap_gib", type=float, default=0.0,
                        help="cap each child's CUDA memory at this many GiB (0: no cap; --flagship: --budget_gib)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(json.loads(args.child))
        return 0
    emit(kind="setup", **machine())
    specs = [dict(preset=name, dtype=dtype, batch=SIZES[name][dtype][0], seq=SIZES[name][dtype][1],
                  grad_ckpt=grad_ckpt, flash=True)
             for name in args.sizes for dtype in args.dtypes for grad_ckpt in (False, True)]
    if args.math and "tiny" in args.sizes:
        specs.append(dict(preset="tiny", dtype="fp32", batch=4, seq=256, grad_ckpt=False, flash=False))
    worst, failures = None, 0
    for spec in specs:
        result = _run_child({**spec, "device": args.device, "cap_gib": args.cap_gib})
        if "measured" not in result:
            failures += 1
            emit(kind="memory_error", **spec, device=args.device, error=result.get("error"),
                 out_of_memory=result.get("out_of_memory", False))
            continue
        cfg = resolve({"preset": spec["preset"]}).model
        amp = torch.bfloat16 if spec["dtype"] == "bf16" else None
        device_type = torch.device(args.device).type
        attention = attention_path(device_type, amp, spec["seq"], spec["flash"])
        estimate = estimate_training_bytes(cfg, spec["batch"], spec["seq"], amp, spec["grad_ckpt"], attention,
                                           device_type)
        error = estimate["total"] / result["measured"] - 1
        worst = max(worst or 0.0, abs(error))
        emit(kind="memory", **spec, attention=attention, device=args.device, measured_mib=result["measured"] / 2**20,
             measured_reserved_mib=result["measured_reserved"] / 2**20,
             estimate_mib=estimate["total"] / 2**20, estimate_error=error,
             measured_rss_mib=result["measured_rss"] / 2**20,
             saved_for_backward_mib=result["saved_for_backward"] / 2**20,
             estimate_saved_mib=(estimate["activations"] + estimate["amp_weights"]) / 2**20,
             peak_phase=max(("loss", "backward_start", "first_block", "last_block", "backward_end"),
                            key=lambda k: estimate[k]),
             parts_mib={k: round(v / 2**20, 1) for k, v in estimate.items()}, step_s=result["seconds"])
    emit(kind="agreement", configurations=len(specs), failures=failures, worst_estimate_error=worst)
    for row in plan(args.budget_gib, args.seq):
        emit(**row)
    if args.flagship:
        failures += flagship(args.budget_gib, args.seq, args.cap_gib or args.budget_gib, args.device)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
