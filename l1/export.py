"""Export a trained run as a Hugging Face folder: a LlamaForCausalLM with its tokenizer.

    python -m l1.export models/<run> OUT/          # the run's best checkpoint (else latest)
    python -m l1.export models/<run>/latest_checkpoint.pt OUT/ --force

OUT then loads offline with transformers' AutoModelForCausalLM / AutoTokenizer, and so with the
tools built on them (vLLM, llama.cpp's convert_hf_to_gguf.py, the Hugging Face hub).

The exported vocabulary is the tokenizer's own: the embedding rows L1 pads on for fast matmuls
(and any rows beyond the tokenizer) are dropped, so no generator, in any framework, can ever pick
an id that has no token. transformers and safetensors are imported inside the functions that use
them: training never needs them.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

from l1 import chat, checkpoint
from l1.config import ModelConfig, SamplingConfig
from l1.cli import entry_point
from l1.errors import L1Error
from l1.hf import require_llama
from l1.tokenizer import EOT, Tokenizer

WEIGHTS = "model.safetensors"


def export(run_or_checkpoint: str, out_dir: str, force: bool = False) -> Path:
    """Write the Hugging Face folder out_dir from a run folder (best, else latest checkpoint) or a
    checkpoint file (its tokenizer.json beside it). A non-empty out_dir needs force=True."""
    _require_libraries()
    source = _checkpoint_path(Path(run_or_checkpoint))
    out = _check_out_dir(Path(out_dir), source.parent, force)
    run = checkpoint.load_run(str(source))
    cfg, tokenizer = run.model_config, run.tokenizer
    require_llama(cfg, str(source))
    run.check_weights()
    weights = {name: t.float() for name, t in run.state["model"].items()}
    hf_cfg = dataclasses.replace(cfg, vocab_size=tokenizer.vocab_size, pad_vocab_to=1)  # unpadded
    target = out.resolve()  # a name to build a sibling from, even for "."
    staging = target.with_name(f".{target.name}.export-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)  # left by an export that was killed
    try:
        staging.mkdir(parents=True)
        _write_config(staging, hf_cfg, tokenizer.eot_id, _stop_ids(tokenizer))
        _write_weights(staging, weights, hf_cfg, tokenizer.vocab_size)
        _write_tokenizer(staging, tokenizer, cfg.block_size)
        _publish(staging, target)
    except OSError as exc:  # a full disk, a read-only folder, a file where a folder should be
        raise L1Error(f"cannot write {out}: {exc.strerror or exc}; free space or choose another folder") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _require_libraries() -> None:
    """Fail before reading a checkpoint (gigabytes) when the libraries that write the folder are missing."""
    for name in ("transformers", "safetensors"):
        if importlib.util.find_spec(name) is None:
            raise L1Error(f"export needs {name}: pip install transformers safetensors")


def _checkpoint_path(path: Path) -> Path:
    """The checkpoint file to export: as given, or a run folder's best, else latest, else newest rolling."""
    if not path.exists():
        raise L1Error(f"{path} does not exist (expected a run folder or a checkpoint file)")
    try:
        return checkpoint.find_for_inference(str(path))
    except checkpoint.CheckpointError:
        raise L1Error(f"no checkpoint in {path} (looked for {checkpoint.BEST}, {checkpoint.LATEST} and "
                      "checkpoint_epoch_E_step_S.pt)") from None


def _check_out_dir(out: Path, run_dir: Path, force: bool) -> Path:
    """Refuse an output that would clobber something: a file, the run folder, a non-empty folder."""
    if out.exists() and not out.is_dir():
        raise L1Error(f"{out} exists and is not a folder")
    if out.resolve() == run_dir.resolve():
        # The run's own config.json and tokenizer.json would be overwritten, breaking resume.
        raise L1Error(f"{out} is the run folder itself; export to another folder")
    if out.is_dir() and any((out / name).exists() for name in (checkpoint.RUN_ID, checkpoint.LATEST, checkpoint.BEST)):
        # Another run's: even --force must not replace its config.json and tokenizer.json.
        raise L1Error(f"{out} is an L1 run folder; export to another folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise L1Error(f"{out} is not empty; pass --force to write into it (files of the same names are replaced)")
    return out


def _write_weights(folder: Path, weights: dict, hf_cfg: ModelConfig, vocab_size: int) -> None:
    """model.safetensors in Llama's names; a tied embedding is stored once (as embed_tokens), an
    untied head as lm_head, both cut to the tokenizer's vocabulary."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    from l1.hf import to_llama_state_dict

    weights = {**weights, **{name: weights[name][:vocab_size] for name in ("embed.weight", "lm_head.weight")}}
    llama = to_llama_state_dict(weights, hf_cfg)
    try:
        # transformers refuses safetensors files whose metadata does not name the framework.
        save_file(llama, folder / WEIGHTS, metadata={"format": "pt"})
    except SafetensorError as exc:  # its I/O errors (a full disk) are not OSErrors
        raise OSError(str(exc)) from None
    shutil.copymode(folder / "config.json", folder / WEIGHTS)  # safetensors creates it owner-only (0600)


def _stop_ids(tokenizer: Tokenizer) -> int | list[int]:
    """The ids that end a generation: end-of-text, and for a chat model first the end of its turn."""
    if chat.has_template(tokenizer):
        return [chat.token_ids(tokenizer)[chat.END], tokenizer.eot_id]
    return tokenizer.eot_id


def _write_config(folder: Path, hf_cfg: ModelConfig, eot_id: int, eos: int | list[int]) -> None:
    """config.json and generation_config.json; sampling defaults are generate_simple.py's."""
    from transformers import GenerationConfig

    from l1.hf import llama_config

    llama = llama_config(hf_cfg, bos_token_id=eot_id, eos_token_id=eos, pad_token_id=eot_id)
    llama.architectures = ["LlamaForCausalLM"]  # vLLM and llama.cpp pick the model class from this
    llama.dtype = "float32"
    llama.save_pretrained(folder)
    # transformers 5 writes dtype and rope_parameters; older readers (transformers 4, llama.cpp's
    # converter) look for torch_dtype and rope_theta. transformers 5 reads both spellings.
    _update_json(folder / "config.json", torch_dtype="float32", rope_theta=hf_cfg.rope_theta)
    defaults = SamplingConfig()
    GenerationConfig(bos_token_id=eot_id, eos_token_id=eos, pad_token_id=eot_id, do_sample=True,
                     temperature=defaults.temperature, top_k=defaults.top_k, top_p=defaults.top_p,
                     max_length=hf_cfg.block_size).save_pretrained(folder)


def _write_tokenizer(folder: Path, tokenizer: Tokenizer, block_size: int) -> None:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json.

    <|endoftext|> separates documents in training, so it serves as beginning, end and padding;
    nothing is added to encoded text, exactly as in L1. Padding is on the left, as batched
    generation with a decoder-only model needs. A chat model's tokenizer also carries l1/chat.py's
    template as chat_template, its turn tokens marked special (so decoding with
    skip_special_tokens, as transformers' chat pipeline does, leaves them out).
    """
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import PreTrainedTokenizerFast

    special = {"bos_token": EOT, "eos_token": EOT, "pad_token": EOT}
    is_chat = chat.has_template(tokenizer)
    inner = HFTokenizer.from_str(tokenizer.content)
    if is_chat:  # the same ids and matching; only the flag that decoding may skip them changes
        inner.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in chat.TOKENS])
    hf = PreTrainedTokenizerFast(tokenizer_object=inner, unk_token=None, model_max_length=block_size,
                                 padding_side="left", **special)
    hf.save_pretrained(folder)
    # transformers 5 names its own class here, which transformers 4 (and so older vLLM) cannot load.
    _update_json(folder / "tokenizer_config.json", tokenizer_class="PreTrainedTokenizerFast",
                 **({"chat_template": chat.CHAT_TEMPLATE} if is_chat else {}))
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def _update_json(path: Path, **values) -> None:
    content = json.loads(path.read_text())
    content.update(values)
    path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")


def _publish(staging: Path, out: Path) -> None:
    """Move the finished files into place: a new folder appears whole, by one rename."""
    if not out.exists():
        staging.rename(out)
        return
    for item in staging.iterdir():
        os.replace(item, out / item.name)


def _summary(out: Path) -> str:
    config = json.loads((out / "config.json").read_text())
    size = (out / WEIGHTS).stat().st_size
    return (f"exported to {out}: LlamaForCausalLM, {config['num_hidden_layers']} layers x "
            f"{config['hidden_size']} wide, vocabulary {config['vocab_size']}, {size / 2**20:.1f} MiB of "
            f"float32 weights\nload it with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")


@entry_point
def main(argv: list[str] | None = None) -> int:
    """The command line (through l1.cli.entry_point: one error line, exit status 2)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a run folder (models/<run>) or a checkpoint file")
    parser.add_argument("out", help="the Hugging Face folder to write")
    parser.add_argument("--force", action="store_true",
                        help="write into a non-empty folder, replacing the files of the same names")
    args = parser.parse_args(argv)
    print(_summary(export(args.source, args.out, force=args.force)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
