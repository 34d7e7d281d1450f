"""Which training recipe gives the best model for the same wall-clock? Validation loss per recipe.

    python -m bench.recipe [--minutes 10] [--seeds 1 2 3] [--recipes baseline l1 wsd muon ...]
                           [--data ../shared/data/wikipedia-sample] [--out DIR] [--plot curves.png]

Each recipe trains the tiny preset from scratch for the same wall-clock budget, turned into a
step count so that every schedule runs to its end. The baseline's probe (a few timed steps)
gives its step count. A recipe doing the same work per step (it changes only learning rates or
the schedule) gets the same count; one that changes the work (another optimizer, an extra loss
term, another batch or shape) is timed against the baseline in interleaved probes, one probe per
distinct kind of work, and gets the count its relative cost allows. Seeds are the outer loop and recipes the inner one; for a
given seed every recipe sees the same data order and the same validation batches. Prints one
JSON object per probe and run, then a summary per recipe (mean over seeds and the spread).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
from pathlib import Path

from bench.common import emit, machine
from l1 import config, plot, trainer

# Overrides of the tiny preset. The baseline follows the classic GPT-2 reproductions: AdamW
# betas 0.9/0.95, weight decay 0.1, warmup then cosine to 10%, lr 6e-4 scaled to width (x 768/256).
# Every recipe warms up over the first 10% of its steps.
BASELINE = {"lr": 1.8e-3, "beta1": 0.9, "beta2": 0.95, "weight_decay": 0.1, "schedule": "cosine",
            "min_lr_ratio": 0.1}
WARMUP_FRACTION = 0.1
RECIPES = {
    "baseline": BASELINE,
    "l1": {},  # the tiny preset as it stands
    "high_lr": {**BASELINE, "lr": 4e-3},
    "wsd": {**BASELINE, "schedule": "wsd", "decay_fraction": 0.2, "min_lr_ratio": 0.0},
    "wsd_high_lr": {**BASELINE, "lr": 4e-3, "schedule": "wsd", "decay_fraction": 0.2, "min_lr_ratio": 0.0},
    "batch8": {**BASELINE, "batch_size": 8},  # half the tokens per step, twice the steps
    "batch8_wsd": {**BASELINE, "batch_size": 8, "schedule": "wsd", "decay_fraction": 0.2, "min_lr_ratio": 0.0},
    "qk_norm": {**BASELINE, "model": {"qk_norm": True}},
    "z_loss": {**BASELINE, "z_loss": 1e-4},
    "muon": {**BASELINE, "optimizer": "muon", "lr": 4e-3},
}
def run_config(name: str, seed: int, args, max_steps: int, **overrides) -> config.TrainConfig:
    """The resolved TrainConfig of one recipe and seed, warming up over 10% of max_steps."""
    base = config.merge({"preset": "tiny", "seed": seed, "log_every": 10, "eval_batches": args.eval_batches,
                         "keep": 1, "data": {"data": args.data, "data_dir": args.data_dir,
                                             "max_docs": args.max_docs}}, RECIPES[name])
    warmup = max(1, round(WARMUP_FRACTION * max_steps))
    return config.resolve(config.merge(base, {"max_steps": max_steps, "warmup_steps": warmup, **overrides}))


def probe_step_seconds(name: str, args, folder: Path) -> float:
    """Median seconds per training step of a recipe over a short run (the first two steps excluded)."""
    cfg = run_config(name, args.seeds[0], args, args.probe_steps, log_every=1, eval_batches=1, out=str(folder))
    trainer.train(cfg)
    records = [r for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())
               if r["kind"] == "train"]
    tokens_per_step = cfg.batch_size * cfg.context * cfg.grad_accum
    return statistics.median(tokens_per_step / r["tokens_per_s"] for r in records[2:])


def work(cfg: config.TrainConfig) -> tuple:
    """What sets the work of a training step: shapes, batch, optimizer, loss terms (not lr or schedule)."""
    return (cfg.batch_size, cfg.grad_accum, cfg.context, cfg.optimizer, cfg.z_loss > 0,
            sorted(dataclasses.asdict(cfg.model).items()))


def steps_per_recipe(names: list[str], args, tmp: Path) -> dict[str, int]:
    """Each recipe's step count for the budget: the baseline's, scaled by measured relative cost.

    One probe stands for all recipes of the same work per step (the first of them named).
    """
    kinds = {name: repr(work(run_config(name, args.seeds[0], args, args.probe_steps)))
             for name in ["baseline", *names]}
    probed: dict[str, str] = {}
    for name in kinds:
        probed.setdefault(kinds[name], name)
    times: dict[str, list[float]] = {name: [] for name in probed.values()}
    for round_ in range(args.probe_rounds if len(times) > 1 else 1):  # interleaved: noise hits all alike
        for name in times:
            seconds = probe_step_seconds(name, args, tmp / f"probe-{name}-{round_}")
            times[name].append(seconds)
            emit(kind="probe", recipe=name, round=round_, step_s=seconds)
    baseline_s = statistics.median(times["baseline"])
    baseline_steps = max(args.probe_steps, int(args.minutes * 60 / baseline_s))
    steps = {}
    for name in names:
        relative = statistics.median(times[probed[kinds[name]]]) / baseline_s
        steps[name] = max(args.probe_steps, round(baseline_steps / relative))
        emit(kind="budget", recipe=name, relative_cost=relative, steps=steps[name])
    return steps


def plot_curves(runs: dict[str, list[Path]], minutes: float, path: Path) -> None:
    """Training loss (mean over seeds) against the fraction of the wall-clock budget, one line per recipe."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, folders in runs.items():
        series = [plot.read_records(f / plot.METRICS)[0] for f in folders]
        steps = sorted(set.intersection(*(set(s) for s in series)))
        last = steps[-1]
        loss = [statistics.mean(s[step]["loss"] for s in series) for step in steps]
        ax.plot([minutes * step / last for step in steps], loss, label=name)
    ax.set_xlabel("minutes of the budget")
    ax.set_ylabel(f"training loss (mean of {len(next(iter(runs.values())))} seeds)")
    ax.set_ylim(top=min(ax.get_ylim()[1], 6.0))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=110, bbox_inches="tight")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="wall-clock budget per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--data", default="../shared/data/wikipedia-sample")
    parser.add_argument("--data_dir", default="data")
    parser.add_argument("--max_docs", type=int, default=0)
    parser.add_argument("--eval_batches", type=int, default=40)
    parser.add_argument("--probe_steps", type=int, default=8)
    parser.add_argument("--probe_rounds", type=int, default=3, help="interleaved probes per costlier recipe")
    parser.add_argument("--out", default="", help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--plot", default="", help="write the loss curves to this PNG")
    args = parser.parse_args(argv)
    tmp = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="l1-recipe-"))
    emit(kind="setup", **machine(), minutes=args.minutes, seeds=args.seeds, recipes=args.recipes, out=str(tmp))
    steps = steps_per_recipe(args.recipes, args, tmp)
    losses: dict[str, list[float]] = {name: [] for name in args.recipes}
    folders: dict[str, list[Path]] = {name: [] for name in args.recipes}
    for seed in args.seeds:
        for name in args.recipes:
            n = steps[name]
            cfg = run_config(name, seed, args, n, eval_every=n, save_every=n, out=str(tmp / f"{name}-{seed}"))
            result = trainer.train(cfg)
            records = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
            final = [r for r in records if r["kind"] == "eval"][-1]
            losses[name].append(final["val_loss"])
            folders[name].append(cfg.run_dir)
            emit(kind="run", recipe=name, seed=seed, steps=result.step, tokens=final["tokens_seen"],
                 val_loss=final["val_loss"], val_bpb=final["val_bpb"])
    baseline = statistics.mean(losses["baseline"]) if "baseline" in losses else None
    for name, values in losses.items():
        mean = statistics.mean(values)
        emit(kind="summary", recipe=name, steps=steps[name], mean_val_loss=mean, spread=max(values) - min(values),
             vs_baseline=None if baseline is None else mean - baseline, runs=len(values))
    if args.plot:
        plot_curves(folders, args.minutes, Path(args.plot))


if __name__ == "__main__":
    main()
