"""--init_from: a new run from an L1 run folder, a checkpoint file or a Hugging Face Llama folder;
its origin recorded; flags that contradict the source refused; exact resume and SIGKILL."""

import json
import shutil

import pytest
import torch

import train_gpu_compatible
from conftest import flags, one_error_line, run_script, tiny_args, train_killed_once_saved
from l1 import checkpoint, info
from l1.checkpoint import load_file
from test_trainer import assert_bitwise_equal, assert_same_state, stop_during

pytestmark = pytest.mark.usefixtures("one_thread")


def train(argv) -> int:
    return train_gpu_compatible.main([str(a) for a in argv])


def finetune_args(source, corpus, tmp, **extra) -> list:
    """Flags of a short fine-tune run from source: no model flags (the source decides the shape)."""
    values = {"preset": "tiny", "init_from": source, "data": corpus, "data_dir": tmp / "data", "out": tmp / "ft",
              "val_fraction": 0.1, "batch_size": 4, "seq_len": 32, "grad_accum": 2, "max_steps": 12,
              "save_every": 2, "eval_every": 4, "eval_batches": 2, "log_every": 2, "device": "cpu"}
    values.update(extra)
    return flags(values)


@pytest.fixture(scope="module")
def base(corpus, tmp_path_factory):
    """A tiny base run with an untied head (both matrices must come across) trained to step 6."""
    tmp = tmp_path_factory.mktemp("base")
    assert train(tiny_args(corpus, tmp, max_steps=6, save_every=3, eval_every=3) + ["--no-tie_embeddings"]) == 0
    return tmp / "run"


def test_init_from_a_run_folder_takes_its_best_weights_shape_and_tokenizer_and_records_the_origin(
        base, corpus, tmp_path):
    # At an lr of 1e-30 a step changes no weight: the first checkpoint holds the weights it started from.
    assert train(finetune_args(base, corpus, tmp_path, max_steps=1, lr=1e-30)) == 0
    run, best = tmp_path / "ft", load_file(base / "best_checkpoint.pt")
    state = load_file(run / "latest_checkpoint.pt")
    assert_bitwise_equal(state["model"], best["model"])
    assert state["model_config"] == best["model_config"]
    assert (run / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    assert state["optimizer"] != best["optimizer"]  # fresh: one step's moments, not the source's
    origin = {"source": str((base / "best_checkpoint.pt").resolve()), "kind": "l1", "step": best["step"],
              "weights": best_checksum(base / "best_checkpoint.pt"),
              "tokenizer_fingerprint": best["tokenizer_fingerprint"], "chat": False}
    assert json.loads((run / "training_args.json").read_text())["origin"] == origin
    assert state["train_config"]["origin"] == origin
    assert f"initialized from {origin['source']} (L1 checkpoint, step {best['step']}" in \
        (run / "training.log").read_text()
    shown = info.format_info(info.run_info(run))
    line = next(line for line in shown.splitlines() if line.startswith("fine-tune of"))
    assert origin["source"] in line and origin["weights"] in line


def best_checksum(path) -> str:
    return checkpoint.peek(path)["checksum"][:16]


def test_fine_tune_defaults_a_tenth_of_the_source_lr_and_a_short_warmup_flags_win(base, corpus, tmp_path):
    from l1 import trainer

    source_lr = load_file(base / "latest_checkpoint.pt")["train_config"]["lr"]
    args = train_gpu_compatible.parse_args([str(a) for a in finetune_args(base, corpus, tmp_path, max_steps=40)])
    from l1 import config

    cfg = trainer.configure(config.overrides_from_args(args))
    assert cfg.lr == pytest.approx(source_lr / 10) and cfg.warmup_steps == 2 and cfg.optimizer == "muon"
    assert cfg.model.n_embd == 64 and cfg.model.tie_embeddings is False  # the source's shape, not the preset's
    args = train_gpu_compatible.parse_args([str(a) for a in finetune_args(base, corpus, tmp_path, lr=0.01,
                                                                          warmup_steps=7, optimizer="adamw")])
    cfg = trainer.configure(config.overrides_from_args(args))
    assert (cfg.lr, cfg.warmup_steps, cfg.optimizer) == (0.01, 7, "adamw")


def test_init_from_a_checkpoint_file(base, corpus, tmp_path):
    source = base / "checkpoint_epoch_0_step_3.pt"
    assert train(finetune_args(source, corpus, tmp_path, max_steps=1, lr=1e-30)) == 0
    state = load_file(tmp_path / "ft" / "latest_checkpoint.pt")
    assert_bitwise_equal(state["model"], load_file(source)["model"])
    assert state["train_config"]["origin"]["step"] == 3


def test_export_then_init_from_the_hugging_face_folder_gives_the_same_logits(base, corpus, tmp_path):
    from l1 import export, sampler

    hf = export.export(str(base), str(tmp_path / "hf"))
    assert train(finetune_args(hf, corpus, tmp_path, max_steps=1, lr=1e-30)) == 0
    original = sampler.load(str(base), device="cpu", dtype="fp32")
    imported = sampler.load(str(tmp_path / "ft"), device="cpu", dtype="fp32")
    assert (tmp_path / "ft" / "tokenizer.json").read_text() == (base / "tokenizer.json").read_text() or \
        imported.tokenizer.hf.get_vocab() == original.tokenizer.hf.get_vocab()
    vocab = original.tokenizer.vocab_size
    ids = torch.randint(0, vocab, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(imported.model(ids)[..., :vocab], original.model(ids)[..., :vocab],
                                   rtol=0, atol=1e-5)
    origin = json.loads((tmp_path / "ft" / "training_args.json").read_text())["origin"]
    assert origin["kind"] == "hf" and origin["source"] == str(hf.resolve())


def _hf_with(tmp_path, hf_source, **changes):
    folder = tmp_path / "llama"
    shutil.copytree(hf_source, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("changes, message", [
    ({"num_key_value_heads": 1}, "grouped-query attention (1 key/value heads for 2 query heads)"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "RoPE scaling 'linear'"),
    ({"attention_bias": True, "hidden_act": "gelu"}, "attention bias; activation 'gelu'"),
    ({"model_type": "mistral"}, "model_type 'mistral' (only llama)"),
])
def test_a_llama_that_l1_cannot_express_is_refused_naming_what_is_missing(base, corpus, tmp_path, changes,
                                                                          message):
    from l1 import export

    hf = export.export(str(base), str(tmp_path / "hf"))
    folder = _hf_with(tmp_path, hf, **changes)
    result = run_script("train_gpu_compatible.py", *finetune_args(folder, corpus, tmp_path))
    assert result.returncode == 2
    assert message in one_error_line(result.stderr) and "cannot be expressed by L1's GPT" in result.stderr
    assert not (tmp_path / "ft").exists()


@pytest.mark.parametrize("flags, message", [
    (["--n_layer", "3"], "--n_layer 3 contradicts the source's n_layer 2"),
    (["--vocab_size", "1000"], "--vocab_size 1000 contradicts the source's vocab_size 512"),
    (["--tie_embeddings"], "--tie_embeddings True contradicts the source's tie_embeddings False"),
    (["--tokenizer", "x.json"], "--tokenizer contradicts --init_from"),
])
def test_flags_that_contradict_the_source_are_refused_in_one_line(base, corpus, tmp_path, flags, message):
    result = run_script("train_gpu_compatible.py", *finetune_args(base, corpus, tmp_path), *flags)
    assert result.returncode == 2 and message in one_error_line(result.stderr)
    assert not (tmp_path / "ft").exists()


def test_init_from_refusals_on_existing_runs_and_missing_sources(base, corpus, tmp_path):
    missing = run_script("train_gpu_compatible.py", *finetune_args(tmp_path / "nowhere", corpus, tmp_path))
    assert "does not exist" in one_error_line(missing.stderr)
    itself = run_script("train_gpu_compatible.py", *finetune_args(base, corpus, tmp_path, out=base))
    assert "did not start from --init_from; a fine-tune is a new run" in one_error_line(itself.stderr)
    scratch = tmp_path / "scratch"
    shutil.copytree(base, scratch)
    onto = run_script("train_gpu_compatible.py", *finetune_args(base, corpus, tmp_path, out=scratch))
    assert "did not start from --init_from" in one_error_line(onto.stderr)
    assert train(finetune_args(base, corpus, tmp_path, max_steps=2)) == 0
    other = run_script("train_gpu_compatible.py",
                       *finetune_args(base / "checkpoint_epoch_0_step_3.pt", corpus, tmp_path, max_steps=4))
    assert "cannot change that on resume" in one_error_line(other.stderr)


def test_resume_of_a_fine_tune_run_is_exact_and_never_initializes_again(base, corpus, tmp_path, monkeypatch):
    source = tmp_path / "source"
    shutil.copytree(base, source)
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert train(finetune_args(source, corpus, straight, max_steps=12)) == 0
    stop_during(monkeypatch, 5)
    assert train(finetune_args(source, corpus, stopped, max_steps=12)) == 0
    monkeypatch.undo()
    assert load_file(stopped / "ft" / "latest_checkpoint.pt")["step"] == 5
    shutil.rmtree(source)  # resuming reads the checkpoint, never the source again
    assert train(finetune_args(source, corpus, stopped, max_steps=12)) == 0
    final = load_file(stopped / "ft" / "latest_checkpoint.pt")
    assert final["step"] == 12
    assert_same_state(load_file(straight / "ft" / "latest_checkpoint.pt"), final)
    log = (stopped / "ft" / "training.log").read_text()
    assert log.count("optimizer fresh") == 1 and "resumed from latest_checkpoint.pt at step 5" in log
    assert f"fine-tune run: initialized from {source.resolve() / 'best_checkpoint.pt'}" in log \
        and "at its first start" in log  # the origin said again on resume


def test_sigkill_of_a_fine_tune_run_loses_nothing(base, corpus, tmp_path):
    straight = run_script("train_gpu_compatible.py", *finetune_args(base, corpus, tmp_path / "straight",
                                                                   max_steps=30, eval_every=100))
    assert straight.returncode == 0, straight.stderr
    args = [str(a) for a in finetune_args(base, corpus, tmp_path / "killed", max_steps=30, eval_every=100)]
    run = tmp_path / "killed" / "ft"
    train_killed_once_saved(args, run, "checkpoint_epoch_*_step_8.pt")
    assert load_file(run / "latest_checkpoint.pt")["step"] < 30
    resumed = run_script("train_gpu_compatible.py", *args)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_state(load_file(tmp_path / "straight" / "ft" / "latest_checkpoint.pt"),
                      load_file(run / "latest_checkpoint.pt"))
