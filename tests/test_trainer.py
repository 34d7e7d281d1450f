"""The trainer: exact resume, checkpoint layout and rotation, best tracking, signals, refusals."""

import json
import math
import os
import signal

import pytest
import torch

import train_gpu_compatible
from conftest import run_script, tiny_args, train_killed_once_saved
from l1 import runtime, trainer
from l1.checkpoint import load_file
from l1.errors import L1Error


def train(argv) -> int:
    return train_gpu_compatible.main([str(a) for a in argv])


def weights(run) -> dict:
    return load_file(run / "latest_checkpoint.pt")["model"]


def assert_bitwise_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def assert_same_state(a: dict, b: dict, where: str = "") -> None:
    """Every tensor and value of two checkpoints equal, the RNG states included; only what names
    the run itself (its folder, its identity) and the wall-clock seconds it took may differ."""
    assert a.keys() == b.keys(), where
    for key in a:
        if where == "" and key in ("train_config", "run_id", "train_seconds") or \
                where == "/data_identity" and key == "folder":  # the digest of the tokens must match
            continue
        x, y, here = a[key], b[key], f"{where}/{key}"
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and torch.equal(x, y), here
        elif isinstance(x, dict):
            assert_same_state(x, y, here)
        elif isinstance(x, (list, tuple)):
            assert len(x) == len(y), here
            assert_same_state(dict(enumerate(x)), dict(enumerate(y)), here)
        else:
            assert x == y, here


def stop_during(monkeypatch, step: int):
    """Deliver a real SIGTERM to this process while optimizer step `step` is being computed."""
    original = trainer._Run._train_step

    def train_step(self, *args):
        if self.step + 1 == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, *args)

    monkeypatch.setattr(trainer._Run, "_train_step", train_step)


def test_promised_run_folder_layout_and_logs(corpus, tmp_path):
    assert train(tiny_args(corpus, tmp_path, keep=2)) == 0
    run = tmp_path / "run"
    names = sorted(p.name for p in run.iterdir())
    assert names == [".lock", "best_checkpoint.pt", "checkpoint_epoch_0_step_12.pt", "checkpoint_epoch_0_step_8.pt",
                     "config.json", "latest_checkpoint.pt", "loss.png", "metrics.jsonl", "run_id.txt",
                     "tokenizer.json", "training.log", "training_args.json"]  # keep=2 of the rolling saves at 4, 8, 12
    for name in ("best_checkpoint.pt", "latest_checkpoint.pt", "tokenizer.json", "config.json",
                 "training_args.json", "training.log", "metrics.jsonl"):
        assert (run / name).is_file(), name
    assert json.loads((run / "config.json").read_text())["n_layer"] == 2
    assert json.loads((run / "training_args.json").read_text())["max_steps"] == 12
    log = (run / "training.log").read_text()
    assert "parameters" in log and "eval step 12" in log and "saved latest_checkpoint.pt" in log
    assert "tokens/s" in log and "mfu" in log and "eta" in log
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in records} == {"train", "eval"}
    assert [r["step"] for r in records if r["kind"] == "train"] == [2, 4, 6, 8, 10, 12]


def test_checkpoint_contents_load_weights_only(corpus, tmp_path):
    assert train(tiny_args(corpus, tmp_path, max_steps=4)) == 0
    state = torch.load(tmp_path / "run" / "latest_checkpoint.pt", weights_only=True)
    for key in ("model", "optimizer", "scaler", "scheduler", "step", "epoch", "data_state", "tokens_seen",
                "best_val_loss", "rng", "model_config", "train_config", "tokenizer_fingerprint"):
        assert key in state, key
    assert state["step"] == 4 and state["tokens_seen"] == 4 * 4 * 32 * 2
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in state["model"])


def test_best_checkpoint_has_the_lowest_validation_loss(corpus, tmp_path):
    assert train(tiny_args(corpus, tmp_path, max_steps=16, lr=0.05, warmup_steps=1)) == 0
    run = tmp_path / "run"
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "eval"]
    best_eval = min(evals, key=lambda r: r["val_loss"])
    best = load_file(run / "best_checkpoint.pt")
    assert best["step"] == best_eval["step"]
    assert best["best_val_loss"] == pytest.approx(best_eval["val_loss"])


@pytest.mark.parametrize("recipe, flags", [({"optimizer": "adamw", "schedule": "cosine"}, []),
                                           ({"optimizer": "muon", "schedule": "wsd"}, []),
                                           ({"mlp": "relu2", "logit_softcap": 15.0}, ["--no-tie_embeddings"])],
                         ids=["adamw-cosine", "muon-wsd", "untied-relu2-softcap"])
def test_resume_is_bitwise_exact_across_an_epoch_boundary(corpus, tmp_path, monkeypatch, recipe, flags):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert train(tiny_args(corpus, straight, max_steps=30, **recipe) + flags) == 0
    stop_during(monkeypatch, 7)
    assert train(tiny_args(corpus, stopped, max_steps=30, **recipe) + flags) == 0  # SIGTERM: clean stop, exit 0
    assert load_file(stopped / "run" / "latest_checkpoint.pt")["step"] == 7
    monkeypatch.undo()
    assert train(tiny_args(corpus, stopped, max_steps=30, **recipe) + flags) == 0
    final = load_file(stopped / "run" / "latest_checkpoint.pt")
    assert final["step"] == 30 and final["epoch"] >= 1, "the run must cross an epoch boundary"
    assert_bitwise_equal(weights(straight / "run"), final["model"])
    assert_same_state(load_file(straight / "run" / "latest_checkpoint.pt"), final)  # optimizer, data, RNG too
    log = (stopped / "run" / "training.log").read_text()
    assert "resumed from latest_checkpoint.pt at step 7" in log
    if recipe.get("optimizer") == "muon":  # in the dtype that is fast here (runtime.newton_schulz_dtype)
        assert f"Muon's Newton-Schulz in {'bf16' if runtime.native_bf16(torch.device('cpu')) else 'fp32'}" in log
    if flags:  # the knobs reached the model that was trained and saved
        assert final["model_config"]["tie_embeddings"] is False and "blocks.0.mlp.up.weight" in final["model"]
        assert final["model"]["lm_head.weight"].data_ptr() != final["model"]["embed.weight"].data_ptr()


def test_resume_after_sigkill_is_bitwise_exact(corpus, tmp_path):
    args = tiny_args(corpus, tmp_path / "killed", max_steps=40, save_every=2, eval_every=100)
    straight = run_script("train_gpu_compatible.py", *tiny_args(corpus, tmp_path / "straight", max_steps=40,
                                                                 save_every=2, eval_every=100))
    assert straight.returncode == 0, straight.stderr
    run = tmp_path / "killed" / "run"
    train_killed_once_saved(args, run, "checkpoint_epoch_*_step_1[0-9].pt")
    assert load_file(run / "latest_checkpoint.pt")["step"] < 40
    resumed = run_script("train_gpu_compatible.py", *args)
    assert resumed.returncode == 0, resumed.stderr
    assert_bitwise_equal(weights(tmp_path / "straight" / "run"), weights(run))
    assert_same_state(load_file(tmp_path / "straight" / "run" / "latest_checkpoint.pt"),
                      load_file(run / "latest_checkpoint.pt"))


def test_sigterm_mid_run_saves_and_exits_zero(corpus, tmp_path):
    import subprocess
    import sys
    import time

    from conftest import REPO

    args = tiny_args(corpus, tmp_path, max_steps=100000, save_every=100000, eval_every=100000)
    proc = subprocess.Popen([sys.executable, str(REPO / "train_gpu_compatible.py"), *map(str, args)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "run" / "training.log"
    deadline = time.time() + 900  # a hang guard only: a loaded machine may take minutes to reach step 4
    while not (log.is_file() and "step 4/" in log.read_text()) and time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.05)
    assert "step 4/" in log.read_text(), "no step 4 within 15 minutes"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    state = load_file(tmp_path / "run" / "latest_checkpoint.pt")
    assert state["step"] >= 4
    assert "SIGTERM received" in log.read_text() and "stopped at step" in log.read_text()


def test_interrupted_save_leaves_older_checkpoints_loadable(corpus, tmp_path, monkeypatch):
    assert train(tiny_args(corpus, tmp_path, max_steps=4)) == 0
    run = tmp_path / "run"
    before = load_file(run / "latest_checkpoint.pt")

    def torn_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # the process dies in the middle of writing

    monkeypatch.setattr(torch, "save", torn_save)
    assert train(tiny_args(corpus, tmp_path, max_steps=8)) == 130  # the interrupt reaches the entry point
    monkeypatch.undo()
    after = load_file(run / "latest_checkpoint.pt")
    assert after["step"] == before["step"] == 4
    assert_bitwise_equal(before["model"], after["model"])
    assert train(tiny_args(corpus, tmp_path, max_steps=8)) == 0
    assert load_file(run / "latest_checkpoint.pt")["step"] == 8


def test_mismatched_resume_is_refused(corpus, tmp_path):
    assert train(tiny_args(corpus, tmp_path, max_steps=4)) == 0
    with pytest.raises(L1Error, match="cannot resume with other data, split, tokenizer or model: --n_layer 3, "
                                      "but the run has 2"):
        trainer.configure({"out": str(tmp_path / "run"), "model": {"n_layer": 3}})
    other = run_script("train_gpu_compatible.py", *tiny_args(corpus, tmp_path, max_steps=8, n_embd=32))
    assert other.returncode == 2
    last = other.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "--n_embd 32, but the run has 64" in last
    assert "Traceback" not in other.stderr


def test_resume_keeps_stored_config_unless_overridden(corpus, tmp_path):
    assert train(tiny_args(corpus, tmp_path, max_steps=4, lr=0.003)) == 0
    cfg = trainer.configure({"out": str(tmp_path / "run"), "max_steps": 6})
    assert cfg.lr == 0.003 and cfg.max_steps == 6 and cfg.model.n_layer == 2 and cfg.batch_size == 4


def test_fresh_moves_the_old_run_aside(corpus, tmp_path):
    assert train(tiny_args(corpus, tmp_path, max_steps=4)) == 0
    assert train(tiny_args(corpus, tmp_path, max_steps=2) + ["--fresh"]) == 0
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1 and load_file(aside[0] / "latest_checkpoint.pt")["step"] == 4
    assert load_file(tmp_path / "run" / "latest_checkpoint.pt")["step"] == 2


def test_non_finite_steps_are_skipped_then_stop(corpus, tmp_path, monkeypatch):
    from l1.model import GPT

    assert train(tiny_args(corpus, tmp_path, max_steps=2)) == 0

    original = GPT.forward
    monkeypatch.setattr(GPT, "forward", lambda self, *a, **k: original(self, *a, **k) * float("nan"))
    with pytest.raises(L1Error, match="non-finite steps in a row"):
        trainer.train(trainer.configure({"out": str(tmp_path / "run"), "max_steps": 10, "max_bad_steps": 3}))
    assert "update skipped (3 in a row)" in (tmp_path / "run" / "training.log").read_text()


def test_end_to_end_script_run(corpus, tmp_path):
    result = run_script("train_gpu_compatible.py", *tiny_args(corpus, tmp_path, max_steps=6))
    assert result.returncode == 0, result.stderr
    log = (tmp_path / "run" / "training.log").read_text()
    assert "no CUDA GPU: training on cpu" in log and "done: step 6" in log


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_learning_rate_schedules(schedule):
    from l1.config import resolve

    cfg = resolve({"preset": "tiny", "max_steps": 100, "warmup_steps": 10, "lr": 1.0, "min_lr_ratio": 0.1,
                   "schedule": schedule, "decay_fraction": 0.2})
    lrs = [trainer._lr_at(cfg, s) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(b <= a + 1e-12 for a, b in zip(lrs[9:], lrs[10:])), "no increase after warmup"
    assert trainer._lr_at(cfg, 100) == pytest.approx(0.1)
    if schedule == "wsd":
        assert lrs[10:80] == [1.0] * 70 and lrs[90] == pytest.approx(0.55)
    else:
        assert lrs[55] == pytest.approx(0.55, abs=0.01)


def test_tensorboard_gets_the_same_metrics(corpus, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert train(tiny_args(corpus, tmp_path, max_steps=4) + ["--tensorboard"]) == 0
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/lr", "eval/val_loss", "eval/val_bpb"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4]


def test_compiled_run_matches_eager(corpus, tmp_path):
    """--compile really compiles (no eager fallback) and trains like the eager model."""
    losses = {}
    for flag in ("--no-compile", "--compile"):
        out = tmp_path / flag.strip("-")
        args = tiny_args(corpus, out, max_steps=4, eval_every=4, save_every=4, log_every=1)
        assert train(args + [flag, "--no-amp"]) == 0
        log = (out / "run" / "training.log").read_text()
        assert f"compile {'on' if flag == '--compile' else 'off'}" in log and "eagerly" not in log
        records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
        losses[flag] = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses["--compile"]) == 4
    assert losses["--compile"] == pytest.approx(losses["--no-compile"], abs=1e-3)


def test_ctrl_c_outside_the_loop_is_one_line_and_exit_130(corpus, tmp_path, monkeypatch, capsys):
    """A Ctrl-C during data preparation (before the trainer's own stop handling) ends in one
    line, exit status 130, no traceback."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "prepare", interrupted)
    assert train(tiny_args(corpus, tmp_path)) == 130
    err = capsys.readouterr().err
    assert err.strip() == "interrupted" and "Traceback" not in err


def test_gradient_checkpointing_run_trains_like_the_plain_one(corpus, tmp_path):
    losses = {}
    for flag in ("--no-grad_ckpt", "--grad_ckpt"):
        out = tmp_path / flag.strip("-")
        assert train(tiny_args(corpus, out, max_steps=4, log_every=1, eval_every=4) + [flag, "--no-amp"]) == 0
        records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
        losses[flag] = [r["loss"] for r in records if r["kind"] == "train"]
        assert f"grad checkpointing {'on' if flag == '--grad_ckpt' else 'off'}" in (
            out / "run" / "training.log").read_text()
    assert losses["--grad_ckpt"] == pytest.approx(losses["--no-grad_ckpt"], rel=1e-5)


def test_fp16_with_loss_scaling_trains_and_resumes(corpus, tmp_path, monkeypatch):
    """The path of GPUs without native bf16 (fp16 autocast + GradScaler), run on the CPU: the
    scaler is on, its state is checkpointed, the loss falls, and a stopped run resumes exactly."""
    from l1 import runtime

    monkeypatch.setattr(runtime, "precision", lambda device, amp=None: runtime.Precision(device.type, torch.float16))
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    flags = dict(max_steps=4, log_every=1, eval_every=4, eval_batches=1)  # CPU fp16 is emulated: keep it short
    assert train(tiny_args(corpus, straight, **flags)) == 0
    log = (straight / "run" / "training.log").read_text()
    assert "precision torch.float16 autocast" in log
    state = load_file(straight / "run" / "latest_checkpoint.pt")
    assert state["scaler"]["scale"] > 0 and state["scaler"]["_growth_tracker"] >= 0
    records = [json.loads(line) for line in (straight / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert all(map(torch.isfinite, torch.tensor(losses))) and losses[-1] < losses[0]
    original_step = trainer._Run._train_step
    stop_during(monkeypatch, 2)
    assert train(tiny_args(corpus, stopped, **flags)) == 0
    assert load_file(stopped / "run" / "latest_checkpoint.pt")["step"] == 2
    monkeypatch.setattr(trainer._Run, "_train_step", original_step)
    assert train(tiny_args(corpus, stopped, **flags)) == 0
    resumed = load_file(stopped / "run" / "latest_checkpoint.pt")
    assert_bitwise_equal(state["model"], resumed["model"])
    assert state["scaler"] == resumed["scaler"]


def metrics(run, kind) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_early_stop_ends_an_overfitting_run_and_a_resume_keeps_the_count(corpus, tmp_path, monkeypatch):
    """A high lr on a tiny corpus stops improving; --early_stop 2 ends the run there, saved, exit 0.
    A run stopped between the two evaluations without improvement stops at the same step on resume,
    with the same weights: the count survives in the checkpoint."""
    flags = dict(max_steps=40, lr=0.05, warmup_steps=1, eval_every=2, save_every=100, early_stop=2)
    assert train(tiny_args(corpus, tmp_path / "straight", **flags)) == 0
    run = tmp_path / "straight" / "run"
    stop = load_file(run / "latest_checkpoint.pt")
    evals = metrics(run, "eval")
    best = min(evals, key=lambda r: r["val_loss"])
    assert stop["step"] == evals[-1]["step"] < 40 and stop["evals_since_best"] == 2
    assert [r["val_loss"] >= best["val_loss"] for r in evals[-2:]] == [True, True]
    assert load_file(run / "best_checkpoint.pt")["step"] == best["step"] == stop["best_step"]
    log = (run / "training.log").read_text()
    assert (f"validation loss has not improved for 1 evaluation(s), since step {best['step']} (epoch 0); "
            f"best_checkpoint.pt holds step {best['step']}") in log
    assert f"early stop: validation loss has not improved for 2 evaluation(s), since step {best['step']}" in log

    stop_during(monkeypatch, stop["step"] - 1)  # after the first evaluation without improvement
    assert train(tiny_args(corpus, tmp_path / "stopped", **flags)) == 0
    stopped = tmp_path / "stopped" / "run"
    assert load_file(stopped / "latest_checkpoint.pt")["evals_since_best"] == 1
    monkeypatch.undo()
    assert train(tiny_args(corpus, tmp_path / "stopped", **flags)) == 0
    resumed = load_file(stopped / "latest_checkpoint.pt")
    assert resumed["step"] == stop["step"]
    assert_bitwise_equal(stop["model"], resumed["model"])
    assert train(tiny_args(corpus, tmp_path / "stopped", **flags)) == 0  # a rerun trains no further
    assert load_file(stopped / "latest_checkpoint.pt")["step"] == stop["step"]
    assert (stopped / "training.log").read_text().count("early stop:") == 2


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_learning_rate_follows_the_time_budget(schedule):
    from l1.config import resolve

    values = {"preset": "tiny", "max_minutes": 1.0, "warmup_steps": 10, "lr": 1.0, "min_lr_ratio": 0.1,
              "schedule": schedule, "decay_fraction": 0.2}
    cfg = resolve(values)
    assert cfg.max_steps == 0, "a budget without --max_steps has no step limit"
    lr = [trainer._lr_at(cfg, 50, seconds) for seconds in range(0, 61)]
    assert lr[0] == pytest.approx(1.0) and lr[60] == pytest.approx(0.1) and trainer._lr_at(cfg, 50, 90) == pytest.approx(0.1)
    assert all(b <= a + 1e-12 for a, b in zip(lr, lr[1:]))
    if schedule == "wsd":
        assert lr[:49] == [1.0] * 49 and lr[54] == pytest.approx(0.55)
    else:
        assert lr[30] == pytest.approx(0.55)
    assert trainer._lr_at(cfg, 4, 59.0) == pytest.approx(min(0.5, lr[59]))  # the warmup caps the lr
    capped = resolve({**values, "max_steps": 100})  # an upper bound: whichever end comes first decays
    assert trainer._lr_at(capped, 99, 1.0) == pytest.approx(0.1)
    assert trainer._lr_at(capped, 89, 1.0) == pytest.approx(0.55 if schedule == "wsd" else 0.1 + 0.45 * (
        1 + math.cos(math.pi * 0.9)))
    stepped = resolve({**values, "max_minutes": 0.0, "max_steps": 100})  # no budget: the time is ignored
    assert [trainer._lr_at(stepped, s, 1e6) for s in range(100)] == [trainer._lr_at(stepped, s) for s in range(100)]


def simulated_clock(monkeypatch, seconds_per_step: float):
    """The budget's clock advances exactly seconds_per_step per training step (one reading per step)."""
    readings = iter(range(10**6))
    monkeypatch.setattr(trainer, "_seconds", lambda: next(readings) * seconds_per_step)


def test_budgeted_run_ends_at_its_deadline_decayed_and_a_resume_keeps_the_clock(corpus, tmp_path, monkeypatch):
    """--max_minutes 0.2 with steps of exactly 1 s: 12 steps, the lr a function of the training time
    and the 12th at the floor; a run stopped at step 5 resumes the clock at 5 s and ends bitwise equal
    to the straight one; a rerun finds the budget spent."""
    flags = dict(max_minutes=0.2, max_steps=1000, schedule="wsd", decay_fraction=0.5, min_lr_ratio=0.1,
                 warmup_steps=2, log_every=1, eval_every=1000, save_every=1000)
    simulated_clock(monkeypatch, 1.0)
    assert train(tiny_args(corpus, tmp_path / "straight", **flags)) == 0
    straight = tmp_path / "straight" / "run"
    final = load_file(straight / "latest_checkpoint.pt")
    assert final["step"] == 12 and final["train_seconds"] == 12.0
    cfg = trainer.configure({"out": str(straight)})
    assert [r["lr"] for r in metrics(straight, "train")] == pytest.approx(
        [trainer._lr_at(cfg, step, step) for step in range(11)] + [cfg.lr * 0.1])
    assert "time budget of 0.2 minutes spent at step 12 (12.0s of training)" in (straight / "training.log").read_text()

    stop_during(monkeypatch, 5)
    simulated_clock(monkeypatch, 1.0)
    assert train(tiny_args(corpus, tmp_path / "stopped", **flags)) == 0
    stopped = tmp_path / "stopped" / "run"
    assert load_file(stopped / "latest_checkpoint.pt")["train_seconds"] == 5.0
    monkeypatch.undo()
    simulated_clock(monkeypatch, 1.0)
    assert train(tiny_args(corpus, tmp_path / "stopped", **flags)) == 0
    resumed = load_file(stopped / "latest_checkpoint.pt")
    assert (resumed["step"], resumed["train_seconds"]) == (12, 12.0)
    assert_bitwise_equal(final["model"], resumed["model"])
    assert train(tiny_args(corpus, tmp_path / "stopped", **flags)) == 0
    assert "done: step 12" in (stopped / "training.log").read_text().splitlines()[-1]
    assert load_file(stopped / "latest_checkpoint.pt")["step"] == 12


def test_a_spent_budget_without_a_step_limit_reruns_as_done(corpus, tmp_path, monkeypatch):
    """A --max_minutes run with no step limit (max_steps 0, as the README's first command leaves
    it) is complete once its budget is spent: the same command again ends at once with exit 0, as a
    finished step-bounded run does, instead of refusing 0 as a --max_steps below the step reached."""
    flags = dict(max_minutes=0.1, max_steps=0, warmup_steps=2, log_every=1, eval_every=1000, save_every=1000)
    simulated_clock(monkeypatch, 1.0)
    assert train(tiny_args(corpus, tmp_path, **flags)) == 0
    assert load_file(tmp_path / "run" / "latest_checkpoint.pt")["step"] == 6
    assert train(tiny_args(corpus, tmp_path, **flags)) == 0
    assert "done: step 6" in (tmp_path / "run" / "training.log").read_text().splitlines()[-1]
    assert load_file(tmp_path / "run" / "latest_checkpoint.pt")["step"] == 6


def test_budgeted_run_on_the_real_clock_spends_its_budget(corpus, tmp_path):
    """--max_minutes 0.1 in real time: the run ends once its budget is spent, long before max_steps,
    its lr falling with the time."""
    flags = dict(max_minutes=0.1, max_steps=100_000, schedule="cosine", warmup_steps=1, log_every=1,
                 eval_every=100_000, save_every=100_000)
    assert train(tiny_args(corpus, tmp_path, **flags)) == 0
    run = tmp_path / "run"
    final = load_file(run / "latest_checkpoint.pt")
    assert final["train_seconds"] >= 6.0 and 0 < final["step"] < 100_000
    records = metrics(run, "train")
    lrs, seconds = [r["lr"] for r in records], [r["train_seconds"] for r in records]
    assert all(b <= a for a, b in zip(lrs, lrs[1:])) and all(b > a for a, b in zip(seconds, seconds[1:]))
    assert lrs[-1] < lrs[0]
    assert f"time budget of 0.1 minutes spent at step {final['step']}" in (run / "training.log").read_text()


def test_checkpoints_from_before_a_new_model_field_still_resume(corpus, tmp_path):
    """A model field added later (with its default) does not make an older run "a different model"."""
    from l1.checkpoint import save_file

    assert train(tiny_args(corpus, tmp_path, max_steps=4)) == 0
    path = tmp_path / "run" / "latest_checkpoint.pt"
    state = load_file(path)
    for knob in ("dropout", "qk_norm", "tie_embeddings", "mlp", "logit_softcap"):  # as written before them
        del state["model_config"][knob]
    save_file(state, path)
    assert train(tiny_args(corpus, tmp_path, max_steps=6)) == 0
    assert "resumed from latest_checkpoint.pt at step 4" in (tmp_path / "run" / "training.log").read_text()


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_an_untied_head_is_an_adamw_matrix_with_weight_decay(optimizer):
    """The untied head is grouped like the embedding: AdamW, weight decay on (never Muon)."""
    from l1.config import resolve
    from l1.model import GPT

    cfg = resolve({"preset": "tiny", "optimizer": optimizer, "weight_decay": 0.25,
                   "model": {"n_layer": 1, "n_embd": 32, "n_head": 2, "tie_embeddings": False}})
    model = GPT(cfg.model)
    adamw, *muon = trainer._optimizers(model, cfg, torch.device("cpu"))
    decayed = [p for group in adamw.param_groups if group["weight_decay"] == 0.25 for p in group["params"]]
    assert any(p is model.lm_head.weight for p in decayed) and any(p is model.embed.weight for p in decayed)
    assert not any(p is model.lm_head.weight for opt in muon for group in opt.param_groups for p in group["params"])
    assert len(muon) == (optimizer == "muon")
    grouped = [p for opt in (adamw, *muon) for group in opt.param_groups for p in group["params"]]
    assert len(grouped) == len({id(p) for p in grouped}) == len(list(model.parameters()))
