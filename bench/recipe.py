"""Which training recipe gives the best model for the same wall-clock? Validation loss per recipe.

    python -m bench.recipe [--minutes 10] [--seeds 1 2 3] [--recipes baseline l1 wsd muon ...]
                           [--data ../shared/data/wikipedia-sample] [--out DIR] [--plot curves.png]
    python -m bench.recipe --replica [--epochs 2 4.9 8] [--seeds 1 2 3] [--recipes baseline wd0 ...]
    python -m bench.recipe --minutes 5 --recipes baseline_fp32 l1_budget   # L1's time budget against the baseline

Each recipe trains the tiny preset from scratch for the same wall-clock budget, turned into a
step count so that every schedule runs to its end. The baseline's probe (a few timed steps)
gives its step count. A recipe doing the same work per step (it changes only learning rates or
the schedule) gets the same count; one that changes the work (another optimizer, an extra loss
term, another batch or shape) is timed against the baseline in interleaved probes, one probe per
distinct kind of work, and gets the count its relative cost allows. A budget recipe (l1_budget) is instead the tiny preset as it
stands under --max_minutes: the trainer fits its own schedule to the clock. Seeds are the outer loop and recipes the inner one; for a
given seed every recipe sees the same data order and the same validation batches. Prints one
JSON object per probe and run, then a summary per recipe (mean over seeds and the spread).

--replica scales down the flagship's data-starved regime instead (l1-gpu-compatible: 155.8M
parameters, about 67M tokens per epoch of Simple English Wikipedia, 0.43 tokens per parameter per
epoch, 4.9 epochs in its 5000 steps): a 541k-parameter model (REPLICA) on a slice of the sample
cut to 0.43 tokens per parameter in its training split (the slice is measured once, with seed 1's
split), trained for --epochs passes over it. Recipes are compared at equal tokens,
the axis that carries over to a GPU: a recipe with another batch gets the steps that keep the
tokens. Each run reports its final and best validation loss and bits per byte (the split is held
out by document) and its measured seconds per step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
from pathlib import Path

from bench.common import emit, machine
from l1 import config, data, plot, trainer

# Overrides of the tiny preset. The baseline follows the classic GPT-2 reproductions: AdamW
# betas 0.9/0.95, weight decay 0.1, warmup then cosine to 10%, lr 6e-4 scaled to width (x 768/n_embd;
# "lr_x" multiplies that). Every recipe warms up over the first 10% of its steps.
BASELINE = {"optimizer": "adamw", "lr_x": 1.0, "beta1": 0.9, "beta2": 0.95, "weight_decay": 0.1,
            "schedule": "cosine", "min_lr_ratio": 0.1}
WARMUP_FRACTION = 0.1
WSD = {"schedule": "wsd", "decay_fraction": 0.2, "min_lr_ratio": 0.0}  # L1's schedule
MUON_QK = {"optimizer": "muon", "model": {"qk_norm": True}}  # Muon with QK-norm beside it
BUDGET = {"as_is": True, "budget": True}  # the tiny preset as it stands, given --max_minutes, not steps
# The tiny preset as it stood until the budget study sized it to the budget (4 x 256, AdamW,
# micro-batch 8, lr 1.8e-3): RECIPE.md's tables measure the textbook baseline and the budget
# variants on it, so they name it, not whatever the preset is today.
TINY_V1 = {"model": {"n_embd": 256}, "optimizer": "adamw", "batch_size": 8, "lr": 1.8e-3}


def budget_v1(*changes: dict) -> dict:
    """A budget recipe: the earlier tiny preset (TINY_V1) under the time budget, but for changes
    (nested like a preset, merged in order)."""
    recipe = config.merge(BUDGET, TINY_V1)
    for change in changes:
        recipe = config.merge(recipe, change)
    return recipe


# Narrower models, each at the lr of the baseline's width rule (6e-4 x 768 / width).
W128 = {"model": {"n_embd": 128}, "lr": 3.6e-3}
W96 = {"model": {"n_embd": 96}, "lr": 4.8e-3}
W64 = {"model": {"n_embd": 64}, "lr": 7.2e-3}
MUON16 = {"optimizer": "muon", "batch_size": 16}  # Muon at a micro-batch that carries its iterations
RECIPES = {
    "baseline": BASELINE,
    "baseline_fp32": {**BASELINE, "amp": False},  # the textbook form: fp32 even where bf16 is native
    # The same under the trainer's time budget: cosine fitted to the clock, so it trains exactly as long
    # as L1 (a probe's step count can miss by 10%), warmup over ~10% of its ~300 steps on the EPYC.
    "baseline_fp32_budget": {**BASELINE, "amp": False, "budget": True, "warmup_steps": 30},
    "baseline_fp32_w128": {**BASELINE, "amp": False, "model": {"n_embd": 128}},  # lr scaled to width
    "l1": {"as_is": True},  # the tiny preset as it stands
    "l1_budget": BUDGET,
    "l1_budget_v1": budget_v1(),
    "l1_budget_batch4": budget_v1({"batch_size": 4}),
    "l1_budget_batch16": budget_v1({"batch_size": 16}),
    "l1_budget_warmup250": budget_v1({"warmup_steps": 250}),  # ~10% of a 5-minute run here
    "l1_budget_lr_x1.5": budget_v1({"lr": 2.7e-3}),
    # The tiny preset resized for the budget, lr scaled to width as the baseline's (6e-4 x 768/width).
    "l1_budget_w192": budget_v1({"model": {"n_embd": 192}, "lr": 2.4e-3}),
    "l1_budget_w128": budget_v1(W128),
    "l1_budget_w128_batch16": budget_v1(W128, {"batch_size": 16}),  # the two largest gains together
    # The replica's best recipe under the budget: on a CPU its Newton-Schulz iterations cost steps.
    "l1_budget_muon_qk": budget_v1(MUON_QK),
    "l1_budget_muon_qk_batch16": budget_v1(MUON_QK, {"batch_size": 16}),
    "l1_budget_muon_qk_batch32": budget_v1(MUON_QK, {"batch_size": 32}),
    "l1_budget_muon_batch16": budget_v1(MUON16),  # exports to Llama
    "l1_budget_muon_batch16_w128": budget_v1(W128, MUON16),  # exports to Llama
    "l1_budget_muon_qk_batch16_w128": budget_v1(MUON_QK, W128, {"batch_size": 16}),
    # Around the candidate above: micro-batch 8 (Muon's iterations cost less at width 128), 1.5x its lr,
    # and a narrower model still (4 x 96, lr by the width rule).
    "l1_budget_muon_w128": budget_v1(W128, {"optimizer": "muon"}),
    "l1_budget_muon_batch16_w128_lr_x1.5": budget_v1(W128, MUON16, {"lr": 5.4e-3}),
    "l1_budget_muon_batch16_w96": budget_v1(W96, MUON16),  # adopted as the tiny preset
    # The two gains above pushed further: 4 x 96 at 1.5x and 2x its width-rule lr, and 4 x 64.
    "l1_budget_muon_batch16_w96_lr_x1.5": budget_v1(W96, MUON16, {"lr": 7.2e-3}),
    "l1_budget_muon_batch16_w96_lr_x2": budget_v1(W96, MUON16, {"lr": 9.6e-3}),
    "l1_budget_muon_batch16_w64": budget_v1(W64, MUON16),
    "high_lr": {**BASELINE, "lr": 4e-3},
    "wsd": {**BASELINE, **WSD},
    "wsd_high_lr": {**BASELINE, "lr": 4e-3, **WSD},
    "batch8": {**BASELINE, "batch_size": 8},  # half the tokens per step, twice the steps
    "batch8_wsd": {**BASELINE, "batch_size": 8, **WSD},
    "qk_norm": {**BASELINE, "model": {"qk_norm": True}},
    "z_loss": {**BASELINE, "z_loss": 1e-4},
    "muon": {**BASELINE, "optimizer": "muon", "lr": 4e-3},
    # Candidates for the data-starved regime (--replica), each one change against the baseline.
    "l1_wsd": {**BASELINE, **WSD},  # L1's schedule
    "wd0": {**BASELINE, "weight_decay": 0.0},
    "wd03": {**BASELINE, "weight_decay": 0.3},
    "wd1": {**BASELINE, "weight_decay": 1.0},
    "lr_x2": {**BASELINE, "lr_x": 2.0},
    "lr_half": {**BASELINE, "lr_x": 0.5},
    "batch_half": {**BASELINE, "batch_size": 4},  # equal tokens: twice the steps
    "batch_x2": {**BASELINE, "batch_size": 16},
    "muon_x": {**BASELINE, "optimizer": "muon"},  # Muon at the baseline's lr (scaled to AdamW's RMS)
    "muon_qk_norm": {**BASELINE, **MUON_QK},
    "dropout": {**BASELINE, "model": {"dropout": 0.1}},
    "untied": {**BASELINE, "model": {"tie_embeddings": False}},
    "relu2": {**BASELINE, "model": {"mlp": "relu2"}},
    "softcap": {**BASELINE, "model": {"logit_softcap": 15.0}},
    # Combinations of the screening's winners (WSD, half the batch, Muon with QK-norm).
    "wsd_long_decay": {**BASELINE, **WSD, "decay_fraction": 0.5},
    "wsd_batch_half": {**BASELINE, **WSD, "batch_size": 4},
    "muon_qk_wsd": {**BASELINE, **MUON_QK, **WSD},
    "muon_qk_lr_x2": {**BASELINE, **MUON_QK, "lr_x": 2.0},
    "muon_qk_wsd_batch_half": {**BASELINE, **MUON_QK, **WSD, "batch_size": 4},
    # GPT-2's init std 0.02 was set for width 768; scaled as 1/sqrt(width) it is 0.057 at the replica's 96.
    "init_wide": {**BASELINE, "model": {"init_std": 0.02 * (768 / 96) ** 0.5}},
    # A second round: the screening's winners pushed further, and the remaining optimizer knobs.
    "wsd_batch_quarter": {**BASELINE, **WSD, "batch_size": 2},
    "muon_qk_wsd_lr_x2": {**BASELINE, **MUON_QK, **WSD, "lr_x": 2.0},
    "muon_qk_wsd_lr_half": {**BASELINE, **MUON_QK, **WSD, "lr_x": 0.5},
    "beta2_099": {**BASELINE, "beta2": 0.99},
    "no_clip": {**BASELINE, "grad_clip": 0.0},
    "warmup_short": {**BASELINE, "warmup_fraction": 0.02},
    "lr_x1.4": {**BASELINE, "lr_x": 1.4},
    # L1's schedule at the flagship's share of warmup (200 of 5000 steps) and at twice the baseline's.
    "wsd_warmup_4pct": {**BASELINE, **WSD, "warmup_fraction": 0.04},
    "wsd_warmup_20pct": {**BASELINE, **WSD, "warmup_fraction": 0.2},
    # 4% of 4x the steps (171): is it the share of the run that matters, or the steps (Adam's moments
    # need ~1/(1 - beta2) = 20 steps to settle)?
    "wsd_batch_quarter_warmup_4pct": {**BASELINE, **WSD, "batch_size": 2, "warmup_fraction": 0.04},
    "wsd_decay_half_batch_quarter": {**BASELINE, **WSD, "decay_fraction": 0.5, "batch_size": 2},
    # A third round: the two best changes together, and knobs from the speedrun peers on L1's schedule.
    "muon_qk_wsd_batch_quarter": {**BASELINE, **MUON_QK, **WSD, "batch_size": 2},
    "beta1_08_wsd": {**BASELINE, **WSD, "beta1": 0.8},
    "untied_wsd": {**BASELINE, **WSD, "model": {"tie_embeddings": False}},
    # What size and shape this data wants: the same slice and tokens on L1's schedule, other widths
    # and depths (lr scaled to width as the baseline's).
    "wsd_w64": {**BASELINE, **WSD, "model": {"n_embd": 64}},
    "wsd_w192": {**BASELINE, **WSD, "model": {"n_embd": 192}},
    "wsd_deep8": {**BASELINE, **WSD, "model": {"n_layer": 8}},
    "wsd_deep8_w64": {**BASELINE, **WSD, "model": {"n_layer": 8, "n_embd": 64}},
    "wsd_deep8_w192": {**BASELINE, **WSD, "model": {"n_layer": 8, "n_embd": 192}},
    "wsd_w384": {**BASELINE, **WSD, "model": {"n_embd": 384}},
    "wsd_w768": {**BASELINE, **WSD, "model": {"n_embd": 768}},
    # The larger the model on the same data, the more it may need regularizing.
    "wsd_w384_wd1": {**BASELINE, **WSD, "model": {"n_embd": 384}, "weight_decay": 1.0},
    "wsd_w768_wd1": {**BASELINE, **WSD, "model": {"n_embd": 768}, "weight_decay": 1.0},
    # A fourth round. The context at equal tokens per step (1,024): shorter or longer sequences, fewer
    # or more of them. And the ceiling at equal tokens: the best recipe on the best-measured size.
    "wsd_ctx64": {**BASELINE, **WSD, "model": {"block_size": 64}, "batch_size": 16},
    "wsd_ctx256": {**BASELINE, **WSD, "model": {"block_size": 256}, "batch_size": 4},
    "wsd_ctx512": {**BASELINE, **WSD, "model": {"block_size": 512}, "batch_size": 2},
    "muon_qk_wsd_w384_wd1": config.merge({**BASELINE, **MUON_QK, **WSD}, {"model": {"n_embd": 384},
                                                                          "weight_decay": 1.0}),
    "muon_qk_wsd_w768_wd1": config.merge({**BASELINE, **MUON_QK, **WSD}, {"model": {"n_embd": 768},
                                                                          "weight_decay": 1.0}),
}
TEXTBOOK_LR = 6e-4 * 768  # GPT-3 small's lr at width 768, scaled as 1/width
# Every recipe but the presets as they stand trains the earlier tiny model (4 x 256) at the classic
# reproductions' micro-batch of 16 sequences, the baseline's.
TEXTBOOK_TINY = config.merge(TINY_V1, {"batch_size": 16})
# The flagship's regime, scaled down to a few minutes a run on 2 CPU cores: 4 blocks (the flagship
# has 12), 96 wide, 541k parameters (the 1024-token vocabulary a fifth of them, the flagship's
# 20k vocabulary an eighth), 128 tokens of context, micro-batch 8.
REPLICA = {"model": {"vocab_size": 1024, "n_layer": 4, "n_head": 4, "n_embd": 96, "block_size": 128},
           "batch_size": 8, "grad_accum": 1, "eval_batches": 10_000,
           "data": {"val_fraction": 0.1}}  # every validation window, a tenth of the slice
FLAGSHIP_TOKENS_PER_PARAM_EPOCH = 0.43  # 67M tokens / 155.8M parameters
EVALS_PER_RUN = 10
def run_config(name: str, seed: int, args, max_steps: int, **overrides) -> config.TrainConfig:
    """The resolved TrainConfig of one recipe and seed, warming up over 10% of max_steps (or the
    recipe's warmup_fraction)."""
    recipe = dict(RECIPES[name])
    lr_x = recipe.pop("lr_x", None)
    as_is = recipe.pop("as_is", False)
    warmup_fraction = recipe.pop("warmup_fraction", WARMUP_FRACTION)
    if recipe.pop("budget", False):  # the preset's own warmup; the time budget sets the length
        overrides = {"max_minutes": args.minutes, **overrides}
        max_steps, warmup = 0, recipe.pop("warmup_steps", config.preset_dict("tiny")["warmup_steps"])
    else:
        warmup = max(1, round(warmup_fraction * max_steps))
    base = config.merge({"preset": "tiny", "seed": seed, "log_every": 10, "eval_batches": args.eval_batches,
                         "keep": 1, "data": {"data": args.data, "data_dir": args.data_dir,
                                             "max_docs": args.max_docs}},
                        REPLICA if args.replica else {} if as_is else TEXTBOOK_TINY)
    base = config.merge(base, recipe)
    if lr_x and "lr" not in recipe:  # a recipe that names its lr (high_lr, muon) keeps it
        base["lr"] = lr_x * TEXTBOOK_LR / config.resolve(base).model.n_embd
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
    return (cfg.batch_size, cfg.grad_accum, cfg.context, cfg.optimizer, cfg.z_loss > 0, cfg.amp,
            sorted(dataclasses.asdict(cfg.model).items()))


def steps_per_recipe(names: list[str], args, tmp: Path) -> dict[str, int]:
    """Each recipe's step count for the budget: the baseline's, scaled by measured relative cost.

    One probe stands for all recipes of the same work per step (the first of them named). A budget
    recipe needs no count (0): the trainer runs it for --minutes.
    """
    budgeted = {name for name in names if RECIPES[name].get("budget")}
    reference = "baseline_fp32" if "baseline_fp32" in names else "baseline"
    kinds = {name: repr(work(run_config(name, args.seeds[0], args, args.probe_steps)))
             for name in [reference, *names] if name not in budgeted}
    probed: dict[str, str] = {}
    for name in kinds:
        probed.setdefault(kinds[name], name)
    times: dict[str, list[float]] = {name: [] for name in probed.values()}
    for round_ in range(args.probe_rounds if len(times) > 1 else 1):  # interleaved: noise hits all alike
        for name in times:
            seconds = probe_step_seconds(name, args, tmp / f"probe-{name}-{round_}")
            times[name].append(seconds)
            emit(kind="probe", recipe=name, round=round_, step_s=seconds)
    baseline_s = statistics.median(times[reference])
    baseline_steps = max(args.probe_steps, int(args.minutes * 60 / baseline_s))
    steps = dict.fromkeys(budgeted, 0)
    for name in kinds.keys() & set(names):
        relative = statistics.median(times[probed[kinds[name]]]) / baseline_s
        steps[name] = max(args.probe_steps, round(baseline_steps / relative))
        emit(kind="budget", recipe=name, relative_cost=relative, steps=steps[name])
    return steps


def plot_curves(runs: dict[str, list[Path]], span: float, x_label: str, path: Path, kind: str = "train",
                clock: bool = False) -> None:
    """Loss (mean over seeds) against the run's progress (0 to span, e.g. minutes or epochs), one line
    per recipe: the training loss (kind "train") or the validation loss (kind "eval"). clock: against
    the training clock in minutes instead (runs of one recipe may differ in steps: their common ones)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    column, table = ("loss", 0) if kind == "train" else ("val_loss", 1)
    for name, folders in runs.items():
        series = [plot.read_records(f / plot.METRICS)[table] for f in folders]
        steps = sorted(set.intersection(*(set(s) for s in series)))
        last = steps[-1]
        loss = [statistics.mean(s[step][column] for s in series) for step in steps]
        if clock:
            x = [statistics.mean(s[step]["train_seconds"] for s in series) / 60 for step in steps]
        else:
            x = [span * step / last for step in steps]
        ax.plot(x, loss, label=name)
    ax.set_xlabel(x_label)
    seeds = len(next(iter(runs.values())))
    ax.set_ylabel(f"{'training' if kind == 'train' else 'validation'} loss"
                  + (f" (mean of {seeds} seeds)" if seeds > 1 else ""))
    ax.set_ylim(top=min(ax.get_ylim()[1], 6.0))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=110, bbox_inches="tight")


def replica_slice(args) -> tuple[int, int, int]:
    """(max_docs, training tokens, parameters) of the slice of --data whose training split holds the
    flagship's tokens per parameter per epoch for the REPLICA model, within 5% where the articles'
    lengths allow: a guess, then interpolation between the closest slices below and above (seed 1's
    split and tokenizer whatever --seeds says, so that separate invocations train on the same slice;
    each slice measured is prepared once and cached)."""
    cfg = run_config("baseline", 1, args, 1)
    params = cfg.model.num_params
    target = args.tokens_per_param * params
    docs = max(20, round(target / 500))  # about 500 tokens per Wikipedia article with a 1k vocabulary
    measured: dict[int, int] = {}
    for _ in range(10):
        prepared = data.prepare(dataclasses.replace(cfg.data, max_docs=docs), cfg.model.vocab_size, cfg.seed,
                                log=lambda line: None)
        measured[docs] = prepared.meta["splits"]["train"]["tokens"]
        emit(kind="slice", max_docs=docs, train_tokens=measured[docs], tokens_per_param=measured[docs] / params)
        below = max((d for d, t in measured.items() if t < target), default=None)
        above = min((d for d, t in measured.items() if t >= target), default=None)
        if abs(measured[docs] / target - 1) <= 0.05 or (below and above and above - below <= 1):
            break
        if below is None or above is None:
            docs = max(20, round(docs * target / measured[docs]))
        else:
            step = (target - measured[below]) / (measured[above] - measured[below])
            docs = min(above - 1, max(below + 1, below + round(step * (above - below))))
    docs = min(measured, key=lambda d: abs(measured[d] - target))
    return docs, measured[docs], params


def train_run(name: str, seed: int, args, steps: int, folder: Path, **overrides) -> dict:
    """Train one recipe and seed for `steps` steps, evaluating EVALS_PER_RUN times; its numbers."""
    every = steps // EVALS_PER_RUN or steps
    cfg = run_config(name, seed, args, steps, eval_every=every, save_every=steps, out=str(folder), **overrides)
    result = trainer.train(cfg)
    train, evals = plot.read_records(cfg.run_dir / plot.METRICS)
    final, best = evals[max(evals)], min(evals.values(), key=lambda r: r["val_loss"])
    tokens_per_step = cfg.batch_size * cfg.context * cfg.grad_accum
    return {"recipe": name, "seed": seed, "steps": result.step, "tokens": final["tokens_seen"],
            "val_loss": final["val_loss"], "val_bpb": final["val_bpb"], "best_val_loss": best["val_loss"],
            "best_val_bpb": best["val_bpb"], "best_step": best["step"], "best_epoch": best["epoch"],
            "step_s": statistics.median(tokens_per_step / r["tokens_per_s"] for r in train.values())}


def summarize_replica(results: list[dict]) -> None:
    """One summary line per recipe and epochs: means over seeds, the spread, and the paired relative
    change in bits per byte against the baseline's run of the same seed and epochs."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["recipe"], r["epochs"]), []).append(r)
    for (name, epochs), runs in groups.items():
        base = {r["seed"]: r for r in groups.get(("baseline", epochs), [])}
        paired = [r["val_bpb"] / base[r["seed"]]["val_bpb"] - 1 for r in runs if r["seed"] in base]
        losses = [r["val_loss"] for r in runs]
        emit(kind="summary", recipe=name, epochs=epochs, steps=runs[0]["steps"], tokens=runs[0]["tokens"],
             mean_val_loss=statistics.mean(losses), spread=max(losses) - min(losses),
             mean_val_bpb=statistics.mean(r["val_bpb"] for r in runs),
             mean_best_val_loss=statistics.mean(r["best_val_loss"] for r in runs),
             best_steps=[r["best_step"] for r in runs], step_s=statistics.median(r["step_s"] for r in runs),
             bpb_vs_baseline=paired or None, runs=len(runs))


def main_replica(args, tmp: Path) -> None:
    """--replica: every recipe at every --epochs, at equal tokens, on the flagship-ratio slice."""
    max_docs, train_tokens, params = replica_slice(args)
    emit(kind="replica", parameters=params, max_docs=max_docs, train_tokens=train_tokens,
         tokens_per_param_per_epoch=train_tokens / params, epochs=args.epochs)
    results, folders = [], {}
    for seed in args.seeds:
        for epochs in args.epochs:
            for name in args.recipes:
                cfg = run_config(name, seed, args, 1)
                steps = args.steps or round(epochs * train_tokens / (cfg.batch_size * cfg.context * cfg.grad_accum))
                folder = tmp / f"{name}-e{epochs:g}-{seed}"
                run = {**train_run(name, seed, args, steps, folder, data={"max_docs": max_docs}), "epochs": epochs}
                emit(kind="run", **run)
                results.append(run)
                folders.setdefault(f"{name}@{epochs:g}", []).append(folder)
    summarize_replica(results)
    if args.plot:
        for epochs in args.epochs:
            runs = {k: v for k, v in folders.items() if k.endswith(f"@{epochs:g}")}
            plot_curves(runs, epochs, "epochs", Path(args.plot).with_suffix(f".e{epochs:g}.png"), kind="eval")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="wall-clock budget per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--recipes", nargs="+", default=None, choices=list(RECIPES),
                        help="default: every recipe (--replica: baseline l1_wsd wd0 wd03 muon_x)")
    parser.add_argument("--data", default="../shared/data/wikipedia-sample")
    parser.add_argument("--data_dir", default="data")
    parser.add_argument("--max_docs", type=int, default=0)
    parser.add_argument("--eval_batches", type=int, default=40)
    parser.add_argument("--probe_steps", type=int, default=8)
    parser.add_argument("--probe_rounds", type=int, default=3, help="interleaved probes per costlier recipe")
    parser.add_argument("--replica", action="store_true", help="the flagship's data-starved regime, scaled down, "
                                                               "at equal tokens (see above)")
    parser.add_argument("--epochs", type=float, nargs="+", default=[4.9], help="--replica: passes over the slice")
    parser.add_argument("--tokens_per_param", type=float, default=FLAGSHIP_TOKENS_PER_PARAM_EPOCH,
                        help="--replica: training tokens of the slice per model parameter")
    parser.add_argument("--steps", type=int, default=0, help="--replica: this many steps per run instead (a smoke "
                                                             "test of the bench, not a measurement)")
    parser.add_argument("--costs", action="store_true", help="only time each recipe's step against the baseline's "
                                                             "(interleaved probes) and print the relative costs")
    parser.add_argument("--out", default="", help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--plot", default="", help="write the loss curves to this PNG (--replica: one per epochs)")
    args = parser.parse_args(argv)
    args.recipes = args.recipes or (["baseline", "l1_wsd", "wd0", "wd03", "muon_x"] if args.replica
                                    else list(RECIPES))
    tmp = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="l1-recipe-"))
    emit(kind="setup", **machine(), minutes=args.minutes, seeds=args.seeds, recipes=args.recipes, out=str(tmp),
         replica=args.replica)
    if args.costs:
        steps_per_recipe(args.recipes, args, tmp)
        return
    if args.replica:
        main_replica(args, tmp)
        return
    steps = steps_per_recipe(args.recipes, args, tmp)
    results: list[dict] = []
    folders: dict[str, list[Path]] = {name: [] for name in args.recipes}
    for seed in args.seeds:
        for name in args.recipes:
            n = steps[name]
            every = n or 10**9  # evaluate and save at the end only (a budget run ends at its deadline)
            cfg = run_config(name, seed, args, n, eval_every=every, save_every=every, out=str(tmp / f"{name}-{seed}"))
            result = trainer.train(cfg)
            train, evals = plot.read_records(cfg.run_dir / plot.METRICS)
            final = evals[max(evals)]
            folders[name].append(cfg.run_dir)
            results.append({"recipe": name, "seed": seed, "steps": result.step, "tokens": final["tokens_seen"],
                            "train_seconds": train[max(train)]["train_seconds"], "val_loss": final["val_loss"],
                            "val_bpb": final["val_bpb"]})
            emit(kind="run", **results[-1])
    reference = "baseline_fp32" if "baseline_fp32" in args.recipes else "baseline"
    base = {r["seed"]: r for r in results if r["recipe"] == reference}
    for name in args.recipes:
        runs = [r for r in results if r["recipe"] == name]
        losses = [r["val_loss"] for r in runs]
        emit(kind="summary", recipe=name, steps=[r["steps"] for r in runs],
             train_seconds=[round(r["train_seconds"], 1) for r in runs], mean_val_loss=statistics.mean(losses),
             spread=max(losses) - min(losses), mean_val_bpb=statistics.mean(r["val_bpb"] for r in runs),
             bpb_vs_baseline=[r["val_bpb"] / base[r["seed"]]["val_bpb"] - 1 for r in runs if r["seed"] in base]
             or None, baseline=reference, runs=len(runs))
    if args.plot:
        plot_curves(folders, args.minutes, "minutes of training", Path(args.plot), clock=True)

if __name__ == "__main__":
    main()
