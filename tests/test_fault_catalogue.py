"""More named faults (issue #16): signals during preparation and training, full disks and unwritable
places for export and plot, damaged files beside good ones, and bad input per entry point. Each
ends in one `error:` line (or an honest result), no traceback, and nothing of a run lost."""

import errno
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import generate_simple
import train_gpu_compatible
from conftest import REPO, make_documents, one_error_line, run_script, snapshot, tiny_args, with_flag, write_parquet
from l1 import checkpoint, export, info, plot
from l1.checkpoint import load_file

pytestmark = pytest.mark.usefixtures("one_thread")


def refused(main, argv, capsys) -> str:
    """main(argv) exits 2 with one error line; that line."""
    capsys.readouterr()
    assert main(list(map(str, argv))) == 2
    return one_error_line(capsys.readouterr().err)


def script(*argv, **popen) -> list[str]:
    """The command line of a repo script or module (python -m when argv[0] has no .py)."""
    head = [str(REPO / argv[0])] if argv[0].endswith(".py") else ["-m", argv[0]]
    return [sys.executable, *head, *map(str, argv[1:])]


ENV = {**os.environ, "PYTHONPATH": str(REPO)}


# ---- kills and signals ------------------------------------------------------------------------------

SLOW_ENCODE = """
import sys, time
from l1.tokenizer import Tokenizer
encode = Tokenizer.encode_documents
def slow(self, docs):  # each batch's call into Rust lasts at least 0.3 s
    print("encoding", file=sys.stderr, flush=True)
    time.sleep(0.3)
    return encode(self, docs)
Tokenizer.encode_documents = slow
import l1.data
l1.data.ENCODE_BATCH_BYTES = 2000
import train_gpu_compatible
sys.exit(train_gpu_compatible.main(sys.argv[1:]))
"""


def test_sigterm_during_data_preparation_is_one_line_and_the_same_command_completes(tmp_path):
    write_parquet(tmp_path / "src" / "a.parquet", make_documents(600))
    args = [str(a) for a in tiny_args(tmp_path / "src", tmp_path, max_steps=1, shard_tokens=1000)]
    proc = subprocess.Popen([sys.executable, "-c", SLOW_ENCODE, *args], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    while "encoding" not in proc.stderr.readline():
        assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1] == "interrupted"
    assert [p.name[0] for p in (tmp_path / "data").iterdir()] == ["."], "only the work folder, no prepared one"
    again = run_script("train_gpu_compatible.py", *args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert load_file(tmp_path / "run" / "latest_checkpoint.pt")["step"] == 1


SWALLOWED = """
import sys, time
from l1.cli import entry_point
class Slow:
    def __del__(self):  # the signal arrives while this finalizer runs, which swallows exceptions
        print("finalizing", file=sys.stderr, flush=True)
        time.sleep(5)
@entry_point
def main():
    Slow()
    time.sleep(5)
    print("went on", file=sys.stderr)
sys.exit(main())
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_that_lands_in_a_finalizer_still_interrupts_in_one_line(signum):
    proc = subprocess.Popen([sys.executable, "-c", SWALLOWED], cwd=REPO, env=ENV, stderr=subprocess.PIPE, text=True)
    assert proc.stderr.readline().strip() == "finalizing"
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "went on" not in err and "Traceback" not in err and "Exception ignored" not in err, err[-2000:]
    assert err.split() == ["interrupted"]


TWO_CTRL_C = """
import os, signal, sys, time
import train_gpu_compatible
from l1 import trainer
step = trainer._Run._train_step
def twice(self, *args):
    if self.step == 3:  # two real Ctrl-C inside step 4, the first handled before the second arrives
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)
    return step(self, *args)
trainer._Run._train_step = twice
sys.exit(train_gpu_compatible.main(sys.argv[1:]))
"""


def test_sigint_twice_during_training_exits_at_once_and_loses_nothing(corpus, tmp_path):
    args = [str(a) for a in tiny_args(corpus, tmp_path, max_steps=8, save_every=2, eval_every=1000)]
    folder = tmp_path / "run"
    killed = subprocess.run([sys.executable, "-c", TWO_CTRL_C, *args], cwd=REPO, env=ENV, capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == 130 and "Traceback" not in killed.stderr, killed.stderr[-2000:]
    assert killed.stderr.count("SIGINT received") == 1
    assert load_file(folder / "latest_checkpoint.pt")["step"] == 2  # step 4 was neither finished nor saved
    resumed = run_script("train_gpu_compatible.py", *with_flag(args, "--max_steps", "4"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from latest_checkpoint.pt at step 2" in resumed.stderr
    assert load_file(folder / "latest_checkpoint.pt")["step"] == 4


# ---- full disks and places that cannot be written ---------------------------------------------------

def _limit_file_size():
    """As a full disk does to a writer: a file cannot grow past 100 kB (EFBIG instead of ENOSPC)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))


def test_export_onto_a_full_disk_is_one_line_and_leaves_nothing(run, tmp_path):
    folder, _ = run
    before = snapshot(folder)
    result = subprocess.run(script("l1.export", folder, tmp_path / "hf"), cwd=REPO, env=ENV, capture_output=True,
                            text=True, timeout=300, preexec_fn=_limit_file_size)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "cannot write" in one_error_line(result.stderr) and "File too large" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no hf/, no staging folder
    assert snapshot(folder) == before


def test_gguf_export_onto_a_full_disk_is_one_line_and_leaves_nothing(run, tmp_path):
    folder, _ = run
    before = snapshot(folder)
    result = subprocess.run(script("l1.export", folder, tmp_path / "tiny.gguf", "--outtype", "f32"), cwd=REPO, env=ENV,
                            capture_output=True, text=True, timeout=300, preexec_fn=_limit_file_size)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "cannot write" in one_error_line(result.stderr)  # numpy's short write says no errno
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no tiny.gguf, Modelfile or staging folder
    assert snapshot(folder) == before


def test_export_under_a_file_is_one_line(run, tmp_path, capsys):
    folder, _ = run
    (tmp_path / "file").write_text("x")
    assert "cannot write" in refused(export.main, [folder, tmp_path / "file" / "hf"], capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "run"]


@pytest.mark.parametrize("fails", ["mkdir", "replace"])
def test_export_into_a_read_only_folder_is_one_line_without_debris(run, tmp_path, capsys, monkeypatch, fails):
    # As root, chmod does not stop a write: the refusal is made to happen where the kernel would make it.
    folder, _ = run
    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text("{}")  # an earlier export, replaced file by file with --force

    def read_only(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(Path, "mkdir", read_only) if fails == "mkdir" else monkeypatch.setattr(os, "replace", read_only)
    assert "Permission denied" in refused(export.main, [folder, out, "--force"], capsys)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "run"]  # no .hf.export-PID staging folder
    assert (out / "config.json").read_text() == "{}"


def test_export_with_force_into_another_run_is_refused(run, finished, capsys):
    folder, _ = run
    other = finished[0]
    before = snapshot(other)
    assert "is an L1 run folder" in refused(export.main, [folder, other, "--force"], capsys)
    assert snapshot(other) == before


@pytest.mark.parametrize("where", ["missing_folder", "under_a_file"])
def test_plot_into_a_folder_that_cannot_hold_it_is_one_line(run, tmp_path, capsys, where):
    folder, _ = run
    (tmp_path / "file").write_text("x")
    out = tmp_path / ("missing" if where == "missing_folder" else "file") / "loss.png"
    assert f"cannot write {out}" in refused(plot.main, [folder, "--out", out], capsys)
    assert not list(tmp_path.rglob(".*.tmp"))


# ---- damaged files beside good ones -----------------------------------------------------------------

def test_info_on_a_binary_metrics_file_still_summarizes_the_checkpoints(run, capsys):
    folder, _ = run
    (folder / "metrics.jsonl").write_bytes(bytes(range(256)) * 16)
    assert info.main([str(folder)]) == 0
    text = capsys.readouterr().out
    assert "no evaluation yet" in text and "step           4" in text


def test_info_on_mistyped_metrics_records_shows_what_is_known(run, capsys):
    folder, _ = run
    for path in folder.glob("*.pt"):  # the progress then comes from the records alone
        path.unlink()
    (folder / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 3, "loss": 2.0, "tokens_seen": "x"})
                                          + "\n" + json.dumps({"kind": "eval", "step": 3, "val_loss": 1.5,
                                                               "val_bpb": []}) + "\n")
    assert info.main([str(folder), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["step"] == 3 and shown["tokens_seen"] is None and shown["best_val_bpb"] is None
    assert shown["best_val_loss"] == 1.5
    assert info.main([str(folder)]) == 0 and "1.5000" in capsys.readouterr().out


def test_info_on_a_mistyped_training_args_file(run, capsys):
    folder, _ = run
    (folder / "training_args.json").write_text(json.dumps({"preset": "tiny", "max_steps": "ten"}))
    line = refused(info.main, [folder], capsys)
    assert "training_args.json is damaged" in line and "'max_steps' must be int" in line


@pytest.mark.parametrize("content, message", [
    ("[]", "must hold a JSON object"),
    (json.dumps({"n_layer": "two"}), "'n_layer' must be int"),
    (json.dumps({"bogus": 1}), "unknown model field(s) bogus"),
])
def test_info_on_a_config_json_of_the_wrong_shape(run, capsys, content, message):
    folder, _ = run
    (folder / "config.json").write_text(content)
    assert message in refused(info.main, [folder], capsys)


def test_plot_skips_a_mistyped_learning_rate(run, tmp_path, capsys):
    folder, _ = run
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    train[0]["lr"], train[-1]["lr"] = "fast", None  # among numbers
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert plot.main([str(folder), "--out", str(tmp_path / "x.png")]) == 0
    assert (tmp_path / "x.png").read_bytes()[:4] == b"\x89PNG"


def test_generate_with_a_corrupt_tokenizer_beside_a_good_checkpoint(run, capsys):
    folder, _ = run
    (folder / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": 7')
    line = refused(generate_simple.main, ["--model_path", folder, "--prompt", "hi", "--no-compile"], capsys)
    assert "tokenizer.json" in line


def test_generate_from_a_checkpoint_whose_model_config_was_edited(run, capsys):
    """A valid checksum over an edited config: the best checkpoint is damaged by its content, and
    generate says so and samples from the newest intact one; a damaged file named alone is refused."""
    folder, _ = run
    state = load_file(folder / "best_checkpoint.pt")
    state["model_config"]["n_layer"] = 3
    checkpoint.save_file(state, folder / "best_checkpoint.pt")
    capsys.readouterr()
    assert generate_simple.main(["--model_path", str(folder), "--prompt", "hi", "--no-compile"]) == 0
    err = capsys.readouterr().err
    assert "skipping best_checkpoint.pt" in err and "do not fit its model_config" in err and "trying latest" in err
    line = refused(generate_simple.main, ["--model_path", folder / "best_checkpoint.pt", "--prompt", "hi",
                                          "--no-compile"], capsys)
    assert "do not fit its model_config" in line


def test_resume_with_an_edited_model_config_in_the_latest_checkpoint_falls_back(run, capsys):
    folder, args = run
    state = load_file(folder / "latest_checkpoint.pt")
    state["model_config"]["n_embd"] = 96
    checkpoint.save_file(state, folder / "latest_checkpoint.pt")
    assert train_gpu_compatible.main(with_flag(args, "--max_steps", "5")) == 0
    log = (folder / "training.log").read_text()
    assert "its weights do not fit its model_config" in log  # damaged by its content
    assert "resumed from checkpoint_epoch_0_step_4.pt at step 4" in log
    assert load_file(folder / "latest_checkpoint.pt")["step"] == 5


# ---- bad input, per entry point ---------------------------------------------------------------------

def test_generate_with_an_empty_stdin_asks_for_a_prompt(run):
    folder, _ = run
    result = subprocess.run(script("generate_simple.py", "--model_path", folder, "--no-compile"), input="\n  \n",
                            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "no prompt" in one_error_line(result.stderr)


def test_config_that_is_a_directory(corpus, tmp_path, capsys):
    args = [*tiny_args(corpus, tmp_path), "--config", tmp_path]
    assert "cannot read config file" in refused(train_gpu_compatible.main, args, capsys)
    assert not (tmp_path / "run").exists()


def test_config_file_whose_section_has_the_wrong_type(corpus, tmp_path, capsys):
    (tmp_path / "c.json").write_text(json.dumps({"model": 5}))
    args = [*tiny_args(corpus, tmp_path), "--config", tmp_path / "c.json"]
    assert "'model' must be an object of fields" in refused(train_gpu_compatible.main, args, capsys)


def test_data_folder_of_binary_junk_named_parquet(tmp_path, capsys):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.parquet").write_bytes(b"PAR1" + bytes(range(256)) * 8)
    line = refused(train_gpu_compatible.main, tiny_args(tmp_path / "junk", tmp_path), capsys)
    assert "a.parquet" in line


def test_resume_with_another_seq_len(run, capsys):
    folder, args = run
    assert train_gpu_compatible.main(with_flag(with_flag(args, "--seq_len", "8"), "--max_steps", "5")) == 0
    assert json.loads((folder / "training_args.json").read_text())["seq_len"] == 8
    assert load_file(folder / "latest_checkpoint.pt")["step"] == 5


@pytest.mark.parametrize("flag, value, message", [
    ("--save_every", -1, "save_every must be > 0"),
    ("--keep", 0, "keep must be > 0"),
    ("--eval_every", 0, "eval_every must be > 0"),
    ("--grad_accum", 0, "grad_accum must be > 0"),
    ("--beta2", 1.0, "beta2 must be in [0, 1)"),
    ("--schedule", "linear", "schedule must be cosine or wsd"),
    ("--n_head", 3, "must split into n_head"),
    ("--max_minutes", "nan", "must be a finite float"),
])
def test_config_checks_refuse_before_a_run_folder_exists(corpus, tmp_path, capsys, flag, value, message):
    args = with_flag(list(map(str, tiny_args(corpus, tmp_path))), flag, str(value))
    assert message in refused(train_gpu_compatible.main, args, capsys)
    assert not (tmp_path / "run").exists()
