"""Shared fixtures: a small synthetic corpus, a tiny, fast training configuration, a finished run to
copy, and the helpers that check a refusal (one error line, files unchanged)."""

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train_gpu_compatible

REPO = Path(__file__).resolve().parents[1]
SHARED_SAMPLE = REPO.parent / "shared" / "data" / "wikipedia-sample"

# A suite started in the background by a non-interactive shell (`cmd &`) inherits SIGINT ignored,
# and so would every process it starts: the Ctrl-C tests' children would never see their Ctrl-C.
# A handled SIGINT is reset to the default in a child, so the children get Python's usual Ctrl-C.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

WORDS = ("the a of and to in is was for on that with as by at from his her it an were are which this "
         "be or has had first one their its new after who they have two but also been other all "
         "city river king war game music film team school church village state year people born "
         "played built known called world album song series station league season county island").split()


def make_documents(n_docs: int = 200, seed: int = 0) -> list[str]:
    """Deterministic English-like documents of a few sentences each."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        sentences = []
        for _ in range(rng.randint(2, 6)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(5, 14))]
            sentences.append(" ".join(words).capitalize() + ".")
        docs.append(" ".join(sentences))
    return docs


def write_parquet(path: Path, docs: list[str]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": [str(i) for i in range(len(docs))],
                      "url": [f"https://example.org/{i}" for i in range(len(docs))],
                      "title": [f"Doc {i}" for i in range(len(docs))], "text": docs})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """A folder holding one parquet file in the hub's schema."""
    folder = tmp_path_factory.mktemp("corpus")
    write_parquet(folder / "train-00000-of-00001.parquet", make_documents())
    return folder


def tiny_args(corpus: Path, tmp: Path, **extra) -> list[str]:
    """Command-line flags for a seconds-long CPU run of a very small model."""
    values = {"preset": "tiny", "data": corpus, "data_dir": tmp / "data", "out": tmp / "run",
              "n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64, "vocab_size": 512, "val_fraction": 0.1,
              "batch_size": 4, "seq_len": 32, "grad_accum": 2, "max_steps": 12, "save_every": 4,
              "eval_every": 4, "eval_batches": 2, "log_every": 2, "warmup_steps": 3, "device": "cpu"}
    values.update(extra)
    return flags(values)


def flags(values: dict) -> list[str]:
    """Command-line flags of a CPU run without compilation: --key value for each item."""
    args = ["--no-compile"]
    for key, value in values.items():
        args += [f"--{key}", str(value)]
    return args


@pytest.fixture(scope="module")
def finished(corpus, tmp_path_factory):
    """A tiny run trained to step 4 (once per module that asks), and the flags that trained it."""
    tmp = tmp_path_factory.mktemp("finished")
    args = [str(a) for a in tiny_args(corpus, tmp, max_steps=4)]
    assert train_gpu_compatible.main(args) == 0
    return tmp / "run", args


@pytest.fixture
def run(finished, tmp_path):
    """A private copy of the finished run, and its flags pointing at the copy."""
    source, args = finished
    copy = tmp_path / "run"
    shutil.copytree(source, copy)
    return copy, with_flag(args, "--out", str(copy))


def with_flag(args: list[str], flag: str, value: str) -> list[str]:
    """A copy of args with flag set to value: replaced where args give it, else appended."""
    args = list(args)
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    return args


def snapshot(folder: Path) -> dict:
    """Every file under folder (relative name -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(err: str) -> str:
    """The one `error: ` line of a command's stderr (other lines may come around it), with no traceback."""
    lines = [line for line in err.strip().splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def run_script(script: str, *args, cwd=REPO, timeout=300, **popen) -> subprocess.CompletedProcess:
    """Run one of the repo's scripts as a user would."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout, **popen)


def train_briefly(model, ids: list[int], steps: int = 150, seq_len: int = 32, lr: float = 3e-3) -> None:
    """Adam steps on random windows of ids (batches of 8), in process: a model for the export
    tests that has learned something, in seconds."""
    data = torch.tensor(ids)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq_len - 1, (8,), generator=gen)
        batch = torch.stack([data[s:s + seq_len + 1] for s in starts])
        loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices on shared cores gain nothing from threads and lose much to contention
    (measured 7x slower); modules opt in with pytestmark = pytest.mark.usefixtures("one_thread")."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def wait_for(condition, process, timeout=180):
    """Poll condition() until it holds; fail if the process (a trainer) exits first or it takes too long."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the trainer exited with {process.returncode}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def train_killed_once_saved(args, run: Path, pattern: str) -> None:
    """Run train_gpu_compatible.py with args as a user would, and SIGKILL it once a file matching
    pattern (a glob) appears in its run folder."""
    proc = subprocess.Popen([sys.executable, str(REPO / "train_gpu_compatible.py"), *map(str, args)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not any(run.glob(pattern)) and time.monotonic() < deadline:
        time.sleep(0.02)  # briefly: a tiny run takes only a few steps more before the kill
    proc.kill()
    proc.wait()
