"""Export a trained run as a Hugging Face folder (LlamaForCausalLM, or Qwen3ForCausalLM for a
model trained with --qk_norm, with its tokenizer) or as a GGUF file for llama.cpp, Ollama and LM Studio.

    python -m l1.export models/<run> OUT/          # the run's best checkpoint (else latest)
    python -m l1.export models/<run>/latest_checkpoint.pt OUT/ --force
    python -m l1.export models/<run> out.gguf --outtype q8_0     # a .gguf name (or --format gguf)

OUT then loads offline with transformers' AutoModelForCausalLM / AutoTokenizer, and so with the
tools built on them (vLLM, the Hugging Face hub); out.gguf with llama.cpp and the tools built on
it, with an Ollama Modelfile beside it (l1/gguf.py).

The exported vocabulary is the tokenizer's own: the embedding rows L1 pads on for fast matmuls
(and any rows beyond the tokenizer) are dropped, so no generator, in any framework, can ever pick
an id that has no token. transformers, safetensors and gguf are imported inside the functions that
use them: training never needs them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

from l1 import chat, checkpoint
from l1 import gguf as gguf_file
from l1.config import ModelConfig, SamplingConfig
from l1.cli import entry_point
from l1.errors import L1Error
from l1.hf import ARCHITECTURES, hf_architecture
from l1.tokenizer import EOT, Tokenizer

WEIGHTS = "model.safetensors"


def export(run_or_checkpoint: str, out_dir: str, force: bool = False) -> Path:
    """Write the Hugging Face folder out_dir from a run folder (best, else latest checkpoint) or a
    checkpoint file (its tokenizer.json beside it). A non-empty out_dir needs force=True."""
    _require_libraries("transformers", "safetensors")
    source = _checkpoint_path(Path(run_or_checkpoint))
    out = _check_out_dir(Path(out_dir), source.parent, force)
    run, architecture, hf_cfg = _load(run_or_checkpoint)
    with _staging(out) as staging:
        _write_config(staging, hf_cfg, architecture, run.tokenizer.eot_id, _stop_ids(run.tokenizer))
        _write_weights(staging, _hf_weights(run, hf_cfg))
        _write_tokenizer(staging, run.tokenizer, hf_cfg.block_size)
        _publish(staging, out.resolve())
    return out


def export_gguf(run_or_checkpoint: str, out_file: str, outtype: str = gguf_file.DEFAULT_OUTTYPE, force: bool = False,
                **writer_options) -> Path:
    """Write the GGUF file out_file, and the Ollama Modelfile beside it, from a run folder or a
    checkpoint file. Existing files need force=True. writer_options: l1.gguf.write's private knobs
    (the tests' deliberately wrong files)."""
    _require_libraries("gguf", "transformers")  # transformers writes the tokenizer files the GGUF is read from
    if outtype not in gguf_file.OUTTYPES:
        raise L1Error(f"--outtype must be one of {', '.join(gguf_file.OUTTYPES)}, got {outtype!r}")
    source = _checkpoint_path(Path(run_or_checkpoint))
    out = Path(out_file)
    modelfile = out.with_name(gguf_file.MODELFILE)
    if out == modelfile:
        raise L1Error(f"{gguf_file.MODELFILE} is the name of the Ollama file written beside the GGUF; "
                      "give the GGUF another name, e.g. model.gguf")
    for path in (out, modelfile):
        if path.is_dir():
            raise L1Error(f"{path} is a folder; give the GGUF a file name, e.g. {path / 'model.gguf'}")
        if path.exists() and not force:
            raise L1Error(f"{path} exists; pass --force to replace it")
    if out.is_file() and not _is_gguf(out):  # a checkpoint, say: never replaced, even with --force
        raise L1Error(f"{out} exists and is not a GGUF file; choose another name")
    run, architecture, cfg = _load(run_or_checkpoint)
    with _staging(out) as staging:
        _write_tokenizer(staging, run.tokenizer, cfg.block_size)
        chat_template = gguf_file.write(staging / out.name, _hf_weights(run, cfg), cfg, architecture, staging,
                                        outtype, name=source.parent.name, **writer_options)
        (staging / modelfile.name).write_text(gguf_file.modelfile(out.name, cfg, chat=chat_template is not None))
        for path in (out, modelfile):  # each appears whole, by one rename
            os.replace(staging / path.name, path)
    return out


def _is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"  # the format's magic
    except OSError:  # unreadable: not one to replace
        return False


def _require_libraries(*names: str) -> None:
    """Fail before reading a checkpoint (gigabytes) when the libraries that write the export are missing."""
    for name in names:
        if importlib.util.find_spec(name) is None:
            raise L1Error(f"export needs {name}: pip install {' '.join(names)}")


def _load(source: str) -> tuple[checkpoint.LoadedRun, str, ModelConfig]:
    """The verified run (a run folder's damaged best: its newest intact checkpoint), its architecture
    ("llama" or "qwen3"; refused if neither) and its model config with the tokenizer's vocabulary,
    unpadded."""
    run = checkpoint.load_run(str(source))
    architecture = hf_architecture(run.model_config, str(run.path))
    return run, architecture, dataclasses.replace(run.model_config, vocab_size=run.tokenizer.vocab_size, pad_vocab_to=1)


@contextlib.contextmanager
def _staging(out: Path):
    """A hidden folder beside out where the export is written before it is moved into place;
    removed afterwards, whatever happens. A failed write is one line."""
    target = out.resolve()  # a name to build a sibling from, even for "."
    staging = target.with_name(f".{target.name}.export-{os.getpid()}")
    _remove_stale_staging(target)
    try:
        staging.mkdir(parents=True)
        yield staging
    except OSError as exc:  # a full disk, a read-only folder, a file where a folder should be
        raise L1Error(f"cannot write {out}: {exc.strerror or exc}; free space or choose another folder") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _checkpoint_path(path: Path) -> Path:
    """The checkpoint file to export: as given, or a run folder's best, else latest, else newest rolling."""
    if not path.exists():
        raise L1Error(f"{path} does not exist (expected a run folder or a checkpoint file)")
    try:
        return checkpoint.find_for_inference(str(path))[0]
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


def _hf_weights(run: checkpoint.LoadedRun, hf_cfg: ModelConfig) -> dict:
    """The weights in float32 under Llama's (Qwen3's) names; a tied embedding once (as
    embed_tokens), an untied head as lm_head, both cut to the tokenizer's vocabulary."""
    from l1.hf import to_hf_state_dict

    weights = {name: t.float() for name, t in run.state["model"].items()}
    weights.update({name: weights[name][:hf_cfg.vocab_size] for name in ("embed.weight", "lm_head.weight")})
    return to_hf_state_dict(weights, hf_cfg)


def _write_weights(folder: Path, weights: dict) -> None:
    """model.safetensors."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        # transformers refuses safetensors files whose metadata does not name the framework.
        save_file(weights, folder / WEIGHTS, metadata={"format": "pt"})
    except SafetensorError as exc:  # its I/O errors (a full disk) are not OSErrors
        raise OSError(str(exc)) from None
    shutil.copymode(folder / "config.json", folder / WEIGHTS)  # safetensors creates it owner-only (0600)


def _stop_ids(tokenizer: Tokenizer) -> int | list[int]:
    """The ids that end a generation: end-of-text, and for a chat model first the end of its turn."""
    if chat.has_template(tokenizer):
        return [chat.token_ids(tokenizer)[chat.END], tokenizer.eot_id]
    return tokenizer.eot_id


def _write_config(folder: Path, hf_cfg: ModelConfig, architecture: str, eot_id: int, eos: int | list[int]) -> None:
    """config.json and generation_config.json; sampling defaults are generate_simple.py's."""
    from transformers import GenerationConfig

    from l1.hf import hf_config

    config = hf_config(hf_cfg, bos_token_id=eot_id, eos_token_id=eos, pad_token_id=eot_id)
    config.architectures = [ARCHITECTURES[architecture]]  # vLLM and llama.cpp pick the model class from this
    config.dtype = "float32"
    config.save_pretrained(folder)
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


def _remove_stale_staging(target: Path) -> None:
    """Remove the staging folders (.NAME.export-PID) that killed exports of target left: those whose
    process no longer runs. A live export's folder, even to the same target, is left alone."""
    for staging in target.parent.glob(f".{glob.escape(target.name)}.export-*"):
        pid = staging.name.rpartition("-")[2]
        if pid.isdigit() and (int(pid) == os.getpid() or not _running(int(pid))):
            shutil.rmtree(staging, ignore_errors=True)


def _running(pid: int) -> bool:
    """Whether a process of this id runs (on this machine)."""
    if os.name == "nt":  # os.kill would end it there
        import ctypes

        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if handle:
            kernel32.CloseHandle(handle)
        return bool(handle) or ctypes.get_last_error() == 5  # ERROR_ACCESS_DENIED: another user's
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


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
    return (f"exported to {out}: {config['architectures'][0]}, {config['num_hidden_layers']} layers x "
            f"{config['hidden_size']} wide, vocabulary {config['vocab_size']}, {size / 2**20:.1f} MiB of "
            f"float32 weights\nload it with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")


def _gguf_summary(out: Path, outtype: str) -> str:
    return (f"exported to {out}: {out.stat().st_size / 2**20:.1f} MiB of {outtype} weights, and "
            f"{out.with_name(gguf_file.MODELFILE)}\nrun it with llama.cpp (llama_cpp.Llama({str(out)!r}, n_ctx=0)) "
            f"or Ollama (cd {out.parent} && ollama create <name> -f {gguf_file.MODELFILE} && ollama run <name>)")


@entry_point
def main(argv: list[str] | None = None) -> int:
    """The command line (through l1.cli.entry_point: one error line, exit status 2)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a run folder (models/<run>) or a checkpoint file")
    parser.add_argument("out", help="the Hugging Face folder to write, or a GGUF file (a name ending in .gguf)")
    parser.add_argument("--format", choices=("hf", "gguf"),
                        help="hf (a Hugging Face folder) or gguf (one file for llama.cpp, Ollama, LM Studio); "
                             "default: gguf for an out ending in .gguf, else hf")
    parser.add_argument("--outtype", choices=gguf_file.OUTTYPES,
                        help="GGUF weights: f32, f16 (default), bf16 or q8_0 (8-bit, half of f16's size)")
    parser.add_argument("--force", action="store_true",
                        help="write into a non-empty folder, replacing the files of the same names "
                             "(GGUF: replace the file and its Modelfile)")
    args = parser.parse_args(argv)
    fmt = args.format or ("gguf" if args.out.lower().endswith(".gguf") else "hf")
    if fmt == "gguf":
        outtype = args.outtype or gguf_file.DEFAULT_OUTTYPE
        print(_gguf_summary(export_gguf(args.source, args.out, outtype=outtype, force=args.force), outtype))
        return 0
    if args.outtype:
        raise L1Error("--outtype applies to GGUF files only (a Hugging Face folder is float32); "
                      "give an out ending in .gguf or --format gguf")
    print(_summary(export(args.source, args.out, force=args.force)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
