"""One Muon step with its Newton-Schulz iterations in fp32 against bf16, interleaved.

    python -m bench.muon [--widths 96 1024] [--repeats 5]

The matrices are one GPT's blocks' (what --optimizer muon hands to Muon): the replica's (4 blocks,
width 96, bench.recipe --replica) and one block at each wider width. torch's own Muon (always bf16)
and a fused AdamW step on the same matrices run in the same turns. Prints one JSON object per
width: median seconds of each contender and the ratios to AdamW.
"""

from __future__ import annotations

import argparse

import torch

from bench.common import emit, interleaved, machine
from l1 import runtime
from l1.config import ModelConfig
from l1.model import GPT
from l1.optim import Muon


def matrices(width: int) -> list[torch.nn.Parameter]:
    """The blocks' 2-D parameters of the replica (width 96: 4 blocks) or of one block this wide."""
    n_layer, n_head = (4, 4) if width == 96 else (1, width // 64)
    model = GPT(ModelConfig(vocab_size=1024, n_layer=n_layer, n_head=n_head, n_embd=width, block_size=128))
    return [p for name, p in model.named_parameters() if p.dim() == 2 and name.startswith("blocks.")]


def contenders(width: int, device: torch.device) -> dict:
    """Each contender: one optimizer step on its own copy of the matrices, with fixed gradients."""
    options = dict(lr=1e-3, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    makers = {"muon_fp32": lambda ps: Muon(ps, ns_dtype=torch.float32, **options),
              "muon_bf16": lambda ps: Muon(ps, ns_dtype=torch.bfloat16, **options),
              "torch_muon": lambda ps: torch.optim.Muon(ps, **options),
              "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=device.type in ("cuda", "cpu"))}
    out = {}
    for name, make in makers.items():
        params = [torch.nn.Parameter(p.detach().to(device)) for p in matrices(width)]
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer = make(params)

        def step(optimizer=optimizer):
            optimizer.step()
            runtime.synchronize(device)

        step()  # state allocated, kernels warm
        out[name] = step
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[96, 1024])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = runtime.pick_device(args.device)
    emit(kind="setup", **machine(), native_bf16=runtime.native_bf16(device),
         newton_schulz_dtype=str(runtime.newton_schulz_dtype(device)))
    for width in args.widths:
        seconds = interleaved(contenders(width, device), args.repeats)
        emit(kind="step", width=width, shapes=[list(p.shape) for p in matrices(width)], seconds=seconds,
             fp32_over_bf16=seconds["muon_fp32"] / seconds["muon_bf16"],
             over_adamw={name: s / seconds["adamw"] for name, s in seconds.items() if name != "adamw"})


if __name__ == "__main__":
    main()
