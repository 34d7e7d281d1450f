"""No traceback, no debris, messages that fit the tool (issue #31): readers that leave early, numbers
out of range (given or stored), full disks at set-up, names too long for the file system, a run
pruned while l1.info reads it, a killed export's staging folder, --fresh with a bad flag, and the
flags each tool's messages name. Each case is a real process (the scripts as a user runs them; a
fault is injected by a few lines run before the command's main)."""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import train_gpu_compatible
from conftest import REPO, one_error_line, snapshot, tiny_args, with_flag
from l1 import config, trainer
from l1.errors import L1Error

pytestmark = pytest.mark.usefixtures("one_thread")

ENV = {**os.environ, "PYTHONPATH": str(REPO)}
TOOLS = {"train": "train_gpu_compatible.py", "generate": "generate_simple.py", "eval": "l1.eval",
         "export": "l1.export", "info": "l1.info", "plot": "l1.plot"}


def command(tool: str, *args) -> list[str]:
    """The command line of a tool (a root script, or python -m for a module)."""
    target = TOOLS[tool]
    head = [str(REPO / target)] if target.endswith(".py") else ["-m", target]
    return [sys.executable, *head, *map(str, args)]


def run(tool: str, *args, **popen) -> subprocess.CompletedProcess:
    popen = {"capture_output": True, **popen} if "stdout" not in popen else {"stderr": subprocess.PIPE, **popen}
    return subprocess.run(command(tool, *args), cwd=REPO, env=ENV, text=True, timeout=300, **popen)


def run_patched(tool: str, patch: str, *args, **popen) -> subprocess.CompletedProcess:
    """A tool's main in a process that first runs `patch` (Python source: the fault to inject)."""
    target = TOOLS[tool]
    module = target[:-3] if target.endswith(".py") else target
    source = f"import sys\n{textwrap.dedent(patch)}\nimport {module}\nsys.exit({module}.main(sys.argv[1:]))\n"
    return subprocess.run([sys.executable, "-c", source, *map(str, args)], cwd=REPO, env=ENV, text=True,
                          capture_output=True, timeout=300, **popen)


def refused(result: subprocess.CompletedProcess) -> str:
    """Exit status 2 and one error line, no traceback; that line."""
    assert result.returncode == 2, result.stderr[-3000:]
    return one_error_line(result.stderr)


def debris(folder: Path) -> list[str]:
    """Temporary files left in a folder."""
    return sorted(p.name for p in folder.rglob("*.tmp"))


# ---- a reader that leaves early (`| head`) -----------------------------------------------------------

def closed_pipe() -> int:
    """The write end of a pipe whose reader has gone: what `| head` leaves a command once it has read enough."""
    read, write = os.pipe()
    os.close(read)
    return write


@pytest.mark.parametrize("tool, args, stdin", [
    ("generate", ["--prompt", "The city", "--max_tokens", "40"], None),  # streamed, one piece at a time
    ("generate", ["--max_tokens", "20", "--num_samples", "2"], "a river\nthe king\n"),  # printed at the end
    ("info", [], None),
    ("info", ["--json"], None),
    ("eval", ["--data", "CORPUS"], None),
    ("plot", ["--out", "OUT/loss.png"], None),
    ("export", ["OUT/hf"], None),
    ("train", ["--help"], None),
])
def test_a_reader_that_leaves_early_ends_each_tool_quietly(run_copy, corpus, tmp_path, tool, args, stdin):
    folder, _ = run_copy
    args = [a.replace("CORPUS", str(corpus)).replace("OUT", str(tmp_path)) for a in args]
    source = [] if tool == "train" else ["--model_path", folder] if tool == "generate" else [folder]
    device = ["--device", "cpu"] if tool in ("generate", "eval") else []
    stdout = closed_pipe()
    try:
        result = run(tool, *source, *args, *device, stdout=stdout, input=stdin,
                     stdin=None if stdin else subprocess.DEVNULL)
    finally:
        os.close(stdout)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr, result.stderr
    assert "BrokenPipe" not in result.stderr


def test_head_takes_ten_bytes_of_a_streamed_sample(run_copy):
    """The literal pipeline: generate_simple.py ... | head -c 10."""
    folder, _ = run_copy
    generate = subprocess.Popen(command("generate", "--model_path", folder, "--prompt", "The city", "--max_tokens",
                                        "2000", "--device", "cpu"), cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    head = subprocess.run(["head", "-c", "10"], stdin=generate.stdout, capture_output=True, timeout=300)
    generate.stdout.close()
    err = generate.stderr.read()
    assert generate.wait(timeout=300) == 0, err
    assert head.stdout.startswith(b"The city") and len(head.stdout) == 10
    assert "Traceback" not in err and "Exception ignored" not in err and "BrokenPipe" not in err, err


# ---- numbers out of range, given or stored -----------------------------------------------------------

@pytest.mark.parametrize("flag, value, message", [
    ("--max_minutes", "1e308", "max_minutes must be at most 10,000,000"),  # was: OverflowError in the first log line
    ("--lr", "1e308", "lr must be a finite number at most 1e+30"),  # was: RuntimeError in the optimizer's step
    ("--vocab_size", str(2 ** 32), "vocab_size must be at most 16,777,216"),  # was: the BPE trainer aborted
    ("--pad_vocab_to", str(2 ** 32), "pad_vocab_to must be at most 65,536"),  # was: a 1 TB embedding's allocation
])
def test_a_number_beyond_range_is_refused_in_one_line_before_any_work(corpus, tmp_path, flag, value, message):
    args = tiny_args(corpus, tmp_path)
    del args[args.index("--max_steps"):args.index("--max_steps") + 2]  # a budget alone sets the run's length
    assert message in refused(run("train", *args, flag, value))
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()


def test_a_stored_value_beyond_range_is_refused_and_the_flag_mends_it(run_copy):
    """training_args.json goes through the same dataclasses as the flags: a hand-edited 1e308 is one line
    (it would crash every rerun), and giving the flag overrides the stored value."""
    folder, args = run_copy
    stored = json.loads((folder / "training_args.json").read_text())
    (folder / "training_args.json").write_text(json.dumps({**stored, "max_minutes": 1e308, "max_steps": 0}))
    before = snapshot(folder)
    line = refused(run("train", "--out", folder, "--no-compile"))
    assert "max_minutes must be at most" in line and "1e+308" in line
    assert snapshot(folder) == before
    mended = run("train", "--out", folder, "--no-compile", "--max_minutes", "0.001")
    assert mended.returncode == 0, mended.stderr[-3000:]


def _duration_and_schedule(cfg):
    """What the trainer computes from the numbers before and during a run (durations, the lr schedule)."""
    trainer._duration(cfg.max_minutes * 60)
    for step in (0, 1, cfg.max_steps):
        for seconds in (0.0, cfg.max_minutes * 60):
            lr = trainer._lr_at(cfg, step, seconds)
            assert lr == lr  # not nan
    assert cfg.model.num_params > 0 and cfg.model.padded_vocab_size > 0 and cfg.context > 0


def _numeric_flags() -> list[tuple[str, type]]:
    parser = argparse.ArgumentParser()
    config.add_config_flags(parser)
    return [(a.option_strings[0], a.type) for a in parser._actions
            if a.option_strings and a.type in (int, float, config._int_or_auto)]


NUMERIC_FLAGS = _numeric_flags()
HUGE = ["1e308", "-1e308", "1e39", "3.5e38", "inf", "-inf", "nan", str(2 ** 63), str(2 ** 63 - 1), str(2 ** 64),
        str(10 ** 400), "-" + str(10 ** 30), "0", "-0.0", "1e-320"]


def numbers(kind) -> st.SearchStrategy:
    special = st.sampled_from(HUGE)
    if kind is float:
        return st.one_of(special, st.floats().map(repr), st.integers().map(str))
    return st.one_of(special, st.integers().map(str))


@given(st.lists(st.sampled_from(NUMERIC_FLAGS).flatmap(lambda fk: numbers(fk[1]).map(lambda v: [fk[0], v])),
                min_size=1, max_size=3))
@settings(max_examples=300, deadline=None, derandomize=True, database=None)
def test_any_number_for_any_flag_is_refused_in_one_line_or_builds_a_usable_config(pairs):
    """Whatever numbers the flags get: argparse refuses the unparsable, the config refuses in one line
    (L1Error) what is out of range, and what it accepts the trainer can compute with (durations, the
    schedule, the model's size): no other exception."""
    argv = ["--preset", "tiny"] + [x for pair in pairs for x in pair]
    try:
        args = train_gpu_compatible.parse_args(argv)
    except SystemExit as exc:  # argparse's one-line refusal of what is not a number of the flag's kind
        assert exc.code == 2
        return
    try:
        cfg = config.resolve(config.overrides_from_args(args))
    except L1Error as exc:
        assert "\n" not in str(exc)
        return
    _duration_and_schedule(cfg)
    # A stored training_args.json holding the same values goes through the same check.
    assert config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


# ---- full disks at set-up --------------------------------------------------------------------------------

LIMIT = """
import resource, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing

def limit(size):
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
"""


def test_a_full_disk_at_the_tokenizer_is_one_line_and_the_same_command_runs_after(finished, tmp_path):
    _, args = finished  # its prepared corpus is reused: the run folder's tokenizer.json is the first big write
    args = with_flag(args, "--out", str(tmp_path / "new"))
    result = run_patched("train", LIMIT + "limit(2000)\n", *args)
    line = refused(result)
    assert f"cannot write {tmp_path / 'new' / 'tokenizer.json'}: File too large" in line
    assert "the checkpoints are intact" in line and "run the same command" in line
    assert debris(tmp_path) == [] and not (tmp_path / "new" / "tokenizer.json").exists()
    again = run("train", *args)
    assert again.returncode == 0, again.stderr[-3000:]


@pytest.mark.parametrize("name", ["training_args.json", "config.json"])
def test_a_full_disk_at_the_run_config_is_one_line_and_keeps_the_old_file(run_copy, name):
    folder, args = run_copy
    before = (folder / name).read_bytes()
    patch = LIMIT + f"""
from l1 import config
save_json = config.save_json
def full(obj, path):
    if path.name == {name!r}:
        limit(100)
    save_json(obj, path)
config.save_json = full
"""
    line = refused(run_patched("train", patch, *with_flag(args, "--max_steps", "8")))
    assert f"cannot write {folder / name}: File too large; the checkpoints are intact" in line
    assert (folder / name).read_bytes() == before and debris(folder) == []


def test_a_full_disk_at_the_metrics_cuts_off_the_half_line_and_the_run_resumes(run_copy):
    folder, args = run_copy
    metrics = folder / "metrics.jsonl"
    before = metrics.read_bytes()
    patch = LIMIT + f"""
import os
from l1 import trainer
write = trainer._Metrics.write
def full(self, **record):
    limit(os.path.getsize({str(metrics)!r}) + 10)  # room for the first 10 bytes of the line only
    write(self, **record)
trainer._Metrics.write = full
"""
    line = refused(run_patched("train", patch, *with_flag(args, "--max_steps", "8")))
    assert f"cannot write {metrics}: File too large; the checkpoints are intact" in line
    assert metrics.read_bytes() == before  # no half record for readers, nor for the resumed run's next line
    again = run("train", *with_flag(args, "--max_steps", "8"))
    assert again.returncode == 0, again.stderr[-3000:]
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert max(r["step"] for r in records) == 8


# ---- names too long for the file system ------------------------------------------------------------------

LONG = "a" * 300


@pytest.mark.parametrize("tool, args", [
    ("train", ["--out", f"OUT/{LONG}", "--data", "CORPUS"]),
    ("train", ["--out", "OUT/run", "--data_dir", f"OUT/{LONG}", "--data", "CORPUS"]),
    ("train", ["--out", "OUT/run", "--data", f"OUT/{LONG}"]),
    ("generate", ["--model_path", f"OUT/{LONG}", "--prompt", "hi"]),
    ("info", [f"OUT/{LONG}"]),
    ("plot", [f"OUT/{LONG}"]),
    ("eval", [f"OUT/{LONG}", "--data", "CORPUS"]),
    ("eval", ["RUN", "--data", f"OUT/{LONG}/x.txt"]),
    ("export", ["RUN", f"OUT/{LONG}"]),
])
def test_a_name_longer_than_the_file_system_allows_is_one_line(finished, corpus, tmp_path, tool, args):
    folder, _ = finished
    args = [a.replace("OUT", str(tmp_path)).replace("CORPUS", str(corpus)).replace("RUN", str(folder)) for a in args]
    extra = ["--preset", "tiny", "--max_steps", "1"] if tool == "train" else []
    line = refused(run(tool, *args, *extra))
    assert "longer than the file system allows" in line or "File name too long" in line


# ---- l1.info while a trainer prunes its rolling checkpoints ------------------------------------------------

@pytest.mark.parametrize("when", ["after_listing", "while_reading"])
def test_info_leaves_out_a_checkpoint_pruned_under_it(run_copy, when):
    folder, _ = run_copy
    rolling = sorted(folder.glob("checkpoint_epoch_*_step_*.pt"))
    assert rolling
    if when == "after_listing":
        patch = """
from l1 import checkpoint
candidates = checkpoint.CheckpointManager.candidates
def pruned(self):
    found = candidates(self)
    for path in found:
        if path.name.startswith("checkpoint_epoch_"):
            path.unlink()  # the trainer's rolling clean-up, between the listing and the reading
    return found
checkpoint.CheckpointManager.candidates = pruned
"""
    else:
        patch = """
from l1 import checkpoint
peek = checkpoint.peek
def pruned(path):
    if path.name.startswith("checkpoint_epoch_"):
        path.unlink()
    return peek(path)
checkpoint.peek = pruned
"""
    result = run_patched("info", patch, folder, "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    shown = [c["name"] for c in json.loads(result.stdout)["checkpoints"]]
    assert shown == ["latest_checkpoint.pt", "best_checkpoint.pt"]


# ---- a killed export's staging folder -----------------------------------------------------------------------

def test_the_next_export_removes_a_killed_exports_staging_folder_only(run_copy, tmp_path):
    folder, _ = run_copy
    out = tmp_path / "hf"
    killed = run_patched("export", """
import os, signal
from l1 import export
export._publish = lambda staging, out: os.kill(os.getpid(), signal.SIGKILL)
""", folder, out)
    assert killed.returncode == -signal.SIGKILL
    left = list(tmp_path.glob(".hf.export-*"))
    assert len(left) == 1 and (left[0] / "config.json").is_file()
    live = tmp_path / f".hf.export-{os.getpid()}"  # a running export's (this process runs)
    live.mkdir()
    (live / "config.json").write_text("{}")
    result = run("export", folder, out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["hf", live.name, "run"])
    assert (live / "config.json").read_text() == "{}"


# ---- --fresh with a bad flag --------------------------------------------------------------------------------

@pytest.mark.parametrize("flag, value", [("--lr", "-1"), ("--max_minutes", "1e308"), ("--seq_len", "100000")])
def test_fresh_with_a_bad_flag_moves_nothing(run_copy, flag, value):
    folder, args = run_copy
    before = snapshot(folder)
    refused(run("train", *with_flag(args, flag, value), "--fresh"))
    assert snapshot(folder) == before
    assert sorted(p.name for p in folder.parent.iterdir()) == ["run"]  # no run.old-* moved aside


# ---- messages that fit the tool -------------------------------------------------------------------------

def tool_flags(tool: str) -> set[str]:
    """The flags a tool has, from its --help."""
    result = run(tool, "--help")
    assert result.returncode == 0, result.stderr
    return set(re.findall(r"--[a-z][a-z_-]*", result.stdout))


def test_eval_takes_a_text_of_one_paragraph(run_copy, tmp_path):
    folder, _ = run_copy
    text = tmp_path / "one.txt"
    text.write_text("The city was built on the river. It is known for its old church and its bridge.\n")
    result = run("eval", folder, "--data", text, "--device", "cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    numbers = json.loads(result.stdout)
    assert numbers["tokens"] > 5 and numbers["bytes"] >= 70 and numbers["loss"] > 0


@pytest.fixture(scope="module")
def bad_inputs(finished, corpus, tmp_path_factory):
    """For each tool, command lines it refuses (paths that do not exist, empty folders, a corpus
    without the text column, damaged run files)."""
    folder, _ = finished
    zoo = tmp_path_factory.mktemp("zoo")
    (zoo / "empty").mkdir()
    damaged = zoo / "damaged"
    shutil.copytree(folder, damaged)
    stored = json.loads((damaged / "config.json").read_text())
    (damaged / "config.json").write_text(json.dumps({**stored, "rope_theta": 1e308}))
    (damaged / "training_args.json").write_text(json.dumps({"max_minutes": 1e308}))
    return {
        "eval": [[zoo / "nothing", "--data", corpus], [zoo / "empty", "--data", corpus],
                 [folder, "--data", corpus, "--text_column", "body"], [folder, "--data", zoo / "empty"],
                 [folder, "--data", corpus, "--device", "cuda:9"]],
        "export": [[zoo / "nothing", zoo / "hf"], [zoo / "empty", zoo / "hf"], [folder, folder]],
        "info": [[zoo / "nothing"], [zoo / "empty"], [damaged]],
        "plot": [[zoo / "nothing"], [zoo / "empty"]],
        "generate": [["--model_path", zoo / "nothing", "--prompt", "x"], ["--model_path", zoo / "empty", "--prompt", "x"],
                     ["--model_path", folder, "--prompt", "x", "--temperature", "1e308"],
                     ["--model_path", folder, "--prompt", "x", "--dtype", "fp7"]],
    }


@pytest.mark.parametrize("tool", ["eval", "export", "info", "plot", "generate"])
def test_each_tool_names_only_flags_it_has(bad_inputs, tool):
    flags = tool_flags(tool)
    for args in bad_inputs[tool]:
        line = refused(run(tool, *args))
        named = set(re.findall(r"(?<![\w-])--[a-z][a-z_-]*", line))
        assert named <= flags, (args, line, named - flags)


def test_a_longer_seq_len_on_resume_is_refused_naming_seq_len(run_copy):
    folder, args = run_copy
    before = snapshot(folder)
    beyond = refused(run("train", *with_flag(with_flag(args, "--seq_len", "128"), "--max_steps", "8")))
    assert "--seq_len 128" in beyond and "block_size (64)" in beyond
    # The model's context grown with it: the checkpoint's model is another one, whose context is fixed.
    grown = with_flag(with_flag(with_flag(args, "--seq_len", "128"), "--block_size", "128"), "--max_steps", "8")
    line = refused(run("train", *grown))
    assert "--block_size 128, but the run has 64" in line and "--seq_len may only shorten" in line
    assert {n: d for n, d in snapshot(folder).items() if n.endswith(".pt")} == \
        {n: d for n, d in before.items() if n.endswith(".pt")}


# ---- fixtures ---------------------------------------------------------------------------------------------

@pytest.fixture
def run_copy(finished, tmp_path):
    """A private copy of the module's finished run (tiny, step 4), and its flags pointing at the copy."""
    source, args = finished
    copy = tmp_path / "run"
    shutil.copytree(source, copy)
    return copy, [str(a) for a in with_flag(args, "--out", str(copy))]
