"""A run's identity: what decides its tokens and its split, fixed at the run's first start.

The settings that decide which documents a run reads, how they are split and how they are cut into
tokens (the source, the split's fraction and seed, the tokenizer and the model's shape) are stored
with the run at its first start, paths made absolute, and every resume is checked against them
before anything in the run folder is written. The settings that only decide how fast or how well
the run trains (batch, accumulation, lr, schedule, optimizer, precision, compile, --seq_len, ...)
may change on resume. The prepared corpus itself is recorded by the digest of its token ids
(data.PreparedData.digest), so a resume reads exactly the tokens the run started with.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from l1.config import DataConfig, ModelConfig, TrainConfig

# DataConfig fields that decide a run's documents, split and tokens ('tokenizer', a path, is
# checked by the fingerprint of the file it names; 'data_dir' only says where corpora are kept).
DATA_FIELDS = ("data", "hub_dataset", "hub_config", "hub_split", "text_column", "val_fraction", "max_docs",
               "tokenizer_sample_mb", "shard_tokens")
HUB_FIELDS = ("hub_dataset", "hub_config", "hub_split")
PATH_FIELDS = ("data", "data_dir", "tokenizer")
TRAIN_FIELDS = ("seed",)  # the split's seed, the data order's and the initialization's


def absolute(cfg: DataConfig, base: Path | None = None) -> DataConfig:
    """cfg with its paths resolved against base (the current folder by default), '~' expanded;
    'hub' and unset paths stay as they are."""
    base = Path.cwd() if base is None else base
    values = {}
    for name in PATH_FIELDS:
        value = getattr(cfg, name)
        if value and not (name == "data" and value == "hub"):
            values[name] = str((base / Path(value).expanduser()).resolve())
    return dataclasses.replace(cfg, **values)


def differences(stored: TrainConfig, cfg: TrainConfig) -> list[tuple[str, object, object]]:
    """(flag, the run's value, the command's value) for each identity setting that cfg changes."""
    found = []
    for name in TRAIN_FIELDS:
        if getattr(stored, name) != getattr(cfg, name):
            found.append((name, getattr(stored, name), getattr(cfg, name)))
    for f in dataclasses.fields(ModelConfig):
        if getattr(stored.model, f.name) != getattr(cfg.model, f.name):
            found.append((f.name, getattr(stored.model, f.name), getattr(cfg.model, f.name)))
    for name in DATA_FIELDS:
        if name in HUB_FIELDS and cfg.data.data != "hub" and stored.data.data != "hub":
            continue
        if getattr(stored.data, name) != getattr(cfg.data, name):
            found.append((name, getattr(stored.data, name), getattr(cfg.data, name)))
    return found


def refusal(run_dir: Path, changes: list[tuple[str, object, object]]) -> str:
    """The one line that refuses a resume which would change the run's identity."""
    said = "; ".join(f"--{name} {new!r}, but the run has {old!r}" for name, old, new in changes)
    context = (" (a run's context is fixed by its model: --seq_len may only shorten its training sequences)"
               if any(name == "block_size" for name, _, _ in changes) else "")
    return (f"{run_dir} cannot resume with other data, split, tokenizer or model: {said}{context}. Leave the "
            f"flag out to resume; to train with it, start a new run (another --out) or start over with --fresh")
