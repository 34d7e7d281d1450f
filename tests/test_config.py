"""Config: presets, JSON round trip, generated flags, and refusal of bad values."""

import argparse
import dataclasses
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from l1 import config
from l1.config import DataConfig, ModelConfig, TrainConfig
from l1.errors import L1Error


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False, exit_on_error=False)
    config.add_config_flags(p)
    return p


def test_help_gives_each_presets_own_values(monkeypatch):
    """--help shows a field's default and every preset's value for it (the default preset sets lr,
    warmup and the MLP width, so the field defaults alone would be wrong for a plain run)."""
    monkeypatch.setenv("COLUMNS", "10000")  # no wrapping inside a help text
    lines, flag = {}, None
    for line in parser().format_help().splitlines():
        if line.startswith("  --"):
            flag = line.split()[0]
            lines[flag] = line
        elif flag and line.startswith("   "):  # the help text, below a long flag
            lines[flag] += " " + line.strip()
        else:
            flag = None
    checked = 0
    for preset, values in config.PRESETS.items():
        for name, value in [*((k, v) for k, v in values.items() if not isinstance(v, dict)),
                            *(item for v in values.values() if isinstance(v, dict) for item in v.items())]:
            assert f"{preset} {value}" in lines[f"--{name}"], name
            checked += 1
    assert checked >= 10
    assert "default: 0.0006; presets: l1-gpu-compatible 0.00045," in lines["--lr"]
    assert "presets" not in lines["--seed"]


@pytest.mark.parametrize("name", list(config.PRESETS))
def test_preset_json_round_trip_is_exact(name, tmp_path):
    cfg = config.resolve({"preset": name})
    path = tmp_path / "training_args.json"
    config.save_json(cfg.to_dict(), path)
    assert config.from_dict(json.loads(path.read_text())) == cfg
    model_path = tmp_path / "config.json"
    config.save_json(dataclasses.asdict(cfg.model), model_path)
    assert config.model_config_from_dict(json.loads(model_path.read_text())) == cfg.model


def test_presets_have_the_promised_shapes():
    flagship = config.resolve({"preset": "l1-gpu-compatible"}).model
    assert (flagship.n_layer, flagship.n_head, flagship.n_embd, flagship.vocab_size, flagship.block_size) == \
        (12, 16, 1024, 20000, 1024)
    legacy = config.resolve({"preset": "l1-v1"}).model
    assert (legacy.n_layer, legacy.n_head, legacy.n_embd, legacy.vocab_size) == (6, 8, 512, 1000)
    tiny = config.resolve({"preset": "tiny"})
    assert (tiny.model.n_layer, tiny.model.n_embd, tiny.optimizer, tiny.batch_size) == (4, 96, "muon", 16)
    # Muon needs whole matrices: the tiny preset under FSDP2 is refused, with AdamW it is not.
    with pytest.raises(L1Error, match="optimizer muon .*preset tiny's.* give --optimizer adamw"):
        config.resolve({"preset": "tiny", "fsdp": True})
    assert config.resolve({"preset": "tiny", "fsdp": True, "optimizer": "adamw"}).fsdp


def test_every_field_has_a_flag_with_help():
    p = parser()
    flags = {opt for action in p._actions for opt in action.option_strings}
    for cls in (TrainConfig, ModelConfig, DataConfig):
        for f in dataclasses.fields(cls):
            if f.name in ("model", "data", "origin") and cls is TrainConfig:  # sections (origin: no flag, set by --init_from)
                continue
            assert f"--{f.name}" in flags and f.metadata["help"]
    for promised in ("--preset", "--data", "--out", "--max_steps", "--max_minutes", "--batch_size", "--seq_len",
                     "--grad_accum", "--lr", "--save_every", "--keep", "--eval_every", "--seed", "--device",
                     "--compile", "--no-compile", "--amp", "--no-amp", "--grad_ckpt", "--no-grad_ckpt"):
        assert promised in flags, promised


def test_precedence_preset_then_stored_then_file_then_flags():
    stored = {"preset": "tiny", "lr": 0.1, "batch_size": 3, "model": {"n_layer": 3}}
    file_values = {"lr": 0.2, "model": {"n_head": 2}}
    cfg = config.resolve({"lr": 0.3}, stored, file_values)
    assert (cfg.lr, cfg.batch_size, cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd) == \
        (0.3, 3, 3, 2, config.PRESETS["tiny"]["model"]["n_embd"])


def test_model_knobs_have_flags_and_an_old_config_json_takes_their_defaults(tmp_path):
    args = parser().parse_args(["--no-tie_embeddings", "--mlp", "relu2", "--logit_softcap", "15"])
    assert config.overrides_from_args(args) == {"model": {"tie_embeddings": False, "mlp": "relu2",
                                                          "logit_softcap": 15.0}}
    with pytest.raises(L1Error, match="'logit_softcap' must be a finite float"):
        config.resolve(config.overrides_from_args(parser().parse_args(["--logit_softcap", "nan"])))
    with pytest.raises(L1Error, match="logit_softcap must be >= 0 and finite"):
        ModelConfig(logit_softcap=float("inf"))
    old = dataclasses.asdict(config.resolve({"preset": "tiny"}).model)
    for name in ("tie_embeddings", "mlp", "logit_softcap"):  # as written before these knobs
        del old[name]
    (tmp_path / "config.json").write_text(json.dumps(old))
    model = config.model_config_from_dict(config.load_json(tmp_path / "config.json"))
    assert (model.tie_embeddings, model.mlp, model.logit_softcap) == (True, "swiglu", 0.0)
    assert model == config.resolve({"preset": "tiny"}).model


def test_only_given_flags_override():
    args = parser().parse_args(["--lr", "0.01", "--no-amp", "--n_layer", "2", "--data", "corpus.txt"])
    assert config.overrides_from_args(args) == {"lr": 0.01, "amp": False, "model": {"n_layer": 2},
                                                "data": {"data": "corpus.txt"}}


@pytest.mark.parametrize("values, message", [
    ({"preset": "nope"}, "unknown preset"),
    ({"lr": "fast"}, "must be a finite float"),
    ({"lr": float("inf")}, "must be a finite float"),
    ({"batch_size": -1}, "batch_size must be >= 0"),
    ({"batch_size": 2.5}, "must be int"),
    ({"colour": 1}, "unknown config field"),
    ({"model": {"n_head": 5}}, "heads"),
    ({"model": {"depth": 5}}, "unknown model field"),
    ({"seq_len": 4096}, "exceeds the model's block_size"),
    ({"data": {"val_fraction": 0.9}}, "val_fraction"),
    ({"beta2": 1.0}, "beta2"),
    ({"max_steps": 0}, "needs a time budget"),
    ({"early_stop": -1}, "early_stop must be >= 0"),
    ({"model": {"mlp": "gelu"}}, "mlp must be one of swiglu, relu2, got 'gelu'"),
    ({"model": {"logit_softcap": -1.0}}, "logit_softcap must be >= 0"),
    ({"model": {"tie_embeddings": "no"}}, "must be bool"),
])
def test_bad_values_are_refused_in_one_line(values, message):
    with pytest.raises(L1Error, match=message) as err:
        config.resolve(values)
    assert "\n" not in str(err.value)


NAMES = st.sampled_from(["lr", "batch_size", "max_steps", "n_layer", "seed", "val_fraction", "keep", "grad_clip"])
VALUES = st.one_of(st.integers(-5, 5000), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
                   st.booleans(), st.none())


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(NAMES, VALUES, max_size=4))
def test_any_config_values_give_a_config_or_a_clear_error(values):
    overrides = {}
    for key, value in values.items():
        section = "model" if key == "n_layer" else "data" if key == "val_fraction" else None
        (overrides.setdefault(section, {}) if section else overrides)[key] = value
    try:
        cfg = config.resolve(overrides)
    except L1Error as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    assert config.from_dict(cfg.to_dict()) == cfg


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["--lr", "--batch_size", "--n_layer", "--compile", "--no-amp", "--preset",
                                  "--max_minutes", "x", "-1", "0.5", "tiny", "1e-3", "nan", "--bogus"]), max_size=6))
def test_any_command_line_parses_or_fails_cleanly(argv):
    try:
        args = parser().parse_args(argv)
    except (argparse.ArgumentError, SystemExit):
        return
    try:
        config.resolve(config.overrides_from_args(args))
    except L1Error as exc:
        assert "\n" not in str(exc)


def test_a_time_budget_sets_the_length_unless_max_steps_is_given():
    assert config.resolve({"preset": "tiny", "max_minutes": 5}).max_steps == 0
    assert config.resolve({"preset": "tiny", "max_minutes": 5, "max_steps": 900}).max_steps == 900
    assert config.resolve({"preset": "tiny", "max_minutes": 5}, file_values={"max_steps": 700}).max_steps == 700
    stored = config.resolve({"preset": "tiny"}).to_dict()  # a resumed run keeps its own step count
    assert config.resolve({"max_minutes": 5}, stored).max_steps == 800
    assert config.resolve({"preset": "tiny"}).max_steps == 800
