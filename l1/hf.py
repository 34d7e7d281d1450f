"""The one-to-one maps between L1's GPT and transformers' LlamaForCausalLM and Qwen3ForCausalLM.

Used by the parity tests (Llama and Qwen3 are the reference implementations) and by the exports
(a Hugging Face folder, GGUF). A model trained with --qk_norm is a Qwen3: Qwen3 normalizes each
head's query and key (RMSNorm over head_dim, eps rms_norm_eps, one weight shared by the heads)
before RoPE, exactly as L1's Attention does. transformers is imported lazily: training and
sampling never need it.
"""

from __future__ import annotations

import torch

from l1.config import ModelConfig
from l1.errors import L1Error

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}  # hf_architecture -> class


def _refuse(cfg: ModelConfig, what: str, formats_cannot_hold: str, qk_norm_fits: bool) -> None:
    """One line naming the knobs of cfg that the formats cannot hold."""
    knobs = [flag for flag, used in (("--qk_norm", cfg.qk_norm and not qk_norm_fits),  # per-head q/k norms
                                     (f"--mlp {cfg.mlp}", cfg.mlp != "swiglu"),  # SwiGLU only
                                     (f"--logit_softcap {cfg.logit_softcap:g}", cfg.logit_softcap))  # no soft cap
             if used]
    # --dropout needs nothing: it acts in training only, and the exported model is for inference.
    if knobs:
        raise L1Error(f"{what} was trained with {', '.join(knobs)}, which {formats_cannot_hold}; "
                      f"only models trained without {'it' if len(knobs) == 1 else 'them'} can be exported")


def require_llama(cfg: ModelConfig, what: str) -> None:
    """Refuse, in one line, a model that the Llama format cannot hold (an untied head it can)."""
    _refuse(cfg, what, "the Llama format cannot hold", qk_norm_fits=False)


def hf_architecture(cfg: ModelConfig, what: str) -> str:
    """"llama", or "qwen3" for a model with query/key norms; a model neither holds is refused in one line."""
    _refuse(cfg, what, "neither the Llama nor the Qwen3 format can hold", qk_norm_fits=True)
    return "qwen3" if cfg.qk_norm else "llama"


def hf_config(cfg: ModelConfig, **extra):
    """A LlamaConfig (a Qwen3Config with --qk_norm) with exactly L1's architecture (the padded
    vocabulary included)."""
    from transformers import LlamaConfig, Qwen3Config

    common = dict(
        vocab_size=cfg.padded_vocab_size,
        hidden_size=cfg.n_embd,
        intermediate_size=cfg.mlp_hidden,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_head,
        max_position_embeddings=cfg.block_size,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False,
        hidden_act="silu",
        **extra,
    )
    if cfg.qk_norm:
        return Qwen3Config(head_dim=cfg.head_dim, use_sliding_window=False, **common)
    return LlamaConfig(mlp_bias=False, **common)


def to_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename and split L1 weights (fused qkv, fused gate/up) into Llama's (Qwen3's) parameter
    names; the head only where it is untied (both tie it to embed_tokens themselves)."""
    out = {"model.embed_tokens.weight": state["embed.weight"], "model.norm.weight": state["norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    for i in range(cfg.n_layer):
        src, dst = f"blocks.{i}.", f"model.layers.{i}."
        q, k, v = state[src + "attn.qkv.weight"].chunk(3, dim=0)
        gate, up = state[src + "mlp.gate_up.weight"].chunk(2, dim=0)
        out.update({
            dst + "input_layernorm.weight": state[src + "attn_norm.weight"],
            dst + "self_attn.q_proj.weight": q,
            dst + "self_attn.k_proj.weight": k,
            dst + "self_attn.v_proj.weight": v,
            dst + "self_attn.o_proj.weight": state[src + "attn.proj.weight"],
            dst + "post_attention_layernorm.weight": state[src + "mlp_norm.weight"],
            dst + "mlp.gate_proj.weight": gate,
            dst + "mlp.up_proj.weight": up,
            dst + "mlp.down_proj.weight": state[src + "mlp.down.weight"],
        })
        if cfg.qk_norm:
            out[dst + "self_attn.q_norm.weight"] = state[src + "attn.q_norm.weight"]
            out[dst + "self_attn.k_norm.weight"] = state[src + "attn.k_norm.weight"]
    return {name: t.contiguous() for name, t in out.items()}


def to_hf(model, dtype=torch.float32):
    """A LlamaForCausalLM (Qwen3ForCausalLM with --qk_norm) carrying the same weights as an L1 GPT
    (refused in one line where neither has an equivalent)."""
    import transformers

    architecture = ARCHITECTURES[hf_architecture(model.cfg, "this model")]
    hf_model = getattr(transformers, architecture)(hf_config(model.cfg)).to(dtype)
    state = to_hf_state_dict({k: v.detach() for k, v in model.state_dict().items()}, model.cfg)
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    # A tied lm_head.weight is the embedding, so it is the only name transformers may report missing.
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if model.cfg.tie_embeddings else set()), \
        (missing, unexpected)
    return hf_model.eval()


def to_llama(model, dtype=torch.float32):
    """A LlamaForCausalLM carrying the same weights as an L1 GPT (refused in one line where
    Llama has no equivalent)."""
    require_llama(model.cfg, "this model")
    return to_hf(model, dtype)


# ---- the other way: a Hugging Face Llama folder as an L1 model ------------------------------------

def _rope_theta(hf: dict) -> tuple[float, str | None]:
    """The RoPE base of a Llama config.json and the scaling it names, if any (transformers 4
    writes rope_theta and rope_scaling, transformers 5 rope_parameters)."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kinds = [params.get("rope_type"), scaling.get("rope_type"), scaling.get("type")]
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    return float(theta), next((k for k in kinds if k not in (None, "default")), None)


def llama_model_config(hf: dict, what: str) -> ModelConfig:
    """The ModelConfig of a Llama config.json, or one L1Error naming everything L1's GPT lacks
    (grouped-query attention, RoPE scaling, biases, another activation, another model type)."""
    missing = []
    if hf.get("model_type") != "llama":
        missing.append(f"model_type {hf.get('model_type')!r} (only llama)")
    heads = hf.get("num_attention_heads", 0)
    kv_heads = hf.get("num_key_value_heads") or heads
    if kv_heads != heads:
        missing.append(f"grouped-query attention ({kv_heads} key/value heads for {heads} query heads)")
    theta, scaling = _rope_theta(hf)
    if scaling:
        missing.append(f"RoPE scaling {scaling!r}")
    for bias in ("attention_bias", "mlp_bias"):
        if hf.get(bias):
            missing.append(bias.replace("_", " "))
    if hf.get("hidden_act", "silu") != "silu":
        missing.append(f"activation {hf.get('hidden_act')!r} (only silu: SwiGLU)")
    width = hf.get("hidden_size", 0)
    if heads and hf.get("head_dim") not in (None, width // heads):
        missing.append(f"head_dim {hf.get('head_dim')} other than hidden_size / heads")
    if missing:
        raise L1Error(f"{what} cannot be expressed by L1's GPT: {'; '.join(missing)}")
    try:
        return ModelConfig(vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_head=heads, n_embd=width,
                           block_size=hf["max_position_embeddings"], intermediate_size=hf["intermediate_size"],
                           rope_theta=theta, norm_eps=hf.get("rms_norm_eps", 1e-6),
                           tie_embeddings=bool(hf.get("tie_word_embeddings", False)))
    except KeyError as exc:
        raise L1Error(f"{what} lacks {exc.args[0]!r}: not a complete Llama config.json") from None


def from_llama_state_dict(llama: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The inverse of to_hf_state_dict (for Llama): Llama's names fused into L1's, the vocabulary rows padded
    to cfg.padded_vocab_size with zeros (rows no token uses: a logit of 0 that training pushes down)."""
    def padded(t: torch.Tensor) -> torch.Tensor:
        out = t.new_zeros((cfg.padded_vocab_size, t.shape[1]))
        out[:len(t)] = t
        return out

    out = {"embed.weight": padded(llama["model.embed_tokens.weight"]), "norm.weight": llama["model.norm.weight"]}
    out["lm_head.weight"] = out["embed.weight"] if cfg.tie_embeddings else padded(llama["lm_head.weight"])
    for i in range(cfg.n_layer):
        src, dst = f"model.layers.{i}.", f"blocks.{i}."
        out.update({
            dst + "attn_norm.weight": llama[src + "input_layernorm.weight"],
            dst + "attn.qkv.weight": torch.cat([llama[src + f"self_attn.{n}_proj.weight"] for n in "qkv"]),
            dst + "attn.proj.weight": llama[src + "self_attn.o_proj.weight"],
            dst + "mlp_norm.weight": llama[src + "post_attention_layernorm.weight"],
            dst + "mlp.gate_up.weight": torch.cat([llama[src + "mlp.gate_proj.weight"],
                                                   llama[src + "mlp.up_proj.weight"]]),
            dst + "mlp.down.weight": llama[src + "mlp.down_proj.weight"],
        })
    return out
