"""The training loop: optimizer, schedule, accumulation, evaluation, logging, signals, resume.

It is handed a config; it asks l1.data for batches, l1.model for the network, l1.runtime for the
device and l1.checkpoint for the run folder. Only the scripts and the tests import it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import logging
import logging.handlers
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from l1 import chat, checkpoint, config, files, finetune, identity, plot, runtime
from l1.checkpoint import CheckpointManager
from l1.config import ModelConfig, TrainConfig
from l1.data import BatchIterator, PreparedData, eval_batches, open_prepared, prepare
from l1.errors import L1Error
from l1.model import GPT
from l1.optim import Muon
from l1.tokenizer import Tokenizer

TRAINING_ARGS = "training_args.json"
ASSUMED_CPU_MFU = 0.4  # for the "how long would this take here" estimate only
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None  # loss.png is optional
LOG_FORMAT = logging.Formatter("%(asctime)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S")


# ---- configuration of a run ---------------------------------------------------------------------

def configure(overrides: dict, file_values: dict | None = None, fresh: bool = False) -> TrainConfig:
    """The run's config: a resumed run keeps its stored training_args.json unless a flag overrides it.

    Every check that can refuse runs here, before anything is written: a resume may change how the
    run trains but not its identity (l1/identity.py). A folder without a checkpoint holds no run to
    resume: the command's own settings start a new one there. With fresh=True an existing run
    folder is moved aside (never deleted), once the new run's config is known to be valid.
    """
    file_values = file_values or {}
    preset = overrides.get("preset") or file_values.get("preset") or TrainConfig.preset
    out = Path(overrides.get("out") or file_values.get("out") or f"models/{preset}")
    has_run = not fresh and bool(CheckpointManager(out, keep=1).candidates())
    reference = _reference_checkpoint(out) if has_run else None
    stored = None
    if has_run:
        stored_path = out / TRAINING_ARGS
        if stored_path.is_file():
            stored = config.load_json(stored_path)
            _check_config_json(out / "config.json", stored.get("model", {}))
        elif reference:
            print(f"{stored_path} is missing: resuming with the configuration stored in {reference[0].name}")
            stored = reference[1]["train_config"]
    elif not fresh and (out / TRAINING_ARGS).is_file():
        print(f"{out} holds no checkpoint: starting a new run there with this command's settings")
    asked = overrides.get("preset") or file_values.get("preset")
    if stored and asked and asked != stored.get("preset"):
        raise L1Error(f"{out} is a run of preset {stored.get('preset')!r}; --preset {asked} would relabel it "
                      "without changing the model: leave --preset out to resume, or train a new run with "
                      "another --out (or --fresh)")
    cfg = finetune.resolve(overrides, stored, file_values, out)
    cfg = dataclasses.replace(cfg, data=identity.absolute(cfg.data))
    if reference:
        _check_identity(cfg, out, reference[1])
        _check_max_steps(cfg, reference[1]["step"])
    if cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise L1Error("--tensorboard needs the tensorboard package: pip install tensorboard")
    if fresh and out.exists() and any(out.iterdir()):
        aside = out.with_name(f"{out.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        with checkpoint.RunLock(out):  # never move a folder that another trainer is writing
            out.rename(aside)
        print(f"--fresh: moved the previous run to {aside}")
    return cfg


def _reference_checkpoint(run_dir: Path) -> tuple[Path, dict] | None:
    """The checkpoint a resume of this folder is checked against before anything is written: the
    newest whose content is sound and whose run id is the folder's, read cheaply (memory-mapped; its
    checksum is verified by the full load, which checks again). None where there is none."""
    try:
        ours = checkpoint.read_run_id(run_dir)
    except checkpoint.CheckpointError:
        ours = None
    for path in CheckpointManager(run_dir, keep=1).candidates():
        state = checkpoint.peek(path)
        if state and not checkpoint.content_problem(state) and (ours is None or state.get("run_id") == ours):
            return path, state
    return None


def _check_identity(cfg: TrainConfig, run_dir: Path, state: dict) -> None:
    """Refuse, in one line, a resume that would change what the run trains on (l1/identity.py).
    The checkpoint's own config is the reference, so a hand-edited training_args.json is caught too."""
    try:
        stored = config.from_dict(state["train_config"], origin=f"the checkpoint of {run_dir}")
    except L1Error:
        return  # a damaged checkpoint: the full load skips it, or refuses the resume
    stored = dataclasses.replace(stored, data=identity.absolute(stored.data))
    changes = identity.differences(stored, cfg)
    if changes:
        raise L1Error(identity.refusal(run_dir, changes))
    if cfg.data.tokenizer:
        given = Tokenizer.load(cfg.data.tokenizer)
        if given.fingerprint != state.get("tokenizer_fingerprint"):
            raise L1Error(f"--tokenizer {cfg.data.tokenizer} (fingerprint {given.fingerprint}) is not the tokenizer "
                          f"of the run in {run_dir} ({state.get('tokenizer_fingerprint')}): leave --tokenizer out "
                          "to resume; to train with it, start a new run (another --out) or start over with --fresh")


def _check_max_steps(cfg: TrainConfig, step: int) -> None:
    """--max_steps is the run's total: one below the step reached would end before it (0, allowed
    only under a time budget, is no step limit at all)."""
    if isinstance(step, int) and cfg.max_steps and cfg.max_steps < step:
        raise L1Error(f"the run is at step {step} already; --max_steps is the run's total, so "
                      f"{cfg.max_steps} ends before it: give a larger --max_steps")


def _check_config_json(path: Path, stored_model: dict) -> None:
    """A run's config.json must agree with its training_args.json: an edited one is refused, not replaced."""
    if not path.is_file():
        return
    edited = config.load_json(path)
    diff = sorted(k for k in set(edited) | set(stored_model) if edited.get(k) != stored_model.get(k))
    if diff:
        says = ", ".join(f"{k} {edited.get(k)!r}" for k in diff)
        truth = ", ".join(f"{k} {stored_model.get(k)!r}" for k in diff)
        raise L1Error(f"{path} says {says}, but the run was trained with {truth}; restore the file, "
                      "or start over with --fresh")


def _lr_at(cfg: TrainConfig, step: int, seconds: float = 0.0) -> float:
    """Linear warmup, then cosine decay to the floor, or constant then a linear decay (wsd).

    Without a time budget the schedule follows the steps. With one (--max_minutes), it follows the
    run's progress: the larger of its fraction of the budget (`seconds`, the training time spent
    before this step; the loop passes the whole budget for the last step that fits) and its fraction
    of max_steps once this step is done (an upper bound, if any), so the run ends fully decayed at
    whichever end comes first. The warmup, still in steps, caps the lr.
    """
    if cfg.max_minutes:
        return _budget_lr_at(cfg, step, seconds)
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "wsd":
        decay_steps = max(1, round(cfg.decay_fraction * cfg.max_steps))
        progress = min(1.0, max(0.0, (step - (cfg.max_steps - decay_steps)) / decay_steps))
        return cfg.lr - (cfg.lr - floor) * progress
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * progress))


def _budget_lr_at(cfg: TrainConfig, step: int, seconds: float) -> float:
    """_lr_at under a time budget: the schedule as a function of the fraction of the run done."""
    done = seconds / (cfg.max_minutes * 60)
    if cfg.max_steps:
        done = max(done, (step + 1) / cfg.max_steps)
    done = min(1.0, done)
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "wsd":
        lr = cfg.lr - (cfg.lr - floor) * max(0.0, (done - (1.0 - cfg.decay_fraction)) / cfg.decay_fraction)
    else:
        lr = floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * done))
    if step < cfg.warmup_steps:
        lr = min(lr, cfg.lr * (step + 1) / cfg.warmup_steps)
    return lr


def _optimizers(model: GPT, cfg: TrainConfig, device: torch.device) -> list[torch.optim.Optimizer]:
    """AdamW with weight decay on matrices only (not norms), fused on CUDA and CPU; with
    --optimizer muon, the blocks' matrices go to Muon (l1/optim.py: torch's update, scaled to
    AdamW's RMS so one --lr serves both; its Newton-Schulz iterations in
    runtime.newton_schulz_dtype) and the embedding and norms stay with AdamW. An untied head is a
    matrix outside the blocks: AdamW with weight decay, like the embedding it would be tied to
    (modded-nanogpt and nanochat also keep the head out of Muon)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    muon = [p for n, p in named if cfg.optimizer == "muon" and p.dim() == 2 and n.startswith("blocks.")]
    taken = {id(p) for p in muon}
    rest = [p for _, p in named if id(p) not in taken]
    groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
    fused = device.type in ("cuda", "cpu")
    optimizers = [torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)]
    if muon:
        optimizers.append(Muon(muon, ns_dtype=runtime.newton_schulz_dtype(device), lr=cfg.lr,
                               weight_decay=cfg.weight_decay, adjust_lr_fn="match_rms_adamw"))
    return optimizers


# ---- logging ------------------------------------------------------------------------------------

class _LogFile(logging.FileHandler):
    """training.log. A line that cannot be written (a full disk) stops the run with one error line
    instead of logging's traceback on stderr and a log with holes."""

    def handleError(self, record):
        raise files.cannot_write(self.baseFilename, sys.exc_info()[1]) from None


class _TqdmHandler(logging.Handler):
    """Console lines that do not break the progress bar."""

    def emit(self, record):
        tqdm.write(self.format(record), file=sys.stderr)


def _make_logger(run_dir: Path, writes: bool) -> logging.Logger:
    """The console now, and training.log once the run starts (_start_log_file): the set-up's lines
    wait in memory till then, so a command refused during set-up leaves the run folder untouched.
    Silent on all but the main rank of a distributed run."""
    logger = logging.getLogger(f"l1.train.{run_dir.resolve()}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    if not writes:
        logger.addHandler(logging.NullHandler())
        return logger
    console = _TqdmHandler()
    console.setFormatter(LOG_FORMAT)
    logger.addHandler(console)
    logger.addHandler(logging.handlers.MemoryHandler(capacity=1 << 20, flushLevel=logging.CRITICAL + 1))
    return logger


def _start_log_file(logger: logging.Logger, run_dir: Path) -> None:
    """Open training.log (appending) and write the lines the set-up held back into it first."""
    for held in [h for h in logger.handlers if isinstance(h, logging.handlers.MemoryHandler)]:
        file_handler = _LogFile(run_dir / "training.log", encoding="utf-8")  # flushes every line
        file_handler.setFormatter(LOG_FORMAT)
        held.setTarget(file_handler)
        held.flush()
        logger.removeHandler(held)
        held.close()
        logger.addHandler(file_handler)


class _Metrics:
    """metrics.jsonl: one JSON object per line, written at once, for tools and plots; with
    --tensorboard the same numbers also go to TensorBoard event files.

    A line is appended whole or not at all: a write that fails (a full disk) is cut back off the
    file, so neither its readers nor the resumed run's next line meet half a record."""

    def __init__(self, run_dir: Path, writes: bool, tensorboard: bool):
        self.path, self.fd, self.board = run_dir / "metrics.jsonl", None, None
        if writes:
            try:
                self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            except OSError as exc:
                raise files.cannot_write(self.path, exc) from None
        if writes and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.board = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, **record):
        if self.fd is not None:
            line = memoryview((json.dumps(record) + "\n").encode("utf-8"))
            end = os.lseek(self.fd, 0, os.SEEK_END)
            try:
                while line:
                    line = line[os.write(self.fd, line):]
            except OSError as exc:
                with contextlib.suppress(OSError):  # a device that cannot be cut (e.g. /dev/full)
                    os.ftruncate(self.fd, end)
                raise files.cannot_write(self.path, exc) from None
        if self.board:
            for key, value in record.items():
                if key not in ("kind", "step", "time") and isinstance(value, (int, float)):
                    self.board.add_scalar(f"{record['kind']}/{key}", value, record["step"])
            self.board.flush()

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.board:
            self.board.close()


class _StopFlag:
    """SIGINT/SIGTERM: the first asks for a clean stop after this step; a second Ctrl-C exits at once."""

    def __init__(self, log):
        self.requested = False
        self.log = log
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            os._exit(130)  # checkpoint writes are atomic, so leaving mid-write loses nothing
        self.requested = True
        self.log(f"{signal.Signals(signum).name} received: finishing this step, then saving "
                 "(Ctrl-C again to quit at once)")


# ---- the run ------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    """What a finished (or stopped) run reached."""

    step: int
    stopped_early: bool
    best_val_loss: float
    last_val_loss: float | None
    run_dir: Path


def train(cfg: TrainConfig) -> TrainResult:
    """Train (or resume) the run in cfg.run_dir until max_steps, its time budget (max_minutes), early
    stopping or a stop signal.

    The set-up, in order: device and precision (runtime.setup), the run folder's lock, the prepared
    corpus, the micro-batch size (--batch_size auto), then the run itself. Every check that can
    refuse runs before the run writes its first file; a folder this command created for a run that
    never started is removed again.
    """
    rt = runtime.setup(cfg.device, cfg.amp, cfg.deterministic)
    if cfg.batch_size == 0 and rt.device.type != "cuda":
        raise L1Error("--batch_size auto probes GPU memory and needs CUDA; give a number instead")
    lock, created, started = None, not cfg.run_dir.exists(), False
    try:
        writes_files = rt.dist.is_main  # only the main rank writes files
        if writes_files:
            lock = _lock_run_dir(cfg.run_dir)
        runtime.barrier(rt.dist)
        logger = _make_logger(cfg.run_dir, writes_files)
        reference = _reference_checkpoint(cfg.run_dir)
        data = _prepare_data(cfg, rt.dist, logger.info, reference[1] if reference else None)
        if cfg.batch_size == 0:
            cfg = auto_batch_size(cfg, rt, logger.info)
        run = _Run(cfg, rt, data, logger.info)
        started = True
        if writes_files:
            _start_log_file(logger, cfg.run_dir)
        return run.run()
    finally:
        if lock:
            lock.release()
            if created and not started:  # nothing of a run is in it: leave no empty folder behind
                shutil.rmtree(cfg.run_dir, ignore_errors=True)
        runtime.shutdown_distributed(rt.dist)


def _lock_run_dir(run_dir: Path) -> checkpoint.RunLock:
    """Create the run folder, take its lock (one trainer per folder, for the whole run), then prove
    the folder writable before any work goes into it. Nothing is written into it before the lock is
    held, so a trainer refused by the lock leaves the folder as it was."""
    lock = None
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = checkpoint.RunLock(run_dir).acquire()
        # The lock file may be writable where the folder is not (a read-only folder that holds one).
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        if lock:
            lock.release()
        raise L1Error(f"run folder {run_dir} is not writable ({exc.strerror}); choose another --out") from None
    return lock


def _prepare_data(cfg: TrainConfig, dist: runtime.Distributed, log, resumed: dict | None) -> PreparedData:
    """The run's prepared corpus (the main rank prepares, the others then reuse its files).

    A new run prepares its source (or reuses a folder prepared alike). A resumed run reads the folder
    it started with, without its source; if that folder is gone, the source is prepared again with
    the run's own tokenizer, and must give the same tokens (the digest recorded in the checkpoint).
    """
    recorded = (resumed or {}).get("data_identity")
    if recorded and Path(recorded["folder"]).is_dir():
        def load():
            return open_prepared(Path(recorded["folder"]), log=log)
    else:
        data_cfg, given = cfg.data, None
        if resumed:
            data_cfg = dataclasses.replace(data_cfg, tokenizer=_run_tokenizer(cfg.run_dir, resumed, recorded))
        elif not data_cfg.tokenizer:  # a fine-tune run starts with its source's tokenizer
            given = finetune.start_tokenizer(cfg)

        def load():
            return prepare(data_cfg, cfg.model.vocab_size, cfg.seed, log=log, tokenizer=given)
    if not dist.is_main:
        runtime.preparation_outcome(dist)  # raises the main rank's error
        return load()
    try:
        data = load()
        if recorded and data.digest != recorded["digest"]:
            raise L1Error(f"the run's prepared corpus {recorded['folder']} is gone, and its source prepared again "
                          f"gives other tokens ({data.digest}, not {recorded['digest']}): the source changed since "
                          "the run started; restore the prepared folder or the source, or start a new run")
    except L1Error as exc:
        runtime.preparation_outcome(dist, failure=str(exc))
        raise
    runtime.preparation_outcome(dist)
    return data


def _run_tokenizer(run_dir: Path, resumed: dict, recorded: dict | None) -> str:
    """The run's own tokenizer.json, to prepare its source again with (its fingerprint must be the
    checkpoint's); '' for a run older than the recorded corpus, whose tokenizer.json is gone or
    another one (the checkpoint's fingerprint then refuses a mismatch after the preparation)."""
    path = run_dir / "tokenizer.json"
    fingerprint = resumed.get("tokenizer_fingerprint")
    if path.is_file() and Tokenizer.load(path).fingerprint == fingerprint:
        return str(path)
    if recorded:
        raise L1Error(f"the run's prepared corpus {recorded['folder']} is gone and {path} is not the run's tokenizer "
                      f"({fingerprint}): restore either to resume, or start a new run")
    return ""


def auto_batch_size(cfg: TrainConfig, rt: runtime.Runtime, log) -> TrainConfig:
    """--batch_size auto: the config whose micro-batch is the largest that fits this GPU (the
    smallest over all ranks, so every rank runs the same micro-steps), found by a short probe on a
    throw-away model wrapped as training runs it (activation checkpointing, compile), while the
    sequences per optimizer step stay the preset's. The sizes found are stored with the run
    (training_args.json). Each rank probes alone, unsharded: no collective waits on a rank that
    ran out of memory, and FSDP's shards only lower the peak."""
    torch.manual_seed(cfg.seed)
    model = GPT(cfg.model).to(rt.device)
    alone = dataclasses.replace(rt, dist=runtime.Distributed())
    compiled = runtime.use_compile(rt.device, cfg.compile, float("inf"))
    _, forward = runtime.parallelize(model, alone, grad_ckpt=cfg.grad_ckpt, compile=compiled, fsdp=False, log=log)
    step = runtime.probe_step(model, forward, rt.precision, cfg.model.vocab_size, cfg.context, rt.device)
    optimizer_bytes = 2 * 4 * cfg.model.num_params  # AdamW's two fp32 moments
    largest = runtime.largest_batch(runtime.cuda_batch_fits(step, rt.device, optimizer_bytes), limit=512)
    del model, forward, step
    largest = int(runtime.all_reduce_min(torch.tensor(largest, device=rt.device), rt.dist).item())
    if largest == 0:
        raise L1Error(f"not even one sequence of {cfg.context} tokens fits this GPU; try --grad_ckpt, "
                      "a shorter --seq_len or a smaller preset")
    wanted = config.preset_dict(cfg.preset).get("batch_size", TrainConfig.batch_size) * cfg.grad_accum
    batch, accum = runtime.fit_global_batch(largest, wanted)
    log(f"--batch_size auto: {largest} sequences of {cfg.context} tokens fit this GPU; batch_size {batch}, "
        f"grad_accum {accum} ({wanted} sequences per optimizer step, as the preset)")
    return dataclasses.replace(cfg, batch_size=batch, grad_accum=accum)


class _Run:
    """One training run, set up in __init__ in a fixed order: batches, the checkpoint to resume
    from, the compile decision, the model and its wrappers, the optimizers, then the resumed state."""

    def __init__(self, cfg: TrainConfig, rt: runtime.Runtime, data: PreparedData, log):
        self.cfg, self.rt, self.data, self.log = cfg, rt, data, log
        self.dist, self.device, self.precision = rt.dist, rt.device, rt.precision
        self.writes_files = rt.dist.is_main
        self.run_dir = cfg.run_dir
        self.tokenizer = data.tokenizer
        # Each process's share of the global batch, which is the same for any number of processes.
        self.micro_batch, self.accum = runtime.split_batch(cfg.batch_size, cfg.grad_accum, self.dist.world_size)
        self.tokens_per_step = cfg.batch_size * cfg.context * cfg.grad_accum  # global, any world size
        self.batches = self._make_batches()

        self.manager = CheckpointManager(self.run_dir, cfg.keep, log=log)
        resumed = self.manager.load_latest(self._refusal, log=log, map_location="cpu")
        state, self.resumed_from = resumed if resumed else (None, None)
        self.step = state["step"] if state else 0
        _check_max_steps(cfg, self.step)

        torch.manual_seed(cfg.seed)
        self.model = GPT(cfg.model).to(self.device)
        finetune.start(self.model, cfg, self.tokenizer, first=state is None, log=log)
        # Chat data: the loss counts the assistant's tokens only (l1/chat.py).
        self.chat_mask = cfg.assistant_only_loss and chat.has_template(self.tokenizer)
        self.flops_per_token = self.model.flops_per_token(cfg.context)
        runtime.seed_rank(cfg.seed, self.dist)  # the same weights everywhere, then each rank its own dropout
        self.peak = runtime.mfu_peak(self.device, self.precision.compute_dtype)
        self.remaining_seconds = self._remaining_seconds()
        expected = min(self.remaining_seconds, cfg.max_minutes * 60) if cfg.max_minutes else self.remaining_seconds
        self.compiled = runtime.use_compile(self.device, cfg.compile, expected)
        self.wrapped, self.forward = runtime.parallelize(self.model, rt, grad_ckpt=cfg.grad_ckpt,
                                                         compile=self.compiled, fsdp=cfg.fsdp, log=log)
        self.compiled = self.compiled and torch._dynamo.is_dynamo_supported()  # as parallelize decided
        self.optimizers = _optimizers(self.model, cfg, self.device)
        self.scaler = self.precision.grad_scaler()
        self.tokens_seen, self.best_val, self.saved_step = 0, float("inf"), -1
        self.train_seconds, self.best_step, self.best_epoch, self.evals_since_best = 0.0, -1, 0, 0
        if state:
            self._load_state(state)
            log(f"resumed from {self.resumed_from.name} at step {self.step} (epoch {self.batches.epoch}, "
                f"{self.tokens_seen:,} tokens seen)")

    def _make_batches(self) -> BatchIterator:
        cfg = self.cfg
        batches = BatchIterator(self.data.tokens("train"), cfg.context, self.micro_batch, cfg.seed,
                                rank=self.dist.rank, world_size=self.dist.world_size)
        val_windows = (len(self.data.tokens("val")) - 1) // cfg.context
        needed = self.micro_batch * self.dist.world_size
        if val_windows < needed:
            raise L1Error(f"the validation split holds {val_windows} sequences of {cfg.context} tokens, "
                          f"fewer than one evaluation batch ({needed}); raise --val_fraction or use more data")
        return batches

    def _refusal(self, state: dict) -> str | None:
        """Why a checkpoint cannot continue this run, or None: damaged by its content, or another run's."""
        damage = checkpoint.content_problem(state)
        if damage:
            return f"it is damaged: {damage}"
        ours = dataclasses.asdict(self.cfg.model)
        # A field added to ModelConfig after the checkpoint was written had its default then.
        theirs = {**dataclasses.asdict(ModelConfig()), **state.get("model_config", {})}
        diff = [f"{k} {theirs.get(k)!r} vs {v!r}" for k, v in ours.items() if theirs.get(k) != v]
        if diff:
            context = (f"; its context is fixed at block_size {theirs['block_size']}: resume with a --seq_len up to "
                       "that, a longer one needs a new run" if theirs.get("block_size") != ours["block_size"] else "")
            return f"it holds a different model ({', '.join(diff)}, checkpoint vs now){context}"
        if state.get("tokenizer_fingerprint") != self.tokenizer.fingerprint:
            return (f"it was trained with tokenizer {state.get('tokenizer_fingerprint')}, "
                    f"not {self.tokenizer.fingerprint}")
        recorded = state.get("data_identity")
        if recorded and recorded.get("digest") != self.data.digest:
            return f"it was trained on another corpus ({recorded.get('folder')}, tokens {recorded.get('digest')})"
        return self.batches.position_problem(state["data_state"])

    def _remaining_seconds(self) -> float:
        """A rough duration of the remaining steps, from the matmul roofline at a CPU-like MFU."""
        if not self.cfg.max_steps:  # no step limit: only the time budget bounds the run
            return float("inf")
        remaining = (self.cfg.max_steps - self.step) * self.tokens_per_step * self.flops_per_token
        return remaining / (self.peak.roofline * ASSUMED_CPU_MFU)

    def _state(self) -> dict:
        """Everything a resume needs (a collective under FSDP: every rank calls it); _load_state is
        its mirror."""
        return {
            "model": runtime.model_state(self.model),
            "optimizer": runtime.optimizer_state(self.model, self.optimizers),
            "scaler": self.scaler.state_dict(),
            "scheduler": {"kind": f"warmup_{self.cfg.schedule}", "step": self.step},  # the lr is a function of step
            "step": self.step,
            "epoch": self.batches.epoch,
            "data_state": self.batches.state_dict(),
            "tokens_seen": self.tokens_seen,
            "best_val_loss": self.best_val,
            "best_step": self.best_step,  # early stopping counts evaluations since the best one
            "best_epoch": self.best_epoch,
            "evals_since_best": self.evals_since_best,
            "train_seconds": self.train_seconds,  # the time budget's clock (--max_minutes)
            "rng": runtime.rng_state(self.device, self.dist),
            "model_config": dataclasses.asdict(self.cfg.model),
            "train_config": self.cfg.to_dict(),
            "tokenizer_fingerprint": self.tokenizer.fingerprint,
            # The corpus the run started with: a resume reads this folder, or these very tokens.
            "data_identity": {"folder": str(self.data.dir.resolve()), "digest": self.data.digest},
        }

    def _load_state(self, state: dict) -> None:
        """Restore what _state() saved: weights, optimizer, scaler, data position, counters, RNG."""
        trained_with = state["train_config"].get("optimizer", "adamw")
        if trained_with == self.cfg.optimizer:
            runtime.load_states(self.model, self.optimizers, state["model"], state["optimizer"])
        else:  # on purpose: the new optimizer starts from fresh state, all else is kept
            runtime.load_states(self.model, self.optimizers, state["model"], None)
            self.log(f"--optimizer {self.cfg.optimizer}: the run trained with {trained_with} until step "
                     f"{state['step']}; {self.cfg.optimizer} starts from fresh state (weights, data position, "
                     "counters and random state are kept)")
        self.scaler.load_state_dict(state["scaler"])
        self.batches.load_state_dict(state["data_state"])
        self.step, self.tokens_seen, self.best_val = state["step"], state["tokens_seen"], state["best_val_loss"]
        self.saved_step = self.step  # this state is on disk already
        # Checkpoints written before early stopping and time budgets existed lack these counters.
        self.best_step, self.best_epoch = state.get("best_step", -1), state.get("best_epoch", 0)
        self.evals_since_best, self.train_seconds = state.get("evals_since_best", 0), state.get("train_seconds", 0.0)
        runtime.set_rng_state(state["rng"], self.device, self.dist)

    def _announce(self):
        cfg = self.cfg
        self.log(f"model {cfg.preset}: {cfg.model.num_params:,} parameters "
                 f"({cfg.model.num_params_unpadded:,} without the padded vocab rows), "
                 f"{cfg.model.n_layer} layers x {cfg.model.n_embd} wide, {cfg.model.n_head} heads, "
                 f"vocab {cfg.model.vocab_size}")
        if self.dist.enabled:
            self.log(f"distributed: {self.dist.world_size} processes, {'FSDP2' if cfg.fsdp else 'DDP'}, "
                     f"{self.accum} micro-steps of {self.micro_batch} sequences each per optimizer step")
        amp = self.precision
        muon = [f", Muon's Newton-Schulz in {'bf16' if opt.ns_dtype == torch.bfloat16 else 'fp32'}"
                for opt in self.optimizers if isinstance(opt, Muon)]
        self.log(f"device {self.device}, precision {amp.compute_dtype if amp.amp else 'fp32'}"
                 f"{' autocast' if amp.amp else ''}{''.join(muon)}, compile {'on' if self.compiled else 'off'}, "
                 f"grad checkpointing {'on' if cfg.grad_ckpt else 'off'}, "
                 f"{self.tokens_per_step:,} tokens/step")
        self.log(self.peak.describe())
        if not HAS_MATPLOTLIB:
            self.log("matplotlib is not installed: no loss.png (pip install matplotlib to get it)")
        if cfg.max_minutes:
            self.log(f"time budget {cfg.max_minutes:g} minutes ({self.train_seconds:.0f}s spent): the lr "
                     f"follows the training time, {cfg.schedule} down to the deadline"
                     f"{f' or step {cfg.max_steps}, whichever comes first' if cfg.max_steps else ''}")
        if self.device.type != "cuda":
            ahead = (f"; the remaining {cfg.max_steps - self.step} steps of {cfg.preset} would take about "
                     f"{_duration(self.remaining_seconds)} here" if cfg.max_steps else "")
            self.log(f"no CUDA GPU: training on {self.device}{ahead}")

    # -- the loop --

    def run(self) -> TrainResult:
        cfg = self.cfg
        if self.writes_files:  # written once every check has passed; --batch_size auto as the size it found
            self.tokenizer.save(self.run_dir / "tokenizer.json")
            config.save_json(cfg.to_dict(), self.run_dir / TRAINING_ARGS)
            config.save_json(dataclasses.asdict(cfg.model), self.run_dir / "config.json")
        self._announce()
        self.metrics = _Metrics(self.run_dir, self.writes_files, cfg.tensorboard)
        val_loss = None
        try:
            with _StopFlag(self.log) as stop, self.manager:  # the last save is on disk before the end
                val_loss, stopped = self._loop(stop)
        finally:
            self.metrics.close()
        return TrainResult(self.step, stopped, self.best_val, val_loss, self.run_dir)

    def _loop(self, stop: _StopFlag) -> tuple[float | None, bool]:
        cfg = self.cfg
        budget = cfg.max_minutes * 60
        started, resumed_seconds, session_steps = _seconds(), self.train_seconds, 0
        bad_in_a_row, val_loss, window = 0, None, _StepAverages()
        bar = tqdm(total=cfg.max_steps or None, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                   disable=None)
        self.model.train()
        while not self._at_end():
            if cfg.early_stop and self.evals_since_best >= cfg.early_stop:
                bar.close()
                return val_loss, self._stop(f"early stop: {self._stall()}; raise --early_stop (0 = off) "
                                            "to train on")
            window.start()
            # The budget's clock is agreed by every rank at each step's sync, so all take the same lr.
            per_step = (self.train_seconds - resumed_seconds) / session_steps if session_steps else 0.0
            last = bool(budget) and self.train_seconds + 2 * per_step > budget  # no step would fit after it
            loss, grad_norm, halt, self.train_seconds = self._train_step(
                _lr_at(cfg, self.step, budget if last else self.train_seconds), lambda: stop.requested,
                lambda: resumed_seconds + _seconds() - started)
            session_steps += 1
            last = last or bool(budget) and self.train_seconds >= budget  # a step that overran it ends the run too
            if self._bad_step(loss, grad_norm):
                bad_in_a_row += 1
                self.log(f"step {self.step}: non-finite loss or gradients (loss {loss}, grad norm {grad_norm}); "
                         f"update skipped ({bad_in_a_row} in a row)")
                if bad_in_a_row >= cfg.max_bad_steps:
                    raise L1Error(f"training diverged: {bad_in_a_row} non-finite steps in a row at step "
                                  f"{self.step}; lower --lr (now {cfg.lr}) and run again (it resumes from "
                                  "the last good checkpoint, if any)")
            else:
                bad_in_a_row = 0
                val_loss = self._after_step(window, loss, grad_norm, val_loss, last)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}")
            if halt:  # agreed by every rank, so none is left waiting in a collective
                bar.close()
                return val_loss, self._stop("stop requested: stopped at step "
                                            f"{self.step}; run the same command to continue")
        bar.close()
        if self.saved_step != self.step:  # the budget ran out in a skipped (non-finite) step
            self._save(rolling=False, best=False)
        self.log(f"done: step {self.step}, best validation loss {self.best_val:.4f}")
        return val_loss, False

    def _at_end(self) -> bool:
        """The run is over: max_steps reached or its time budget spent."""
        cfg = self.cfg
        return (bool(cfg.max_steps) and self.step >= cfg.max_steps) or \
            (bool(cfg.max_minutes) and self.train_seconds >= cfg.max_minutes * 60)

    def _stop(self, why: str) -> bool:
        """End the run before its end (a stop signal, early stopping): save, say why. Returns True."""
        if self.saved_step != self.step:
            self._save(rolling=False, best=False)
        self.log(why)
        return True

    def _stall(self) -> str:
        """How long the validation loss has not improved, for the log."""
        return (f"validation loss has not improved for {self.evals_since_best} evaluation(s), since step "
                f"{self.best_step} (epoch {self.best_epoch}); {checkpoint.BEST} holds step {self.best_step} "
                f"(val loss {self.best_val:.4f})")

    def _bad_step(self, loss: float, grad_norm: float) -> bool:
        """A non-finite step; with fp16 loss scaling, overflowing gradients are the scaler's job."""
        if self.scaler.is_enabled():
            return not math.isfinite(loss)
        return not (math.isfinite(loss) and math.isfinite(grad_norm))

    def _after_step(self, window: "_StepAverages", loss: float, grad_norm: float, val_loss: float | None,
                    last: bool):
        """Count the step; log, evaluate and save on their schedules. Returns the latest val loss.

        last: the time budget ends with this step (no room for another, or it overran the deadline)."""
        cfg = self.cfg
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        window.add(loss, grad_norm, self.tokens_per_step)
        finished = self.step == cfg.max_steps or last
        if self.step % cfg.log_every == 0 or finished:
            self._log_train(window.flush())
        improved = False
        if self.step % cfg.eval_every == 0 or finished:
            val_loss = self._evaluate()
            improved = val_loss < self.best_val
            if improved:
                self.best_val, self.best_step, self.best_epoch = val_loss, self.step, self.batches.epoch
                self.evals_since_best = 0
            else:
                self.evals_since_best += 1
                self.log(self._stall())
        if last:
            self.log(f"time budget of {cfg.max_minutes:g} minutes spent at step {self.step} "
                     f"({self.train_seconds:.1f}s of training)")
            # The last step takes what is left of the budget (less than a step): a rerun finds it spent.
            self.train_seconds = max(self.train_seconds, cfg.max_minutes * 60)
        rolling = self.step % cfg.save_every == 0
        if rolling or improved or finished:
            self._save(rolling=rolling, best=improved)
        return val_loss

    def _train_step(self, lr: float, halt_requested, clock) -> tuple[float, float, bool, float]:
        """One optimizer step over the accumulation micro-batches: (mean loss, grad norm, halt, seconds).

        The single host sync per step reads loss, norm, halt_requested() (a stop signal) and clock()
        (this rank's training seconds) together, summed over ranks: non-finite updates are skipped,
        every rank stops after the same step, and all share one clock (the ranks' mean) for the lr.
        """
        device = self.device
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        for micro in range(self.accum):
            x, y = self.batches.next()
            x, y = _to_device(x, device), _to_device(y, device)
            with runtime.gradient_sync(self.wrapped, enabled=micro == self.accum - 1):
                with self.precision.autocast():
                    loss = self.forward(x, y, z_loss=self.cfg.z_loss, loss_mask=self._loss_mask(x)) / self.accum
                self.scaler.scale(loss).backward()
            loss_sum += loss.detach()
        for optimizer in self.optimizers:
            self.scaler.unscale_(optimizer)
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        grad_norm = runtime.clip_grad_norm(self.wrapped, max_norm)
        halt = torch.tensor(float(halt_requested()), device=device)
        seconds = torch.tensor(float(clock()), device=device)
        stats = torch.stack([loss_sum, grad_norm.float(), halt, seconds])
        loss_total, norm_value, halts, seconds_total = runtime.all_reduce_sum(stats, self.dist).tolist()
        loss_value = loss_total / self.dist.world_size
        if math.isfinite(loss_value) and math.isfinite(norm_value):
            for optimizer in self.optimizers:
                self.scaler.step(optimizer)
        self.scaler.update()
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        return (loss_value, norm_value / self.dist.world_size if self.dist.enabled else norm_value, halts > 0,
                seconds_total / self.dist.world_size)

    @torch.no_grad()
    def _evaluate(self) -> float:
        cfg, device = self.cfg, self.device
        self.model.eval()
        started = time.perf_counter()
        totals = torch.zeros(2, device=device)  # loss sum, batch count: reduced over ranks together
        for x, y in eval_batches(self.data.tokens("val"), cfg.context, self.micro_batch, cfg.eval_batches,
                                 rank=self.dist.rank, world_size=self.dist.world_size):
            with self.precision.autocast():
                x = _to_device(x, device)
                totals[0] += self.forward(x, _to_device(y, device), loss_mask=self._loss_mask(x)).float()
            totals[1] += 1
        self.model.train()
        loss_sum, count = runtime.all_reduce_sum(totals, self.dist).tolist()
        val_loss = loss_sum / count
        bpb = val_loss / math.log(2) / self.data.bytes_per_token("val")
        ppl = math.exp(min(val_loss, 50.0))
        self.log(f"eval step {self.step}: val loss {val_loss:.4f}, perplexity {ppl:.2f}, "
                 f"bits/byte {bpb:.4f} ({time.perf_counter() - started:.1f}s)")
        self.metrics.write(kind="eval", step=self.step, epoch=self.batches.epoch, val_loss=val_loss,
                           val_ppl=ppl, val_bpb=bpb, tokens_seen=self.tokens_seen, time=time.time())
        if self.writes_files and HAS_MATPLOTLIB:
            try:
                plot.plot_run(self.run_dir)
            except L1Error as exc:  # a missing picture must not stop training
                self.log(f"loss.png not updated: {exc}")
        return val_loss

    def _loss_mask(self, x: torch.Tensor) -> torch.Tensor | None:
        """The targets the loss counts: the assistant's, for a chat run (None: all)."""
        return chat.assistant_mask(x, self.tokenizer) if self.chat_mask else None

    def _save(self, rolling: bool, best: bool) -> None:
        state = self._state()
        self.saved_step = self.step  # on every rank: whether to save again is decided alike (FSDP collectives)
        if not self.writes_files:
            return
        seconds = self.manager.save(state, rolling=rolling, best=best)
        self.log(f"checkpoint of step {self.step} taken, training held {seconds:.2f}s; writing it in the background")

    def _log_train(self, stats: dict) -> None:
        tokens_per_s = stats["tokens"] / stats["seconds"]
        mfu = tokens_per_s * self.flops_per_token / (self.peak.flops * self.dist.world_size)
        step_seconds = stats["seconds"] / stats["steps"]
        etas = [(self.cfg.max_steps - self.step) * step_seconds] if self.cfg.max_steps else []
        if self.cfg.max_minutes:
            etas.append(max(0.0, self.cfg.max_minutes * 60 - self.train_seconds))
        eta = min(etas)
        memory = runtime.memory_in_use(self.device)
        lr = self.optimizers[0].param_groups[0]["lr"]
        total = f"/{self.cfg.max_steps}" if self.cfg.max_steps else ""
        self.log(f"step {self.step}{total} epoch {self.batches.epoch} loss {stats['loss']:.4f} "
                 f"lr {lr:.2e} grad norm {stats['grad_norm']:.3f} tokens/s {tokens_per_s:,.0f} "
                 f"mfu {100 * mfu:.1f}% {runtime.memory_text(memory)} eta {_duration(eta)}")
        self.metrics.write(kind="train", step=self.step, epoch=self.batches.epoch, loss=stats["loss"], lr=lr,
                           grad_norm=stats["grad_norm"], tokens_per_s=tokens_per_s, mfu=mfu,
                           memory_bytes=memory["allocated"], memory_reserved_bytes=memory["reserved"],
                           tokens_seen=self.tokens_seen, train_seconds=self.train_seconds,
                           time=time.time())


class _StepAverages:
    """Averages of the steps since the last log line."""

    def __init__(self):
        self.loss = self.grad_norm = self.seconds = 0.0
        self.steps = self.tokens = 0
        self.t0 = time.perf_counter()

    def start(self):
        self.t0 = time.perf_counter()

    def add(self, loss: float, grad_norm: float, tokens: int):
        self.loss += loss
        self.grad_norm += grad_norm
        self.steps += 1
        self.tokens += tokens
        self.seconds += time.perf_counter() - self.t0

    def flush(self) -> dict:
        stats = {"loss": self.loss / self.steps, "grad_norm": self.grad_norm / self.steps,
                 "steps": self.steps, "tokens": self.tokens, "seconds": max(self.seconds, 1e-9)}
        self.__init__()
        return stats


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Pinned, non-blocking host-to-GPU copies; a no-op on CPU."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _seconds() -> float:
    """The time budget's clock: monotonic seconds (a test simulates it)."""
    return time.monotonic()


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} days"
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
