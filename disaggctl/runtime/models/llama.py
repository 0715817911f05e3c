"""Llama-style dense decoder (Llama, Mistral, Qwen2, Qwen3): one module, the families differ by flags.

Parameter names are those of the Hugging Face checkpoints, so loading is a name-for-name copy. The forward
pass runs over one flat step (see `attention.py`): `input_ids`/`positions` of every scheduled token back to
back, and returns logits only for the rows that sample.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from disaggctl.runtime.attention import AttentionMeta, paged_attention, store_kv
from disaggctl.runtime.config import ModelConfig
from disaggctl.runtime.parallel import TensorParallel


def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """(inverse frequencies in fp32, factor applied to cos/sin) for the config's RoPE type."""
    dim, base, rope = cfg.head_dim, cfg.rope_theta, cfg.rope
    kind = rope.get("rope_type", "default")
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / float(rope["factor"]), 1.0
    if kind == "llama3":
        factor, low, high = (
            float(rope["factor"]),
            float(rope["low_freq_factor"]),
            float(rope["high_freq_factor"]),
        )
        old_len = float(rope["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        return _yarn(dim, base, rope)
    raise ValueError(f"unsupported rope type {kind!r}")


def _yarn(dim: int, base: float, rope: dict) -> tuple[torch.Tensor, float]:
    factor = float(rope["factor"])
    old_len = float(rope["original_max_position_embeddings"])

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        m, m_all = rope.get("mscale"), rope.get("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    beta_fast, beta_slow = rope.get("beta_fast") or 32, rope.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(old_len / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolate = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv_freq, float(attention_factor)


class RMSNorm(nn.Module):
    """As transformers does it: normalise in fp32, cast back, then scale (the order matters in bf16)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # without a weight rms_norm normalises in fp32 and rounds to x's dtype (one fused kernel on CUDA);
        # the scale comes after the rounding, as in transformers
        return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


def fuse_linears(*layers: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for layers that read the same input; the layers keep views into it.

    A step is a few hundred small kernels whose launches cost more than their math at decode batch
    sizes, so one matmul instead of three pays. The views keep the checkpoint's names and hold no copy;
    the fused tensors are plain attributes, so fuse only once the model is on its device for good.
    """
    weight = torch.cat([m.weight.detach() for m in layers])
    has_bias = [m.bias is not None for m in layers]
    bias = torch.cat([m.bias.detach() for m in layers]) if all(has_bias) else None
    if any(has_bias) and bias is None:
        raise ValueError("cannot fuse linear layers of which only some have a bias")
    start = 0
    for m in layers:
        n = m.weight.shape[0]
        m.weight = nn.Parameter(weight[start : start + n], requires_grad=False)
        if bias is not None:
            m.bias = nn.Parameter(bias[start : start + n], requires_grad=False)
        start += n
    return weight, bias


def row_parallel(layer: nn.Linear, x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """`layer(x)` for a layer whose input columns are split over ranks: partial products summed over ranks,
    the bias added once, after the sum."""
    if not tp.enabled:
        return layer(x)
    out = tp.all_reduce(F.linear(x, layer.weight))
    return out if layer.bias is None else out + layer.bias


class Attention(nn.Module):
    """Self-attention over this rank's heads (all of them without tensor parallelism)."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel):
        super().__init__()
        self.tp = tp
        self.heads = tp.split(cfg.num_heads, "num_attention_heads")
        self.kv_heads = tp.split(cfg.num_kv_heads, "num_key_value_heads")
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:  # Qwen3: RMSNorm over head_dim, per head, before RoPE
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.qkv: tuple[torch.Tensor, torch.Tensor | None] | None = None  # set by `fuse`

    def fuse(self) -> None:
        self.qkv = fuse_linears(self.q_proj, self.k_proj, self.v_proj)

    def forward(self, x, cos, sin, k_cache, v_cache, meta: AttentionMeta) -> torch.Tensor:
        n, h, hkv, d = x.shape[0], self.heads, self.kv_heads, self.head_dim
        if self.qkv is not None:
            qkv = F.linear(x, *self.qkv)
        else:
            qkv = torch.cat((self.q_proj(x), self.k_proj(x), self.v_proj(x)), dim=-1)
        v = qkv[:, (h + hkv) * d :].view(n, hkv, d)
        if hasattr(self, "q_norm"):
            q = apply_rope(self.q_norm(qkv[:, : h * d].view(n, h, d)), cos, sin)
            k = apply_rope(self.k_norm(qkv[:, h * d : (h + hkv) * d].view(n, hkv, d)), cos, sin)
        else:  # q and k side by side: one RoPE pass over both
            qk = apply_rope(qkv[:, : (h + hkv) * d].view(n, h + hkv, d), cos, sin)
            q, k = qk[:, :h], qk[:, h:]
        store_kv(k_cache, v_cache, k, v, meta)
        o = paged_attention(q, k_cache, v_cache, meta)
        return row_parallel(self.o_proj, o.reshape(n, self.heads * self.head_dim), self.tp)


class MLP(nn.Module):
    """SwiGLU MLP of `inter` (this rank's share of the) intermediate units. `reduce`: sum the ranks' partial
    outputs here (a dense layer); an expert leaves that to its mixture, which reduces once for all experts."""

    def __init__(self, hidden: int, inter: int, bias: bool, tp: TensorParallel, reduce: bool = True):
        super().__init__()
        self.tp = tp if reduce else TensorParallel()
        self.gate_proj = nn.Linear(hidden, inter, bias=bias)
        self.up_proj = nn.Linear(hidden, inter, bias=bias)
        self.down_proj = nn.Linear(inter, hidden, bias=bias)
        self.gate_up: tuple[torch.Tensor, torch.Tensor | None] | None = None  # set by `fuse`

    def fuse(self) -> None:
        self.gate_up = fuse_linears(self.gate_proj, self.up_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is None:
            act = F.silu(self.gate_proj(x)) * self.up_proj(x)
        else:
            gate, up = F.linear(x, *self.gate_up).chunk(2, dim=-1)
            act = F.silu(gate) * up
        return row_parallel(self.down_proj, act, self.tp)


def dense_mlp(cfg: ModelConfig, tp: TensorParallel, layer: int) -> nn.Module:
    inter = tp.split(cfg.intermediate_size, "intermediate_size")
    return MLP(cfg.hidden_size, inter, cfg.mlp_bias, tp)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel, mlp: nn.Module):
        super().__init__()
        self.self_attn = Attention(cfg, tp)
        self.mlp = mlp
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, cos, sin, k_cache, v_cache, meta):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, k_cache, v_cache, meta)
        return h + self.mlp(self.post_attention_layernorm(h))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel, mlp_for):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, tp, mlp_for(cfg, tp, i)) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    # builds each layer's MLP (cfg, tp, layer index): a mixture-of-experts model plugs its own in
    mlp_for = staticmethod(dense_mlp)
    # whether a decode step can be captured as a CUDA graph (no host sync, no data-dependent shapes)
    cuda_graphs = True

    def __init__(self, cfg: ModelConfig, tp: TensorParallel | None = None):
        super().__init__()
        self.config = cfg
        self.tp = tp or TensorParallel()
        self.model = Backbone(cfg, self.tp, self.mlp_for)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        inv_freq, self.rope_factor = rope_inv_freq(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.fused = False

    def init_buffers(self, device) -> None:
        self.inv_freq = rope_inv_freq(self.config)[0].to(device)

    def fuse_projections(self) -> None:
        """q/k/v and gate/up as one matmul each. Done at the first forward, not at load time: the loader
        still holds the checkpoint's tensors then, and fusing every layer at once would need the fused
        copies beside all of them; here one layer's originals are freed before the next is fused."""
        with torch.inference_mode(False), torch.no_grad():
            for layer in self.model.layers:
                layer.self_attn.fuse()
                layer.mlp.fuse()
        self.fused = True

    def foreign(self, name: str) -> bool:
        """Whether checkpoint tensor `name` belongs to another rank (the loader skips it)."""
        return False

    def tie_weights(self) -> None:
        self.lm_head.weight = self.model.embed_tokens.weight

    def rope(self, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # angles in fp32 (bf16 positions lose whole radians past a few hundred tokens), applied in the
        # activation dtype as transformers does; [T, 1, head_dim] to broadcast over heads
        angles = positions.float()[:, None] * self.inv_freq.float()[None, :]
        emb = torch.cat((angles, angles), dim=-1)
        cos, sin = emb.cos() * self.rope_factor, emb.sin() * self.rope_factor
        return cos.to(dtype)[:, None, :], sin.to(dtype)[:, None, :]

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache,
        meta: AttentionMeta,
        logit_rows: torch.Tensor | None,
        embeds: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor | None:
        """Logits (fp32, [len(logit_rows), vocab]) of the given rows; KV of every token goes to `kv_cache`
        (a `KVCache`). `logit_rows` None: the KV only (ranks that do not sample). `embeds` (rows, values):
        input embeddings that replace those rows' token embeddings (a multimodal model's image tokens)."""
        if not self.fused:
            self.fuse_projections()
        h = self.model.embed_tokens(input_ids)
        if embeds is not None:
            h = h.index_copy(0, embeds[0], embeds[1].to(h.dtype))
        cos, sin = self.rope(positions, h.dtype)
        for i, layer in enumerate(self.model.layers):
            h = layer(h, cos, sin, kv_cache.k(i), kv_cache.v(i), meta)
        if logit_rows is None:
            return None
        h = self.model.norm(h.index_select(0, logit_rows))
        return self.lm_head(h).float()
