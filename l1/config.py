"""Configuration as plain dataclasses: named presets, JSON round trip, CLI flags built from the fields.

Each knob is defined once, here: its name is its flag, its default is the dataclass default and
its help is the field's metadata. A preset is a small dict of values that differ from those
defaults; a JSON file and command-line flags override the preset, in that order.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

from l1 import files
from l1.errors import L1Error

MIN_VOCAB = 257  # a byte-level BPE: 256 byte symbols + the end-of-text token
MAX_VOCAB = 2 ** 24  # the BPE trainer reserves ~66 bytes per entry up front (2**32 failed to allocate 280 GB)
MAX_PARAMS = 2 ** 40  # 1.1 trillion: beyond it no machine holds the weights, and shapes near int64's end overflow
MAX_PAD_VOCAB = 2 ** 16  # a multiple for the matmuls' tiles (64-256 in practice); beyond, it only adds rows
MAX_BLOCK_SIZE = 2 ** 20  # the rotary tables and the decoding cache are allocated for the whole context
MAX_MINUTES = 10 ** 7  # 19 years; in seconds (x 60) and durations, larger budgets overflow
MAX_FLOAT = 1e30  # torch turns float knobs into float32 (3.4e38 at most) and multiplies some (lr x Muon's scale)
INT64 = 2 ** 63  # whole numbers go to torch, numpy and itertools as int64 (seeds, counts, shapes)
MLP_KINDS = {"swiglu": 3, "relu2": 2}  # each kind's matrices of hidden x n_embd


def knob(default, help: str, auto: bool = False):
    """A dataclass field whose help text becomes the help of its command-line flag.

    auto=True lets the flag take the word 'auto', stored as 0.
    """
    return field(default=default, metadata={"help": help, "auto": auto})


def _int_or_auto(text: str) -> int:
    if text == "auto":
        return 0
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or 'auto', got {text!r}") from None


@dataclass
class ModelConfig:
    """The architecture of the GPT; saved as the run's config.json."""

    vocab_size: int = knob(20000, "tokenizer vocabulary size, special tokens included")
    n_layer: int = knob(12, "number of transformer blocks")
    n_head: int = knob(16, "attention heads per block")
    n_embd: int = knob(1024, "model width")
    block_size: int = knob(1024, "longest context (in tokens) the model is trained for")
    intermediate_size: int = knob(0, "MLP hidden width; 0 = automatic: 8/3 x n_embd rounded up to 256 for "
                                     "swiglu, 4 x n_embd for relu2")
    rope_theta: float = knob(10000.0, "RoPE base frequency")
    norm_eps: float = knob(1e-5, "RMSNorm epsilon")
    init_std: float = knob(0.02, "std of the normal init; residual projections are scaled down")
    pad_vocab_to: int = knob(64, "embedding rows are padded to a multiple of this for fast matmuls")
    qk_norm: bool = knob(False, "RMSNorm each head's queries and keys before RoPE (as in OLMo 2 and Qwen3), "
                                "which bounds the attention logits")
    dropout: float = knob(0.0, "in training, drop this fraction of each residual branch's output (attention "
                               "and MLP), against overfitting data repeated over many epochs (0 = off)")
    tie_embeddings: bool = knob(True, "the output head shares the input embedding's matrix (--no-tie_embeddings: "
                                      "a head of its own, as many parameters again)")
    mlp: str = knob("swiglu", "MLP kind: swiglu (three matrices, as in Llama) or relu2 (down(relu(up(x))^2), "
                              "two matrices, as in Primer and modded-nanogpt)")
    logit_softcap: float = knob(0.0, "bound the logits smoothly to (-C, C): C x tanh(logits / C), in training "
                                     "and sampling alike (Gemma 2; modded-nanogpt uses 15-30; 0 = off)")

    def __post_init__(self):
        _require_positive(self, "vocab_size", "n_layer", "n_head", "n_embd", "block_size",
                          "rope_theta", "norm_eps", "init_std", "pad_vocab_to")
        if self.vocab_size < MIN_VOCAB:
            raise L1Error(f"vocab_size must be at least {MIN_VOCAB} for a byte-level BPE (256 bytes + end-of-text), "
                          f"got {self.vocab_size}")
        _require_at_most(self, vocab_size=MAX_VOCAB, block_size=MAX_BLOCK_SIZE, pad_vocab_to=MAX_PAD_VOCAB)
        if not 0.0 <= self.dropout < 1.0:
            raise L1Error(f"dropout must be in [0, 1), got {self.dropout}")
        if self.mlp not in MLP_KINDS:
            raise L1Error(f"mlp must be one of {', '.join(MLP_KINDS)}, got {self.mlp!r}")
        if not (0.0 <= self.logit_softcap < float("inf")):
            raise L1Error(f"logit_softcap must be >= 0 and finite (0 = off), got {self.logit_softcap}")
        if self.intermediate_size < 0:
            raise L1Error(f"intermediate_size must be >= 0 (0 = automatic), got {self.intermediate_size}")
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise L1Error(f"n_embd ({self.n_embd}) must split into n_head ({self.n_head}) heads "
                          "of even width (RoPE rotates pairs)")
        _require_representable(self)  # before the parameter count's arithmetic
        if self.num_params > MAX_PARAMS:
            raise L1Error(f"the model would have {self.num_params:.3g} parameters, more than the {MAX_PARAMS:.3g} "
                          "L1 can hold: lower --n_layer, --n_embd, --intermediate_size or --vocab_size")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_hidden(self) -> int:
        """The MLP's hidden width. Automatic: SwiGLU's three matrices of 8/3 x width cost about what
        two of 4 x width do, which is ReLU^2's (and GPT-2's GELU's) width."""
        if self.intermediate_size:
            return self.intermediate_size
        if self.mlp == "relu2":
            return 4 * self.n_embd
        return 256 * math.ceil(8 * self.n_embd / 3 / 256)

    @property
    def mlp_matrices(self) -> int:
        """Matrices of mlp_hidden x n_embd in one block's MLP (SwiGLU's gate, up and down; ReLU^2's up and down)."""
        return MLP_KINDS[self.mlp]

    @property
    def padded_vocab_size(self) -> int:
        return self.pad_vocab_to * math.ceil(self.vocab_size / self.pad_vocab_to)

    @property
    def num_params(self) -> int:
        """Exact parameters of l1.model.GPT of this shape, by arithmetic (no torch): a tied
        embedding once, no biases; a test holds it to the built model's count."""
        d, hidden = self.n_embd, self.mlp_hidden
        norms = 2 * d + (2 * self.head_dim if self.qk_norm else 0)  # block norms (+ query/key norms)
        block = norms + 4 * d * d + self.mlp_matrices * d * hidden  # qkv + proj, the MLP's matrices
        return self._vocab_matrices * self.padded_vocab_size * d + self.n_layer * block + d  # + the final norm

    @property
    def num_params_unpadded(self) -> int:
        """num_params without the embedding (and untied head) rows padded on past the vocabulary."""
        return self.num_params - self._vocab_matrices * (self.padded_vocab_size - self.vocab_size) * self.n_embd

    @property
    def _vocab_matrices(self) -> int:
        """The embedding, and the output head where it is not tied to it."""
        return 1 if self.tie_embeddings else 2


@dataclass
class DataConfig:
    """Where the text comes from and how it is prepared into token files."""

    data: str = knob("hub", "'hub' (Simple English Wikipedia from the Hugging Face hub) or a local "
                            ".parquet/.jsonl/.txt file or folder of them")
    hub_dataset: str = knob("wikimedia/wikipedia", "hub dataset used when --data is 'hub'")
    hub_config: str = knob("20231101.simple", "configuration of the hub dataset")
    hub_split: str = knob("train", "split of the hub dataset")
    text_column: str = knob("text", "column (parquet, hub) or field (jsonl) holding the text")
    data_dir: str = knob("data", "folder where prepared corpora (token files + meta.json) are kept")
    val_fraction: float = knob(0.01, "fraction of documents held out for validation")
    tokenizer: str = knob("", "reuse this tokenizer.json instead of training one on the corpus")
    max_docs: int = knob(0, "use only the first N documents of the source (0 = all)")
    tokenizer_sample_mb: float = knob(256.0, "train the tokenizer on the first N MB of the training documents "
                                             "(all of a smaller corpus)")
    shard_tokens: int = knob(2 ** 25, "tokens per prepared shard file (the unit of resuming a killed preparation)")

    def __post_init__(self):
        if not 0.0 < self.val_fraction < 0.5:
            raise L1Error(f"val_fraction must be in (0, 0.5), got {self.val_fraction}")
        if self.max_docs < 0:
            raise L1Error(f"max_docs must be >= 0 (0 = all), got {self.max_docs}")
        if not self.data.strip():
            raise L1Error("--data is empty: give 'hub' or a file or folder of text")
        _require_positive(self, "tokenizer_sample_mb", "shard_tokens")
        _require_representable(self)


@dataclass
class Origin:
    """Where a fine-tune run's weights came from, fixed at its first start (empty for a run from
    scratch): no flag sets it; l1/finetune.py fills it from --init_from."""

    source: str = ""  # the absolute path of the checkpoint file or Hugging Face folder read
    kind: str = ""  # "l1" (a checkpoint) or "hf" (a Hugging Face Llama folder)
    step: int = 0  # the source checkpoint's step (0 for a Hugging Face folder)
    weights: str = ""  # a content hash of the source's weights
    tokenizer_fingerprint: str = ""  # the source's tokenizer
    chat: bool = False  # the chat template's tokens were added to it (chat data)


@dataclass
class TrainConfig:
    """Everything a training run needs; saved as the run's training_args.json."""

    preset: str = knob("l1-gpu-compatible", "named preset to start from")
    out: str = knob("", "run folder (default: models/<preset>)")
    max_steps: int = knob(5000, "total optimizer steps of the run (a resumed run stops at the same step); "
                                "with --max_minutes an upper bound, 0 = none (the default there unless "
                                "given: the budget sets the length)")
    max_minutes: float = knob(0.0, "time budget of the run's training loop in minutes, summed over resumed "
                                   "sessions: the lr schedule follows the elapsed time, so the run ends at the "
                                   "deadline fully decayed (0 = no budget: the schedule follows the steps)")
    early_stop: int = knob(0, "stop when the validation loss has not improved for N evaluations in a row "
                              "(0 = never; the log notes every evaluation without improvement)")
    batch_size: int = knob(8, "sequences per micro-batch; auto (or 0) = the largest that fits the GPU, "
                              "found by a short probe (CUDA only)", auto=True)
    seq_len: int = knob(0, "tokens per training sequence (0 = the model's block_size)")
    grad_accum: int = knob(8, "micro-batches accumulated per optimizer step")
    lr: float = knob(6e-4, "peak learning rate")
    min_lr_ratio: float = knob(0.0, "learning-rate floor at the end of the schedule, as a fraction of --lr")
    warmup_steps: int = knob(200, "linear warmup steps")
    schedule: str = knob("wsd", "after warmup: wsd (constant, then a linear decay to the floor over the "
                                "last decay_fraction of the steps; see RECIPE.md) or cosine (decay to the floor)")
    decay_fraction: float = knob(0.2, "wsd: fraction of the steps spent decaying")
    optimizer: str = knob("adamw", "adamw, or muon (Muon for the blocks' matrices, AdamW for the rest)")
    weight_decay: float = knob(0.1, "AdamW weight decay (matrices only)")
    beta1: float = knob(0.9, "AdamW beta1")
    beta2: float = knob(0.95, "AdamW beta2")
    grad_clip: float = knob(1.0, "clip the global gradient norm to this (0 = off)")
    z_loss: float = knob(0.0, "weight of the z-loss, mean(logsumexp(logits)^2), added to the training loss "
                              "to keep the softmax normalizer near 1 (PaLM: 1e-4; 0 = off)")
    save_every: int = knob(100, "write a rolling checkpoint every N steps")
    keep: int = knob(5, "rolling checkpoints to keep")
    eval_every: int = knob(250, "evaluate on the validation split every N steps")
    eval_batches: int = knob(20, "micro-batches per evaluation")
    log_every: int = knob(10, "write a training.log line every N steps")
    seed: int = knob(1337, "seed for initialization and data order")
    device: str = knob("auto", "auto (cuda, then mps, then cpu), cuda, cuda:N, mps or cpu")
    compile: typing.Optional[bool] = knob(None, "torch.compile the model (default: on for CUDA; on CPU for runs "
                                                    "expected to last over 10 minutes)")
    amp: typing.Optional[bool] = knob(None, "mixed precision: bf16 autocast, or fp16 with loss scaling where "
                                            "bf16 is missing (default: on for GPUs and CPUs with native bf16)")
    grad_ckpt: bool = knob(False, "recompute each block in the backward pass to save activation memory")
    deterministic: bool = knob(False, "CUDA: deterministic kernels, so a resumed run matches an uninterrupted "
                                      "one bit for bit (slower; CPU runs are deterministic anyway)")
    fsdp: bool = knob(False, "under torchrun: shard parameters, gradients and optimizer state with FSDP2 "
                             "instead of replicating them with DDP")
    max_bad_steps: int = knob(5, "stop after this many non-finite steps in a row")
    tensorboard: bool = knob(False, "also write the metrics for TensorBoard (run folder's tensorboard/; "
                                    "needs pip install tensorboard)")
    init_from: str = knob("", "fine-tune: start from trained weights instead of random ones: an L1 run folder "
                              "(its best, else latest checkpoint), a checkpoint .pt, or a Hugging Face Llama folder; "
                              "the run takes its shape and tokenizer, its optimizer starts fresh, and lr and warmup "
                              "default to fine-tuning values (README, 'Fine-tuning')")
    assistant_only_loss: bool = knob(True, "chat data: the loss counts only the assistant's tokens and the token "
                                           "that ends each of its turns (--no-assistant_only_loss: every token)")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    origin: Origin = field(default_factory=Origin)

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise L1Error(f"unknown preset {self.preset!r}; choose one of: {', '.join(PRESETS)}")
        _require_seed(self.seed)
        _require_positive(self, "grad_accum", "lr", "save_every", "keep",
                          "eval_every", "eval_batches", "log_every", "max_bad_steps")
        _require_non_negative(self, "max_steps", "max_minutes", "batch_size", "seq_len", "warmup_steps",
                              "weight_decay", "grad_clip", "min_lr_ratio", "z_loss", "early_stop")
        _require_at_most(self, max_minutes=MAX_MINUTES)
        if not self.max_steps and not self.max_minutes:
            raise L1Error("max_steps 0 (no step limit) needs a time budget: give --max_minutes, or max_steps > 0")
        if self.seq_len > self.model.block_size:
            raise L1Error(f"--seq_len {self.seq_len} exceeds the model's block_size ({self.model.block_size}), the "
                          "longest context it has: give a --seq_len up to that (0 = block_size); a run's block_size "
                          "is fixed, so a longer context needs a new run (another --out, or --fresh)")
        if self.schedule not in ("cosine", "wsd"):
            raise L1Error(f"schedule must be cosine or wsd, got {self.schedule!r}")
        if self.optimizer not in ("adamw", "muon"):
            raise L1Error(f"optimizer must be adamw or muon, got {self.optimizer!r}")
        if not 0 < self.decay_fraction <= 1:
            raise L1Error(f"decay_fraction must be in (0, 1], got {self.decay_fraction}")
        for beta in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, beta) < 1.0:
                raise L1Error(f"{beta} must be in [0, 1), got {getattr(self, beta)}")
        if self.optimizer == "muon" and self.fsdp:
            raise L1Error(f"optimizer muon (--optimizer, or preset {self.preset}'s) does not work with --fsdp "
                          "(it needs whole matrices): give --optimizer adamw, or leave out --fsdp to use DDP")
        _require_representable(self)

    @property
    def context(self) -> int:
        """Tokens per training sequence."""
        return self.seq_len or self.model.block_size

    @property
    def run_dir(self) -> Path:
        return Path(self.out or f"models/{self.preset}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class SamplingConfig:
    """How generate_simple.py samples; each field is one of its flags."""

    max_tokens: int = knob(50, "tokens to generate per prompt")
    temperature: float = knob(0.8, "softmax temperature; 0 = greedy (always the most likely token)")
    top_k: int = knob(50, "sample among the k most likely tokens (0 = all)")
    top_p: float = knob(1.0, "nucleus sampling: the smallest set of tokens with this much probability (1 = all)")
    repetition_penalty: float = knob(1.0, "divide the logits of tokens already in the text by this (1 = off)")
    num_samples: int = knob(1, "samples per prompt")
    seed: int = knob(1234, "random seed: the same seed gives the same text")

    def __post_init__(self):
        _require_seed(self.seed)
        if not 0 < self.max_tokens <= 100_000:
            raise L1Error(f"--max_tokens must be between 1 and 100000, got {self.max_tokens}")
        if not self.temperature >= 0 or not math.isfinite(self.temperature):
            raise L1Error(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise L1Error(f"--top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise L1Error(f"--top_p must be in (0, 1], got {self.top_p}")
        if not 0 < self.repetition_penalty < float("inf"):
            raise L1Error(f"--repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if not 1 <= self.num_samples <= 1000:
            raise L1Error(f"--num_samples must be between 1 and 1000, got {self.num_samples}")
        _require_representable(self)


# Presets are data: only what differs from the dataclass defaults.
PRESETS: dict[str, dict] = {
    # The flagship for one 16 GB GPU: 12 x 1024, 16 heads, 20k BPE, context 1024.
    # A 2304-wide SwiGLU (2.25 x n_embd, a multiple of 256) gives the original's 155.8M parameters.
    # lr: the textbook 6e-4 at width 768 scaled as 1/width, which the replica study found at the
    # optimum (twice it costs 10%; RECIPE.md). Warmup over 10% of the steps: 4% cost the replica 1.1%.
    "l1-gpu-compatible": {"model": {"intermediate_size": 2304}, "lr": 4.5e-4, "warmup_steps": 500},
    # The small legacy model.
    "l1-v1": {
        "model": {"vocab_size": 1000, "n_layer": 6, "n_head": 8, "n_embd": 512, "block_size": 512},
        "batch_size": 16, "grad_accum": 4, "lr": 1e-3, "max_steps": 3000,
    },
    # Learns recognizable English in minutes on 2 CPU cores. Sized to a 5-minute CPU budget (RECIPE.md,
    # section 2): 4 x 96 sees ~7 tokens per parameter there (the earlier 4 x 256: 0.4), Muon at
    # micro-batch 16 spreads its Newton-Schulz iterations over enough tokens, lr by the width rule
    # (6e-4 x 768 / width).
    "tiny": {
        "model": {"vocab_size": 4096, "n_layer": 4, "n_head": 4, "n_embd": 96, "block_size": 256},
        "optimizer": "muon", "batch_size": 16, "grad_accum": 1, "lr": 4.8e-3, "max_steps": 800, "warmup_steps": 80,
        "eval_every": 200, "eval_batches": 20,
    },
}

_SECTIONS = {"model": ModelConfig, "data": DataConfig, "origin": Origin}


def _require_seed(seed: int) -> None:
    """Seeds feed torch's and numpy's generators: both take 0 <= seed < 2**63."""
    if not 0 <= seed < 2 ** 63:
        raise L1Error(f"--seed must be between 0 and 2**63 - 1, got {seed}")


def _require_representable(cfg) -> None:
    """Every number of a config can go where it is used: floats finite (a flag may say 'inf' or 'nan') and
    within float32's range with room for the products torch makes of them (the lr scaled by an optimizer),
    whole numbers below int64's end (torch's and numpy's; a flag or a JSON file may hold any integer)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not abs(value) <= MAX_FLOAT:  # nan fails the comparison too
            raise L1Error(f"{f.name} must be a finite number at most {MAX_FLOAT:g} in size, got {value}")
        if isinstance(value, int) and not isinstance(value, bool) and value >= INT64:  # negatives: each knob's own check
            raise L1Error(f"{f.name} must be at most 2**63 - 1, got {value}")


def _require_at_most(cfg, **limits) -> None:
    for name, limit in limits.items():
        if getattr(cfg, name) > limit:
            raise L1Error(f"{name} must be at most {limit:,}, got {getattr(cfg, name):,}")


def _require_positive(cfg, *names):
    for name in names:
        if not getattr(cfg, name) > 0:
            raise L1Error(f"{name} must be > 0, got {getattr(cfg, name)}")


def _require_non_negative(cfg, *names):
    for name in names:
        if not getattr(cfg, name) >= 0:
            raise L1Error(f"{name} must be >= 0, got {getattr(cfg, name)}")


def _field_types(cls) -> dict[str, typing.Any]:
    return typing.get_type_hints(cls)


def _check_value(name: str, value, kind):
    """Type-check one JSON value against its field's annotation (ints are accepted as floats)."""
    if kind == typing.Optional[bool]:
        ok = value is None or isinstance(value, bool)
    elif kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        # Finite (inf and nan fail the comparison), and an integer within float's range.
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) <= sys.float_info.max
        value = float(value) if ok else value
    else:
        ok = isinstance(value, kind)
    if not ok:
        kind_name = "a finite float" if kind is float else getattr(kind, "__name__", kind)
        raise L1Error(f"config field {name!r} must be {kind_name}, got {value!r}")
    return value


def merge(base: dict, update: dict) -> dict:
    """Nested dict update: sections (model, data) merge field by field."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for key, value in update.items():
        if key in _SECTIONS and isinstance(value, dict):
            if not isinstance(out.get(key, {}), dict):  # e.g. a --config file's "model": 5
                raise L1Error(f"config {key!r} must be an object of fields, got {out[key]!r}")
            out[key] = {**out.get(key, {}), **value}
        else:
            out[key] = value
    return out


def from_dict(values: dict, origin: str = "config") -> TrainConfig:
    """Build a validated TrainConfig from a (possibly partial) nested dict; unknown keys are refused."""
    kinds = _field_types(TrainConfig)
    top = {}
    for key, value in values.items():
        if key in _SECTIONS:
            if not isinstance(value, dict):
                raise L1Error(f"{origin}: {key!r} must be an object of fields")
            section_kinds = _field_types(_SECTIONS[key])
            for sub in value:
                if sub not in section_kinds:
                    raise L1Error(f"{origin}: unknown {key} field {sub!r}")
            top[key] = _SECTIONS[key](**{k: _check_value(k, v, section_kinds[k]) for k, v in value.items()})
        elif key in kinds:
            top[key] = _check_value(key, value, kinds[key])
        else:
            raise L1Error(f"{origin}: unknown config field {key!r}")
    return TrainConfig(**top)


def preset_dict(name: str) -> dict:
    """The values of a named preset, as a nested dict that includes its name."""
    if name not in PRESETS:
        raise L1Error(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return merge(PRESETS[name], {"preset": name})


def load_json(path: str | Path) -> dict:
    """Read a JSON config file, with one clear line on failure."""
    try:
        values = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise L1Error(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise L1Error(f"cannot read config file {path}: {exc}") from None
    if not isinstance(values, dict):
        raise L1Error(f"config file {path} must hold a JSON object")
    return values


def resolve(overrides: dict, stored: dict | None = None, file_values: dict | None = None) -> TrainConfig:
    """The effective config: preset <- stored run config <- JSON file <- command-line flags.

    With a time budget (max_minutes) a step limit applies only where one was given, not the preset's.
    """
    file_values = file_values or {}
    name = overrides.get("preset") or file_values.get("preset") or (stored or {}).get("preset") \
        or TrainConfig.preset
    values = merge(preset_dict(name), stored or {})
    values = merge(values, file_values)
    values = merge(values, overrides)
    if values.get("max_minutes") and not any("max_steps" in v for v in (stored or {}, file_values, overrides)):
        values["max_steps"] = 0  # a time budget sets the run's length; the preset's step count does not bind
    return from_dict(values)


# ---- command line -----------------------------------------------------------------------------

def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per training config field (sections flattened), each defaulting to 'not given'."""
    for cls, prefix in ((TrainConfig, ""), (ModelConfig, "model"), (DataConfig, "data")):
        _add_fields(parser, cls, prefix, f"{prefix or 'training'} options")


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per SamplingConfig field."""
    _add_fields(parser, SamplingConfig, "", "sampling options")


def sampling_config_from_args(args: argparse.Namespace) -> SamplingConfig:
    """The SamplingConfig of the flags given (defaults for the others)."""
    names = {f.name for f in dataclasses.fields(SamplingConfig)}
    return SamplingConfig(**{k: v for k, v in vars(args).items() if k in names})


def _add_fields(parser: argparse.ArgumentParser, cls, prefix: str, title: str) -> None:
    kinds = _field_types(cls)
    group = parser.add_argument_group(title)
    for f in dataclasses.fields(cls):
        if cls is TrainConfig and f.name in _SECTIONS:
            continue
        kind = kinds[f.name]
        presets = "" if cls is SamplingConfig else _preset_values(prefix, f.name)
        help_text = f"{f.metadata['help']} (default: {f.default}{presets})"
        dest = f"{prefix}.{f.name}" if prefix else f.name
        if kind in (bool, typing.Optional[bool]):
            group.add_argument(f"--{f.name}", dest=dest, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help_text)
        else:
            group.add_argument(f"--{f.name}", dest=dest, type=_int_or_auto if f.metadata["auto"] else kind,
                               default=argparse.SUPPRESS, metavar=f.name.upper(), help=help_text)


def _preset_values(section: str, name: str) -> str:
    """'; presets: l1-gpu-compatible 0.00045, ...' for a field that presets set ('' for none): the
    default preset sets some, so the field's own default alone would mislead --help's reader."""
    scopes = {preset: values.get(section, {}) if section else values for preset, values in PRESETS.items()}
    found = [f"{preset} {scope[name]}" for preset, scope in scopes.items() if name in scope]
    return f"; presets: {', '.join(found)}" if found else ""


def overrides_from_args(args: argparse.Namespace) -> dict:
    """The flags the user actually gave, as a nested dict for resolve()."""
    out: dict = {}
    for dest, value in vars(args).items():
        section, _, name = dest.rpartition(".")
        if section in _SECTIONS:
            out.setdefault(section, {})[name] = value
        elif not section and name in _field_types(TrainConfig):
            out[name] = value
    return out


def save_json(obj: dict, path: Path) -> None:
    """Write JSON atomically (temporary file + rename), so a crash never leaves half a file; a failed
    write leaves no temporary file and raises one L1Error line."""
    files.write_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def model_config_from_dict(values: dict, origin: str = "config.json") -> ModelConfig:
    """Rebuild a ModelConfig (e.g. from a run's config.json), refusing unknown or mistyped fields."""
    kinds = _field_types(ModelConfig)
    unknown = sorted(set(values) - set(kinds))
    if unknown:
        raise L1Error(f"{origin}: unknown model field(s) {', '.join(unknown)}")
    return ModelConfig(**{k: _check_value(k, v, kinds[k]) for k, v in values.items()})
