"""The GPT: a decoder-only transformer in the modern (Llama) style, readable in one sitting.

RoPE positions, RMSNorm, SwiGLU MLP, no biases, tied input/output embeddings, causal attention
through scaled_dot_product_attention (flash kernels on CUDA; plain matmuls where those measured
faster), the loss through l1/loss.py's chunked head. Knobs, off by default: an untied head, a
ReLU^2 MLP, soft-capped logits, query/key norms, residual dropout. A pure nn.Module: it picks
kernels by the tensors it is given, and knows nothing of device placement, compilation, DDP or
files.

The weights map one-to-one onto transformers' LlamaForCausalLM (see l1/hf.py), which the tests
use as the reference implementation (of the knobs, Llama holds only an untied head).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from l1.config import ModelConfig
from l1.loss import compute_dtype, linear_cross_entropy, soft_cap


class KVCache:
    """Preallocated keys and values of every layer, for incremental decoding.

    Slots [0, length) are filled. A forward pass with a cache writes its T new keys/values at
    [length, length + T) in every layer, then advances length by T.

    Static decoding (what torch.compile and CUDA graphs need: the same shapes at every step):
    while `slot` is set, a forward pass of one token writes its keys/values at that slot (a
    one-element long tensor) and attends over all max_len slots, its key_mask (B, max_len)
    saying which it may see; it reads and writes no Python number, so the caller advances
    slot and length.

    Each layer has its own k and v tensors, written by indexing (index_put_): torch.compile then
    writes the slot in place. A slice of one all-layer tensor written with index_copy_ compiled
    into a copy of every layer's whole cache per step, a cost that grew with max_len.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device=None, dtype=None):
        shape = (batch_size, cfg.n_head, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.length = 0
        self.slot: torch.Tensor | None = None

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's keys/values of one layer; return all keys/values so far (static: all slots)."""
        if self.slot is not None:
            self.k[layer][:, :, self.slot] = k
            self.v[layer][:, :, self.slot] = v
            return self.k[layer], self.v[layer]
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


def rope_tables(head_dim: int, max_pos: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (max_pos, head_dim) in Llama's rotate-half layout, rotate_half's sign
    folded into sin (its first half negated)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)
    return torch.cat([angles, angles], dim=-1).cos(), torch.cat([-angles, angles], dim=-1).sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + D/2) of x (..., D) by the angles of each position (cos/sin broadcast to x).

    rotate_half(x) swaps the halves of x and negates the first: a flip of the (2, D/2) view, the
    sign being in sin. Unlike slicing and concatenating, a flip's backward is a single flip, not a
    zero-filled buffer per slice.
    """
    half = x.shape[-1] // 2
    pairs = x.unflatten(-1, (2, half))
    cos, sin = cos.to(x.dtype).unflatten(-1, (2, half)), sin.to(x.dtype).unflatten(-1, (2, half))
    return (pairs * cos + pairs.flip(-2) * sin).flatten(-2)


class _RMSNormFunction(torch.autograd.Function):
    """y = x * rstd * w, rstd = 1 / sqrt(mean(x^2) + eps), with the backward written out.

    Autograd through the composite formula saves x and x * rstd and runs about twenty kernels;
    this saves x * rstd alone and runs about ten. The statistics are fp32; the output comes in
    out_dtype, under autocast the dtype of the matmul it feeds, so that matmul needs no cast.
    """

    @staticmethod
    def forward(ctx, x, weight, eps, out_dtype):
        wide = torch.promote_types(x.dtype, torch.float32)
        rstd = torch.rsqrt(x.to(wide).pow(2).mean(-1, keepdim=True) + eps)
        x_hat = (x * rstd).to(out_dtype)
        ctx.save_for_backward(x_hat, rstd, weight)
        ctx.x_dtype = x.dtype
        return x_hat * weight.to(out_dtype)

    @staticmethod
    def backward(ctx, grad):
        x_hat, rstd, weight = ctx.saved_tensors
        grad_x_hat = grad * weight
        # d/dx of x * rstd: the component along x_hat is divided out, the rest scaled by rstd.
        grad_x = (grad_x_hat - x_hat * (grad_x_hat * x_hat).mean(-1, keepdim=True)) * rstd
        grad_weight = (grad * x_hat).flatten(0, -2).sum(0, dtype=torch.float32)
        return grad_x.to(ctx.x_dtype), grad_weight.to(weight.dtype), None, None


class RMSNorm(nn.Module):
    """nn.RMSNorm (same parameter, same result) with a leaner backward on eager CPU and GPU."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if torch.is_grad_enabled():
            return _RMSNormFunction.apply(x, self.weight, self.eps, compute_dtype(x))
        # Inference (decoding runs ~13 norms per token): torch's single fused kernel.
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


def matmul_attention_pays(device_type: str, dtype: torch.dtype, keys: int) -> bool:
    """Whether two plain matmuls beat SDPA for a multi-query attention over this many keys.

    On CPU in bf16/fp16 with up to 256 keys, the scores' matmuls (oneDNN's bf16 GEMMs) and one
    softmax over the whole T x S block beat the CPU flash kernel (the l1-v1 and tiny steps
    measured 4-22% faster); beyond that the T x S scores outgrow the caches and flash wins, as
    it does in fp32. On GPUs the flash kernels always win.
    """
    return device_type == "cpu" and dtype in (torch.bfloat16, torch.float16) and keys <= 256


def causal_matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal softmax(q k^T / sqrt(D)) v for (B, H, T, D) inputs, the T x T scores materialized
    in q's dtype (torch's softmax accumulates in fp32 even for bf16). One baddbmm scales the
    scores and adds the causal -inf bias, so neither needs a pass of its own, nor a backward."""
    B, H, T, D = q.shape
    bias = torch.full((T, T), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
    scores = torch.baddbmm(bias, q.reshape(B * H, T, D), k.reshape(B * H, T, D).transpose(1, 2),
                           alpha=1.0 / math.sqrt(D))
    return (scores.softmax(dim=-1) @ v.reshape(B * H, T, D)).view(B, H, T, D)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)  # one matmul for q, k, v
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x, cos, sin, mask=None, cache: KVCache | None = None, layer: int = 0):
        B, T, C = x.shape
        # Split rather than index the fused output: the backward is then one concatenation.
        qk, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).split([2, 1], dim=2)
        if self.q_norm is not None:
            qk = torch.stack((self.q_norm(qk[:, :, 0]), self.k_norm(qk[:, :, 1])), dim=2)
        qk = apply_rope(qk, cos[..., None, None, :], sin[..., None, None, :])  # q and k in one go
        q, k = qk.permute(2, 0, 3, 1, 4)  # (B, H, T, D) views
        v = v.squeeze(2).transpose(1, 2)
        if cache is not None:
            k, v = cache.store(layer, k, v)
        if T == 1:
            # One decoding query: two small matmuls. SDPA's CPU flash kernel is ~100x slower here.
            scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            y = scores.float().softmax(dim=-1).to(v.dtype) @ v
        elif mask is None and matmul_attention_pays(q.device.type, q.dtype, T):
            y = causal_matmul_attention(q, k, v)
        elif mask is None:
            # Without a cache, or when the query block starts the sequence, causal alignment is
            # the default top-left one (the flash / memory-efficient kernels on CUDA).
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.hidden = cfg.mlp_hidden
        self.gate_up = nn.Linear(cfg.n_embd, 2 * self.hidden, bias=False)  # gate and up in one matmul
        self.down = nn.Linear(self.hidden, cfg.n_embd, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).split(self.hidden, dim=-1)
        return self.down(F.silu(gate) * up)


class ReLU2(nn.Module):
    """down(relu(up(x))^2): the squared ReLU of Primer (So et al., 2021) and modded-nanogpt."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=False)
        self.down = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=False)

    def forward(self, x):
        return self.down(F.relu(self.up(x)).square())


MLPS = {"swiglu": SwiGLU, "relu2": ReLU2}  # ModelConfig.mlp -> its module (both end in `down`)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.mlp = MLPS[cfg.mlp](cfg)
        self.dropout = cfg.dropout

    def forward(self, x, cos, sin, mask=None, cache=None, layer=0):
        x = x + self._drop(self.attn(self.attn_norm(x), cos, sin, mask, cache, layer))
        return x + self._drop(self.mlp(self.mlp_norm(x)))

    def _drop(self, branch):
        """Dropout of a residual branch in training; no op (not even a copy) when off or in eval."""
        return F.dropout(branch, self.dropout, training=True) if self.dropout and self.training else branch


class GPT(nn.Module):
    """Token ids in, next-token logits (or the mean cross-entropy loss) out."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.padded_vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.padded_vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.block_size, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, init_std), residual projections scaled by 1/sqrt(2 * n_layer)."""
        std = self.cfg.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, mean=0.0, std=std / math.sqrt(2 * self.cfg.n_layer))
            nn.init.normal_(block.mlp.down.weight, mean=0.0, std=std / math.sqrt(2 * self.cfg.n_layer))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None, positions: torch.Tensor | None = None,
                key_mask: torch.Tensor | None = None, z_loss: float = 0.0, last: bool = False,
                loss_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, padded_vocab) for idx (B, T), or the mean loss when targets are given.

        z_loss: with targets, add z_loss x mean(logsumexp(logits)^2) to the cross-entropy (PaLM).
        The logits, returned or in the loss, are soft-capped where cfg.logit_softcap is set.

        cache: decode incrementally; the T new tokens occupy cache slots [length, length + T)
        (a static cache: see KVCache).
        positions: (B, T) RoPE positions (default: slot indices), for left-padded batches.
        key_mask: (B, length + T) bool, False for padding slots that no query may attend to
        (a static cache: (B, max_len)).
        last: the logits of the last position only (B, 1, padded_vocab), all that decoding needs.
        loss_mask: (B, T) bool, the targets the loss counts (default: all); the mean is over those.
        """
        B, T = idx.shape
        static = cache is not None and cache.slot is not None
        start = cache.length if cache is not None and not static else 0
        if positions is None:
            if start + T > self.cfg.block_size:
                raise ValueError(f"{start + T} tokens exceed the context of {self.cfg.block_size}")
            cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]  # (T, D) views
        else:
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # (B, T, D)
        mask = key_mask[:, None, None, :] if static else self._attention_mask(T, start, key_mask, idx.device)
        x = self.embed(idx)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, mask, cache, i)
        if cache is not None and not static:
            cache.length += T
        x = self.norm(x[:, -1:] if last else x)
        if targets is None:
            return soft_cap(self.lm_head(x), self.cfg.logit_softcap)
        return linear_cross_entropy(x.flatten(0, 1), self.lm_head.weight, targets.reshape(-1), z_loss,
                                    self.cfg.logit_softcap, None if loss_mask is None else loss_mask.reshape(-1))

    @staticmethod
    def _attention_mask(T: int, start: int, key_mask, device):
        """None where SDPA's own causal flag is right, else a (B, 1, T, start + T) bool mask."""
        if key_mask is None and (start == 0 or T == 1):
            return None
        S = start + T
        query_slot = torch.arange(start, S, device=device)
        allowed = torch.arange(S, device=device)[None, :] <= query_slot[:, None]  # (T, S) causal
        if key_mask is None:
            return allowed[None, None]
        own_slot = torch.arange(S, device=device)[None, :] == query_slot[:, None]
        # A padding query may still see itself, so no softmax row is empty (empty rows give NaN).
        return (allowed[None] & key_mask[:, None, :] | own_slot[None])[:, None]

    def num_params(self, exclude_padding: bool = False) -> int:
        """Parameters counted tensor by tensor (a tied embedding once); optionally without the
        padded vocab rows. ModelConfig.num_params gives the same by arithmetic."""
        total = sum(p.numel() for p in self.parameters())
        if exclude_padding:
            total -= self.cfg.num_params - self.cfg.num_params_unpadded
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6 x matmul weights + attention (PaLM)."""
        # The head is a matmul, tied or not (a tied one listed under both names); the embedding a lookup.
        matmul = sum(p.numel() for n, p in self.named_parameters(remove_duplicate=False)
                     if p.dim() == 2 and n != "embed.weight")
        return 6.0 * matmul + 12.0 * self.cfg.n_layer * self.cfg.n_embd * seq_len
