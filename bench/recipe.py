"""Which training recipe gives the best model for the same wall-clock? Validation loss per recipe.

    python -m bench.recipe [--minutes 10] [--seeds 1 2 3] [--recipes baseline l1 wsd muon]
                           [--data ../shared/data/wikipedia-sample] [--max_docs 0]

Each recipe trains the tiny preset from scratch for the same wall-clock budget: a short probe
measures its step time, the budget is turned into max_steps, so every schedule runs to its end.
Seeds are the outer loop and recipes the inner one, so machine noise falls on all recipes alike;
every recipe sees the same data order and the same validation batches for a given seed.
Prints one JSON object per run and a summary per recipe (mean and spread over seeds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import emit, machine
from l1 import config, trainer

# Overrides of the tiny preset. The baseline follows the classic GPT-2 reproductions: AdamW
# betas 0.9/0.95, weight decay 0.1, warmup then cosine to 10%, lr 6e-4 scaled to width (x 768/256).
RECIPES = {
    "baseline": {"lr": 1.8e-3, "beta1": 0.9, "beta2": 0.95, "weight_decay": 0.1, "schedule": "cosine",
                 "min_lr_ratio": 0.1},
    "l1": {},  # the tiny preset as it stands
    "wsd": {"schedule": "wsd", "decay_fraction": 0.2, "min_lr_ratio": 0.0},
    "high_lr": {"lr": 4e-3},
    "muon": {"optimizer": "muon", "lr": 4e-3},
}


def steps_for_budget(base: dict, seconds: float, probe_steps: int, tmp: Path) -> int:
    """Run a few steps, read their measured speed (evaluation excluded), size the run to the budget."""
    probe = config.resolve(config.merge(base, {"max_steps": probe_steps, "eval_batches": 1,
                                               "out": str(tmp / "probe")}))
    trainer.train(probe)
    records = [json.loads(line) for line in (probe.run_dir / "metrics.jsonl").read_text().splitlines()]
    tokens_per_s = [r["tokens_per_s"] for r in records if r["kind"] == "train"][-1]
    tokens_per_step = probe.batch_size * probe.context * probe.grad_accum
    return max(probe_steps, int(seconds * tokens_per_s / tokens_per_step))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="wall-clock budget per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--data", default="../shared/data/wikipedia-sample")
    parser.add_argument("--data_dir", default="data")
    parser.add_argument("--max_docs", type=int, default=0)
    parser.add_argument("--eval_batches", type=int, default=40)
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="l1-recipe-"))
    emit(kind="setup", **machine(), minutes=args.minutes, seeds=args.seeds, recipes=args.recipes)
    results: dict[str, list[float]] = {name: [] for name in args.recipes}
    for seed in args.seeds:
        for name in args.recipes:
            base = config.merge({"preset": "tiny", "seed": seed, "log_every": 50,
                                 "eval_batches": args.eval_batches, "keep": 1,
                                 "data": {"data": args.data, "data_dir": args.data_dir, "max_docs": args.max_docs}},
                                RECIPES[name])
            steps = steps_for_budget(base, args.minutes * 60, 5, tmp / f"{name}-{seed}")
            cfg = config.resolve(config.merge(base, {"max_steps": steps, "warmup_steps": max(1, steps // 10),
                                                     "eval_every": steps, "save_every": steps,
                                                     "out": str(tmp / f"{name}-{seed}" / "run")}))
            started = time.perf_counter()
            result = trainer.train(cfg)
            evals = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
            final = [r for r in evals if r["kind"] == "eval"][-1]
            results[name].append(final["val_loss"])
            emit(kind="run", recipe=name, seed=seed, steps=result.step, seconds=time.perf_counter() - started,
                 tokens=final["tokens_seen"], val_loss=final["val_loss"], val_bpb=final["val_bpb"])
    for name, losses in results.items():
        emit(kind="summary", recipe=name, mean_val_loss=statistics.mean(losses),
             spread=max(losses) - min(losses), runs=len(losses))


if __name__ == "__main__":
    main()
