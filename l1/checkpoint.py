"""The run folder's checkpoints: atomic writes, verified loads, latest / best / rolling-N, fallback.

A checkpoint is a plain dict of tensors and Python values that loads with
torch.load(weights_only=True): no pickled code. It carries a format version and a SHA-256 of its
own contents, so a flipped byte or a truncated file is detected instead of trusted, and the id
of the run that wrote it, so another run's checkpoint is never resumed. Saving snapshots the state
and writes it in a background thread; a run holds an OS lock on its folder. This module knows
state dicts and files, not training.
"""

from __future__ import annotations

import copy
import hashlib
import os
import pickle
import re
import shutil
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from l1.config import ModelConfig, model_config_from_dict
from l1.errors import L1Error
from l1.files import fsync_dir, replace_atomic
from l1.lock import NOTE, FolderLock, remove_temporaries, temporary
from l1.model import GPT
from l1.tokenizer import Tokenizer

FORMAT_VERSION = 1
LATEST = "latest_checkpoint.pt"
BEST = "best_checkpoint.pt"
ROLLING = re.compile(r"checkpoint_epoch_(\d+)_step_(\d+)\.pt")
RUN_ID = "run_id.txt"  # the run's identity, created with its first checkpoint
LOCK = NOTE  # the PID of the trainer that holds the run folder's lock


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
        if t.numel():  # the array itself, not a bytes copy: hashlib reads it without the GIL
            h.update(t.reshape(-1).view(torch.uint8).numpy())
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


def save_file(state: dict, path: Path) -> None:
    """Write a checkpoint atomically: temporary file in the same folder, fsync, rename, fsync folder.

    A crash at any instant leaves either the old file or the complete new one at `path`.
    """
    _write_sealed(_sealed(state), Path(path))


def _sealed(state: dict) -> dict:
    """The state as it is stored: with its format version and the checksum of everything."""
    payload = {**state, "format_version": FORMAT_VERSION}
    payload["checksum"] = _digest(payload)
    return payload


def _write_sealed(payload: dict, path: Path) -> None:
    try:
        replace_atomic(path, lambda f: torch.save(payload, f))
    except OSError as exc:
        raise _cannot_write(f"checkpoint {path}", exc, "the older checkpoints are") from None


def _cannot_write(what: str, exc: OSError, intact: str) -> CheckpointError:
    return CheckpointError(f"cannot write {what}: {exc.strerror or exc}; {intact} intact: free space or "
                           "fix the folder, then resume")


def load_file(path: Path, map_location="cpu") -> dict:
    """Load and verify a checkpoint; any damage or foreign content raises CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if len(magic) == 4 and magic != b"PK\x03\x04":  # torch.save writes a zip archive (a truncated one starts so too)
        raise CheckpointError(f"{path} is not an L1 checkpoint: not a file written by torch.save (truncated or "
                              "corrupt, or another kind of file); pass a run folder or one of its .pt files")
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


def content_problem(state: dict, training: bool = True) -> str | None:
    """Why a checkpoint cannot be trusted by its content, or None: a checksum proves only that the
    file is as written, and a tool or a hand edit can seal anything. Checked: the entries a model
    needs (weights that fit their own model_config, a step, a tokenizer fingerprint), and with
    training=True those a resume needs (counters in range, a config, a data position, optimizer
    state that fits the weights and the optimizer named in the config)."""
    weights, model_cfg = state.get("model"), state.get("model_config")
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        return "it holds no model weights"
    if not isinstance(model_cfg, dict) or not isinstance(state.get("tokenizer_fingerprint"), str):
        return "it has no model_config or tokenizer fingerprint"
    if not _whole(state.get("step")):
        return f"its step {state.get('step')!r} is not a whole number >= 0"
    try:
        cfg = model_config_from_dict(model_cfg, origin="its model_config")
    except L1Error as exc:
        return str(exc)
    with torch.device("meta"):
        model = GPT(cfg)
    params = dict(model.named_parameters())  # before the load: assign would untie a tied head
    try:
        model.load_state_dict(weights, assign=True)  # checks names and shapes; copies nothing
    except RuntimeError as exc:  # missing, unexpected or misshapen weights
        return f"its weights do not fit its model_config ({str(exc).strip().splitlines()[-1].strip()[:200]})"
    if not training:
        return None
    for key in ("epoch", "tokens_seen", "evals_since_best"):
        if not _whole(state.get(key, 0)):
            return f"its {key} {state.get(key)!r} is not a whole number >= 0"
    seconds = state.get("train_seconds", 0.0)
    if not (isinstance(seconds, (int, float)) and 0 <= seconds < float("inf")):
        return f"its train_seconds {seconds!r} is not a finite number >= 0"
    if not isinstance(state.get("best_val_loss"), float) or state["best_val_loss"] != state["best_val_loss"]:
        return f"its best_val_loss {state.get('best_val_loss')!r} is not a number"
    for key in ("train_config", "data_state", "rng", "scaler", "optimizer"):
        if not isinstance(state.get(key), dict):
            return f"it has no {key}"
    return _optimizer_problem(state["optimizer"], params,
                              state["train_config"].get("optimizer", "adamw"))


def _whole(value) -> bool:
    return type(value) is int and value >= 0


def _optimizer_problem(optimizer: dict, params: dict, kind: str) -> str | None:
    """Why optimizer state (by parameter name) does not fit the weights or the optimizer `kind`."""
    groups, per_param = optimizer.get("param_groups"), optimizer.get("state")
    if not isinstance(groups, list) or not isinstance(per_param, dict) \
            or not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups):
        return "its optimizer state has no parameter groups"
    named = [name for g in groups for name in g["params"]]
    if sorted(named) != sorted(params):
        return "its optimizer state names other parameters than its weights"
    muon = any("ns_steps" in g for g in groups)  # Muon's groups carry its Newton-Schulz settings
    if muon != (kind == "muon"):
        return f"its optimizer state is {'Muon' if muon else 'AdamW'}'s, but its config says {kind}"
    for name, entry in per_param.items():
        if name not in params or not isinstance(entry, dict):
            return f"its optimizer state has an entry for {name!r}, which is no parameter"
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() and value.shape != params[name].shape:
                return f"its optimizer state {name}.{key} has shape {tuple(value.shape)}, not the weight's " \
                       f"{tuple(params[name].shape)}"
    return None


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
    tmp = temporary(dst)
    try:
        shutil.copyfile(src, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


class _Snapshot:
    """Host copies of a state's tensors, taken while training waits, written while it runs on.

    The copies are kept from save to save: the next snapshot of the same shapes is a plain copy
    into them (no allocation, no page faults, no re-pinning). Storages are copied whole and once,
    so views and tied weights stay shared, exactly as torch.save stores the live tensors.
    CUDA storages go to pinned memory with non-blocking copies and one synchronize.
    """

    def __init__(self):
        self.buffers: list[torch.UntypedStorage] = []

    def take(self, state: dict) -> dict:
        self.used, self.cuda_devices, memo = 0, set(), {}
        snapshot = self._copy(state, memo)
        for device in self.cuda_devices:  # the non-blocking copies have landed
            torch.cuda.synchronize(device)
        del self.buffers[self.used:]
        return snapshot

    def _copy(self, value, memo: dict):
        if isinstance(value, torch.Tensor):
            if id(value) not in memo:  # one tensor under two names stays one tensor
                source = value.untyped_storage()
                key = (source.device, source.data_ptr(), source.nbytes())
                if key not in memo:
                    memo[key] = self._storage_copy(source)
                memo[id(value)] = torch.empty(0, dtype=value.dtype).set_(
                    memo[key], value.storage_offset(), value.size(), value.stride())
            return memo[id(value)]
        if isinstance(value, dict):
            return {key: self._copy(item, memo) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self._copy(item, memo) for item in value)
        return copy.deepcopy(value)

    def _storage_copy(self, source: torch.UntypedStorage) -> torch.UntypedStorage:
        pinned = source.device.type == "cuda"
        if pinned:
            self.cuda_devices.add(source.device)
        i, self.used = self.used, self.used + 1
        if i < len(self.buffers) and self.buffers[i].nbytes() == source.nbytes() and self.buffers[i].is_pinned() == pinned:
            buffer = self.buffers[i]
        else:
            buffer = torch.empty(source.nbytes(), dtype=torch.uint8, pin_memory=pinned).untyped_storage()
            self.buffers[i:i + 1] = [buffer]
        buffer.copy_(source, non_blocking=pinned)
        return buffer


class CheckpointManager:
    """latest_checkpoint.pt, best_checkpoint.pt and the rolling checkpoint_epoch_E_step_S.pt files.

    save() takes a snapshot and returns; the files are written by one background thread (with
    background=False, before save returns). At most one save is in flight: the next save(), wait()
    or the end of a `with manager:` block waits for it, and raises its error if it failed.
    Every checkpoint carries the run's id (run_id.txt); load_latest refuses another run's.
    """

    def __init__(self, run_dir: Path, keep: int, *, background: bool = True,
                 log: Callable[[str], None] = print):
        self.dir = Path(run_dir)
        self.keep = keep
        self.background = background
        self.log = log
        self.run_id: str | None = None  # known after load_latest or the first save
        self._snapshot = _Snapshot()
        self._writer: threading.Thread | None = None
        self._error: BaseException | None = None

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
        """Save latest; also copy it to a rolling and/or the best checkpoint.

        Returns the seconds the caller was held: waiting for the previous save, then the snapshot
        (the whole write when background=False). The write's own time is logged when it is done.
        """
        start = time.perf_counter()
        self.wait()
        if self.run_id is None:
            self.run_id = read_run_id(self.dir) or uuid.uuid4().hex
        state = {**state, "run_id": self.run_id}
        if not self.background:
            self._write(state, rolling, best)
            return time.perf_counter() - start
        state = self._snapshot.take(state)
        self._writer = threading.Thread(target=self._write_catching, args=(state, rolling, best),
                                        name="l1-checkpoint-writer")
        self._writer.start()
        return time.perf_counter() - start

    def wait(self) -> None:
        """Wait for the save in flight; raise its error (once) if it failed."""
        error = self._join()
        if error is not None:
            raise error

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.wait()
            return
        error = self._join()
        if error is not None:  # the exception on its way out is reported; this one is logged
            self.log(f"the checkpoint write in flight failed too: {error}")

    def _join(self) -> BaseException | None:
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        error, self._error = self._error, None
        return error

    def _write_catching(self, state: dict, rolling: bool, best: bool) -> None:
        try:
            self._write(state, rolling, best)
        except BaseException as exc:  # handed to the training thread at its next save or wait
            self._error = exc

    def _write(self, state: dict, rolling: bool, best: bool) -> None:
        start = time.perf_counter()
        lock = _HELD.get(os.path.abspath(self.dir))
        if lock:  # the folder must still be the one locked: never write where another trainer may be
            lock.check()
        if not (self.dir / RUN_ID).is_file():
            _write_run_id(self.dir, self.run_id)
        payload = _sealed(state)
        sealed = time.perf_counter()
        _write_sealed(payload, self.latest)
        written = time.perf_counter()
        names = [LATEST]
        try:
            if rolling:
                names.append(rolling_name(state["epoch"], state["step"]))
                _copy(self.latest, self.dir / names[-1])
                for old in self.rolling()[:-self.keep]:
                    old.unlink()
            if best:
                names.append(BEST)
                _copy(self.latest, self.best)
            fsync_dir(self.dir)
        except OSError as exc:
            raise _cannot_write(f"checkpoints in {self.dir}", exc, f"{LATEST} is") from None
        done = time.perf_counter()
        self.log(f"saved {', '.join(names)} at step {state.get('step')} in {done - start:.2f}s (checksum "
                 f"{sealed - start:.2f}s, write {written - sealed:.2f}s, copies {done - written:.2f}s)")

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
        ours = read_run_id(self.dir)
        problems = []
        for path in self.candidates():
            try:
                state = load_file(path, map_location)
            except CheckpointError as exc:
                log(f"skipping checkpoint: {exc}")
                problems.append(str(exc))
                continue
            theirs = state.get("run_id")
            reason = check(state)
            if reason is None and ours and theirs and theirs != ours:
                reason = f"it belongs to another run ({theirs}; this folder's {RUN_ID} says {ours})"
            if reason is None:
                if theirs and not ours:
                    log(f"{RUN_ID} is missing: continuing run {theirs} of {path.name}")
                self.run_id = ours or theirs
                return state, path
            log(f"skipping checkpoint {path.name}: {reason}")
            problems.append(f"{path.name}: {reason}")
        if problems:
            raise CheckpointError(f"no usable checkpoint in {self.dir} ({problems[0]}); fix it, or start "
                                  "over with --fresh (the old run is moved aside, not deleted)")
        self.run_id = ours
        return None


def read_run_id(run_dir: Path) -> str | None:
    """The id in a run folder's run_id.txt; None without one (a new run, or one older than run ids)."""
    path = Path(run_dir) / RUN_ID
    if not path.is_file():
        return None
    text = path.read_bytes().strip()
    if not re.fullmatch(rb"[0-9a-f]{32}", text):
        raise CheckpointError(f"{path} is damaged (expected 32 hex digits); restore it, or delete it to "
                              "continue with the run id stored in the newest checkpoint")
    return text.decode()


def _write_run_id(run_dir: Path, run_id: str) -> None:
    try:
        replace_atomic(Path(run_dir) / RUN_ID, lambda f: f.write(f"{run_id}\n".encode()))
    except OSError as exc:
        raise _cannot_write(str(Path(run_dir) / RUN_ID), exc, "the checkpoints are") from None


class RunLock:
    """The lock on a run folder for the life of a run: one trainer per folder (l1.lock.FolderLock).

    What is locked is the folder itself (on Windows, a file beside it that cannot be deleted while
    open), not a file a user may delete, and the OS drops it when the holder dies, SIGKILL
    included: no stale lock. The holder's PID is in the folder's .lock note, for the message a
    second trainer gets; deleting the note changes nothing. Before each save, the holder checks that
    the folder is still the one it locked (not moved, deleted or replaced since), and stops
    otherwise. Taking the lock also removes the temporary files that killed writes left, which only
    the folder's owner may do.
    """

    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir)
        self._lock = FolderLock(self.dir, note=True)

    def acquire(self) -> RunLock:
        """Take the lock, or raise L1Error naming the holder's PID."""
        try:
            taken = self._lock.try_acquire()
        except OSError as exc:
            raise L1Error(f"run folder {self.dir} is not writable ({exc.strerror}); choose another --out") from None
        if not taken:
            raise L1Error(f"run folder {self.dir} is in use by another trainer (PID {self._lock.holder()}); wait "
                          "for it to finish or stop it, or choose another --out")
        _HELD[os.path.abspath(self.dir)] = self
        remove_temporaries(self.dir)
        for debris in [*self.dir.glob(".*.pt.tmp"), self.dir / f".{RUN_ID}.tmp"]:  # named so before unique names
            debris.unlink(missing_ok=True)
        return self

    def check(self) -> None:
        """Raise CheckpointError if the run folder is no longer the one this process locked."""
        if not self._lock.intact():
            raise CheckpointError(f"run folder {self.dir} was moved, deleted or replaced while this trainer held "
                                  "it; stopping without writing there (another trainer may own that path now): "
                                  "resume from wherever the run's folder is now")

    def release(self) -> None:
        """Let go of the lock (closing the folder releases it); the .lock note stays, harmless."""
        if _HELD.get(os.path.abspath(self.dir)) is self:
            del _HELD[os.path.abspath(self.dir)]
        self._lock.release()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# The run locks this process holds, by absolute folder: a save into one of them checks it first.
_HELD: dict[str, RunLock] = {}


def find_for_inference(model_path: str | None, models_root: Path = Path("models")) -> list[Path]:
    """The checkpoint files to sample from, in the order to try them: a file as given (alone), or a
    run folder's best, latest, then rolling newest first (the next is used where one is damaged).

    Without a path, the most recently trained run under models_root is used.
    """
    if model_path:
        path = Path(model_path)
        if path.is_file():
            return [path]
        if not path.is_dir():
            raise CheckpointError(f"{path} does not exist (expected a run folder or a .pt file)")
        runs = [path]
    else:
        runs = [d for d in Path(models_root).glob("*") if d.is_dir()] if Path(models_root).is_dir() else []
        runs.sort(key=lambda d: max((f.stat().st_mtime for f in d.glob("*.pt")), default=0.0), reverse=True)
    for run in runs:
        manager = CheckpointManager(run, keep=1)
        found = [p for p in (manager.best, manager.latest, *reversed(manager.rolling())) if p.is_file()]
        if found:
            return found
    where = model_path or f"{models_root}/*/"
    other = "" if model_path else " or pass --model_path"  # only generate_simple.py looks for the newest run
    raise CheckpointError(f"no checkpoint found in {where} (looked for {BEST}, {LATEST}, "
                          f"checkpoint_epoch_E_step_S.pt); train one with train_gpu_compatible.py{other}")


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

    def model(self) -> GPT:
        """The GPT with the checkpoint's weights, on the CPU, in fp32 as trained."""
        model = GPT(self.model_config)
        model.load_state_dict(self.state["model"])
        return model


def load_run(model_path: str | None, models_root: Path = Path("models"),
             log: Callable[[str], None] = lambda line: print(line, file=sys.stderr)) -> LoadedRun:
    """The one loader of a trained run for every tool (sampler, eval, export): a checkpoint file, or
    a run folder's best else latest, or the newest run under models_root; verified by checksum and
    by content, with the tokenizer.json beside it, which must be the one the model was trained
    with. A damaged checkpoint of a run folder is skipped for the next intact one, saying so."""
    paths = find_for_inference(model_path, models_root)
    for i, path in enumerate(paths):
        try:
            state = load_file(path)
            damage = content_problem(state, training=False)
            if damage:
                raise CheckpointError(f"{path} is damaged: {damage}")
        except CheckpointError as exc:
            if i + 1 == len(paths):
                if len(paths) > 1:
                    raise CheckpointError(f"no intact checkpoint in {path.parent} (the last tried: {exc})") from None
                raise
            log(f"skipping {path.name}: {exc}; trying {paths[i + 1].name}")
            continue
        break
    cfg = model_config_from_dict(state["model_config"], origin=str(path))
    tokenizer_path = path.parent / "tokenizer.json"
    tokenizer = Tokenizer.load(tokenizer_path)
    if tokenizer.fingerprint != state["tokenizer_fingerprint"]:
        raise L1Error(f"{tokenizer_path} (fingerprint {tokenizer.fingerprint}) is not the tokenizer this model "
                      f"was trained with ({state['tokenizer_fingerprint']}); restore the run's own tokenizer.json")
    if tokenizer.vocab_size > cfg.vocab_size:
        raise L1Error(f"{tokenizer_path} has {tokenizer.vocab_size} tokens but the model only {cfg.vocab_size}")
    return LoadedRun(path, state, cfg, tokenizer)
