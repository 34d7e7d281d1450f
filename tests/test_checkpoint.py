"""CheckpointManager: background saves that are true snapshots, one in flight, errors never lost;
the run's identity; the run-folder lock and the debris it sweeps; bench.checkpoint runs."""

import copy
import errno
import json
import os
import subprocess
import sys
import threading

import pytest
import torch

from conftest import REPO
from l1 import checkpoint
from l1.checkpoint import BEST, LATEST, RUN_ID, CheckpointError, CheckpointManager, RunLock, load_file, rolling_name
from l1.errors import L1Error
from l1.lock import temporary


def make_state(step: int = 1, device: str = "cpu") -> dict:
    """A trainer-like state: tied weights (one storage, two names), a view, bf16, a transposed
    tensor, nested optimizer state and plain values."""
    embed = torch.randn(16, 8, device=device)
    return {"model": {"embed.weight": embed, "lm_head.weight": embed, "rows": embed[2:5],
                      "norm": torch.randn(8, device=device).to(torch.bfloat16),
                      "proj": torch.randn(8, 4, device=device).t()},
            "optimizer": {"state": {"embed.weight": {"step": torch.tensor(3.0), "exp_avg": torch.randn(16, 8)}},
                          "param_groups": [{"lr": 1e-3, "params": ["embed.weight"]}]},
            "step": step, "epoch": 0, "data_state": {"order": [3, 1, 2], "position": 5},
            "rng": {"cpu": torch.get_rng_state(), "cuda": []}}


def tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors(item)


def train_on(state: dict) -> None:
    """What training does to the live state after save() returned: in-place updates everywhere."""
    for t in tensors(state):
        t.add_(1)
    state["data_state"]["order"].append(9)
    state["data_state"]["position"] = 99


def assert_same(got, want, where="state"):
    if isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and torch.equal(got.cpu(), want.cpu()), where
    elif isinstance(want, dict):
        assert got.keys() == want.keys(), where
        for key in want:
            assert_same(got[key], want[key], f"{where}.{key}")
    else:
        assert got == want, where


def stored(path) -> dict:
    state = load_file(path)
    del state["format_version"], state["run_id"]
    return state


@pytest.fixture
def gate(monkeypatch):
    """Holds the background writer before it reads the snapshot, until the test opens the gate."""
    opened = threading.Event()
    sealed = checkpoint._sealed

    def held(state):
        assert opened.wait(timeout=30)
        return sealed(state)

    monkeypatch.setattr(checkpoint, "_sealed", held)
    return opened


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_saved_files_hold_the_state_at_save_although_training_changed_it(tmp_path, gate, device):
    state = make_state(device=device)
    expected = copy.deepcopy(state)
    lines = []
    manager = CheckpointManager(tmp_path, keep=2, log=lines.append)
    manager.save(state, rolling=True, best=True)
    train_on(state)  # the writer has not read a byte yet
    gate.set()
    manager.wait()
    for name in (LATEST, BEST, rolling_name(0, 1)):
        loaded = stored(tmp_path / name)
        assert_same(loaded, expected)
        weights = loaded["model"]
        assert weights["embed.weight"].data_ptr() == weights["lm_head.weight"].data_ptr()  # still tied
        assert weights["rows"].untyped_storage().data_ptr() == weights["embed.weight"].untyped_storage().data_ptr()
    if device == "cuda":
        assert all(buffer.is_pinned() for buffer in manager._snapshot.buffers)
    assert len(lines) == 1 and lines[0].startswith(f"saved {LATEST}, {rolling_name(0, 1)}, {BEST} at step 1 in ")


def test_background_files_are_byte_identical_to_synchronous_ones(tmp_path):
    state = make_state(step=4)
    files = {}
    for background in (False, True):
        folder = tmp_path / str(background)
        folder.mkdir()
        (folder / RUN_ID).write_text("0" * 32 + "\n")
        with CheckpointManager(folder, keep=2, background=background, log=lambda line: None) as manager:
            manager.save(state, rolling=True, best=True)
        files[background] = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert files[True] == files[False] and len(files[True]) == 4


def test_later_snapshots_reuse_their_buffers_and_never_hold_stale_values(tmp_path):
    state = make_state()
    manager = CheckpointManager(tmp_path, keep=2, log=lambda line: None)
    manager.save(state)
    manager.wait()
    buffers = [b.data_ptr() for b in manager._snapshot.buffers]
    train_on(state)
    state["step"] = 2
    expected = copy.deepcopy(state)
    manager.save(state)
    manager.wait()
    assert [b.data_ptr() for b in manager._snapshot.buffers] == buffers
    assert_same(stored(tmp_path / LATEST), expected)


def test_one_save_in_flight_the_next_waits_for_it(tmp_path, gate):
    manager = CheckpointManager(tmp_path, keep=5, log=lambda line: None)
    manager.save(make_state(step=1), rolling=True)
    second = threading.Thread(target=manager.save, args=(make_state(step=2),), kwargs={"rolling": True})
    second.start()
    second.join(timeout=0.5)
    assert second.is_alive() and not (tmp_path / LATEST).exists()  # held behind the first write
    gate.set()
    second.join()
    manager.wait()
    assert [p.name for p in manager.rolling()] == [rolling_name(0, 1), rolling_name(0, 2)]
    assert load_file(tmp_path / LATEST)["step"] == 2


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("surfaces_at", ["save", "wait", "end_of_with"])
def test_a_failed_background_write_surfaces_once_as_one_line(tmp_path, monkeypatch, surfaces_at):
    manager = CheckpointManager(tmp_path, keep=2, log=lambda line: None)
    manager.save(make_state(step=1))
    manager.wait()
    monkeypatch.setattr(torch, "save", no_space)
    manager.save(make_state(step=2))  # returns: the write fails in the background
    with pytest.raises(CheckpointError) as failed:
        if surfaces_at == "save":
            manager.save(make_state(step=3))
        elif surfaces_at == "wait":
            manager.wait()
        else:
            with manager:
                pass
    message = str(failed.value)
    assert "No space left on device" in message and "\n" not in message and "intact" in message
    assert load_file(tmp_path / LATEST)["step"] == 1
    assert not list(tmp_path.glob(".*.tmp"))
    monkeypatch.undo()
    manager.wait()  # reported once, not again
    manager.save(make_state(step=4))
    manager.wait()
    assert load_file(tmp_path / LATEST)["step"] == 4


def test_a_write_failing_while_another_error_leaves_is_logged_not_lost(tmp_path, monkeypatch):
    lines = []
    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(ZeroDivisionError):
        with CheckpointManager(tmp_path, keep=2, log=lines.append) as manager:
            manager.save(make_state())
            1 / 0
    assert len(lines) == 1 and "failed too" in lines[0] and "No space left on device" in lines[0]


# ---- run identity ----------------------------------------------------------------------------

def foreign_checkpoint(tmp_path, step: int) -> bytes:
    """A checkpoint of the same shape from another run."""
    other = tmp_path / "other"
    other.mkdir(exist_ok=True)
    CheckpointManager(other, keep=2, background=False, log=lambda line: None).save(make_state(step))
    return (other / LATEST).read_bytes()


def test_another_runs_checkpoint_is_refused_even_when_latest_is_damaged(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    ours = CheckpointManager(run, keep=3, background=False, log=lambda line: None)
    ours.save(make_state(step=4), rolling=True)
    run_id = (run / RUN_ID).read_text().strip()
    (run / LATEST).write_bytes(b"damaged")
    (run / rolling_name(0, 9)).write_bytes(foreign_checkpoint(tmp_path, 9))  # the newest rolling one
    lines = []
    manager = CheckpointManager(run, keep=3, log=lambda line: None)
    state, path = manager.load_latest(log=lines.append)
    assert path.name == rolling_name(0, 4) and state["step"] == 4 and manager.run_id == run_id
    assert any(f"skipping checkpoint {rolling_name(0, 9)}: it belongs to another run" in line and run_id in line
               for line in lines)


def test_only_foreign_checkpoints_refuse_to_resume(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / RUN_ID).write_text("a" * 32 + "\n")
    (run / LATEST).write_bytes(foreign_checkpoint(tmp_path, 3))
    with pytest.raises(CheckpointError, match="no usable checkpoint .*belongs to another run"):
        CheckpointManager(run, keep=2).load_latest(log=lambda line: None)


def test_checkpoints_from_before_run_ids_resume_and_the_run_gets_an_id(tmp_path):
    checkpoint.save_file(make_state(step=5), tmp_path / LATEST)  # format 1 without run_id
    manager = CheckpointManager(tmp_path, keep=2, background=False, log=lambda line: None)
    state, _ = manager.load_latest(log=lambda line: None)
    assert state["step"] == 5 and "run_id" not in state and manager.run_id is None
    manager.save(make_state(step=6))
    run_id = (tmp_path / RUN_ID).read_text().strip()
    assert len(run_id) == 32 and load_file(tmp_path / LATEST)["run_id"] == run_id
    assert CheckpointManager(tmp_path, keep=2).load_latest(log=lambda line: None)[0]["step"] == 6


def test_a_missing_run_id_file_is_restored_from_the_checkpoint_resumed(tmp_path):
    first = CheckpointManager(tmp_path, keep=2, background=False, log=lambda line: None)
    first.save(make_state(step=2))
    run_id = (tmp_path / RUN_ID).read_text()
    (tmp_path / RUN_ID).unlink()
    lines = []
    manager = CheckpointManager(tmp_path, keep=2, background=False, log=lambda line: None)
    manager.load_latest(log=lines.append)
    assert lines == [f"{RUN_ID} is missing: continuing run {run_id.strip()} of {LATEST}"]
    manager.save(make_state(step=3))
    assert (tmp_path / RUN_ID).read_text() == run_id


def test_a_damaged_run_id_file_is_one_clear_line(tmp_path):
    CheckpointManager(tmp_path, keep=2, background=False, log=lambda line: None).save(make_state())
    (tmp_path / RUN_ID).write_bytes(b"\xff\x00garbage")
    with pytest.raises(CheckpointError, match=f"{RUN_ID} is damaged"):
        CheckpointManager(tmp_path, keep=2).load_latest(log=lambda line: None)


# ---- the run-folder lock ---------------------------------------------------------------------

def test_a_held_run_lock_refuses_a_second_holder_naming_its_pid(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(L1Error, match=f"in use by another trainer \\(PID {os.getpid()}\\)"):
            RunLock(tmp_path).acquire()
    with RunLock(tmp_path):  # released at the end of the block
        pass


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from l1.checkpoint import RunLock; "
                               f"RunLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
                              cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(L1Error, match=f"PID {holder.pid}\\)"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    with RunLock(tmp_path):
        pass


def test_taking_the_lock_removes_what_a_killed_save_left(tmp_path):
    debris = [".latest_checkpoint.pt.tmp", f".{rolling_name(0, 6)}.tmp", ".best_checkpoint.pt.tmp", f".{RUN_ID}.tmp",
              *(temporary(tmp_path / name).name for name in (LATEST, BEST, RUN_ID, "config.json", "tokenizer.json",
                                                              "training_args.json", "loss.png"))]  # named per process now
    kept = [LATEST, "notes.tmp", ".data.tmp", "training.log"]
    for name in debris + kept:
        (tmp_path / name).write_bytes(b"x" * 1000)
    with RunLock(tmp_path):
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*kept, checkpoint.LOCK])


# ---- the bench -------------------------------------------------------------------------------

def test_bench_checkpoint_smoke(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bench.checkpoint", "--scale", "0.002", "--saves", "2",
                             "--save_every", "2", "--step_s", "0.05", "--dir", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["kind"] for r in records] == ["setup", "mode", "mode", "summary"]
    assert all(len(r["held_s"]) == 2 and r["write_s"]["write"] > 0 for r in records[1:3])
    assert records[-1]["held_ratio"] > 0 and not list(tmp_path.iterdir())  # its folder removed


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_model_weights_round_trip_bitwise_tied_or_not(tmp_path, tie):
    """A checkpoint's weights come back bit for bit, a tied head still the embedding itself and an
    untied one still its own tensor (the background snapshot included: it keeps shared storages)."""
    import dataclasses

    from l1.config import ModelConfig, model_config_from_dict
    from l1.model import GPT

    cfg = ModelConfig(vocab_size=300, n_layer=1, n_head=2, n_embd=32, block_size=16, tie_embeddings=tie)
    torch.manual_seed(0)
    model = GPT(cfg)
    with CheckpointManager(tmp_path, keep=1, log=lambda line: None) as manager:
        manager.save({"model": model.state_dict(), "model_config": dataclasses.asdict(cfg), "step": 1, "epoch": 0})
    state = load_file(tmp_path / LATEST)
    weights = state["model"]
    assert (weights["lm_head.weight"].data_ptr() == weights["embed.weight"].data_ptr()) == tie
    run = checkpoint.LoadedRun(tmp_path / LATEST, state, model_config_from_dict(state["model_config"]), None)
    restored = run.model()
    assert (restored.lm_head.weight is restored.embed.weight) == tie
    assert restored.state_dict().keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(restored.state_dict()[name], tensor), name
