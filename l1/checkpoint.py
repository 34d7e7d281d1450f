"""The run folder's checkpoints: atomic writes, verified loads, latest / best / rolling-N, fallback.

A checkpoint is a plain dict of tensors and Python values that loads with
torch.load(weights_only=True): no pickled code. It carries a format version and a SHA-256 of its
own contents, so a flipped byte or a truncated file is detected instead of trusted. This module
knows state dicts and files, not training.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from l1.config import ModelConfig, model_config_from_dict
from l1.errors import L1Error
from l1.model import GPT
from l1.tokenizer import Tokenizer

FORMAT_VERSION = 1
LATEST = "latest_checkpoint.pt"
BEST = "best_checkpoint.pt"
ROLLING = re.compile(r"checkpoint_epoch_(\d+)_step_(\d+)\.pt")


class CheckpointError(L1Error):
    """A checkpoint that cannot be written, read or trusted."""


def rolling_name(epoch: int, step: int) -> str:
    return f"checkpoint_epoch_{epoch}_step_{step}.pt"


def _digest(value, h=None) -> str:
    """SHA-256 over a nested structure of tensors and plain values, in a fixed order."""
    h = h or hashlib.sha256()
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(value, dict):
        h.update(b"{")
        for key in sorted(value, key=repr):
            h.update(repr(key).encode())
            _digest(value[key], h)
        h.update(b"}")
    elif isinstance(value, (list, tuple)):
        h.update(b"[")
        for item in value:
            _digest(item, h)
        h.update(b"]")
    else:
        h.update(repr(value).encode())
    return h.hexdigest()


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable: the folder entry itself must reach the disk (POSIX only)."""
    if os.name == "posix":
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_file(state: dict, path: Path) -> None:
    """Write a checkpoint atomically: temporary file in the same folder, fsync, rename, fsync folder.

    A crash at any instant leaves either the old file or the complete new one at `path`.
    """
    path = Path(path)
    payload = {**state, "format_version": FORMAT_VERSION}
    payload["checksum"] = _digest(payload)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"cannot write checkpoint {path}: {exc.strerror or exc}; the older "
                              "checkpoints are intact: free space or fix the folder, then resume") from None


def load_file(path: Path, map_location="cpu") -> dict:
    """Load and verify a checkpoint; any damage or foreign content raises CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if len(magic) == 4 and magic != b"PK\x03\x04":  # torch.save writes a zip archive (a truncated one starts so too)
        raise CheckpointError(f"{path} is not an L1 checkpoint (not a file written by torch.save); pass a "
                              "run folder or one of its .pt files")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).splitlines()[0][:200]
        raise CheckpointError(f"{path} refused: it holds pickled objects that a weights-only load "
                              f"does not run ({reason})") from None
    except Exception as exc:  # torch raises RuntimeError, EOFError, ... for damaged archives
        raise CheckpointError(f"{path} is truncated or corrupt ({type(exc).__name__})") from None
    if not isinstance(state, dict) or "checksum" not in state or "format_version" not in state:
        raise CheckpointError(f"{path} is not an L1 checkpoint")
    if state["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {state['format_version']}, "
                              f"this L1 reads format {FORMAT_VERSION}")
    expected = state.pop("checksum")
    if _digest(state) != expected:
        raise CheckpointError(f"{path} is corrupt: its checksum does not match its contents")
    return state


def peek(path: Path) -> dict | None:
    """A checkpoint's plain values without reading its tensors (memory-mapped, not verified), or
    None if unreadable: for summaries and early checks, never for resuming."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # a damaged or foreign file
        return None
    return state if isinstance(state, dict) else None


def _copy(src: Path, dst: Path) -> None:
    """Atomically make dst an independent copy of src.

    A copy, not a hard link: a damaged sector in one file must not take its twin with it.
    """
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dst)


class CheckpointManager:
    """latest_checkpoint.pt, best_checkpoint.pt and the rolling checkpoint_epoch_E_step_S.pt files."""

    def __init__(self, run_dir: Path, keep: int):
        self.dir = Path(run_dir)
        self.keep = keep

    @property
    def latest(self) -> Path:
        return self.dir / LATEST

    @property
    def best(self) -> Path:
        return self.dir / BEST

    def rolling(self) -> list[Path]:
        """Rolling checkpoints, oldest step first."""
        found = [(int(m[2]), p) for p in self.dir.glob("checkpoint_epoch_*_step_*.pt")
                 if (m := ROLLING.fullmatch(p.name))]
        return [p for _, p in sorted(found)]

    def save(self, state: dict, *, rolling: bool = False, best: bool = False) -> float:
        """Write latest; also copy it to a rolling and/or the best checkpoint. Returns seconds taken."""
        start = time.perf_counter()
        save_file(state, self.latest)
        try:
            if rolling:
                _copy(self.latest, self.dir / rolling_name(state["epoch"], state["step"]))
                for old in self.rolling()[:-self.keep]:
                    old.unlink()
            if best:
                _copy(self.latest, self.best)
            _fsync_dir(self.dir)
        except OSError as exc:
            raise CheckpointError(f"cannot write checkpoints in {self.dir}: {exc.strerror or exc}; "
                                  f"{LATEST} is intact: free space or fix the folder, then resume") from None
        return time.perf_counter() - start

    def candidates(self) -> list[Path]:
        """Resume order: latest, then rolling newest first, then best."""
        files = [self.latest, *reversed(self.rolling()), self.best]
        return [p for p in files if p.is_file()]

    def load_latest(self, check: Callable[[dict], str | None] = lambda s: None,
                    log: Callable[[str], None] = print, map_location="cpu") -> tuple[dict, Path] | None:
        """The newest intact checkpoint that `check` accepts (check returns a reason to refuse).

        None when the folder has no checkpoint at all; CheckpointError when it has some but none
        can be used, so a run is never silently restarted from zero.
        """
        problems = []
        for path in self.candidates():
            try:
                state = load_file(path, map_location)
            except CheckpointError as exc:
                log(f"skipping checkpoint: {exc}")
                problems.append(str(exc))
                continue
            reason = check(state)
            if reason is None:
                return state, path
            log(f"skipping checkpoint {path.name}: {reason}")
            problems.append(f"{path.name}: {reason}")
        if problems:
            raise CheckpointError(f"no usable checkpoint in {self.dir} ({problems[0]}); fix it, or start "
                                  "over with --fresh (the old run is moved aside, not deleted)")
        return None


def find_for_inference(model_path: str | None, models_root: Path = Path("models")) -> Path:
    """The checkpoint file to sample from: a file as given, or a run folder's best else latest.

    Without a path, the most recently trained run under models_root is used.
    """
    if model_path:
        path = Path(model_path)
        if path.is_file():
            return path
        if not path.is_dir():
            raise CheckpointError(f"--model_path {path} does not exist (expected a run folder or a .pt file)")
        runs = [path]
    else:
        runs = [d for d in Path(models_root).glob("*") if d.is_dir()] if Path(models_root).is_dir() else []
        runs.sort(key=lambda d: max((f.stat().st_mtime for f in d.glob("*.pt")), default=0.0), reverse=True)
    for run in runs:
        for name in (BEST, LATEST):
            if (run / name).is_file():
                return run / name
        rolling = CheckpointManager(run, keep=1).rolling()
        if rolling:
            return rolling[-1]
    where = model_path or f"{models_root}/*/"
    raise CheckpointError(f"no checkpoint found in {where} (looked for {BEST}, {LATEST}, "
                          "checkpoint_epoch_E_step_S.pt); train one with train_gpu_compatible.py "
                          "or pass --model_path")


# ---- a trained run, for inference and tools -------------------------------------------------------

@dataclass
class LoadedRun:
    """A verified checkpoint with its model config and the tokenizer it was trained with."""

    path: Path  # the checkpoint file
    state: dict
    model_config: ModelConfig
    tokenizer: Tokenizer

    @property
    def step(self) -> int:
        return int(self.state.get("step", 0))

    def check_weights(self) -> None:
        """Refuse weights that do not fit the model_config they claim (names and shapes), in one
        line, without allocating the model (built on the meta device)."""
        with torch.device("meta"):
            model = GPT(self.model_config)
        try:
            model.load_state_dict(self.state["model"], assign=True)  # checks names and shapes; copies nothing
        except RuntimeError as exc:  # missing, unexpected or misshapen weights
            first = str(exc).strip().splitlines()[-1].strip()[:200]
            raise CheckpointError(f"{self.path}: its weights do not fit its model_config ({first})") from None

    def model(self) -> GPT:
        """The GPT with the checkpoint's weights, on the CPU, in fp32 as trained."""
        self.check_weights()
        model = GPT(self.model_config)
        model.load_state_dict(self.state["model"])
        return model


def load_run(model_path: str | None, models_root: Path = Path("models")) -> LoadedRun:
    """The one loader of a trained run for every tool (sampler, export): a checkpoint file, or a
    run folder's best else latest, or the newest run under models_root; verified, with the
    tokenizer.json beside it, which must be the one the model was trained with."""
    path = find_for_inference(model_path, models_root)
    state = load_file(path)
    if not isinstance(state.get("model"), dict) or "model_config" not in state \
            or "tokenizer_fingerprint" not in state:
        raise CheckpointError(f"{path} has no model weights, model_config or tokenizer fingerprint: "
                              "not an L1 model checkpoint")
    cfg = model_config_from_dict(state["model_config"], origin=str(path))
    tokenizer_path = path.parent / "tokenizer.json"
    tokenizer = Tokenizer.load(tokenizer_path)
    if tokenizer.fingerprint != state["tokenizer_fingerprint"]:
        raise L1Error(f"{tokenizer_path} (fingerprint {tokenizer.fingerprint}) is not the tokenizer this model "
                      f"was trained with ({state['tokenizer_fingerprint']}); restore the run's own tokenizer.json")
    if tokenizer.vocab_size > cfg.vocab_size:
        raise L1Error(f"{tokenizer_path} has {tokenizer.vocab_size} tokens but the model only {cfg.vocab_size}")
    return LoadedRun(path, state, cfg, tokenizer)
