"""Nothing lost, nothing trusted blindly: kills at many instants, damaged files, full disks, bad input."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import train_gpu_compatible
from conftest import REPO, make_documents, run_script, tiny_args, wait_for
from l1.checkpoint import load_file

MAX_STEPS = 16
RUN_FLAGS = dict(max_steps=MAX_STEPS, save_every=2, eval_every=4, keep=3)

# (fault kind, n-th occurrence): each kills the trainer at a different instant.
KILL_POINTS = [
    ("step", 1), ("step", 9), ("step", 24),                # inside a forward pass of a training step
    ("eval", 1), ("eval", 3),                              # in the middle of an evaluation
    ("mid_write", 1), ("mid_write", 5),                    # half-way through writing a checkpoint
    ("overlap", 1), ("overlap", 4),                        # the same, while training runs on past that save
    ("before_rename", 2), ("before_rename", 6),            # temporary file complete, not yet renamed
    ("copy", 1), ("copy", 5),                              # copying latest to a rolling / best file
]


def error_line(capsys) -> str:
    """The one error line a failed run ends with (progress lines may come before it on stderr)."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert sum(line.startswith("error: ") for line in lines) == 1 and "Traceback" not in "".join(lines)
    return lines[-1]


def weights(run) -> dict:
    return load_file(run / "latest_checkpoint.pt")["model"]


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """An uninterrupted run: what every interrupted run must reach, bit for bit; and its prepared
    data folder, which the interrupted runs reuse (no kill point lies in the preparation: those
    are test_data's and test_fault_catalogue's)."""
    tmp = tmp_path_factory.mktemp("reference")
    result = run_script("train_gpu_compatible.py", *tiny_args(corpus, tmp, **RUN_FLAGS))
    assert result.returncode == 0, result.stderr
    return weights(tmp / "run"), tmp / "data"


def run_with_fault(fault: str, args) -> subprocess.CompletedProcess:
    env = {**os.environ, "L1_FAULT": fault, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / "tests" / "fault_runner.py"), *map(str, args)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("kind, n", KILL_POINTS, ids=[f"{k}-{n}" for k, n in KILL_POINTS])
def test_sigkill_at_any_instant_loses_nothing(corpus, tmp_path, reference, kind, n):
    reference_weights, data_dir = reference
    args = tiny_args(corpus, tmp_path, **RUN_FLAGS, data_dir=data_dir)
    killed = run_with_fault(f"{kind}:{n}", args)
    assert killed.returncode == -9, (killed.returncode, killed.stderr[-2000:])
    run = tmp_path / "run"
    for name in ("latest_checkpoint.pt", "best_checkpoint.pt"):
        if (run / name).exists():
            load_file(run / name)  # whatever was written completely is intact
    resumed = run_script("train_gpu_compatible.py", *args)
    assert resumed.returncode == 0, resumed.stderr
    assert same_weights(weights(run), reference_weights)


@pytest.fixture
def finished_run(corpus, tmp_path):
    """A run with rolling checkpoints at steps 4, 6, 8 (keep 3), latest and best at 8."""
    args = tiny_args(corpus, tmp_path, max_steps=8, save_every=2, eval_every=4, keep=3)
    assert train_gpu_compatible.main(list(map(str, args))) == 0
    return tmp_path / "run", args


def flip_bytes(path):
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 8):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def other_runs_checkpoint(corpus, tmp_path, **shape):
    args = tiny_args(corpus, tmp_path / "other", max_steps=2, **shape)
    assert train_gpu_compatible.main(list(map(str, args))) == 0
    return (tmp_path / "other" / "run" / "latest_checkpoint.pt").read_bytes()


@pytest.mark.parametrize("damage, message", [
    ("flipped", "checksum does not match"),
    ("zero", "truncated or corrupt"),
    ("truncated", "truncated or corrupt"),
    ("wrong_format", "not an L1 checkpoint"),
    ("other_run", "different model"),
    ("same_shape_other_run", "belongs to another run"),  # same model and tokenizer: only its run id differs
])
def test_damaged_latest_falls_back_to_newest_intact_rolling(finished_run, corpus, tmp_path, capsys, damage, message):
    run, args = finished_run
    latest = run / "latest_checkpoint.pt"
    rolling_before = {p.name: p.read_bytes() for p in run.glob("checkpoint_epoch_*")}
    if damage == "flipped":
        flip_bytes(latest)
    elif damage == "zero":
        latest.write_bytes(b"")
    elif damage == "truncated":
        latest.write_bytes(latest.read_bytes()[:5000])
    elif damage == "wrong_format":
        torch.save({"weights": torch.zeros(3)}, latest)
    elif damage == "other_run":
        latest.write_bytes(other_runs_checkpoint(corpus, tmp_path, n_embd=32))
    else:
        latest.write_bytes(other_runs_checkpoint(corpus, tmp_path))
    capsys.readouterr()
    args = [*map(str, args)]
    args[args.index("--max_steps") + 1] = "10"
    assert train_gpu_compatible.main(args) == 0
    log = (run / "training.log").read_text()
    assert message in log
    assert "resumed from checkpoint_epoch_0_step_8.pt at step 8" in log
    assert load_file(latest)["step"] == 10
    for name, data in rolling_before.items():  # the good files were never overwritten
        if (run / name).exists():
            assert (run / name).read_bytes() == data


def test_all_checkpoints_damaged_refuses_instead_of_restarting(finished_run, capsys):
    run, args = finished_run
    files = sorted(run.glob("*.pt"))
    for path in files:
        flip_bytes(path)
    damaged = {p: p.read_bytes() for p in files}
    assert train_gpu_compatible.main(list(map(str, args))) == 2
    err = error_line(capsys)
    assert err.startswith("error: no usable checkpoint") and "--fresh" in err
    assert {p: p.read_bytes() for p in files} == damaged  # nothing overwritten, nothing restarted


def test_disk_full_stops_clearly_and_keeps_older_checkpoints(corpus, tmp_path):
    args = tiny_args(corpus, tmp_path, **RUN_FLAGS)
    result = run_with_fault("enospc:3", args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: cannot write checkpoint") and "No space left on device" in lines[-1]
    assert "Traceback" not in result.stderr
    assert load_file(tmp_path / "run" / "latest_checkpoint.pt")["step"] == 4  # saves at 2 and 4 succeeded
    assert not list((tmp_path / "run").glob(".*.tmp"))


def test_debris_of_a_killed_save_is_removed_by_the_next_run(finished_run):
    run, args = finished_run
    debris = [run / ".latest_checkpoint.pt.tmp", run / ".checkpoint_epoch_0_step_2.pt.tmp"]
    for path in debris:  # full size, as a save killed before its rename leaves them
        shutil.copyfile(run / "latest_checkpoint.pt", path)
    args = [*map(str, args)]
    args[args.index("--max_steps") + 1] = "9"  # no save of step 2 or a rename over them
    assert train_gpu_compatible.main(args) == 0
    assert not any(path.exists() for path in debris) and not list(run.glob(".*.tmp"))


def test_second_trainer_on_a_run_folder_refuses_and_touches_nothing(corpus, tmp_path):
    args = tiny_args(corpus, tmp_path, max_steps=100000, save_every=2, eval_every=4)
    run = tmp_path / "run"
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen([sys.executable, str(REPO / "train_gpu_compatible.py"), *map(str, args)], cwd=REPO,
                                 env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=log, stderr=log)
    try:
        wait_for(lambda: (run / "latest_checkpoint.pt").exists(), first)
        os.kill(first.pid, signal.SIGSTOP)  # it still holds the lock; its own files stay still
        before = {p.name: p.read_bytes() for p in run.iterdir()}
        for extra in ([], ["--fresh"]):
            second = run_script("train_gpu_compatible.py", *args, *extra)
            errors = [line for line in second.stderr.splitlines() if line.startswith("error: ")]
            assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-2000:]
            assert len(errors) == 1 and f"in use by another trainer (PID {first.pid})" in errors[0]
        assert {p.name: p.read_bytes() for p in run.iterdir()} == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "first.log", "run"]  # nothing moved aside
    finally:
        first.kill()  # SIGKILL, even while stopped: the kernel drops its lock
        first.wait()
    step = load_file(run / "latest_checkpoint.pt")["step"]
    args[args.index("--max_steps") + 1] = str(step + 2)
    resumed = run_script("train_gpu_compatible.py", *args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from latest_checkpoint.pt at step {step}" in resumed.stderr
    assert load_file(run / "latest_checkpoint.pt")["step"] == step + 2


def test_pickle_that_runs_code_is_refused(finished_run, tmp_path, capsys):
    run, args = finished_run
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    for path in run.glob("*.pt"):
        torch.save({"model": Exploit()}, path)
    log_before = (run / "training.log").read_bytes()
    assert train_gpu_compatible.main(list(map(str, args))) == 2
    assert "pickled objects" in capsys.readouterr().err
    assert (run / "training.log").read_bytes() == log_before  # a refused resume writes nothing
    assert not marker.exists()


def bad_corpus(tmp_path, kind):
    folder = tmp_path / "bad"
    folder.mkdir()
    if kind == "empty":
        (folder / "a.txt").write_text("")
    elif kind == "tiny":
        (folder / "a.txt").write_text("Too short.")
        (folder / "b.txt").write_text("Also short.")
    return folder


@pytest.mark.parametrize("flags, message", [
    (["--preset", "nope"], "unknown preset"),
    (["--lr", "-1"], "lr must be > 0"),
    (["--batch_size", "-2"], "batch_size must be >= 0"),
    (["--batch_size", "auto"], "needs CUDA"),
    (["--vocab_size", "100"], "vocab_size must be at least 257"),
    (["--seq_len", "100000"], "exceeds the model's block_size"),
    (["--val_fraction", "2"], "val_fraction"),
    (["--data", "/nonexistent/corpus.parquet"], "/nonexistent/corpus.parquet"),
    (["--device", "cuda"], "CUDA is not available"),
])
def test_bad_training_input_gets_one_clear_line(corpus, tmp_path, capsys, flags, message):
    args = [*map(str, tiny_args(corpus, tmp_path, max_steps=2)), *flags]
    assert train_gpu_compatible.main(args) == 2
    err = error_line(capsys)
    assert err.startswith("error: ") and message in err, err


@pytest.mark.parametrize("kind, message", [("empty", "no text"), ("tiny", "tokens")])
def test_unusable_corpus_is_refused(tmp_path, capsys, kind, message):
    args = [*map(str, tiny_args(bad_corpus(tmp_path, kind), tmp_path, max_steps=2))]
    assert train_gpu_compatible.main(args) == 2
    err = error_line(capsys)
    assert err.startswith("error: ") and message in err, err


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    folder = tmp_path / "utf8"
    folder.mkdir()
    docs = make_documents(80)
    for i, doc in enumerate(docs):
        data = doc.encode()
        (folder / f"{i:03d}.txt").write_bytes(data[:20] + b"\xff\xfe" + data[20:] if i % 10 == 0 else data)
    args = [*map(str, tiny_args(folder, tmp_path, max_steps=2))]
    assert train_gpu_compatible.main(args) == 0
    log = (tmp_path / "run" / "training.log").read_text()
    assert "invalid UTF-8" in log or "U+FFFD" in log


@pytest.mark.parametrize("argv, message", [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--batch_size", "many"], "expected a whole number or 'auto'"),
    (["--lr", "fast"], "invalid float value"),
])
def test_command_line_errors_exit_2(argv, message):
    result = run_script("train_gpu_compatible.py", *argv)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_unwritable_output_folder(corpus, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    args = [*map(str, tiny_args(corpus, tmp_path, max_steps=2)), "--out", str(blocker / "run")]
    assert train_gpu_compatible.main(args) == 2
    assert "is not writable" in error_line(capsys)


def test_edited_config_json_with_another_shape_is_refused(finished_run, capsys):
    run, args = finished_run
    cfg = json.loads((run / "config.json").read_text())
    cfg["n_layer"] = 7
    (run / "config.json").write_text(json.dumps(cfg))
    assert train_gpu_compatible.main(list(map(str, args))) == 2
    err = error_line(capsys)
    assert "config.json" in err and "n_layer" in err


def test_hub_default_fails_fast_offline(tmp_path):
    result = run_script("train_gpu_compatible.py", "--preset", "tiny", "--out", tmp_path / "run",
                        "--data_dir", tmp_path / "data", timeout=60)
    assert result.returncode == 2
    assert "--data" in result.stderr and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "hub" in errors[0]
