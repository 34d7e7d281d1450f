"""generate_simple.py as a user runs it, against a run folder whose small model is trained here."""

import dataclasses
import shutil

import pytest
import torch

from conftest import make_documents, run_script
from l1.checkpoint import save_file
from l1.config import ModelConfig
from l1.model import GPT
from l1.tokenizer import Tokenizer

SENTENCE = "the quick brown fox jumps over the lazy dog and runs into the green forest ."


def learn_sentence(model: GPT, ids: torch.Tensor, steps: int = 300, seq_len: int = 32) -> float:
    """Adam on random windows of the repeated sentence until the model knows it by heart."""
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - seq_len - 1, (8,), generator=gen)
        x = torch.stack([ids[s:s + seq_len] for s in starts])
        y = torch.stack([ids[s + 1:s + seq_len + 1] for s in starts])
        loss = model(x, targets=y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return loss.item()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run folder whose model has learned one sentence by heart."""
    run = tmp_path_factory.mktemp("generate") / "run"
    run.mkdir()
    tokenizer = Tokenizer.train([SENTENCE] * 20 + make_documents(50), vocab_size=300)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2, n_embd=64, block_size=64)
    torch.manual_seed(0)
    model = GPT(cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small only loses to thread synchronization
    try:
        loss = learn_sentence(model, torch.tensor(tokenizer.encode(" ".join([SENTENCE] * 40))))
    finally:
        torch.set_num_threads(threads)
    assert loss < 0.1
    save_file({"model": model.state_dict(), "model_config": dataclasses.asdict(cfg),
               "tokenizer_fingerprint": tokenizer.fingerprint, "step": 300}, run / "best_checkpoint.pt")
    tokenizer.save(run / "tokenizer.json")
    return run


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def generate(*args, **kwargs):
    return run_script("generate_simple.py", *args, **kwargs)


def test_greedy_continues_the_learned_sentence(trained):
    result = generate("--model_path", trained, "--prompt", "the quick brown", "--temperature", "0",
                      "--max_tokens", "20")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("the quick brown fox jumps over the lazy dog")
    assert "best_checkpoint.pt" in result.stderr and "step 300" in result.stderr


def test_same_seed_same_text(trained):
    args = ("--model_path", trained, "--prompt", "the lazy", "--temperature", "3", "--top_k", "0", "--seed", "5")
    first, second = generate(*args), generate(*args)
    assert first.returncode == 0 and first.stdout == second.stdout
    assert generate(*args[:-1], "6").stdout != first.stdout


def test_prompts_from_stdin_as_a_batch(trained):
    result = generate("--model_path", trained, "--temperature", "0", "--max_tokens", "8",
                      input="the quick brown\n\nover the lazy\n")
    assert result.returncode == 0, result.stderr
    blocks = result.stdout.strip().split("\n\n")
    assert len(blocks) == 2
    assert blocks[0].startswith("the quick brown fox") and blocks[1].startswith("over the lazy dog")


def test_newest_run_is_found_without_model_path(trained, tmp_path):
    shutil.copytree(trained, tmp_path / "models" / "mine")
    result = generate("--prompt", "the quick brown", "--temperature", "0", "--max_tokens", "4", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("the quick brown fox")


def test_stop_string(trained):
    result = generate("--model_path", trained, "--prompt", "the quick", "--temperature", "0", "--stop", "lazy")
    assert result.returncode == 0 and result.stdout == "the quick brown fox jumps over the \n"


@pytest.mark.parametrize("args, message", [
    (("--model_path", "/nonexistent/run", "--prompt", "x"), "does not exist"),
    (("--prompt", "x", "--temperature", "-1"), "temperature"),
    (("--prompt", "x", "--max_tokens", "0"), "max_tokens"),
    (("--prompt", "x", "--top_p", "1.5"), "top_p"),
    (("--prompt", ""), "empty prompt"),
    (("--prompt", "fox " * 300), "longer than the model's context"),
    (("--prompt", "x", "--dtype", "fp16"), "unknown --dtype 'fp16'"),
    (("--interactive", "--num_samples", "2"), "one continuation at a time"),
])
def test_bad_input_is_one_line_without_traceback(trained, args, message):
    if "--model_path" not in args:
        args = ("--model_path", trained, *args)
    result = generate(*args)
    assert result.returncode == 2 and result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if not line.startswith("[")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_no_model_anywhere_is_refused(tmp_path):
    result = generate("--prompt", "x", cwd=tmp_path)
    assert result.returncode == 2 and "no checkpoint found" in result.stderr and "Traceback" not in result.stderr


def test_not_a_checkpoint_is_refused(tmp_path):
    bogus = tmp_path / "model.pt"
    bogus.write_bytes(b"this is not a checkpoint")
    result = generate("--model_path", bogus, "--prompt", "x")
    assert result.returncode == 2 and "truncated or corrupt" in result.stderr and "Traceback" not in result.stderr


def test_misspelled_or_abbreviated_flags_are_usage_errors():
    for args in (("--max", "5", "--prompt", "x"), ("--max_tokens", "five")):
        result = generate(*args)
        assert result.returncode == 2 and "usage:" in result.stderr and "Traceback" not in result.stderr


def test_interactive_loads_once_compiles_and_continues_each_prompt(trained):
    one_shot = [generate("--model_path", trained, "--prompt", p, "--temperature", "0", "--max_tokens", "8")
                for p in ("the quick brown", "over the lazy")]
    # --compile: the compiled step (a CPU's default is eager; see README, Sampling).
    result = generate("--model_path", trained, "--interactive", "--compile", "--temperature", "0",
                      "--max_tokens", "8", input="the quick brown\n\nover the lazy\n")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("best_checkpoint.pt") == 1 and "compiled and warmed up" in result.stderr
    # Each continuation on its own line, the prompt not repeated: the compiled step's greedy text
    # equals the eager one-shot run's.
    assert result.stdout.splitlines() == [r.stdout.rstrip("\n")[len(p):] for r, p in
                                          zip(one_shot, ("the quick brown", "over the lazy"))]
    assert result.stdout.startswith(" fox jumps")


class _Reader:
    """Collects a pipe's text in a background thread, so a test can wait for what it expects."""

    def __init__(self, pipe):
        import threading

        self.text, self._pipe = "", pipe
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        for chunk in iter(lambda: self._pipe.read1(256), b""):
            self.text += chunk.decode("utf-8", "replace")

    def wait_for(self, predicate, timeout: float = 120.0) -> None:
        import time

        deadline = time.monotonic() + timeout
        while not predicate(self.text):
            assert time.monotonic() < deadline, f"timed out; got {self.text[-500:]!r}"
            time.sleep(0.05)


def test_interactive_ctrl_c_stops_one_continuation_then_leaves_at_the_prompt(trained):
    import os
    import signal
    import subprocess
    import sys

    from conftest import REPO

    proc = subprocess.Popen([sys.executable, str(REPO / "generate_simple.py"), "--model_path", str(trained),
                             "--interactive", "--no-compile", "--temperature", "0", "--max_tokens", "100000"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    out, err = _Reader(proc.stdout), _Reader(proc.stderr)
    try:
        for prompt, expected in (("the quick brown", "fox jumps"), ("over the lazy", "dog and runs")):
            start = len(out.text)
            proc.stdin.write(f"{prompt}\n".encode())
            proc.stdin.flush()
            # 100000 tokens would take minutes: stop this one once it has streamed a few sentences.
            out.wait_for(lambda text: text[start:].count(".") >= 3)
            stopped = err.text.count("[stopped]")
            proc.send_signal(signal.SIGINT)
            err.wait_for(lambda text: text.count("[stopped]") == stopped + 1)
            assert proc.poll() is None and out.text[start:].lstrip().startswith(expected)
        proc.send_signal(signal.SIGINT)  # at the prompt: leave
        assert proc.wait(timeout=60) == 130
    finally:
        proc.kill()
        proc.wait()
    assert "Traceback" not in err.text
