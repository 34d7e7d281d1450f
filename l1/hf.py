"""The one-to-one map between L1's GPT and transformers' LlamaForCausalLM.

Used by the parity tests (Llama is the reference implementation) and by the export to a Hugging
Face folder. transformers is imported lazily: training and sampling never need it.
"""

from __future__ import annotations

import torch

from l1.config import ModelConfig
from l1.errors import L1Error


def require_llama(cfg: ModelConfig, what: str) -> None:
    """Refuse, in one line, a model that the Llama format cannot hold (an untied head it can)."""
    knobs = [flag for flag, used in (("--qk_norm", cfg.qk_norm),  # no per-head query/key norms
                                     (f"--mlp {cfg.mlp}", cfg.mlp != "swiglu"),  # SwiGLU only
                                     (f"--logit_softcap {cfg.logit_softcap:g}", cfg.logit_softcap))  # no soft cap
             if used]
    # --dropout needs nothing: it acts in training only, and the Llama model is for inference.
    if knobs:
        raise L1Error(f"{what} was trained with {', '.join(knobs)}, which the Llama format cannot hold; "
                      f"only models trained without {'it' if len(knobs) == 1 else 'them'} can be exported")


def llama_config(cfg: ModelConfig, **extra):
    """A LlamaConfig with exactly L1's architecture (the padded vocabulary included)."""
    from transformers import LlamaConfig

    return LlamaConfig(
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
        mlp_bias=False,
        hidden_act="silu",
        **extra,
    )


def to_llama_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename and split L1 weights (fused qkv, fused gate/up) into Llama's parameter names; the
    head only where it is untied (Llama ties it to embed_tokens itself)."""
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
    return {name: t.contiguous() for name, t in out.items()}


def to_llama(model, dtype=torch.float32):
    """A LlamaForCausalLM carrying the same weights as an L1 GPT (refused in one line where
    Llama has no equivalent)."""
    from transformers import LlamaForCausalLM

    require_llama(model.cfg, "this model")
    llama = LlamaForCausalLM(llama_config(model.cfg)).to(dtype)
    state = to_llama_state_dict({k: v.detach() for k, v in model.state_dict().items()}, model.cfg)
    missing, unexpected = llama.load_state_dict(state, strict=False)
    # A tied lm_head.weight is the embedding, so it is the only name Llama may report missing.
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if model.cfg.tie_embeddings else set()), \
        (missing, unexpected)
    return llama.eval()


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
    """The inverse of to_llama_state_dict: Llama's names fused into L1's, the vocabulary rows padded
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
