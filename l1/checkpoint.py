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
import threading
import time
import uuid
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
RUN_ID = "run_id.txt"  # the run's identity, created with its first checkpoint
LOCK = ".lock"  # held (flock) by the process that trains the run; holds its PID as text


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
    _write_sealed(_sealed(state), Path(path))


def _sealed(state: dict) -> dict:
    """The state as it is stored: with its format version and the checksum of everything."""
    payload = {**state, "format_version": FORMAT_VERSION}
    payload["checksum"] = _digest(payload)
    return payload


def _write_sealed(payload: dict, path: Path) -> None:
    try:
        _write_atomic(path, lambda f: torch.save(payload, f))
    except OSError as exc:
        raise _cannot_write(f"checkpoint {path}", exc, "the older checkpoints are") from None


def _cannot_write(what: str, exc: OSError, intact: str) -> CheckpointError:
    return CheckpointError(f"cannot write {what}: {exc.strerror or exc}; {intact} intact: free space or "
                           "fix the folder, then resume")


def _write_atomic(path: Path, write: Callable) -> None:
    """write(f) into a temporary file in the same folder, fsync, rename, fsync the folder; on an
    OSError the temporary file is removed and the error raised."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


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
            self.run_id = _read_run_id(self.dir) or uuid.uuid4().hex
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
            _fsync_dir(self.dir)
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
        ours = _read_run_id(self.dir)
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


def _read_run_id(run_dir: Path) -> str | None:
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
        _write_atomic(Path(run_dir) / RUN_ID, lambda f: f.write(f"{run_id}\n".encode()))
    except OSError as exc:
        raise _cannot_write(str(Path(run_dir) / RUN_ID), exc, "the checkpoints are") from None


class RunLock:
    """An OS lock on a run folder for the life of a run: one trainer per folder.

    flock on the folder's .lock file (msvcrt on Windows), so the kernel releases it when the
    holder dies, SIGKILL included: no stale lock. The holder writes its PID into the file for the
    message a second trainer gets. Taking the lock also removes the temporary files that a killed
    save left (full-size .*.pt.tmp), which only the folder's owner may do.
    """

    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir)
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock, or raise L1Error naming the holder's PID."""
        try:
            fd = os.open(self.dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise L1Error(f"run folder {self.dir} is not writable ({exc.strerror}); choose another --out") from None
        if not _try_lock(fd):
            os.lseek(fd, 1, os.SEEK_SET)  # byte 0 is the one Windows locks (and cannot read)
            holder = os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise L1Error(f"run folder {self.dir} is in use by another trainer (PID {holder}); wait for it "
                          "to finish or stop it, or choose another --out")
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f" {os.getpid()}\n".encode())
        self._fd = fd
        for debris in [*self.dir.glob(".*.pt.tmp"), self.dir / f".{RUN_ID}.tmp"]:
            debris.unlink(missing_ok=True)
        return self

    def release(self) -> None:
        """Let go of the lock (closing the file releases it); the .lock file stays, harmless."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _try_lock(fd: int) -> bool:
    """An exclusive, non-blocking lock on an open file; False when another process holds it."""
    if os.name == "nt":
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)  # byte 0, from the current position
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def find_for_inference(model_path: str | None, models_root: Path = Path("models")) -> Path:
    """The checkpoint file to sample from: a file as given, or a run folder's best else latest.

    Without a path, the most recently trained run under models_root is used.
    """
    if model_path:
        path = Path(model_path)
        if path.is_file():
            return path
        if not path.is_dir():
            raise CheckpointError(f"{path} does not exist (expected a run folder or a .pt file)")
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
