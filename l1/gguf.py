"""Write a GGUF file (llama.cpp, Ollama, LM Studio) through llama.cpp's own Python package `gguf`.

The input is the Hugging Face layout of l1/hf.py (Llama, or Qwen3 for --qk_norm) and the Hugging
Face tokenizer files that the HF export writes, so both exports share one weight map and one
tokenizer description (special tokens, chat template). From there this module does what
llama.cpp's convert_hf_to_gguf.py does for those two architectures, and no more:

- tensor names through gguf's own TensorNameMap;
- for the `llama` architecture, the rows of q_proj and k_proj reordered: Hugging Face's Llama and
  L1 rotate the pairs (i, i + D/2) of each head (rotate-half RoPE), llama.cpp's llama graph the
  adjacent pairs (2i, 2i + 1). Its `qwen3` graph rotates halves, as Qwen3 does: no reordering;
- the tokenizer as a GPT-2 BPE vocabulary with the llama.cpp pre-tokenizer that splits text as L1
  does (checked, never guessed: one that differs is refused);
- 1-D tensors (the norms) in float32 at every --outtype, as llama.cpp's converter keeps them.

`gguf` is imported inside the functions: training and sampling never need it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from l1 import chat as chat_format
from l1.config import ModelConfig, SamplingConfig
from l1.errors import L1Error

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
DEFAULT_OUTTYPE = "f16"  # half of f32's size, its logits within 2e-2 of L1's (tests/test_gguf.py)
MODELFILE = "Modelfile"  # Ollama's recipe, written beside the GGUF

# What the GPT-2 byte-level BPE, the one L1 trains, holds in tokenizer.json (the parts that decide
# how text becomes ids). llama.cpp's pre-tokenizer "gpt-2" splits text as this ByteLevel
# pre-tokenizer does (its expression lacks the final `|\s+`, but llama.cpp keeps unmatched text as
# a piece of its own, which is all that alternative does), applies the merges by rank (no
# ignore_merges) and maps bytes to characters by GPT-2's table. tests/test_gguf.py checks the ids
# on Wikipedia text and on any text hypothesis draws.
_GPT2_PRE_TOKENIZER = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
_GPT2_MODEL = {"type": "BPE", "dropout": None, "continuing_subword_prefix": None, "end_of_word_suffix": None,
               "byte_fallback": False, "ignore_merges": False}
_ABSENT_MEANS = {"byte_fallback": False, "ignore_merges": False}  # options older tokenizer.json files lack


def llama_cpp_pre_tokenizer(tokenizer_json: dict) -> str:
    """The name of the llama.cpp pre-tokenizer that turns text into the same ids as this
    tokenizer.json: "gpt-2" for GPT-2's byte-level rules (L1's); any other is refused in one line,
    since a file that llama.cpp tokenizes differently would give other ids than the model learned."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    model = tokenizer_json.get("model") or {}
    differences = [what for what, same in (
        ("a normalizer", tokenizer_json.get("normalizer") is None),
        (f"the pre-tokenizer {json.dumps(pre)}", all(pre.get(k) == v for k, v in _GPT2_PRE_TOKENIZER.items())),
        (f"the {model.get('type')} model's options",
         all(model.get(k, _ABSENT_MEANS.get(k)) == v for k, v in _GPT2_MODEL.items())),
        ("its decoder", (tokenizer_json.get("decoder") or {}).get("type") == "ByteLevel")) if not same]
    if differences:
        raise L1Error(f"the tokenizer differs from GPT-2's byte-level BPE in {', '.join(differences)}, and no "
                      "llama.cpp pre-tokenizer is known to split text as it does; no GGUF was written")
    return "gpt-2"


def interleave_rope_pairs(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """The rows of a query or key projection reordered from rotate-half RoPE pairs (i, i + D/2) in
    each head (Hugging Face's Llama, L1) to adjacent pairs (2i, 2i + 1) (llama.cpp's llama graph):
    row 2i + h of a head is its row i + h * D/2. The same permutation as llama.cpp's converter."""
    rows, cols = weight.shape
    return weight.reshape(n_head, 2, rows // n_head // 2, cols).transpose(1, 2).reshape(rows, cols)


def write(path: Path, weights: dict[str, torch.Tensor], cfg: ModelConfig, architecture: str,
          tokenizer_folder: Path, outtype: str, name: str, *,
          _pre_tokenizer: str | None = None, _interleave_rope: bool = True) -> str | None:
    """Write the GGUF file path; return the chat template it holds (None for a base model).

    weights: l1.hf.to_hf_state_dict's names and tensors, cut to the tokenizer's vocabulary;
    cfg: the model's config with that vocabulary; architecture: "llama" or "qwen3" (l1.hf);
    tokenizer_folder: the HF export's tokenizer.json and tokenizer_config.json (special tokens,
    chat template). _pre_tokenizer and _interleave_rope exist for the tests that prove a wrong
    file fails llama.cpp's checks: a wrong pre-tokenizer name, the query/key rows as they are.
    """
    import gguf

    tokenizer_json = json.loads((tokenizer_folder / "tokenizer.json").read_text(encoding="utf-8"))
    pre_tokenizer = _pre_tokenizer or llama_cpp_pre_tokenizer(tokenizer_json)
    arch = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen3": gguf.MODEL_ARCH.QWEN3}[architecture]
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    try:
        writer.add_name(name)
        writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_vocab_size(cfg.vocab_size)
        writer.add_context_length(cfg.block_size)
        writer.add_embedding_length(cfg.n_embd)
        writer.add_feed_forward_length(cfg.mlp_hidden)
        writer.add_block_count(cfg.n_layer)
        writer.add_head_count(cfg.n_head)
        writer.add_head_count_kv(cfg.n_head)
        writer.add_rope_dimension_count(cfg.head_dim)
        writer.add_rope_freq_base(cfg.rope_theta)
        writer.add_layer_norm_rms_eps(cfg.norm_eps)
        _add_sampling_defaults(writer)
        chat_template = _add_tokenizer(writer, tokenizer_json, tokenizer_folder, pre_tokenizer)
        names = gguf.get_tensor_name_map(arch, cfg.n_layer)
        for hf_name, tensor in weights.items():
            if architecture == "llama" and _interleave_rope and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
                tensor = interleave_rope_pairs(tensor, cfg.n_head)
            data, qtype = _encode(tensor.float().numpy(), outtype)
            writer.add_tensor(names.get_name(hf_name, try_suffixes=(".weight",)), data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return chat_template


def _add_sampling_defaults(writer) -> None:
    """generate_simple.py's sampling defaults, which llama.cpp's tools take as theirs."""
    defaults = SamplingConfig()
    writer.add_sampling_temp(defaults.temperature)
    writer.add_sampling_top_k(defaults.top_k)
    writer.add_sampling_top_p(defaults.top_p)
    writer.add_sampling_min_p(0.0)  # L1 has no min-p; llama.cpp's own default is 0.05
    writer.add_sampling_penalty_repeat(defaults.repetition_penalty)


def _add_tokenizer(writer, tokenizer_json: dict, folder: Path, pre_tokenizer: str) -> str | None:
    """The vocabulary (the special tokens as control tokens, which llama.cpp never prints as
    text), the merges, the special ids and the chat template (returned; None if there is none)."""
    import gguf

    vocab = {token_id: token for token, token_id in tokenizer_json["model"]["vocab"].items()}
    vocab.update({added["id"]: added["content"] for added in tokenizer_json.get("added_tokens", [])})
    special = {added["id"] for added in tokenizer_json.get("added_tokens", []) if added["special"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer)
    writer.add_token_list([vocab[i] for i in range(len(vocab))])
    writer.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
                            for i in range(len(vocab))])
    special_vocab = gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(vocab))
    # L1 adds nothing to encoded text: a prompt is continued as it is (see l1/sampler.py).
    special_vocab.add_special_token.update(bos=False, eos=False)
    special_vocab.add_to_gguf(writer, quiet=True)
    return special_vocab.chat_template


def _encode(array, outtype: str):
    """The tensor's data and GGML type at outtype; 1-D tensors stay float32. A matrix whose rows
    do not split into q8_0's blocks of 32 is written in float16, as llama.cpp's converter does."""
    import gguf

    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[outtype]
    if array.ndim == 1:
        qtype = gguf.GGMLQuantizationType.F32
    try:
        return gguf.quants.quantize(array, qtype), qtype
    except gguf.QuantError:
        return gguf.quants.quantize(array, gguf.GGMLQuantizationType.F16), gguf.GGMLQuantizationType.F16


def modelfile(gguf_name: str, cfg: ModelConfig, chat: bool) -> str:
    """Ollama's Modelfile for the GGUF file gguf_name beside it: generate_simple.py's sampling
    defaults and the model's context. A base model continues the prompt as it is; a chat model
    gets l1/chat.py's template in Ollama's language, and stops at the end of its turn."""
    defaults = SamplingConfig()
    lines = ["# Ollama: ollama create <name> -f Modelfile, then ollama run <name> (written by python -m l1.export)",
             f"FROM ./{gguf_name}"]
    if chat:
        lines += [f'TEMPLATE """{chat_format.OLLAMA_TEMPLATE}"""', f'PARAMETER stop "{chat_format.END}"']
    else:
        lines.append('TEMPLATE """{{ .Prompt }}"""')
    lines += [f"PARAMETER temperature {defaults.temperature:g}", f"PARAMETER top_k {defaults.top_k}",
              f"PARAMETER top_p {defaults.top_p:g}", "PARAMETER min_p 0",
              f"PARAMETER repeat_penalty {defaults.repetition_penalty:g}",
              f"PARAMETER num_predict {defaults.max_tokens}", f"PARAMETER num_ctx {cfg.block_size}"]
    return "\n".join(lines) + "\n"
