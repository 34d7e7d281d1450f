"""Bad input and full disks around a finished run: one `error:` line, exit 2, no traceback, and the
run folder exactly as it was. Each case is a real command line (in-process main, or a subprocess
where the input is bytes)."""

import errno
import os
import subprocess
import sys

import pytest

import generate_simple
import train_gpu_compatible
from conftest import REPO, one_error_line, snapshot, with_flag
from l1 import info, trainer
from l1.checkpoint import RunLock, load_file


@pytest.mark.parametrize("flag, value, message", [
    ("--preset", "l1-v1", "is a run of preset 'tiny'"),  # another preset on resume
    ("--max_steps", "2", "at step 4 already"),  # max_steps below the current step
])
def test_resume_flags_that_contradict_the_run_are_refused(run, capsys, flag, value, message):
    folder, args = run
    before = snapshot(folder)
    assert train_gpu_compatible.main(with_flag(args, flag, value)) == 2
    assert message in one_error_line(capsys.readouterr().err)
    assert snapshot(folder) == before


def test_a_second_trainer_on_a_locked_run_touches_nothing_before_its_refusal(run, capsys):
    """Refused by the lock of a run that another trainer holds, train() has written nothing into the
    folder: the same files with the same bytes and mtimes, the folder's own mtime included."""
    folder, args = run

    def mtimes():
        return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in [folder, *folder.rglob("*")]}

    with RunLock(folder):  # the other trainer
        before = snapshot(folder), mtimes()
        assert train_gpu_compatible.main(with_flag(args, "--max_steps", "8")) == 2
        line = one_error_line(capsys.readouterr().err)
        assert (snapshot(folder), mtimes()) == before
    assert f"run folder {folder} is in use by another trainer (PID {os.getpid()})" in line


def test_deleted_training_args_resume_from_the_checkpoints_config(run, capsys):
    folder, args = run
    (folder / "training_args.json").unlink()
    # Only --out and --max_steps: the rest (data, model shape) must come from the checkpoint, not the defaults.
    assert train_gpu_compatible.main(["--out", str(folder), "--max_steps", "6", "--no-compile"]) == 0
    assert load_file(folder / "latest_checkpoint.pt")["step"] == 6
    assert "resuming with the configuration stored in latest_checkpoint.pt" in capsys.readouterr().out


@pytest.mark.parametrize("seed", ["-1", str(2 ** 63)])
def test_seeds_outside_the_generators_range_are_refused(run, capsys, seed):
    folder, args = run
    before = snapshot(folder)
    assert train_gpu_compatible.main(with_flag(args, "--seed", seed)) == 2
    assert "--seed must be between 0 and 2**63 - 1" in one_error_line(capsys.readouterr().err)
    assert generate_simple.main(["--model_path", str(folder), "--prompt", "hi", "--seed", seed]) == 2
    assert "--seed must be between" in one_error_line(capsys.readouterr().err)
    assert snapshot(folder) == before


def test_empty_data_is_refused(tmp_path, capsys):
    assert train_gpu_compatible.main(["--data", "", "--out", str(tmp_path / "r"), "--data_dir", str(tmp_path)]) == 2
    assert "--data is empty" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "r").exists()


def test_a_tokenizer_as_model_path_is_named_for_what_it_is(run, capsys):
    folder, _ = run
    assert generate_simple.main(["--model_path", str(folder / "tokenizer.json"), "--prompt", "hi"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "not an L1 checkpoint" in line and "pickled" not in line and "weights_only" not in line


def test_info_on_a_checkpoint_file_points_to_its_folder(run, capsys):
    folder, _ = run
    assert info.main([str(folder / "latest_checkpoint.pt")]) == 2
    assert f"pass the run folder that holds it (e.g. {folder})" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("where", ["stdin", "argument"])
def test_prompts_that_are_not_utf8_are_refused(run, where):
    folder, _ = run
    cmd = [sys.executable, str(REPO / "generate_simple.py"), "--model_path", str(folder), "--max_tokens", "2"]
    data = b"caf\xe9 au lait\n"
    if where == "argument":
        cmd += ["--prompt", data.strip().decode("utf-8", "surrogateescape")]
    result = subprocess.run(cmd, input=data if where == "stdin" else b"", capture_output=True, timeout=300,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"})
    err = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("error: the prompt holds bytes that are not UTF-8")


class _FullDisk:
    """A file whose writes fail as on a full disk."""

    name = "full"

    def write(self, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    def flush(self):
        pass

    def close(self):
        pass


def test_full_disk_while_writing_training_log(run, monkeypatch, capsys):
    folder, args = run
    checkpoints = {name: data for name, data in snapshot(folder).items() if name.endswith(".pt")}
    started = trainer._start_log_file

    def log_file_on_a_full_disk(logger, run_dir):
        started(logger, run_dir)
        next(h for h in logger.handlers if isinstance(h, trainer._LogFile)).stream = _FullDisk()

    monkeypatch.setattr(trainer, "_start_log_file", log_file_on_a_full_disk)
    assert train_gpu_compatible.main(with_flag(args, "--max_steps", "8")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "training.log: No space left on device" in line and "run the same command" in line
    assert {n: d for n, d in snapshot(folder).items() if n.endswith(".pt")} == checkpoints


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full, a device that is always full")
def test_full_disk_while_writing_metrics(run, monkeypatch, capsys):
    folder, args = run
    made = trainer._Metrics.__init__

    def metrics_on_a_full_disk(self, *a, **k):
        made(self, *a, **k)
        os.close(self.fd)
        self.fd = os.open("/dev/full", os.O_WRONLY)

    monkeypatch.setattr(trainer._Metrics, "__init__", metrics_on_a_full_disk)
    assert train_gpu_compatible.main(with_flag(args, "--max_steps", "8")) == 2
    assert "metrics.jsonl: No space left on device" in one_error_line(capsys.readouterr().err)
    assert load_file(folder / "latest_checkpoint.pt")["step"] >= 4
