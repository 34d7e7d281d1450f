"""generate_simple.py as a user runs it, against a model trained by train_gpu_compatible.py in the test."""

import shutil

import pytest

from conftest import run_script, tiny_args, write_parquet

SENTENCE = "the quick brown fox jumps over the lazy dog and runs into the green forest ."


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run folder whose model has learned one sentence by heart."""
    tmp = tmp_path_factory.mktemp("generate")
    write_parquet(tmp / "corpus" / "a.parquet", [" ".join([SENTENCE] * 6)] * 60)
    args = tiny_args(tmp / "corpus", tmp, max_steps=80, lr=0.01, warmup_steps=5, eval_every=40,
                     vocab_size=300, val_fraction=0.2)
    result = run_script("train_gpu_compatible.py", *args)
    assert result.returncode == 0, result.stderr
    return tmp / "run"


def generate(*args, **kwargs):
    return run_script("generate_simple.py", *args, **kwargs)


def test_greedy_continues_the_learned_sentence(trained):
    result = generate("--model_path", trained, "--prompt", "the quick brown", "--temperature", "0",
                      "--max_tokens", "12")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("the quick brown fox jumps over the lazy dog")
    assert "best_checkpoint.pt" in result.stderr


def test_same_seed_same_text(trained):
    args = ("--model_path", trained, "--prompt", "the lazy", "--temperature", "1.5", "--seed", "5")
    first, second = generate(*args), generate(*args)
    assert first.returncode == 0 and first.stdout == second.stdout


def test_prompts_from_stdin_as_a_batch(trained):
    result = generate("--model_path", trained, "--temperature", "0", "--max_tokens", "6",
                      input="the quick brown\n\nover the lazy\n")
    assert result.returncode == 0, result.stderr
    blocks = result.stdout.strip().split("\n\n")
    assert len(blocks) == 2
    assert blocks[0].startswith("the quick brown fox") and blocks[1].startswith("over the lazy dog")


def test_newest_run_is_found_without_model_path(trained, tmp_path):
    shutil.copytree(trained, tmp_path / "models" / "mine")
    result = generate("--prompt", "the quick brown", "--temperature", "0", "--max_tokens", "3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("the quick brown fox")


def test_stop_string(trained):
    result = generate("--model_path", trained, "--prompt", "the quick", "--temperature", "0", "--stop", "lazy")
    assert result.returncode == 0 and result.stdout.strip() == "the quick brown fox jumps over the"


@pytest.mark.parametrize("args, message", [
    (("--model_path", "/nonexistent/run", "--prompt", "x"), "does not exist"),
    (("--prompt", "x", "--temperature", "-1"), "temperature"),
    (("--prompt", "x", "--max_tokens", "0"), "max_tokens"),
    (("--prompt", "x", "--top_p", "1.5"), "top_p"),
    (("--prompt", ""), "empty prompt"),
    (("--prompt", "fox " * 300), "context"),
])
def test_bad_input_is_one_line_without_traceback(trained, args, message):
    if "--model_path" not in args:
        args = ("--model_path", trained, *args)
    result = generate(*args)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if not line.startswith("[")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_not_a_checkpoint_is_refused(tmp_path):
    bogus = tmp_path / "model.pt"
    bogus.write_bytes(b"this is not a checkpoint")
    result = generate("--model_path", bogus, "--prompt", "x")
    assert result.returncode == 2 and "truncated or corrupt" in result.stderr and "Traceback" not in result.stderr
