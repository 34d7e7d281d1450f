"""Fine-tuning: a new run that starts from trained weights (--init_from) instead of random ones.

The source is an L1 run folder (its best, else latest checkpoint), a checkpoint file, or a Hugging
Face LlamaForCausalLM folder (safetensors + tokenizer.json), read through the same loader as
sampling (checkpoint.load_run) or l1/hf.py's map. The new run takes the source's model shape and
tokenizer (with the chat template's tokens added when its data is chat: l1/chat.py); its optimizer
starts fresh and its schedule, lr and data are its own flags, with fine-tuning defaults.

Where it came from is fixed at the run's first start in its config's `origin` section, so it is in
training_args.json and in every checkpoint (train_config); the log says it and l1.info shows it.
From its first checkpoint on, a fine-tune run resumes like any run: the source is read again only
while no checkpoint exists, and must then be unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from l1 import chat, checkpoint, config, data
from l1.config import ModelConfig, Origin, TrainConfig
from l1.errors import L1Error
from l1.tokenizer import EOT, Tokenizer

# Fine-tuning defaults, where the command and --config leave them out. lr: a tenth of the source's
# peak (nanoGPT's Shakespeare fine-tune of GPT-2 takes a twentieth, nanochat's SFT a fiftieth, litgpt's
# full fine-tune ~3e-5 for models pretrained at ~3e-4): the source is at a minimum that a full
# pretraining lr would shake it out of. Warmup: 5% of the steps, since the optimizer starts cold.
LR_FRACTION = 0.1
WARMUP_FRACTION = 0.05
# Model fields that only act in training: a fine-tune run may set them (the shape it may not).
TRAINING_ONLY = ("dropout", "init_std")


@dataclass
class Source:
    """A source's facts that decide the new run's config; its weights are read by initialize()."""

    path: Path  # the checkpoint file or Hugging Face folder
    kind: str  # "l1" or "hf"
    model: ModelConfig
    tokenizer: Tokenizer
    step: int
    weights: str  # content hash of the weights
    train_config: dict  # the source run's own (empty for a Hugging Face folder)


def _is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def _hf_config(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise L1Error(f"cannot read {folder / 'config.json'}: {exc}") from None


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    return sorted(folder.glob("*.safetensors"))


def _files_digest(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def _hf_tokenizer(folder: Path) -> Tokenizer:
    """The folder's tokenizer.json, which L1's sampler can decode: a byte-level BPE with <|endoftext|>."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise L1Error(f"{folder} has no tokenizer.json (a fast tokenizer): L1 cannot tokenize for it")
    content = path.read_text(encoding="utf-8")
    decoder = (json.loads(content).get("decoder") or {}).get("type")
    if decoder != "ByteLevel" or f'"{EOT}"' not in content:
        raise L1Error(f"{path} is not a byte-level BPE with an {EOT} token (decoder {decoder!r}); L1 fine-tunes "
                      "Llamas with such a tokenizer (GPT-2's kind, as L1's own export writes)")
    return Tokenizer.load(path)


def find_source(init_from: str) -> Source:
    """What --init_from names, checked and described without reading its weights in full (a
    checkpoint is memory-mapped, its stored checksum taken as its hash)."""
    path = Path(init_from).expanduser()
    if not path.exists():
        raise L1Error(f"--init_from {init_from} does not exist (expected an L1 run folder, a checkpoint .pt, "
                      "or a Hugging Face Llama folder)")
    if _is_hf_folder(path) and not any(path.glob("*.pt")):
        folder = path.resolve()
        model = _hf_model_config(folder)
        return Source(folder, "hf", model, _hf_tokenizer(folder), 0, _files_digest(_safetensors_files(folder)), {})
    try:
        file = checkpoint.find_for_inference(str(path))[0].resolve()
    except checkpoint.CheckpointError as exc:
        raise L1Error(f"--init_from {init_from}: {exc}") from None
    state = checkpoint.peek(file) or {}
    if not isinstance(state.get("model_config"), dict) or not isinstance(state.get("checksum"), str):
        raise L1Error(f"--init_from {file} is not an L1 model checkpoint")
    tokenizer = Tokenizer.load(file.parent / "tokenizer.json")
    if tokenizer.fingerprint != state.get("tokenizer_fingerprint"):
        raise L1Error(f"{file.parent / 'tokenizer.json'} is not the tokenizer {file.name} was trained with; "
                      "restore the run's own tokenizer.json")
    model = config.model_config_from_dict(state["model_config"], origin=str(file))
    train_config = state.get("train_config") if isinstance(state.get("train_config"), dict) else {}
    return Source(file, "l1", model, tokenizer, int(state.get("step", 0)), state["checksum"][:16], train_config)


def _hf_model_config(folder: Path) -> ModelConfig:
    from l1.hf import llama_model_config

    return llama_model_config(_hf_config(folder), str(folder))


def start_tokenizer(cfg: TrainConfig) -> Tokenizer | None:
    """The tokenizer a fine-tune run starts with (None for a run from scratch): its source's, with
    the chat template's tokens where its data is chat."""
    if not cfg.origin.source:
        return None
    source = find_source(cfg.origin.source)
    return chat.with_chat_tokens(source.tokenizer) if cfg.origin.chat else source.tokenizer


def resolve(overrides: dict, stored: dict | None, file_values: dict, out: Path) -> TrainConfig:
    """config.resolve, for fine-tune runs too: at a fine-tune run's first start, its model is the
    source's and its lr, warmup and optimizer default to fine-tuning values; on resume its origin
    stays what it was."""
    asked = overrides.get("init_from") or file_values.get("init_from")
    if stored:
        origin = (stored.get("origin") or {}).get("source")
        if asked and not origin:
            raise L1Error(f"{out} is a run that did not start from --init_from; a fine-tune is a new run: "
                          "give another --out (or --fresh to move this one aside)")
        if asked and asked != stored.get("init_from") and str(find_source(asked).path) != origin:
            raise L1Error(f"{out} was initialized from {origin}; --init_from {asked} cannot change that on resume: "
                          "leave --init_from out to resume, or give another --out (or --fresh)")
        return config.resolve(overrides, stored, file_values)
    if not asked:
        return config.resolve(overrides, None, file_values)
    source = find_source(asked)
    _refuse_contradictions(source, overrides, file_values)
    given = config.resolve(overrides, None, file_values)  # the preset, file and flags: data, steps, ...
    is_chat = data.chat_source(given.data)
    tokenizer = chat.with_chat_tokens(source.tokenizer) if is_chat else source.tokenizer
    model = dataclasses.replace(source.model, vocab_size=max(source.model.vocab_size, tokenizer.vocab_size))
    user = config.merge(file_values, overrides)
    base = {"model": {**dataclasses.asdict(model), **{k: v for k, v in user.get("model", {}).items()
                                                       if k in TRAINING_ONLY}}}
    source_lr = source.train_config.get("lr")
    base["lr"] = (source_lr if isinstance(source_lr, (int, float)) else given.lr) * LR_FRACTION
    if source.train_config.get("optimizer") in ("adamw", "muon"):
        base["optimizer"] = source.train_config["optimizer"]
    if given.max_steps:
        base["warmup_steps"] = max(1, round(WARMUP_FRACTION * given.max_steps))
    base["origin"] = dataclasses.asdict(Origin(source=str(source.path), kind=source.kind, step=source.step,
                                               weights=source.weights,
                                               tokenizer_fingerprint=source.tokenizer.fingerprint, chat=is_chat))
    base["init_from"] = str(source.path)
    if is_chat:
        base["data"] = {"text_column": data.CHAT_COLUMN}
    return config.resolve(overrides, base, file_values)


def _refuse_contradictions(source: Source, overrides: dict, file_values: dict) -> None:
    """Refuse, in one line, flags that would give the run another shape or tokenizer than its source's."""
    theirs = dataclasses.asdict(source.model)
    for values in (overrides, file_values):
        for key, value in values.get("model", {}).items():
            if key not in TRAINING_ONLY and value != theirs[key]:
                raise L1Error(f"--{key} {value} contradicts the source's {key} {theirs[key]} ({source.path}): a "
                              f"fine-tune run takes its source's shape; leave --{key} out")
        if values.get("data", {}).get("tokenizer"):
            raise L1Error("--tokenizer contradicts --init_from: a fine-tune run takes its source's tokenizer; "
                          "leave --tokenizer out")


def describe(origin: Origin) -> str:
    """The origin in one line, for the log and l1.info."""
    step = f" step {origin.step}," if origin.kind == "l1" else ""
    added = ", chat template tokens added" if origin.chat else ""
    return (f"{origin.source} ({'L1 checkpoint' if origin.kind == 'l1' else 'Hugging Face Llama'},{step} weights "
            f"{origin.weights}, tokenizer {origin.tokenizer_fingerprint}{added})")


def start(model: torch.nn.Module, cfg: TrainConfig, tokenizer: Tokenizer, first: bool, log) -> None:
    """The trainer's hook for a fine-tune run, before the model is wrapped: at its first start
    (no checkpoint yet), the source's weights into `model`; on resume only the log line (the
    checkpoint holds the weights)."""
    if not cfg.origin.source:
        return
    if not first:
        log(f"fine-tune run: initialized from {describe(cfg.origin)} at its first start")
        return
    source = find_source(cfg.origin.source)
    if source.weights != cfg.origin.weights:
        raise L1Error(f"{cfg.origin.source} has changed since this run started from it (weights {source.weights}, "
                      f"then {cfg.origin.weights}) and the run has no checkpoint yet: restore it, or start over "
                      "with --fresh")
    weights = _weights(source, cfg.model)
    added = list(chat.token_ids(tokenizer).values()) if cfg.origin.chat else []
    state = _resized(weights, source, cfg.model, added)
    model.load_state_dict(state)
    log(f"fine-tune run: initialized from {describe(cfg.origin)}; optimizer fresh"
        + (f"; {len(added)} chat template token rows set to the mean embedding" if added else ""))


def _weights(source: Source, model: ModelConfig) -> dict[str, torch.Tensor]:
    """The source's weights in L1's names, verified (an L1 checkpoint through checkpoint.load_run)."""
    if source.kind == "l1":
        return checkpoint.load_run(str(source.path)).state["model"]  # verified by checksum and content
    from safetensors.torch import load_file

    from l1.hf import from_llama_state_dict

    llama: dict[str, torch.Tensor] = {}
    for path in _safetensors_files(source.path):
        llama.update(load_file(path))
    return from_llama_state_dict({k: v.float() for k, v in llama.items()}, source.model)


def _resized(weights: dict, source: Source, model: ModelConfig, added: list[int]) -> dict:
    """The source's weights at the new run's vocabulary: its rows kept, rows past them zero, and
    the rows of tokens added to its tokenizer set to the mean of its tokens' rows (what
    transformers' resize_token_embeddings does: a new token starts as an average one)."""
    rows = model.padded_vocab_size
    used = source.tokenizer.vocab_size
    out = dict(weights)
    names = ["embed.weight"] + ([] if model.tie_embeddings else ["lm_head.weight"])
    for name in names:
        old = weights[name]
        new = old.new_zeros((rows, old.shape[1]))
        new[:min(rows, len(old))] = old[:rows]
        if added:
            new[added] = old[:used].mean(dim=0)
        out[name] = new
    if model.tie_embeddings:
        out["lm_head.weight"] = out["embed.weight"]
    return out
