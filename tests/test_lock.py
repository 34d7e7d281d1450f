"""One writer per folder (l1/lock.py), on POSIX and, through tests/without_fcntl.py, on its Windows
branch: a second process is refused naming the holder, waits its turn, or gets a killed holder's
lock at once; deleting the .lock note lets no second trainer in; a trainer whose folder moves
stops before writing elsewhere; temporary names are unique per process; and where fcntl cannot be
imported every module imports and a tiny run trains and resumes."""

import importlib
import os
import pkgutil
import select
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import l1
from conftest import REPO, one_error_line, run_script, tiny_args, wait_for, with_flag
from l1 import lock
from l1.checkpoint import load_file

ENV = {**os.environ, "PYTHONPATH": str(REPO)}
SHIM = str(REPO / "tests" / "without_fcntl.py")
MODES = {"fcntl": [sys.executable], "msvcrt": [sys.executable, SHIM]}  # how a process is started in each

HOLD = """
import sys
from l1.lock import FolderLock
held = FolderLock(sys.argv[1], note=True)
assert held.try_acquire()
print("held", flush=True)
sys.stdin.readline()  # hold until told
held.release()
print("released", flush=True)
sys.stdin.readline()
"""

TRY = """
import sys
from l1.lock import FolderLock
attempt = FolderLock(sys.argv[1], note=True)
print("taken" if attempt.try_acquire() else f"held by {attempt.holder()}")
"""

WAIT = """
import sys
from l1.lock import FolderLock
FolderLock(sys.argv[1]).acquire(lambda: print("waiting", flush=True))
print("taken", flush=True)
"""


def start(mode: str, code: str, folder) -> subprocess.Popen:
    return subprocess.Popen([*MODES[mode], "-c", code, str(folder)], cwd=REPO, env=ENV, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)


def attempt(mode: str, folder) -> str:
    result = subprocess.run([*MODES[mode], "-c", TRY, str(folder)], cwd=REPO, env=ENV, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def has_output(process: subprocess.Popen, seconds: float) -> bool:
    return bool(select.select([process.stdout], [], [], seconds)[0])


@pytest.fixture
def holder_of(tmp_path):
    """Start a process that holds tmp_path/run's lock; every one started is killed at the end."""
    started = []

    def hold(mode):
        folder = tmp_path / "run"
        folder.mkdir(exist_ok=True)
        process = start(mode, HOLD, folder)
        started.append(process)
        assert process.stdout.readline() == "held\n"
        return folder, process

    yield hold
    for process in started:
        process.kill()
        process.wait()


@pytest.mark.parametrize("mode", MODES)
def test_a_second_process_is_refused_naming_the_holder_even_without_the_note(holder_of, mode):
    folder, holder = holder_of(mode)
    assert (folder / lock.NOTE).read_text() == f"{holder.pid}\n"
    assert attempt(mode, folder) == f"held by {holder.pid}"
    (folder / lock.NOTE).unlink()  # what the README once called harmless: it still is
    assert attempt(mode, folder) == f"held by {holder.pid}"  # the kernel's lock table names it (Linux)
    assert not (folder / lock.NOTE).exists(), "a refused process writes nothing"
    holder.stdin.write("\n")
    holder.stdin.flush()
    assert holder.stdout.readline() == "released\n"
    assert attempt(mode, folder) == "taken"


@pytest.mark.parametrize("mode", MODES)
def test_a_killed_holder_leaves_the_lock_free(holder_of, mode):
    folder, holder = holder_of(mode)
    assert attempt(mode, folder) == f"held by {holder.pid}"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert attempt(mode, folder) == "taken"


@pytest.mark.parametrize("mode", MODES)
def test_a_waiting_process_takes_the_lock_when_the_holder_lets_go(holder_of, mode):
    folder, holder = holder_of(mode)
    waiter = start(mode, WAIT, folder)
    try:
        assert waiter.stdout.readline() == "waiting\n"
        assert not has_output(waiter, 1.0), "took a lock that another process holds"
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline() == "released\n"
        assert has_output(waiter, 30) and waiter.stdout.readline() == "taken\n"
    finally:
        waiter.kill()
        waiter.wait()


def test_the_windows_branch_locks_a_file_beside_the_folder_so_the_folder_can_be_renamed(holder_of, tmp_path):
    folder, holder = holder_of("msvcrt")
    assert (tmp_path / ".run.lock").is_file()  # Windows locks files, not folders; beside, not inside
    folder.rename(tmp_path / "moved")  # what data preparation does with its work folder, under the lock
    folder.mkdir()
    assert attempt("msvcrt", folder) == f"held by {holder.pid}"  # the lock is the name's, not the folder's


@pytest.mark.parametrize("change", ["moved", "replaced", "deleted"])
def test_a_lock_is_no_longer_intact_once_its_folder_is_moved_replaced_or_deleted(tmp_path, change):
    folder = tmp_path / "run"
    folder.mkdir()
    held = lock.FolderLock(folder)
    assert held.try_acquire() and held.intact()
    if change == "deleted":
        folder.rmdir()
    else:
        folder.rename(tmp_path / "elsewhere")
        if change == "replaced":
            folder.mkdir()
    assert not held.intact()
    if change == "replaced":
        other = lock.FolderLock(folder)
        assert other.try_acquire() and other.intact()  # the new folder is free: the old lock is not its
        other.release()
    held.release()


def test_temporary_names_are_unique_per_process_and_call_and_only_they_are_swept(tmp_path):
    target = tmp_path / "latest_checkpoint.pt"
    names = {lock.temporary(target).name for _ in range(100)}
    other = subprocess.run([sys.executable, "-c", f"from l1.lock import temporary; print(temporary({str(target)!r}))"],
                           cwd=REPO, env=ENV, capture_output=True, text=True, timeout=60).stdout.strip()
    assert len(names) == 100 and all(f".latest_checkpoint.pt.{os.getpid()}-" in name for name in names)
    assert os.path.basename(other) not in names and os.path.dirname(other) == str(tmp_path)
    kept = ["latest_checkpoint.pt", ".data.tmp", "notes.tmp", ".x.12-nothex!.tmp"]
    for name in [*names, os.path.basename(other), *kept]:
        (tmp_path / name).write_bytes(b"x")
    lock.remove_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)


SAVE_MANY = """
import sys, torch
from l1.checkpoint import save_file
state = {"weights": torch.full((200_000,), float(sys.argv[2])), "step": int(sys.argv[2])}
for _ in range(40):
    save_file(state, sys.argv[1])
"""


def test_two_processes_saving_the_same_file_never_share_a_temporary_file(tmp_path):
    """What one writer per run folder does not cover: a tool (l1.plot) writing a file beside the
    trainer. With one fixed temporary name, one writer's rename takes the other's half-written file
    or leaves it nothing to rename."""
    path = tmp_path / "latest_checkpoint.pt"
    writers = [subprocess.Popen([sys.executable, "-c", SAVE_MANY, str(path), str(n)], cwd=REPO, env=ENV,
                                stderr=subprocess.PIPE, text=True) for n in (1, 2)]
    for writer in writers:
        _, err = writer.communicate(timeout=300)
        assert writer.returncode == 0, err[-2000:]
    state = load_file(path)  # whole, and one writer's own
    assert state["step"] in (1, 2) and torch.equal(state["weights"], torch.full((200_000,), float(state["step"])))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest_checkpoint.pt"]


PREPARE = """
import sys
from l1.config import DataConfig
from l1.data import prepare
data = prepare(DataConfig(data=sys.argv[1], data_dir=sys.argv[2]), 400, seed=1, log=lambda line: print(line, flush=True))
print("prepared", data.dir.name, flush=True)
"""


@pytest.mark.parametrize("mode", MODES)
def test_a_second_preparation_of_a_corpus_waits_for_the_first(corpus, tmp_path, mode):
    def preparation():
        return subprocess.Popen([*MODES[mode], "-c", PREPARE, str(corpus), str(tmp_path / "data")], cwd=REPO,
                                env=ENV, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)

    first = preparation()
    name = first.communicate(timeout=300)[0].splitlines()[-1].removeprefix("prepared ")
    prepared = tmp_path / "data" / name
    shutil.rmtree(prepared)
    work = prepared.with_name(f".{name}.partial")  # where a preparation of this corpus works, under its lock
    work.mkdir()
    holder = start(mode, HOLD, work)  # a process preparing it
    second = preparation()
    try:
        assert holder.stdout.readline() == "held\n"
        assert second.stdout.readline() == f"waiting for another process that is preparing {prepared}\n"
        assert not has_output(second, 1.0) and not prepared.exists()
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert second.communicate(timeout=300)[0].splitlines()[-1] == f"prepared {name}"
        assert second.returncode == 0 and prepared.is_dir() and not work.exists()
    finally:
        for process in (holder, second):
            process.kill()
            process.wait()


# ---- the trainer ------------------------------------------------------------------------------------

def start_trainer(args, log_path) -> subprocess.Popen:
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, str(REPO / "train_gpu_compatible.py"), *map(str, args)], cwd=REPO,
                                env=ENV, stdout=log, stderr=log)


def test_deleting_the_lock_note_lets_no_second_trainer_in(corpus, tmp_path):
    args = tiny_args(corpus, tmp_path, max_steps=100000, save_every=2, eval_every=4)
    run = tmp_path / "run"
    first = start_trainer(args, tmp_path / "first.log")
    try:
        wait_for(lambda: (run / "latest_checkpoint.pt").exists(), first)
        (run / ".lock").unlink()
        os.kill(first.pid, signal.SIGSTOP)  # its own files stay still while the second one tries
        before = {p.name: p.read_bytes() for p in run.iterdir()}
        second = run_script("train_gpu_compatible.py", *args)
        assert second.returncode == 2
        assert f"in use by another trainer (PID {first.pid})" in one_error_line(second.stderr)
        assert {p.name: p.read_bytes() for p in run.iterdir()} == before
        os.kill(first.pid, signal.SIGCONT)
        step = load_file(run / "latest_checkpoint.pt")["step"]
        wait_for(lambda: load_file(run / "latest_checkpoint.pt")["step"] > step, first)  # the first goes on
    finally:
        first.kill()
        first.wait()
    step = load_file(run / "latest_checkpoint.pt")["step"]
    resumed = run_script("train_gpu_compatible.py", *with_flag(args, "--max_steps", str(step + 2)))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert load_file(run / "latest_checkpoint.pt")["step"] == step + 2


def test_a_trainer_whose_folder_is_moved_stops_at_its_next_save_without_writing_elsewhere(corpus, tmp_path):
    args = tiny_args(corpus, tmp_path, max_steps=100000, save_every=2, eval_every=4)
    run, moved = tmp_path / "run", tmp_path / "moved"
    first = start_trainer(args, tmp_path / "first.log")
    try:
        wait_for(lambda: (run / "latest_checkpoint.pt").exists(), first)
        run.rename(moved)  # or deleted, or replaced: another trainer may take the path now
        assert first.wait(timeout=180) == 2
    finally:
        first.kill()
        first.wait()
    log = (tmp_path / "first.log").read_text()
    assert f"error: run folder {run} was moved, deleted or replaced" in one_error_line(log)
    assert not run.exists(), "the trainer wrote at its folder's old path"
    load_file(moved / "latest_checkpoint.pt")  # what it wrote before is whole
    assert not [p.name for p in moved.iterdir() if lock.TEMPORARY.fullmatch(p.name)]


# ---- where fcntl does not exist (Windows) --------------------------------------------------------------

def test_every_module_imports_without_fcntl():
    modules = sorted(m.name for m in pkgutil.iter_modules(l1.__path__))
    code = ("import importlib, sys\n"
            f"for name in {modules!r}: importlib.import_module('l1.' + name)\n"
            "import train_gpu_compatible, generate_simple\n"
            "assert sys.modules['fcntl'] is None\n"
            "print('imported', len(sys.modules))")
    result = subprocess.run([sys.executable, SHIM, "-c", code], cwd=REPO, env=ENV, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.startswith("imported"), result.stderr[-3000:]
    assert len(modules) > 10 and importlib.import_module("l1.lock").fcntl is not None  # here, the POSIX branch


def test_a_tiny_run_trains_and_resumes_without_fcntl_and_compiles_or_falls_back_in_one_line(corpus, tmp_path):
    """As on a Windows laptop without a compiler for torch.compile: the locks take msvcrt's branch,
    and --compile falls back to eager in one log line."""
    args = [*map(str, tiny_args(corpus, tmp_path, max_steps=4, save_every=2)), "--compile"]
    env = {**ENV, "CXX": str(tmp_path / "no-compiler"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}

    def train(*args):
        return subprocess.run([sys.executable, SHIM, str(REPO / "train_gpu_compatible.py"), *args], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=600)

    first = train(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (tmp_path / ".run.lock").is_file()  # msvcrt's branch: a file beside the run folder
    assert [p.name for p in (tmp_path / "data").iterdir() if p.name.endswith(".lock")], "and beside the corpus's"
    resumed = train(*with_flag(args, "--max_steps", "6"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from latest_checkpoint.pt at step 4" in resumed.stderr
    assert load_file(tmp_path / "run" / "latest_checkpoint.pt")["step"] == 6
    for result in (first, resumed):
        fallbacks = [line for line in result.stderr.splitlines() if "continuing eagerly" in line]
        assert len(fallbacks) == 1 and "torch.compile failed" in fallbacks[0], result.stderr[-3000:]


WITHOUT_TRITON = """
import sys
sys.modules["triton"] = None  # as on Windows, where Triton is usually missing
import torch
from l1 import runtime
lines = []
step = runtime.compile_function(lambda x: torch.sin(x) * 2 + 1, lines.append)
x = torch.randn(4096, device="cuda")
for _ in range(3):
    assert torch.equal(step(x), torch.sin(x) * 2 + 1)
assert len(lines) == 1 and "continuing eagerly" in lines[0], lines
print(lines[0])
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: Triton is inductor's GPU compiler")
def test_compile_on_cuda_without_triton_falls_back_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-c", WITHOUT_TRITON], cwd=REPO, capture_output=True, text=True,
                            env={**ENV, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path)}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "triton" in result.stdout.lower(), result.stdout  # the one line says why
