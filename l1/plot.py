"""Plot a run's metrics.jsonl: training and validation loss over steps, the learning rate below.

    python -m l1.plot models/<run>                 # writes models/<run>/loss.png
    python -m l1.plot models/<run> --out loss.png --log

Uses matplotlib's object-oriented API on the Agg canvas, never pyplot: no display is needed and
no global state is touched, so the trainer can call plot_run() at every evaluation.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from l1.cli import entry_point
from l1.errors import L1Error
from l1.lock import temporary

METRICS = "metrics.jsonl"
PLOT = "loss.png"


@dataclass
class Series:
    """The plotted values, one list per curve, in step order."""

    train_step: list[int]
    train_loss: list[float]
    lr: list[float]
    eval_step: list[int]
    val_loss: list[float]


def read_records(path: str | Path) -> tuple[dict[int, dict], dict[int, dict]]:
    """The train and the eval records of a metrics.jsonl, each by step.

    Lines that do not parse (the trainer may be writing the last one right now) are skipped. A
    resumed run goes back to its checkpoint's step and logs the steps after it again: the records
    of the abandoned steps are dropped, even those the resumed run has not reached yet.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        raise L1Error(f"no {METRICS} in {path.parent}: nothing has been logged yet") from None
    except OSError as exc:
        raise L1Error(f"cannot read {path}: {exc.strerror or exc}") from None
    train, evals = {}, {}
    for record in _records(lines):
        step = record["step"]
        if record.get("kind") == "train" and _finite(record.get("loss")):
            if train and step <= next(reversed(train)):  # the newest step so far: a resume went back
                for table in (train, evals):
                    for old in [k for k in table if k >= step]:
                        del table[old]
            train[step] = record
        elif record.get("kind") == "eval" and _finite(record.get("val_loss")):
            evals[step] = record
    return train, evals


def read_series(path: str | Path) -> Series:
    """The curves of a metrics.jsonl in step order; L1Error if it holds nothing to plot."""
    train, evals = read_records(path)
    if not train and not evals:
        raise L1Error(f"{path} holds no training or evaluation records yet")
    steps = sorted(train)
    eval_steps = sorted(evals)
    return Series(train_step=steps, train_loss=[train[s]["loss"] for s in steps],
                  lr=[train[s]["lr"] if _finite(train[s].get("lr")) else math.nan for s in steps], eval_step=eval_steps,
                  val_loss=[evals[s]["val_loss"] for s in eval_steps])


def _records(lines: list[str]) -> list[dict]:
    """The records with an integer step. The complete lines are parsed as one JSON array (C speed);
    line by line only if one of them is damaged. The last line may be half written."""
    lines = [line for line in lines if line.strip()]
    try:
        records = json.loads("[" + ",".join(lines[:-1]) + "]") + [_parse(line) for line in lines[-1:]]
    except ValueError:
        records = [_parse(line) for line in lines]
    return [r for r in records if isinstance(r, dict) and isinstance(r.get("step"), int)]


def _parse(line: str):
    try:
        return json.loads(line)
    except ValueError:
        return None


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def figure(series: Series, title: str, log_y: bool = False):
    """A matplotlib Figure: losses on a tall upper panel, the learning rate on a short lower one."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import StrMethodFormatter
    except ModuleNotFoundError:
        raise L1Error("plotting needs matplotlib: pip install matplotlib") from None

    fig = Figure(figsize=(9, 6), dpi=100)
    # Fixed margins: a constrained layout would draw the figure twice, doubling the time.
    fig.subplots_adjust(left=0.09, right=0.98, top=0.94, bottom=0.08, hspace=0.08)
    loss_ax, lr_ax = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    if series.train_step:
        loss_ax.plot(series.train_step, series.train_loss, color="tab:blue", linewidth=1, alpha=0.8,
                     label="train loss")
    if series.eval_step:
        loss_ax.plot(series.eval_step, series.val_loss, color="tab:orange", linewidth=2, marker="o",
                     markersize=4, label=f"validation loss (best {min(series.val_loss):.3f})")
    loss_ax.set_ylabel("loss (nats per token)")
    if log_y:
        loss_ax.set_yscale("log")
        # Losses span about a decade: label the 2..9 ticks too, as plain numbers, not 4x10^0.
        loss_ax.yaxis.set_major_formatter(StrMethodFormatter("{x:.3g}"))
        loss_ax.yaxis.set_minor_formatter(StrMethodFormatter("{x:.3g}"))
    loss_ax.grid(True, which="both", alpha=0.3)
    loss_ax.legend(loc="upper right")
    loss_ax.set_title(title)
    lr_ax.plot(series.train_step, series.lr, color="tab:green", linewidth=1.5, label="learning rate")
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("step")
    lr_ax.yaxis.set_major_formatter(StrMethodFormatter("{x:.2g}"))  # 0.0006, not an offset label
    lr_ax.grid(True, alpha=0.3)
    lr_ax.set_xlim(left=0)
    lr_ax.set_ylim(bottom=0)
    fig.align_ylabels([loss_ax, lr_ax])
    return fig


def plot_run(run_dir: str | Path, out: str | Path | None = None, log_y: bool = False) -> Path:
    """Write the run's loss plot (default run_dir/loss.png) and return its path.

    The file is replaced atomically, so an image viewer never shows half a PNG.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise L1Error(f"run folder {run_dir} does not exist")
    series = read_series(run_dir / METRICS)
    out = Path(out) if out else run_dir / PLOT
    last = series.train_step[-1] if series.train_step else series.eval_step[-1]
    fig = figure(series, f"{run_dir.resolve().name}: step {last:,}", log_y)
    tmp = temporary(out)
    try:
        fig.savefig(tmp, format=out.suffix.lstrip(".") or "png")
        os.replace(tmp, out)
    except (OSError, ValueError) as exc:  # ValueError: a format matplotlib cannot write
        if tmp.is_file():  # half an image; where the folder is missing (or a file) there is nothing
            tmp.unlink()
        raise L1Error(f"cannot write {out}: {exc}") from None
    return out


@entry_point
def main(argv: list[str] | None = None) -> int:
    """The command line (through l1.cli.entry_point: one error line, exit status 2)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="the run folder (models/<run>)")
    parser.add_argument("--out", help=f"image file to write (default: RUN/{PLOT}; .png, .svg or .pdf)")
    parser.add_argument("--log", action="store_true", help="logarithmic loss axis")
    args = parser.parse_args(argv)
    print(plot_run(args.run, args.out, log_y=args.log))
    return 0


if __name__ == "__main__":
    sys.exit(main())
