"""How long a checkpoint save holds the training loop: synchronous against background writing.

    python -m bench.checkpoint [--scale 1.0] [--saves 3] [--save_every 10] [--step_s 1.0] [--dir DIR]

The state has the l1-gpu-compatible preset's shapes: the model's weights (tied embedding stored
twice by name, once by storage) and AdamW's two moments, about 1.87 GB in fp32, plus the small
values a trainer stores; --scale shrinks every tensor's first dimension for a smoke run. A
training step is stood in for by sleeping --step_s: the Python thread of a GPU run mostly waits
for the device, so what a save costs the loop is the time save() holds it plus any delay the
writer thread causes it (the GIL). Both are measured: `held_s` per save (save() returning) and
`overrun_s` per save (the loop's wall time beyond its steps' sleeps, divided by the saves).
"sync" is CheckpointManager(background=False): today's synchronous save (hash, write, fsync,
rename, copy to the rolling file, all before save() returns); "background" snapshots and returns.
The first background save allocates its host copies; later ones copy into them, so its held time
is reported apart. Prints one JSON object per mode, then a summary with the ratio.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.common import emit, machine
from l1.checkpoint import CheckpointManager
from l1.config import resolve
from l1.model import GPT

PHASES = re.compile(r"checksum ([\d.]+)s, write ([\d.]+)s, copies ([\d.]+)s")


def flagship_state(scale: float) -> dict:
    """A trainer-shaped state with the flagship's tensor shapes (first dimension times scale)."""
    cfg = resolve({"preset": "l1-gpu-compatible"}).model
    with torch.device("meta"):
        model = GPT(cfg)
    made: dict[int, torch.Tensor] = {}
    weights, moments = {}, {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) not in made:  # the tied head shares the embedding's storage, as in a real state
            shape = (max(1, round(param.shape[0] * scale)), *param.shape[1:])
            made[id(param)] = torch.randn(shape)
            moments[name] = {"step": torch.tensor(100.0), "exp_avg": torch.randn(shape),
                             "exp_avg_sq": torch.rand(shape)}
        weights[name] = made[id(param)]
    return {"model": weights, "optimizer": {"state": moments, "param_groups": [{"lr": 6e-4, "params": list(moments)}]},
            "step": 0, "epoch": 0, "rng": {"cpu": torch.get_rng_state(), "cuda": []},
            "data_state": {"epoch": 0, "position": 0}, "model_config": {"preset": "l1-gpu-compatible"}}


def state_bytes(state: dict) -> int:
    storages = {}

    def walk(value):
        if isinstance(value, torch.Tensor):
            storages[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
    walk(state)
    return sum(storages.values())


def measure(state: dict, folder: Path, background: bool, args) -> dict:
    """Run saves * save_every sleeping steps, saving a rolling checkpoint every save_every steps."""
    lines: list[str] = []
    manager = CheckpointManager(folder, keep=2, background=background, log=lines.append)
    held = []
    steps = args.saves * args.save_every
    started = time.perf_counter()
    for step in range(1, steps + 1):
        time.sleep(args.step_s)
        for tensor in state["optimizer"]["state"].values():  # training changes the state between saves
            tensor["step"] += 1
        if step % args.save_every == 0:
            state["step"] = step
            held.append(manager.save(state, rolling=True))
    loop = time.perf_counter() - started
    drain_start = time.perf_counter()
    manager.wait()
    drain = time.perf_counter() - drain_start
    phases = [tuple(map(float, m.groups())) for line in lines if (m := PHASES.search(line))]
    slept = steps * args.step_s
    return {"held_s": [round(h, 4) for h in held], "held_first_s": round(held[0], 4),
            "held_median_s": round(statistics.median(held[1:] or held), 4),
            "overrun_s": round((loop - slept) / args.saves, 4), "last_write_waited_s": round(drain, 3),
            "write_s": {name: round(statistics.median(p[i] for p in phases), 3)
                        for i, name in enumerate(("checksum", "write", "copies"))}}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the flagship's state (smoke: 0.01)")
    parser.add_argument("--saves", type=int, default=3)
    parser.add_argument("--save_every", type=int, default=10, help="steps between saves")
    parser.add_argument("--step_s", type=float, default=1.0, help="seconds one training step takes")
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    args = parser.parse_args(argv)
    state = flagship_state(args.scale)
    size = state_bytes(state)
    emit(kind="setup", **machine(), state_gb=round(size / 1e9, 3), scale=args.scale, saves=args.saves,
         save_every=args.save_every, step_s=args.step_s)
    work = Path(tempfile.mkdtemp(prefix="l1-bench-checkpoint-", dir=args.dir))
    try:
        results = {}
        for mode in ("sync", "background"):
            folder = work / mode
            folder.mkdir()
            results[mode] = measure(state, folder, mode == "background", args)
            emit(kind="mode", mode=mode, **results[mode])
        sync, background = results["sync"], results["background"]
        emit(kind="summary", state_gb=round(size / 1e9, 3),
             held_ratio=round(background["held_median_s"] / sync["held_median_s"], 4),
             overrun_ratio=round(background["overrun_s"] / sync["overrun_s"], 4) if sync["overrun_s"] > 0 else None,
             first_save_held_ratio=round(background["held_first_s"] / sync["held_median_s"], 4))
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
