"""A run is bound to its tokenizer, corpus and split (l1/identity.py), no refusal writes first, and a
checkpoint is trusted by its content, not only its checksum. Real command lines against a finished
tiny run (conftest's `run`), and subprocesses where the working directory matters."""

import json
import shutil

import pytest
import torch

import generate_simple
import train_gpu_compatible
from conftest import make_documents, one_error_line, run_script, snapshot, tiny_args, with_flag, write_parquet
from l1.checkpoint import LATEST, load_file, rolling_name, save_file


def run_files(folder):
    """The run folder's files but its lock, which names the process holding it (a refused trainer too)."""
    return {name: data for name, data in snapshot(folder).items() if not name.startswith(".lock")}


def other_corpus(tmp_path):
    return write_parquet(tmp_path / "other" / "a.parquet", make_documents(seed=7)).parent


# ---- 1. a resume that would change the run's identity is refused, before anything is written ----

@pytest.mark.parametrize("flag, value, said", [
    ("--val_fraction", "0.2", "--val_fraction 0.2, but the run has 0.1"),
    ("--seed", "7", "--seed 7, but the run has 1337"),
    ("--max_docs", "150", "--max_docs 150, but the run has 0"),
    ("--text_column", "title", "--text_column 'title', but the run has 'text'"),
    ("--vocab_size", "600", "--vocab_size 600, but the run has 512"),
    ("--tokenizer_sample_mb", "1", "--tokenizer_sample_mb 1.0, but the run has 256.0"),
    ("--shard_tokens", "4096", "--shard_tokens 4096, but the run has 33554432"),
    ("--n_layer", "3", "--n_layer 3, but the run has 2"),
])
def test_resume_with_another_identity_setting_is_refused_and_writes_nothing(run, capsys, flag, value, said):
    folder, args = run
    before = snapshot(folder)
    assert train_gpu_compatible.main(with_flag(args, flag, value)) == 2
    line = one_error_line(capsys.readouterr().err)
    assert said in line and "Leave the flag out to resume" in line and "--fresh" in line, line
    assert snapshot(folder) == before


def test_resume_on_another_corpus_is_refused(run, tmp_path, capsys):
    folder, args = run
    before = snapshot(folder)
    assert train_gpu_compatible.main(with_flag(args, "--data", str(other_corpus(tmp_path)))) == 2
    assert "--data " in one_error_line(capsys.readouterr().err)
    assert snapshot(folder) == before


def test_a_refused_tokenizer_leaves_the_runs_tokenizer_in_place(run, tmp_path, capsys):
    """Another --tokenizer on resume: refused in one line; tokenizer.json (and everything) unchanged,
    so the run still resumes and samples."""
    folder, args = run
    other = tmp_path / "other-tokenizer.json"
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["added_tokens"][0]["content"] = "<|other|>"
    other.write_text(json.dumps(tokenizer))
    before = snapshot(folder)
    assert train_gpu_compatible.main(with_flag(args, "--tokenizer", str(other))) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"--tokenizer {other}" in line and "is not the tokenizer of the run" in line
    assert snapshot(folder) == before
    assert train_gpu_compatible.main(with_flag(args, "--tokenizer", str(folder / "tokenizer.json"))
                                     + ["--max_steps", "6"]) == 0  # the run's own tokenizer is fine
    assert generate_simple.main(["--model_path", str(folder), "--prompt", "The", "--max_tokens", "3"]) == 0


def test_flags_that_do_not_change_the_identity_may_change_on_resume(run, tmp_path):
    """lr, batch, accumulation, a shorter --seq_len, another --data_dir: the run resumes on the very tokens."""
    folder, args = run
    changed = args
    for flag, value in [("--lr", "1e-3"), ("--batch_size", "2"), ("--grad_accum", "4"), ("--seq_len", "16"),
                        ("--data_dir", str(tmp_path / "elsewhere")), ("--max_steps", "6")]:
        changed = with_flag(changed, flag, value)
    assert train_gpu_compatible.main(changed) == 0
    state = load_file(folder / LATEST)
    assert state["step"] == 6 and state["train_config"]["lr"] == 1e-3
    assert not (tmp_path / "elsewhere").exists()  # read from the folder the run started with


# ---- paths: stored absolute, a resume needs only the prepared folder ------------------------------

def test_relative_paths_are_stored_absolute_and_a_resume_from_elsewhere_reads_the_same_corpus(corpus, tmp_path):
    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    home.mkdir()
    elsewhere.mkdir()
    shutil.copytree(corpus, home / "corpus")
    args = tiny_args("corpus", home, max_steps=4, data_dir="data", out=str(home / "run"))
    first = run_script("train_gpu_compatible.py", *args, cwd=home)
    assert first.returncode == 0, first.stderr
    stored = json.loads((home / "run" / "training_args.json").read_text())["data"]
    assert stored["data"] == str(home / "corpus") and stored["data_dir"] == str(home / "data")
    # The same relative flags from another folder name another corpus: refused, nothing prepared there.
    shutil.copytree(corpus, elsewhere / "corpus")
    again = run_script("train_gpu_compatible.py", *with_flag(args, "--max_steps", "6"), cwd=elsewhere)
    assert again.returncode == 2 and f"--data '{elsewhere / 'corpus'}'" in one_error_line(again.stderr)
    assert not (elsewhere / "data").exists()
    # Without --data the run resumes on its own corpus, even with its source deleted to free disk.
    shutil.rmtree(home / "corpus")
    resumed = run_script("train_gpu_compatible.py", "--out", home / "run", "--max_steps", "6", "--no-compile",
                         cwd=elsewhere)
    assert resumed.returncode == 0, resumed.stderr
    assert load_file(home / "run" / LATEST)["step"] == 6 and not (elsewhere / "data").exists()
    assert "reusing the run's prepared corpus" in resumed.stderr


def test_a_deleted_prepared_corpus_is_prepared_again_only_from_an_unchanged_source(corpus, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(corpus, source)
    args = tiny_args(source, tmp_path, max_steps=4)
    assert train_gpu_compatible.main(args) == 0
    digest = load_file(tmp_path / "run" / LATEST)["data_identity"]["digest"]
    shutil.rmtree(tmp_path / "data")
    assert train_gpu_compatible.main(with_flag(args, "--max_steps", "6")) == 0  # the same tokens again
    assert load_file(tmp_path / "run" / LATEST)["data_identity"]["digest"] == digest
    # The source changed and the prepared corpus is gone: the tokens would differ, so the resume is refused.
    shutil.rmtree(tmp_path / "data")
    write_parquet(next(source.glob("*.parquet")), make_documents(seed=3))
    before = run_files(tmp_path / "run")
    refused = run_script("train_gpu_compatible.py", *with_flag(args, "--max_steps", "8"))
    assert refused.returncode == 2 and "gives other tokens" in one_error_line(refused.stderr)
    assert run_files(tmp_path / "run") == before


# ---- 2. no refusal writes first; a folder without a checkpoint is not trusted ---------------------

def test_a_failed_first_start_leaves_nothing_that_a_later_command_trusts(corpus, tmp_path, capsys):
    """A corpus too small for the batch: refused after its preparation, the new run folder is gone
    again (no tokenizer.json to be picked up), and the next command trains with its own vocabulary."""
    args = tiny_args(corpus, tmp_path, batch_size=64)
    assert train_gpu_compatible.main(args) == 2
    assert "fewer than one" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()
    assert train_gpu_compatible.main(tiny_args(other_corpus(tmp_path), tmp_path, vocab_size=600, max_steps=2)) == 0
    state = load_file(tmp_path / "run" / LATEST)
    assert state["model_config"]["vocab_size"] == 600


def test_a_folder_without_a_checkpoint_starts_a_new_run_with_the_commands_settings(run, tmp_path, capsys):
    folder, args = run
    for path in folder.glob("*.pt"):
        path.unlink()
    assert train_gpu_compatible.main(with_flag(with_flag(args, "--vocab_size", "600"), "--max_steps", "2")) == 0
    assert "holds no checkpoint: starting a new run" in capsys.readouterr().out
    assert load_file(folder / LATEST)["model_config"]["vocab_size"] == 600


# ---- 4. a checkpoint is valid by content, not only by checksum ------------------------------------

def resealed(path, **changes):
    """Rewrite a checkpoint with changed entries (None deletes one) and a valid checksum, as a tool would."""
    state = load_file(path)
    state.pop("format_version")
    for key, value in changes.items():
        if value is None:
            state.pop(key)
        else:
            state[key] = value
    save_file(state, path)


@pytest.mark.parametrize("damage", [
    {"step": -5}, {"optimizer": None}, {"data_state": {"epoch": 0, "index": 10 ** 9}},
    {"model_config": "wide"}, {"tokens_seen": 1.5},
], ids=["negative-step", "no-optimizer", "data-position", "no-model-config", "float-counter"])
def test_resume_falls_back_from_a_resealed_damaged_checkpoint(run, capsys, damage):
    folder, args = run
    resealed(folder / LATEST, **damage)
    assert train_gpu_compatible.main(with_flag(args, "--max_steps", "6")) == 0
    log = (folder / "training.log").read_text()
    assert "skipping checkpoint latest_checkpoint.pt: " in log
    assert f"resumed from {rolling_name(0, 4)} at step 4" in log
    assert load_file(folder / LATEST)["step"] == 6


def test_misshapen_weights_and_optimizer_state_are_damage(run):
    folder, args = run
    state = load_file(folder / LATEST)
    weights = dict(state["model"])
    weights["norm.weight"] = torch.ones(3)
    resealed(folder / LATEST, model=weights)
    optimizer = state["optimizer"]
    entry = optimizer["state"]["embed.weight"]
    entry["exp_avg"] = entry["exp_avg"][:, :5].clone()
    resealed(folder / rolling_name(0, 4), optimizer=optimizer)
    assert train_gpu_compatible.main(with_flag(args, "--max_steps", "6")) == 0
    log = (folder / "training.log").read_text()
    assert "its weights do not fit its model_config" in log and "embed.weight.exp_avg has shape" in log
    assert "resumed from best_checkpoint.pt at step 4" in log


def test_every_tool_falls_back_from_a_damaged_best_checkpoint(run, capsys):
    folder, _ = run
    resealed(folder / "best_checkpoint.pt", model_config=None)
    assert generate_simple.main(["--model_path", str(folder), "--prompt", "The", "--max_tokens", "3"]) == 0
    err = capsys.readouterr().err
    assert "skipping best_checkpoint.pt" in err and "trying latest_checkpoint.pt" in err


# ---- 5. another optimizer on resume works on purpose ------------------------------------------------

def test_resume_with_another_optimizer_starts_it_fresh_and_keeps_the_rest(run):
    folder, args = run  # the tiny preset trains with Muon
    before = load_file(folder / LATEST)
    assert train_gpu_compatible.main(with_flag(with_flag(args, "--optimizer", "adamw"), "--max_steps", "6")) == 0
    log = (folder / "training.log").read_text()
    assert "--optimizer adamw: the run trained with muon until step 4; adamw starts from fresh state" in log
    after = load_file(folder / LATEST)
    assert after["step"] == 6 and after["train_config"]["optimizer"] == "adamw"
    assert after["data_state"]["index"] > before["data_state"]["index"]
    assert not any("ns_steps" in group for group in after["optimizer"]["param_groups"])


def test_info_names_a_damaged_checkpoint_and_reads_the_newest_intact_one(run, capsys):
    from l1 import info

    folder, _ = run
    resealed(folder / LATEST, step=-5, tokens_seen=123)
    assert info.main([str(folder)]) == 0
    out = capsys.readouterr().out
    assert "latest_checkpoint.pt" in out and "damaged: its step -5 is not a whole number >= 0" in out
    got = info.run_info(folder)
    assert got["step"] == 4 and got["tokens_seen"] != 123  # from the next intact checkpoint


def test_fresh_with_a_bad_flag_refuses_before_moving_the_run_aside(run, capsys):
    folder, args = run
    before = snapshot(folder)
    assert train_gpu_compatible.main(with_flag(args, "--lr", "-1") + ["--fresh"]) == 2
    assert "lr must be > 0" in one_error_line(capsys.readouterr().err)
    assert snapshot(folder) == before and not list(folder.parent.glob("run.old-*"))
