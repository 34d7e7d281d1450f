"""The small tools over a run folder (l1.plot, l1.info) and the installable package (pyproject.toml)."""

import dataclasses
import json
import math
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, make_documents
from l1 import checkpoint, config, info, plot
from l1.config import ModelConfig, TrainConfig
from l1.errors import L1Error
from l1.model import GPT
from l1.tokenizer import Tokenizer


def lr_at(step: int, steps: int, warmup: int = 50, peak: float = 6e-4) -> float:
    if step < warmup:
        return peak * step / warmup
    return 0.1 * peak + 0.45 * peak * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))


def metrics_lines(steps: int, eval_every: int = 50, start: int = 1) -> list[str]:
    """A realistic metrics.jsonl: loss decaying 8 -> 4 with noise, warmup + cosine lr, periodic evals."""
    lines = []
    for step in range(start, steps + 1):
        loss = 4 + 4 * math.exp(-step / 80) + 0.08 * math.sin(step * 12.9898)
        lines.append(json.dumps({"kind": "train", "step": step, "epoch": 0, "loss": loss, "lr": lr_at(step, steps),
                                 "grad_norm": 1.0, "tokens_per_s": 1e4, "mfu": 0.3, "memory_bytes": 2**30,
                                 "tokens_seen": step * 256, "time": 1.7e9 + step}))
        if step % eval_every == 0:
            val = 4.1 + 4 * math.exp(-step / 80)
            lines.append(json.dumps({"kind": "eval", "step": step, "epoch": 0, "val_loss": val,
                                     "val_ppl": math.exp(val), "val_bpb": val / math.log(2) / 4.0,
                                     "tokens_seen": step * 256, "time": 1.7e9 + step}))
    return lines


def write_metrics(path, lines: list[str], partial: str = "") -> None:
    path.write_text("\n".join(lines) + "\n" + partial)


# ---- l1.plot --------------------------------------------------------------------------------------

def test_plot_writes_a_png_of_both_losses_and_the_lr(tmp_path):
    from matplotlib.image import imread

    write_metrics(tmp_path / "metrics.jsonl", metrics_lines(500), partial='{"kind": "train", "st')
    out = plot.plot_run(tmp_path)
    assert out == tmp_path / "loss.png" and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert imread(out).shape[:2] == (600, 900)
    fig = plot.figure(plot.read_series(tmp_path / "metrics.jsonl"), "run")
    lines = {line.get_label(): line for ax in fig.axes for line in ax.get_lines()}
    assert set(lines) == {"train loss", "validation loss (best 4.108)", "learning rate"}
    assert len(lines["train loss"].get_xdata()) == 500 and len(lines["learning rate"].get_xdata()) == 500
    assert list(lines["validation loss (best 4.108)"].get_xdata()) == list(range(50, 501, 50))
    assert lines["train loss"].axes is lines["validation loss (best 4.108)"].axes is not lines["learning rate"].axes


def test_series_skip_damaged_lines_and_drop_the_steps_a_resume_abandoned(tmp_path):
    lines = metrics_lines(100, eval_every=20)
    # Resumed from a step-60 checkpoint and now at step 80: steps 81-100 of the first attempt are gone.
    resumed = [line.replace('"loss": ', '"loss": 1') for line in metrics_lines(80, eval_every=20, start=61)]
    write_metrics(tmp_path / "metrics.jsonl", lines + ["not json"] + resumed, partial='{"kind": "ev')
    series = plot.read_series(tmp_path / "metrics.jsonl")
    assert series.train_step == list(range(1, 81)) and series.eval_step == [20, 40, 60, 80]
    assert series.train_loss[59] < 10 < series.train_loss[60]  # steps 61+ come from the resumed records


def test_plot_command_line_and_errors(tmp_path, capsys):
    write_metrics(tmp_path / "metrics.jsonl", metrics_lines(120))
    assert plot.main([str(tmp_path), "--out", str(tmp_path / "curve.svg"), "--log"]) == 0
    assert (tmp_path / "curve.svg").read_text().lstrip().startswith("<?xml")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(L1Error, match="nothing has been logged"):
        plot.plot_run(empty)
    (empty / "metrics.jsonl").write_text('{"kind": "train", "st')
    with pytest.raises(L1Error, match="no training or evaluation records"):
        plot.plot_run(empty)
    assert plot.main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_plot_of_ten_thousand_records_with_a_torn_last_line(tmp_path):
    write_metrics(tmp_path / "metrics.jsonl", metrics_lines(10_000, eval_every=250), partial='{"kind"')
    series = plot.read_series(tmp_path / "metrics.jsonl")
    assert len(series.train_step) == 10_000 and len(series.eval_step) == 40
    assert plot.plot_run(tmp_path).stat().st_size > 0


# ---- l1.info --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder as the trainer leaves it: saved at step 30, logged up to step 40."""
    folder = tmp_path_factory.mktemp("run")
    tok = Tokenizer.train(make_documents(30), 300)
    cfg = ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=64, block_size=64)
    model = GPT(cfg)
    state = {"model": model.state_dict(), "model_config": dataclasses.asdict(cfg), "step": 30, "epoch": 1,
             "tokens_seen": 30 * 256, "best_val_loss": 4.2, "tokenizer_fingerprint": tok.fingerprint,
             "train_config": {}}
    checkpoint.save_file(state, folder / checkpoint.LATEST)
    shutil.copy(folder / checkpoint.LATEST, folder / checkpoint.BEST)
    shutil.copy(folder / checkpoint.LATEST, folder / checkpoint.rolling_name(1, 30))
    tok.save(folder / "tokenizer.json")
    config.save_json(dataclasses.asdict(cfg), folder / "config.json")
    config.save_json(TrainConfig(preset="tiny", max_steps=100, model=cfg).to_dict(), folder / "training_args.json")
    lines = metrics_lines(40, eval_every=10)
    # The best evaluation is not the last one.
    lines.append(json.dumps({"kind": "eval", "step": 20, "val_loss": 3.5, "val_bpb": 1.25, "val_ppl": 33.1}))
    write_metrics(folder / "metrics.jsonl", lines, partial='{"kind": "train"')
    return folder, model, tok


def test_run_info_reports_the_run(run):
    folder, model, tok = run
    got = info.run_info(folder)
    assert got["preset"] == "tiny" and got["max_steps"] == 100
    assert got["parameters"] == model.num_params() and got["padded_vocab_size"] == 320
    assert got["parameters_without_padding"] == model.num_params(exclude_padding=True)
    assert (got["step"], got["epoch"], got["tokens_seen"], got["logged_step"]) == (30, 1, 7680, 40)
    assert (got["best_val_loss"], got["best_val_bpb"], got["best_val_step"]) == (3.5, 1.25, 20)
    assert got["tokenizer_fingerprint"] == got["checkpoint_tokenizer_fingerprint"] == tok.fingerprint
    assert [(c["name"], c["bytes"], c["step"]) for c in got["checkpoints"]] == [
        (name, (folder / name).stat().st_size, 30)
        for name in (checkpoint.LATEST, "checkpoint_epoch_1_step_30.pt", checkpoint.BEST)]


@pytest.mark.parametrize("preset", list(config.PRESETS))
def test_parameter_counts_are_the_models(preset, tmp_path):
    cfg = config.resolve({"preset": preset}).model
    for variant in (cfg, dataclasses.replace(cfg, vocab_size=1001, intermediate_size=0, n_layer=3)):
        config.save_json(dataclasses.asdict(variant), tmp_path / "config.json")
        got = info.run_info(tmp_path)
        with torch.device("meta"):
            model = GPT(variant)
        assert got["parameters"] == model.num_params()
        assert got["parameters_without_padding"] == model.num_params(exclude_padding=True)


def test_info_command_line(run, capsys):
    folder, model, tok = run
    assert info.main([str(folder)]) == 0
    text = capsys.readouterr().out
    for expected in ("tiny", f"{model.num_params():,}", "30 of 100, epoch 1, 7,680 tokens seen",
                     "logged up to step 40", "3.5000 (1.2500 bits/byte, perplexity 33.12) at step 20",
                     f"{tok.fingerprint} (the checkpoints' own)", "latest_checkpoint.pt", "best_checkpoint.pt"):
        assert expected in text
    assert info.main([str(folder), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(info.run_info(folder)))


def test_info_marks_a_damaged_checkpoint_and_refuses_a_non_run(run, tmp_path, capsys):
    folder = tmp_path / "copy"
    shutil.copytree(run[0], folder)
    (folder / checkpoint.LATEST).write_bytes(b"garbage")
    got = info.run_info(folder)
    assert got["checkpoints"][0] == {"name": checkpoint.LATEST, "bytes": 7, "step": None, "damaged": "unreadable"}
    assert got["step"] == 30  # from the next readable checkpoint
    assert "unreadable" in info.format_info(got)
    (tmp_path / "empty").mkdir()
    for bad in (tmp_path / "missing", tmp_path / "empty"):
        assert info.main([str(bad)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1


# ---- pyproject.toml -------------------------------------------------------------------------------

def test_pip_install_provides_the_commands(tmp_path):
    """`pip install .` into a fresh venv; the commands run the root scripts' own main()."""
    src = tmp_path / "src"  # a copy: building in place would leave build/ and *.egg-info in the repo
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "train_gpu_compatible.py", "generate_simple.py"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "l1", src / "l1", ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    # The running interpreter's packages (torch, pip, setuptools) serve the venv, whether it is CI's plain
    # interpreter or a user's virtualenv: a .pth file adds its site folders. (--system-site-packages would
    # add the base interpreter's instead, which under a virtualenv are not those the README installed.)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python, bin_dir = venv / "bin" / "python", venv / "bin"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, env=env, capture_output=True, text=True).stdout.strip()
    ours = [p for p in [*site.getsitepackages(), site.getusersitepackages()] if os.path.isdir(p)]
    (Path(purelib) / "l1-test-parent.pth").write_text(f"import site; list(map(site.addsitedir, {ours!r}))\n")
    # Nothing is downloaded where the build backend pyproject.toml asks for is installed; else pip's
    # build isolation fetches it (a fresh virtualenv of Python 3.11 holds setuptools 65, 3.12's none).
    offline = ["--no-build-isolation", "--no-index"] if _has_build_backend() else []
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", *offline, "-q", str(src)], check=True,
                   env=env, cwd=tmp_path, timeout=300)
    where = subprocess.run([str(python), "-c", "import l1, train_gpu_compatible; print(l1.__file__)"],
                           check=True, env=env, cwd=tmp_path, capture_output=True, text=True).stdout
    assert where.startswith(str(venv))
    for command, flag in (("l1-train", "--preset"), ("l1-generate", "--prompt"), ("l1-export", "--force"),
                          ("l1-plot", "--log"), ("l1-info", "--json"), ("l1-eval", "--max_tokens")):
        result = subprocess.run([str(bin_dir / command), "--help"], env=env, cwd=tmp_path, capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"usage: {command}") and flag in result.stdout


def _has_build_backend() -> bool:
    """Whether this interpreter holds the setuptools that pyproject.toml's build-system requires."""
    import tomllib
    from importlib import metadata

    requirement, = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"]
    name, _, minimum = requirement.partition(">=")
    try:
        have = metadata.version(name)
    except metadata.PackageNotFoundError:
        return False
    return _release(have) >= _release(minimum)


def _release(version: str) -> tuple[int, ...]:
    """(70, 1) of "70.1" or "70.1.0.post1": the leading numbers of a version."""
    numbers = []
    for part in version.split("."):
        if not part.isdigit():
            break
        numbers.append(int(part))
    return tuple(numbers)


def test_requirements_match_the_package_dependencies():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    required = [line.strip() for line in (REPO / "requirements.txt").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert project["dependencies"] == required
    dev = [line.strip() for line in (REPO / "requirements-dev.txt").read_text().splitlines()
           if line.strip() and not line.startswith(("#", "-r"))]
    assert project["optional-dependencies"]["dev"] == dev
