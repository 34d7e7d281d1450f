"""Summarize a run folder: model, parameters, progress, best validation loss, checkpoints, tokenizer.

    python -m l1.info models/<run>
    python -m l1.info models/<run> --json

Checkpoints are opened memory-mapped and not verified against their checksums: that would read
every byte of every file (gigabytes for the flagship), and this is a summary, not a resume.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

from l1 import checkpoint, config, finetune
from l1.config import ModelConfig, model_config_from_dict
from l1.cli import entry_point
from l1.errors import L1Error
from l1.plot import METRICS, read_records
from l1.tokenizer import fingerprint_of


def run_info(run_dir: str | Path) -> dict:
    """Everything `python -m l1.info` shows, as a JSON-ready dict (None where a fact is unknown)."""
    run = Path(run_dir)
    if run.is_file():
        raise L1Error(f"{run} is a file: pass the run folder that holds it (e.g. {run.parent})")
    if not run.is_dir():
        raise L1Error(f"run folder {run} does not exist")
    checkpoints = _checkpoints(run)
    markers = ("config.json", "training_args.json", METRICS, "tokenizer.json")
    if not checkpoints and not any((run / name).is_file() for name in markers):
        raise L1Error(f"{run} is not an L1 run folder (no checkpoint, config.json, training_args.json, "
                      f"{METRICS} or tokenizer.json)")
    for c in checkpoints:  # the check generate, eval and export make (resume checks its counters too)
        c["damaged"] = checkpoint.content_problem(c["state"], training=False) if c["state"] else "unreadable"
    newest = next((c["state"] for c in checkpoints if not c["damaged"]), {})
    train_args = _train_args(run, newest)
    model_cfg = _model_config(run, newest)
    info = {"run": str(run), "preset": train_args.get("preset"), "max_steps": train_args.get("max_steps"),
            "model": dataclasses.asdict(model_cfg) if model_cfg else None, **_parameters(model_cfg)}
    info.update(_progress(run, newest))
    info["tokenizer_fingerprint"] = _tokenizer_fingerprint(run)
    info["checkpoint_tokenizer_fingerprint"] = newest.get("tokenizer_fingerprint")
    info["checkpoints"] = [{k: c[k] for k in ("name", "bytes", "step", "damaged")} for c in checkpoints]
    origin = train_args.get("origin")
    info["origin"] = origin if isinstance(origin, dict) and origin.get("source") else None  # a fine-tune run's
    return info


def _checkpoints(run: Path) -> list[dict]:
    """Latest, then rolling newest first, then best; each with its size and (if readable) its state.

    A running trainer prunes rolling checkpoints at any moment: one gone since it was listed is left out."""
    found = []
    for path in checkpoint.CheckpointManager(run, keep=1).candidates():
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            continue
        state = checkpoint.peek(path)
        if state is None and not path.exists():  # gone while it was read: not "unreadable"
            continue
        found.append({"name": path.name, "bytes": size, "state": state, "step": state.get("step") if state else None})
    return found


def _train_args(run: Path, state: dict) -> dict:
    """The run's training config, checked as a resume would check it (a mistyped file is refused)."""
    path = run / "training_args.json"
    if not path.is_file():
        return state.get("train_config") or {}
    values = config.load_json(path)
    try:
        config.from_dict(values, origin=str(path))
    except L1Error as exc:
        raise L1Error(f"{path} is damaged ({exc}); restore it, or delete it to use the checkpoint's own copy") from None
    return values


def _model_config(run: Path, state: dict) -> ModelConfig | None:
    path = run / "config.json"
    if path.is_file():
        return model_config_from_dict(config.load_json(path), origin=str(path))
    if state.get("model_config"):
        return model_config_from_dict(state["model_config"], origin="checkpoint")
    return None


def _parameters(cfg: ModelConfig | None) -> dict:
    """Exact counts from the config's arithmetic: building the GPT, even on the meta device, first
    imports torch's compiler stack (seconds, for a summary that otherwise takes a fraction)."""
    if cfg is None:
        return {"parameters": None, "parameters_without_padding": None, "padded_vocab_size": None}
    return {"parameters": cfg.num_params, "parameters_without_padding": cfg.num_params_unpadded,
            "padded_vocab_size": cfg.padded_vocab_size}


def _progress(run: Path, state: dict) -> dict:
    """Step, epoch and tokens from the newest readable checkpoint (else the last logged step);
    the best validation loss and its bits per byte from metrics.jsonl."""
    train, evals = read_records(run / METRICS) if (run / METRICS).is_file() else ({}, {})
    last = train[max(train)] if train else {}
    source = state or last
    best = min(evals.values(), key=lambda r: r["val_loss"]) if evals else {}

    def number(record: dict, key: str):  # a hand-edited or damaged record may hold anything
        value = record.get(key)
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
            else None

    return {"step": number(source, "step"), "epoch": number(source, "epoch"),
            "tokens_seen": number(source, "tokens_seen"), "logged_step": max([*train, *evals], default=None),
            "best_val_loss": best.get("val_loss"), "best_val_bpb": number(best, "val_bpb"),
            "best_val_step": best.get("step")}


def _tokenizer_fingerprint(run: Path) -> str | None:
    path = run / "tokenizer.json"
    return fingerprint_of(path.read_text(encoding="utf-8")) if path.is_file() else None


def format_info(info: dict) -> str:
    """The human-readable summary printed by `python -m l1.info`."""
    rows = [("run", info["run"]), ("preset", info["preset"] or "unknown")]
    model = info["model"]
    if model:
        rows.append(("model", f"{model['n_layer']} layers x {model['n_embd']} wide, {model['n_head']} heads, "
                              f"context {model['block_size']}, vocab {model['vocab_size']:,} "
                              f"(padded to {info['padded_vocab_size']:,})"))
        rows.append(("parameters", f"{info['parameters']:,} ({info['parameters_without_padding']:,} "
                                   "without the padded vocab rows)"))
    rows.append(("step", _step_line(info)))
    rows.append(("best val loss", _best_line(info)))
    rows.append(("tokenizer", _tokenizer_line(info)))
    if info["origin"]:
        rows.append(("fine-tune of", finetune.describe(config.Origin(**info["origin"]))))
    names = [c["name"] for c in info["checkpoints"]]
    width = max(map(len, names), default=0)
    lines = [f"{c['name']:<{width}}  {_size(c['bytes']):>9}  "
             + (f"damaged: {c['damaged']}" if c["damaged"] else f"step {c['step']:,}") for c in info["checkpoints"]]
    rows += [("checkpoints" if i == 0 else "", line) for i, line in enumerate(lines or ["none"])]
    return "\n".join(f"{label:<14} {value}" for label, value in rows)


def _step_line(info: dict) -> str:
    if info["step"] is None:
        return "not started"
    text = f"{info['step']:,}" + (f" of {info['max_steps']:,}" if info["max_steps"] else "")
    if info["epoch"] is not None:
        text += f", epoch {info['epoch']}"
    if info["tokens_seen"] is not None:
        text += f", {info['tokens_seen']:,} tokens seen"
    if info["logged_step"] is not None and info["logged_step"] > info["step"]:
        text += f" (logged up to step {info['logged_step']:,}, not saved)"
    return text


def _best_line(info: dict) -> str:
    loss = info["best_val_loss"]
    if loss is None:
        return "no evaluation yet"
    bpb = f"{info['best_val_bpb']:.4f} bits/byte, " if info["best_val_bpb"] is not None else ""
    return f"{loss:.4f} ({bpb}perplexity {math.exp(min(loss, 50.0)):.2f}) at step {info['best_val_step']:,}"


def _tokenizer_line(info: dict) -> str:
    ours, theirs = info["tokenizer_fingerprint"], info["checkpoint_tokenizer_fingerprint"]
    if ours is None:
        return "no tokenizer.json"
    if theirs is None:
        return f"fingerprint {ours}"
    if ours == theirs:
        return f"fingerprint {ours} (the checkpoints' own)"
    return f"fingerprint {ours}, but the checkpoints were trained with {theirs}"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


@entry_point
def main(argv: list[str] | None = None) -> int:
    """The command line (through l1.cli.entry_point: one error line, exit status 2)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="the run folder (models/<run>)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    args = parser.parse_args(argv)
    info = run_info(args.run)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
