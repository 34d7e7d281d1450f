"""The benches' own logic: the analytic memory model against a measured training step; the
recipe study's recipes resolve to the configs they promise."""

import argparse
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from bench import recipe
from conftest import REPO
from bench.memory import attention_path, estimate_training_bytes, measure
from l1.config import ModelConfig, preset_dict

SMALL = ModelConfig(vocab_size=1000, n_layer=2, n_head=4, n_embd=128, block_size=128)


@pytest.mark.parametrize("grad_ckpt", [False, True])
@pytest.mark.parametrize("amp, peak_tolerance", [(False, 0.01), (True, 0.025)])
def test_memory_model_agrees_with_a_measured_step(grad_ckpt, amp, peak_tolerance):
    """fp32 peaks within 1%; under bf16 autocast (the chunked loss's casts, CPU matmul attention)
    within 2.5% (this small model's loss-phase peak is 1.8% above the estimate; the presets'
    are within 0.35%); what autograd saves for backward within 1% in both."""
    measured = measure(SMALL, batch=4, seq=128, amp=amp, grad_ckpt=grad_ckpt, flash=True,
                       device=torch.device("cpu"))
    dtype = torch.bfloat16 if amp else None
    estimate = estimate_training_bytes(SMALL, 4, 128, dtype, grad_ckpt, attention_path("cpu", dtype, 128, True))
    assert estimate["total"] == pytest.approx(measured["measured"], rel=peak_tolerance)
    saved = estimate["activations"] + estimate["amp_weights"]
    assert saved == pytest.approx(measured["saved_for_backward"], rel=0.01)


@pytest.mark.parametrize("replica", [False, True])
def test_model_knob_recipes_change_only_their_knob(replica):
    """untied, relu2 and softcap resolve (as bench.recipe --replica runs them) to the baseline's
    config but for one model field."""
    args = argparse.Namespace(replica=replica, data="corpus", data_dir="data", max_docs=0, eval_batches=10)
    base = recipe.run_config("baseline", 1, args, 100)
    for name, field, value in [("untied", "tie_embeddings", False), ("relu2", "mlp", "relu2"),
                               ("softcap", "logit_softcap", 15.0)]:
        cfg = recipe.run_config(name, 1, args, 100)
        assert getattr(cfg.model, field) == value
        assert dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **{field: getattr(base.model, field)})) \
            == base
        assert recipe.work(cfg) != recipe.work(base)  # a model change: timed apart without --replica


def test_budget_recipe_is_the_tiny_preset_under_the_time_budget():
    """l1_budget is tiny as it stands with --max_minutes (no step count, its own warmup);
    baseline_fp32 is the baseline with mixed precision off, so it is probed apart, and
    baseline_fp32_budget the same under the time budget."""
    args = argparse.Namespace(replica=False, data="corpus", data_dir="data", max_docs=0, eval_batches=10, minutes=5.0)
    budget = recipe.run_config("l1_budget", 1, args, 0)
    tiny = recipe.run_config("l1", 1, args, 800)
    assert (budget.max_minutes, budget.max_steps) == (5.0, 0)
    assert budget.warmup_steps == preset_dict("tiny")["warmup_steps"]
    assert dataclasses.replace(budget, max_minutes=0.0, max_steps=800, warmup_steps=tiny.warmup_steps) == tiny
    fp32 = recipe.run_config("baseline_fp32", 1, args, 100)
    assert fp32.amp is False and recipe.work(fp32) != recipe.work(recipe.run_config("baseline", 1, args, 100))
    # baseline_fp32_budget: the same recipe, its cosine fitted to the clock instead of a probed step count.
    timed = recipe.run_config("baseline_fp32_budget", 1, args, 0)
    assert (timed.max_minutes, timed.max_steps, timed.warmup_steps) == (5.0, 0, 30)
    assert dataclasses.replace(timed, max_minutes=0.0, max_steps=300) == recipe.run_config("baseline_fp32", 1, args, 300)


def test_second_round_recipes_change_what_they_name():
    """warmup_short warms up over 2% of the steps instead of 10%, and nothing else; the budget
    variants are the earlier tiny preset under the budget (l1_budget_v1) but for their batch,
    warmup, width, optimizer or lr; a recipe that names its lr keeps it over the width rule."""
    args = argparse.Namespace(replica=True, data="corpus", data_dir="data", max_docs=0, eval_batches=10, minutes=5.0)
    base = recipe.run_config("baseline", 1, args, 1000)
    short = recipe.run_config("warmup_short", 1, args, 1000)
    assert (base.warmup_steps, short.warmup_steps) == (100, 20)
    assert dataclasses.replace(short, warmup_steps=100) == base
    assert base.optimizer == "adamw" and recipe.run_config("high_lr", 1, args, 1000).lr == 4e-3
    args.replica = False
    v1 = recipe.run_config("l1_budget_v1", 1, args, 0)
    assert (v1.model.n_embd, v1.optimizer, v1.batch_size, v1.lr) == (256, "adamw", 8, 1.8e-3)
    w128 = dataclasses.replace(v1.model, n_embd=128)
    for name, change in [("l1_budget_batch4", {"batch_size": 4}), ("l1_budget_batch16", {"batch_size": 16}),
                         ("l1_budget_lr_x1.5", {"lr": 2.7e-3}), ("l1_budget_warmup250", {"warmup_steps": 250}),
                         ("l1_budget_w128", {"lr": 3.6e-3, "model": w128}),
                         ("l1_budget_w128_batch16", {"lr": 3.6e-3, "batch_size": 16, "model": w128}),
                         ("l1_budget_muon_batch16_w128", {"lr": 3.6e-3, "batch_size": 16, "model": w128,
                                                          "optimizer": "muon"}),
                         ("l1_budget_muon_qk_batch16_w128", {"lr": 3.6e-3, "batch_size": 16, "optimizer": "muon",
                                                             "model": dataclasses.replace(w128, qk_norm=True)})]:
        assert recipe.run_config(name, 1, args, 0) == dataclasses.replace(v1, **change), name
    # The tiny preset today is the budget study's measured winner, and the baseline is not moved by it.
    assert recipe.run_config("l1_budget", 1, args, 0) == recipe.run_config("l1_budget_muon_batch16_w96", 1, args, 0)
    fp32 = recipe.run_config("baseline_fp32", 1, args, 100)
    assert (fp32.model.n_embd, fp32.optimizer, fp32.batch_size, fp32.lr) == (256, "adamw", 16, 1.8e-3)


def test_fourth_round_recipes_change_what_they_name():
    """The context recipes keep the replica's 1,024 tokens a step (equal tokens, the same steps) and
    change only the context and the micro-batch; the ceiling recipes are Muon + QK-norm + WSD but for
    the width (lr by the width rule) and weight decay 1.0."""
    args = argparse.Namespace(replica=True, data="corpus", data_dir="data", max_docs=0, eval_batches=10)
    wsd = recipe.run_config("l1_wsd", 1, args, 1000)
    for name, context, batch in [("wsd_ctx64", 64, 16), ("wsd_ctx256", 256, 4), ("wsd_ctx512", 512, 2)]:
        cfg = recipe.run_config(name, 1, args, 1000)
        assert (cfg.context, cfg.batch_size, cfg.context * cfg.batch_size) == (context, batch, 1024)
        assert dataclasses.replace(cfg, batch_size=8, model=dataclasses.replace(cfg.model, block_size=128)) == wsd
    muon = recipe.run_config("muon_qk_wsd", 1, args, 1000)
    for name, width in [("muon_qk_wsd_w384_wd1", 384), ("muon_qk_wsd_w768_wd1", 768)]:
        cfg = recipe.run_config(name, 1, args, 1000)
        assert cfg.model.qk_norm and cfg.optimizer == "muon"
        assert cfg == dataclasses.replace(muon, lr=recipe.TEXTBOOK_LR / width, weight_decay=1.0,
                                          model=dataclasses.replace(muon.model, n_embd=width))


def test_the_gpu_check_needs_no_datasets_package(corpus, tmp_path):
    """bench.gpu runs where torch, transformers, tokenizers, numpy, pyarrow, safetensors and pytest
    are installed but `datasets` is not: its modules import, and a parquet corpus (what it trains
    the flagship on) is prepared, with any import of `datasets` failing."""
    blocked = tmp_path / "blocked" / "datasets"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text("raise ImportError('datasets is not installed here')\n")
    code = ("import bench.gpu, bench.memory, bench.train, bench.generate, l1.trainer, l1.sampler\n"
            "from l1.config import DataConfig\nfrom l1.data import prepare\n"
            f"data = prepare(DataConfig(data={str(corpus)!r}, data_dir={str(tmp_path / 'data')!r}), 512, 0, "
            "log=lambda line: None)\nprint(len(data.tokens('train')))\n"
            "try:\n    import datasets\nexcept ImportError:\n    print('blocked')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "blocked"), str(REPO)])}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    tokens, marker = result.stdout.split()
    assert int(tokens) > 1000 and marker == "blocked"


def test_gpu_check_records_every_failing_part_and_fails(tmp_path, monkeypatch, capsys):
    """bench.gpu: a part that times out or breaks is recorded in the summary (printed and written
    to --out) while the other parts still run, and the exit status is 1; with none, 0."""
    from bench import gpu

    ran = []

    def passing(name, record):
        def part(*args):
            ran.append(name)
            return record
        return part

    def timing_out(*args):
        ran.append("flagship")
        gpu.run([sys.executable, "-c", "import time; time.sleep(30)"], tmp_path / "slow.log", timeout=0.5)

    monkeypatch.setattr(gpu, "tests", passing("tests", {"tests_exit": 0}))
    monkeypatch.setattr(gpu, "bench_memory", passing("bench_memory", {"memory_model_worst_error": 0.01}))
    monkeypatch.setattr(gpu, "flagship", timing_out)
    out = tmp_path / "summary.json"
    assert gpu.main(["--cpu_smoke", "--work", str(tmp_path / "work"), "--out", str(out)]) == 1
    summary = json.loads(out.read_text())
    assert ran == ["tests", "bench_memory", "flagship"] and summary["passed"] is False
    assert summary["failures"] == {"flagship": f"timed out after 0 s (log: {tmp_path / 'slow.log'})"}
    assert summary["tests_exit"] == 0 and summary["memory_model_worst_error"] == 0.01
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == summary

    def broken(*args):
        raise KeyError("resume_bitwise")

    monkeypatch.setattr(gpu, "flagship", broken)
    assert gpu.main(["--cpu_smoke", "--work", str(tmp_path / "work2"), "--out", str(out)]) == 1
    assert json.loads(out.read_text())["failures"] == {"flagship": "KeyError: 'resume_bitwise'"}
    monkeypatch.setattr(gpu, "flagship", passing("flagship", {"resume_bitwise": True}))
    assert gpu.main(["--cpu_smoke", "--work", str(tmp_path / "work3"), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["passed"] is True


def test_a_failed_memory_child_is_reported_not_fatal():
    """bench.memory: a child that fails gives its error line (the run goes on and exits 1)."""
    from bench import memory

    result = memory._run_child(dict(preset="no-such-preset", dtype="fp32", batch=1, seq=8, grad_ckpt=False,
                                    flash=True, device="cpu"))
    assert "measured" not in result and "no-such-preset" in result["error"]
