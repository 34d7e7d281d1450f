"""Property test: every entry point (train, generate, export, info, plot) under generated bad flags
and bad files ends in an exit status != 0 with an `error:` line, or in a valid result; never in a
traceback; and never changes a finished run folder (or the prepared corpus it trains on).

Each example is one in-process call of a command's main(argv). Flag names are each parser's
real flags; values come from pools of hostile values (wrong types, negative, huge, NaN/inf,
empty) plus a few valid ones that keep a successful call cheap (a model of a few thousand
parameters, 1-3 steps). --compile is never generated: compiling on a CPU takes tens of seconds
and is exercised elsewhere.
"""

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import generate_simple
import train_gpu_compatible
from conftest import snapshot, tiny_args
from l1 import config, export, info, plot
from l1.checkpoint import load_file

pytestmark = pytest.mark.usefixtures("one_thread")

# The suite runs the same 40 examples per entry point every time; L1_PROPERTY_EXAMPLES=N draws N
# new random ones (a deeper hunt, e.g. before a release).
DEEPER = int(os.environ.get("L1_PROPERTY_EXAMPLES", "0"))
SETTINGS = settings(max_examples=DEEPER or 40, deadline=None, derandomize=not DEEPER, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
FINISHED_STEP = 3

# ---- the world the examples run in: a finished run and damaged files, built once per module --------


@pytest.fixture(scope="module")
def world(corpus, tmp_path_factory):
    """A finished tiny run, its prepared corpus, and a zoo of bad files and folders (name -> path)."""
    root = tmp_path_factory.mktemp("world")
    args = [str(a) for a in tiny_args(corpus, root, max_steps=FINISHED_STEP, save_every=1, eval_every=FINISHED_STEP,
                                      eval_batches=1, n_embd=32, block_size=32, seq_len=16)]
    assert train_gpu_compatible.main(args) == 0
    run = root / "run"
    zoo = root / "zoo"
    zoo.mkdir()
    paths = {"run": run, "corpus": corpus, "nothing": zoo / "nothing", "empty_dir": zoo / "empty_dir",
             "binary": zoo / "binary.bin", "under_file": zoo / "binary.bin" / "sub", "tokenizer": run / "tokenizer.json",
             "checkpoint": run / "latest_checkpoint.pt", "truncated_ckpt": zoo / "truncated.pt",
             "json_list": zoo / "list.json", "json_wrong_types": zoo / "wrong_types.json",
             "junk_parquet_dir": zoo / "junk_parquet", "text_file": zoo / "notes.txt", "empty": ""}
    paths["empty_dir"].mkdir()
    paths["binary"].write_bytes(bytes(range(256)) * 64)
    paths["truncated_ckpt"].write_bytes(paths["checkpoint"].read_bytes()[:3000])
    paths["json_list"].write_text("[1, 2, 3]")
    paths["json_wrong_types"].write_text(json.dumps({"max_steps": "many", "lr": None, "model": 5}))
    paths["junk_parquet_dir"].mkdir()
    (paths["junk_parquet_dir"] / "a.parquet").write_bytes(b"PAR1" + bytes(range(256)) * 8)
    paths["text_file"].write_text("hello\n")
    # Run folders with one damaged file each (read by info, plot, generate, export; trained on as copies).
    damage = {"run_binary_metrics": ("metrics.jsonl", bytes(range(256)) * 16),
              "run_mistyped_args": ("training_args.json", json.dumps({"max_steps": "ten", "model": [1]}).encode()),
              "run_config_list": ("config.json", b"[]"),
              "run_config_wrong_shape": ("config.json", json.dumps({"n_layer": "two", "bogus": 1}).encode()),
              "run_corrupt_tokenizer": ("tokenizer.json", b'{"model": {"type": "BPE", "vocab": 7'),
              "run_truncated_ckpts": None,
              "run_mistyped_metrics": ("metrics.jsonl", b'{"kind": "train", "step": 1, "loss": 2.0, "lr": "hi", '
                                       b'"tokens_seen": "many"}\n{"kind": "eval", "step": 1, "val_loss": 1.5, '
                                       b'"val_bpb": [], "step_time": null}\n{"kind": "eval", "step": "2"}\n')}
    for name, change in damage.items():
        copy = zoo / name
        shutil.copytree(run, copy)
        if name == "run_mistyped_metrics":  # what info shows then comes from these records alone
            for ckpt in copy.glob("*.pt"):
                ckpt.unlink()
        if change:
            (copy / change[0]).write_bytes(change[1])
        else:
            for ckpt in copy.glob("*.pt"):
                ckpt.write_bytes(ckpt.read_bytes()[:4000])
        paths[name] = copy
    return World({"root": root, "run": run, "paths": paths, "prepared": root / "data", "args": args,
                  "snapshot": {"run": snapshot(run),
                               "prepared": {p: snapshot(p) for p in (root / "data").iterdir()}}})


class World(dict):
    """The fixture's dict, shown briefly in hypothesis' reports (its snapshots hold megabytes)."""

    def __repr__(self):
        return f"World({self['root']})"


def assert_untouched(world):
    """The finished run and its prepared corpus hold the same files with the same bytes (other
    settings may prepare other corpora beside it)."""
    assert snapshot(world["run"]) == world["snapshot"]["run"]
    assert {p: snapshot(p) for p in world["snapshot"]["prepared"]} == world["snapshot"]["prepared"]


# ---- values ---------------------------------------------------------------------------------------

# "caf\udce9" is how Python hands over an argument holding bytes that are not UTF-8.
HOSTILE = ["", " ", "-1", "0", "nan", "-nan", "inf", "-inf", "1e309", "abc", "1.5", "0x10", "9" * 30,
           str(2 ** 63), "caf\udce9"]
INT_OK = ["1", "2", "3"]
FLOAT_OK = ["0.1", "0.3", "1e-3"]
# Flags whose valid values must stay small for a successful example to stay cheap.
SMALL = {"max_steps": ["1", "2", "3"], "n_layer": ["1", "2"], "n_head": ["1", "2", "3"], "n_embd": ["16", "32", "48"],
         "block_size": ["16", "32", "100000000"], "vocab_size": ["300", "512", "100"], "seq_len": ["0", "8", "16"],
         "intermediate_size": ["0", "32"], "batch_size": ["1", "2", "auto", "4096"], "grad_accum": ["1", "2"],
         "eval_batches": ["1", "2", "100000"], "shard_tokens": ["64", "4096"], "max_docs": ["5", "60"],
         "tokenizer_sample_mb": ["0.001", "1"], "val_fraction": ["0.1", "0.3", "0.5"], "max_tokens": ["1", "4", "1000000"],
         "num_samples": ["1", "2", "1001"], "max_minutes": ["0", "0.01"]}
NEVER = {"compile"}  # never generated (see the docstring)
PATH_FLAGS = {"data", "data_dir", "tokenizer", "out", "model_path", "config"}


def real_flags(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.Action]]:
    """The parser's own optional flags (name without dashes, action)."""
    return [(a.option_strings[0][2:], a) for a in parser._actions
            if a.option_strings and a.option_strings[0].startswith("--") and a.option_strings[0] != "--help"]


def train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    parser.add_argument("--fresh", action="store_true")
    config.add_config_flags(parser)
    return parser


def generate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    for flag in ("--prompt", "--model_path", "--device", "--dtype", "--stop"):
        parser.add_argument(flag)
    parser.add_argument("--interactive", action="store_true")
    config.add_sampling_flags(parser)
    return parser


def flag_values(name: str, action: argparse.Action, paths: st.SearchStrategy) -> st.SearchStrategy:
    """argv pieces for one flag: a boolean's --x / --no-x, or --x with a hostile or valid value."""
    if action.nargs == 0:
        names = [s for s in action.option_strings if s.startswith("--")]
        return st.sampled_from(names).map(lambda s: [s])
    if name in PATH_FLAGS:
        values = paths
    elif name == "device":
        values = st.sampled_from(["cpu", "auto", "cuda", "cuda:7", "mps", "tpu", "", "cpu:0"])
    elif name == "dtype":
        values = st.sampled_from(["auto", "fp32", "bf16", "int8", "fp8", ""])
    elif name in ("preset", "schedule", "optimizer"):
        values = st.sampled_from(["tiny", "l1-v1", "cosine", "wsd", "adamw", "muon", "", "TINY"])
    elif name in SMALL:
        values = st.sampled_from(HOSTILE + SMALL[name])
    elif action.type is float:
        values = st.sampled_from(HOSTILE + FLOAT_OK)
    elif action.type in (int, config._int_or_auto):
        values = st.sampled_from(HOSTILE + INT_OK + ["100000"])
    else:  # free text: hub names, text column, prompts, stop strings
        values = st.one_of(st.sampled_from(["text", "nope", "", "hub"]), st.text(max_size=8))
    return values.map(lambda v: [f"--{name}", v])


def argv_from(parser, paths, exclude=(), extra=()) -> st.SearchStrategy:
    """A list of 1-4 generated flags (plus unknown ones sometimes), flattened into argv."""
    flags = [(n, a) for n, a in real_flags(parser) if n not in NEVER and n not in exclude]
    one = st.one_of(*[flag_values(n, a, paths) for n, a in flags],
                    st.sampled_from([["--bogus"], ["--max-steps", "2"], ["-x"], ["--lr"]]), *extra)
    return st.lists(one, min_size=1, max_size=4).map(lambda parts: [x for part in parts for x in part])


def path_names(*names) -> st.SearchStrategy:
    return st.sampled_from(names)


RUN_PATHS = path_names("run", "run_binary_metrics", "run_mistyped_args", "run_config_list", "run_config_wrong_shape",
                       "run_corrupt_tokenizer", "run_truncated_ckpts", "run_mistyped_metrics")
ANY_PATH = path_names("run", "corpus", "nothing", "empty_dir", "binary", "under_file", "tokenizer", "checkpoint",
                      "truncated_ckpt", "json_list", "json_wrong_types", "junk_parquet_dir", "text_file", "empty",
                      "run_binary_metrics", "run_mistyped_args", "run_config_list", "run_config_wrong_shape",
                      "run_corrupt_tokenizer", "run_truncated_ckpts", "run_mistyped_metrics")
RUN_OR_ANY = st.one_of(RUN_PATHS, ANY_PATH)  # half the draws a run folder, damaged or not


class Resolver:
    """Turns the path names drawn into real paths. A folder (or nothing) given where a command
    legitimately writes (train's --out and --data_dir, plot's run folder) is a fresh copy in this
    example's scratch folder; the shared ones stay as they were."""

    def __init__(self, world, scratch: Path):
        self.world, self.scratch = world, scratch

    def __call__(self, name: str, writable: bool = False) -> str:
        path = self.world["paths"][name]
        if not writable or name == "empty" or not (path.is_dir() or not path.exists()) or name == "under_file":
            return str(path)
        copy = self.scratch / f"copy-{name}"
        if path.is_dir() and not copy.exists():
            shutil.copytree(path, copy)
        return str(copy)


@contextlib.contextmanager
def scratch_folder(world):
    """A fresh scratch folder for one example, and a Resolver copying into it. Not a fixture:
    hypothesis runs every example of a test inside one call of its function-scoped fixtures."""
    with tempfile.TemporaryDirectory() as scratch:
        yield Path(scratch), Resolver(world, Path(scratch))


def call(main, argv, capsys, cwd: Path, stdin_text: str = "") -> tuple[int, str, str]:
    """main(argv) in-process, in folder cwd (an empty path means "."), with stdin_text on standard
    input: (exit status, stdout, stderr)."""
    saved = sys.stdin
    sys.stdin = io.StringIO(stdin_text)
    capsys.readouterr()
    try:
        with contextlib.chdir(cwd):
            code = main(argv)
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    finally:
        sys.stdin = saved
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    event(f"exit {code}")  # --hypothesis-show-statistics: how many examples succeeded
    return code, out, err


def assert_outcome(world, code: int, err: str, valid) -> None:
    """Exit 0 with valid() true, or exit 2 with an error line; the finished run untouched either way."""
    if code == 0:
        assert valid()
    else:
        assert code == 2 and "error: " in err, (code, err[-2000:])
    assert_untouched(world)


# ---- the properties -------------------------------------------------------------------------------

@given(data=st.data())
@SETTINGS
def test_train_with_bad_flags_and_files(world, capsys, data):
    with scratch_folder(world) as (scratch, resolve):
        # The base command: a cheap new run in scratch; the generated flags come after and win.
        base = list(world["args"])
        base[base.index("--out") + 1] = str(scratch / "new")
        base[base.index("--max_steps") + 1] = "2"
        generated = data.draw(argv_from(train_parser(), ANY_PATH, extra=[st.just(["--fresh"])]), "flags")
        argv = [resolve(v, writable=flag in ("--out", "--data_dir")) if flag in {f"--{n}" for n in PATH_FLAGS}
                else v for flag, v in zip([""] + generated, generated)]
        code, out, err = call(train_gpu_compatible.main, base + argv, capsys, cwd=scratch)

        def trained():  # a run trained and saved somewhere in scratch (--out may be any of the folders there)
            states = [load_file(p) for p in scratch.rglob("latest_checkpoint.pt")]
            return any(s["step"] >= 1 and all(torch.isfinite(t).all() for t in s["model"].values()) for s in states)

        assert_outcome(world, code, err, trained)


@given(data=st.data())
@SETTINGS
def test_generate_with_bad_flags_and_files(world, capsys, data):
    resolve = Resolver(world, Path(world["root"]))
    generated = data.draw(argv_from(generate_parser(), RUN_OR_ANY), "flags")
    argv = [resolve(v) if flag == "--model_path" else v for flag, v in zip([""] + generated, generated)]
    if "--model_path" not in argv:
        argv += ["--model_path", str(world["run"])]
    stdin = data.draw(st.sampled_from(["", "\n\n", "Hello there\n", "a\nb\n", "\udcff\n", "x" * 300 + "\n"]), "stdin")
    code, out, err = call(generate_simple.main, ["--no-compile", "--max_tokens", "3", *argv], capsys,
                          cwd=world["root"], stdin_text=stdin)
    # A text for each prompt; --interactive says "error:" for a bad one and asks for the next.
    assert_outcome(world, code, err, lambda: out.strip() or "--interactive" in argv)


@given(data=st.data())
@SETTINGS
def test_export_with_bad_sources_and_targets(world, capsys, data):
    with scratch_folder(world) as (scratch, resolve):
        (scratch / "full").mkdir()
        (scratch / "full" / "keep.txt").write_text("mine")
        source = data.draw(st.one_of(RUN_OR_ANY.map(resolve), st.sampled_from(["", "-", "--force"])), "source")
        targets = {"new": scratch / "hf", "nested_new": scratch / "a" / "b", "full": scratch / "full",
                   "run": world["run"], "binary": world["paths"]["binary"],
                   "under_file": world["paths"]["under_file"], "empty": "", "dot_in_run": world["run"] / "."}
        target = str(targets[data.draw(st.sampled_from(sorted(targets)), "target")])
        extra = data.draw(st.lists(st.sampled_from(["--force", "--bogus", "--json", "extra"]), max_size=2), "extra")
        code, out, err = call(export.main, [source, target, *extra], capsys, cwd=scratch)

        def exported():  # the folder it names (the positionals may be drawn in another order), relative to scratch
            hf = scratch / out.split("exported to ", 1)[1].split(": LlamaForCausalLM", 1)[0]
            return (json.loads((hf / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
                    and (hf / export.WEIGHTS).stat().st_size > 0)

        assert_outcome(world, code, err, exported)
        assert (scratch / "full" / "keep.txt").read_text() == "mine"
        assert not list(scratch.rglob(".*export-*")) and not list(world["root"].rglob(".*export-*"))  # no debris


@given(data=st.data())
@SETTINGS
def test_info_on_bad_runs(world, capsys, data):
    resolve = Resolver(world, Path(world["root"]))
    run = data.draw(st.one_of(RUN_OR_ANY.map(resolve), st.sampled_from(["-", "--json"])), "run")
    extra = data.draw(st.lists(st.sampled_from(["--json", "--bogus", "extra"]), max_size=2), "extra")
    code, out, err = call(info.main, [run, *extra], capsys, cwd=world["root"])
    assert_outcome(world, code, err, lambda: isinstance(json.loads(out), dict) if "--json" in extra else out.strip())


@given(data=st.data())
@SETTINGS
def test_plot_on_bad_runs_and_outputs(world, capsys, data):
    with scratch_folder(world) as (scratch, resolve):
        run = data.draw(RUN_OR_ANY.map(lambda name: resolve(name, writable=True)), "run")
        outs = [None, str(scratch / "loss.png"), str(scratch / "plot.svg"), str(scratch / "missing" / "x.png"),
                str(scratch), str(world["paths"]["under_file"] / "x.png"), str(scratch / "x.bogus"),
                str(scratch / "noext"), "", str(world["run"] / "latest_checkpoint.pt")]
        out_file = data.draw(st.sampled_from(outs), "out")
        extra = data.draw(st.lists(st.sampled_from(["--log", "--bogus"]), max_size=2), "extra")
        argv = [run, *extra] + (["--out", out_file] if out_file is not None else [])
        code, out, err = call(plot.main, argv, capsys, cwd=scratch)
        assert_outcome(world, code, err, lambda: Path(out.strip()).is_file() and Path(out.strip()).stat().st_size > 0)
        assert not list(scratch.rglob(".*.tmp"))


@given(data=st.data())
@SETTINGS
def test_resume_with_generated_flags_is_refused_untouched_or_valid(world, capsys, data):
    """Generated flags against an existing run (a private copy of the finished one): the command is
    refused and the run folder is byte-identical (its lock aside, which names the last trainer that
    held it), or the resume is valid: the same run, tokenizer, tokens and model, trained on."""
    with scratch_folder(world) as (scratch, resolve):
        run = Path(resolve("run", writable=True))
        base = list(world["args"])
        base[base.index("--out") + 1] = str(run)
        base[base.index("--max_steps") + 1] = str(FINISHED_STEP + 1)
        generated = data.draw(argv_from(train_parser(), ANY_PATH, exclude=("out", "fresh")), "flags")
        argv = [resolve(v, writable=flag == "--data_dir") if flag in {f"--{n}" for n in PATH_FLAGS} else v
                for flag, v in zip([""] + generated, generated)]
        before = {n: d for n, d in snapshot(run).items() if not n.startswith(".lock")}
        original = load_file(world["run"] / "latest_checkpoint.pt")
        code, out, err = call(train_gpu_compatible.main, base + argv, capsys, cwd=scratch)
        if code != 0:
            assert code == 2 and "error: " in err, (code, err[-2000:])
            assert {n: d for n, d in snapshot(run).items() if not n.startswith(".lock")} == before
        else:
            state = load_file(run / "latest_checkpoint.pt")
            assert state["step"] >= FINISHED_STEP and state["run_id"] == original["run_id"]
            for key in ("tokenizer_fingerprint", "data_identity", "model_config"):
                assert state[key] == original[key], key
            assert (run / "tokenizer.json").read_bytes() == (world["run"] / "tokenizer.json").read_bytes()
        assert_untouched(world)
