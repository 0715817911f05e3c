"""DeepSeek-V3 architecture: multi-head latent attention (MLA) and a mixture of experts with shared experts.

MLA caches one compressed latent per token instead of per-head keys and values: `kv_a_proj_with_mqa`
gives `kv_lora_rank` latent units (normalised by `kv_a_layernorm`) and `qk_rope_head_dim` rotary key units
shared by every head; the cache holds both, roped, as one "head" of `kv_lora_rank + qk_rope_head_dim` per
token (`KVCache` with one part per layer). Attention runs on the latent directly: `kv_b_proj`'s key half
is folded into the queries and its value half applied to the attended latent, so the cached tokens are
never expanded to per-head K/V. With tensor parallelism each rank computes its share of the query heads
(q_b_proj, kv_b_proj, o_proj split by head), but every head reads the same latent, so the latent cache is
replicated: every rank stores the whole of it, and a PD transfer takes it from one of them.

Routing as transformers does it: sigmoid scores in fp32; the correction bias is added only to choose
(groups scored by their best two experts, the best `topk_group` groups kept, the top `num_experts_per_tok`
experts in them); the chosen experts' unbiased scores are the weights, renormalised with `norm_topk_prob`,
times `routed_scaling_factor`. Shared experts see every token; experts are split or spread over ranks as in
`moe.py`, and one all-reduce combines routed and shared parts. The first `first_k_dense_replace` layers
have a dense MLP. The attention is in torch here, not in `attention.py`: its kernels are for per-head KV.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from disaggctl.runtime.attention import AttentionMeta
from disaggctl.runtime.config import ModelConfig
from disaggctl.runtime.models.llama import MLP, RMSNorm, dense_mlp, rope_inv_freq, row_parallel
from disaggctl.runtime.models.moe import SparseMoE
from disaggctl.runtime.parallel import TensorParallel

# transformers builds q_a_layernorm and kv_a_layernorm with its RMSNorm's default eps, not rms_norm_eps
LATENT_NORM_EPS = 1e-6


def softmax_scale(cfg: ModelConfig) -> float:
    """1/sqrt(qk head dim), times YaRN's mscale squared when the context is stretched (mscale_all_dim)."""
    scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    rope = cfg.rope
    if rope.get("rope_type", "default") != "default" and rope.get("mscale_all_dim"):
        factor = float(rope["factor"])
        m = 1.0 if factor <= 1 else 0.1 * float(rope["mscale_all_dim"]) * math.log(factor) + 1.0
        scale *= m * m
    return scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate pairs of `x`'s last dim by the angles in cos/sin ([T, 1, dim/2]). DeepSeek's checkpoints pair
    neighbours (x0, x1), (x2, x3)...; the output puts the pairs' first halves first, as transformers does:
    queries and keys get the same order, so their dot products are those of the interleaved rotation."""
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def decode_slots(meta: AttentionMeta) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(slots [Bd, L], mask [Bd, L]) of the step's decode rows, or None without any. A meta built for the
    paged decode kernel (CUDA with Triton) carries their page table and lengths instead; the slots are
    derived from those once per step."""
    if meta.decode_slots is not None:
        return meta.decode_slots, meta.decode_mask
    if meta.decode_table is None:
        return None
    if "latent_decode" not in meta.cache:
        table, lens = meta.decode_table.long(), meta.decode_lens.long()
        pos = torch.arange(int(lens.max()), device=table.device)
        slots = table[:, pos // meta.page_size] * meta.page_rows + pos % meta.page_size
        valid = pos[None, :] < lens[:, None]
        # masked slots point at the sequence's own first key, never at unwritten bytes (0 * NaN is NaN)
        meta.cache["latent_decode"] = (torch.where(valid, slots, slots[:, :1]), valid)
    return meta.cache["latent_decode"]


class LatentAttention(nn.Module):
    """MLA over this rank's heads, reading and writing the per-token latent of one layer's cache."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel):
        super().__init__()
        self.tp = tp
        self.heads = tp.split(cfg.num_heads, "num_attention_heads")
        self.nope, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.rank = cfg.kv_lora_rank
        self.interleave = cfg.rope_interleave
        self.scale = softmax_scale(cfg)
        qk = self.nope + self.rope_dim
        bias = cfg.o_bias  # attention_bias: q_a, kv_a and o projections
        if cfg.q_lora_rank:
            self.q_a_proj = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, self.heads * qk, bias=False)
        else:
            self.q_proj = nn.Linear(cfg.hidden_size, self.heads * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.hidden_size, self.rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.rank, self.heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.heads * self.v_dim, cfg.hidden_size, bias=bias)

    def forward(self, x, cos, sin, latent_cache: torch.Tensor, meta: AttentionMeta) -> torch.Tensor:
        """x: [T, hidden]; latent_cache: this layer's [slots, kv_lora_rank + qk_rope_head_dim]."""
        n, h, r = x.shape[0], self.heads, self.rank
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_pe = q.view(n, h, -1).split((self.nope, self.rope_dim), dim=-1)
        q_pe = apply_rope(q_pe, cos, sin, self.interleave)
        c, k_pe = self.kv_a_proj_with_mqa(x).split((r, self.rope_dim), dim=-1)
        k_pe = apply_rope(k_pe[:, None, :], cos, sin, self.interleave)[:, 0]
        latent_cache.index_copy_(0, meta.slot_mapping, torch.cat((self.kv_a_layernorm(c), k_pe), dim=-1))

        # kv_b_proj per head: [h, nope + v, r]; its key half turns a query into latent space
        w = self.kv_b_proj.weight.view(h, self.nope + self.v_dim, r)
        q_lat = torch.einsum("thd,hdr->thr", q_nope, w[:, : self.nope])
        out = torch.empty(n, h, r, dtype=x.dtype, device=x.device)
        decode = decode_slots(meta)
        if decode is not None:
            rows = meta.decode_rows
            qd = (q_lat, q_pe) if rows is None else (q_lat[rows], q_pe[rows])
            lat = latent_cache[decode[0]]  # [Bd, L, r + rope]
            o = self._attend(qd[0][:, None], qd[1][:, None], lat, decode[1][:, None, :])[:, 0]
            if rows is None:
                out = o
            else:
                out.index_copy_(0, rows, o)
        for p in meta.prefills:
            q_len, kv_len = p.rows.shape[1], p.kv_slots.shape[1]
            mask = p.mask
            if mask is None:  # plain causal
                mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=x.device).tril()
            o = self._attend(q_lat[p.rows], q_pe[p.rows], latent_cache[p.kv_slots], mask[None])
            out.index_copy_(0, p.rows.reshape(-1), o.reshape(-1, h, r))
        o = torch.einsum("thr,hvr->thv", out, w[:, self.nope :])
        return row_parallel(self.o_proj, o.reshape(n, h * self.v_dim), self.tp)

    def _attend(self, q_lat, q_pe, lat, mask) -> torch.Tensor:
        """q_lat [G, q, h, r], q_pe [G, q, h, rope], lat [G, L, r + rope], mask [G or 1, q, L] (True: a key
        the query sees) -> the attended latent [G, q, h, r]."""
        c, k_pe = lat[..., : self.rank], lat[..., self.rank :]
        scores = torch.einsum("gqhr,glr->ghql", q_lat, c) + torch.einsum("gqhp,glp->ghql", q_pe, k_pe)
        scores = (scores * self.scale).masked_fill(~mask[:, None], float("-inf"))
        # softmax accumulates in fp32 and rounds once, as transformers' eager attention does
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(c.dtype)
        return torch.einsum("ghql,glr->gqhr", probs, c)


class Router(nn.Module):
    """The gate's weight and the correction bias (checkpoint names `gate.weight`,
    `gate.e_score_correction_bias`), both kept in fp32 as transformers does."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.num_experts))


class DeepseekMoE(SparseMoE):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel):
        super().__init__(cfg, tp)
        self.gate = Router(cfg)
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.scaling = cfg.routed_scaling_factor
        if cfg.n_shared_experts:  # split over the ranks like a dense MLP, summed by the mixture's all-reduce
            inter = tp.split(cfg.moe_intermediate_size * cfg.n_shared_experts, "shared experts' width")
            self.shared_experts = MLP(cfg.hidden_size, inter, False, tp, reduce=False)

    def fuse(self) -> None:
        super().fuse()
        if hasattr(self, "shared_experts"):
            self.shared_experts.fuse()

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.sigmoid(F.linear(x.float(), self.gate.weight.float()))
        choice = scores + self.gate.e_score_correction_bias.float()
        t, e = choice.shape
        groups = choice.view(t, self.n_group, e // self.n_group)
        group_scores = groups.topk(2, dim=-1)[0].sum(dim=-1)  # [T, n_group]
        best = torch.topk(group_scores, self.topk_group, dim=-1, sorted=False)[1]
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        choice = choice.masked_fill(~keep[:, :, None].expand_as(groups).reshape(t, e), float("-inf"))
        chosen = torch.topk(choice, self.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, chosen)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return (weights * self.scaling).to(x.dtype), chosen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dispatch(x, *self.route(x))
        if hasattr(self, "shared_experts"):
            out = out + self.shared_experts(x)
        return self.tp.all_reduce(out)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel, layer: int):
        super().__init__()
        self.self_attn = LatentAttention(cfg, tp)
        sparse = cfg.num_experts and layer in cfg.sparse_layers
        self.mlp = DeepseekMoE(cfg, tp) if sparse else dense_mlp(cfg, tp, layer)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, cos, sin, latent_cache, meta):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, latent_cache, meta)
        return h + self.mlp(self.post_attention_layernorm(h))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, tp, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DeepseekV3ForCausalLM(nn.Module):
    fp32_params = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias")
    cuda_graphs = False  # the experts a step hits are read back to the host (data-dependent shapes)

    def __init__(self, cfg: ModelConfig, tp: TensorParallel | None = None):
        super().__init__()
        self.config = cfg
        self.tp = tp or TensorParallel()
        self.model = Backbone(cfg, self.tp)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        inv_freq, self.rope_factor = rope_inv_freq(cfg)  # over qk_rope_head_dim (cfg.head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.fused = False

    def init_buffers(self, device) -> None:
        self.inv_freq = rope_inv_freq(self.config)[0].to(device)

    def foreign(self, name: str) -> bool:
        """Other ranks' experts, and layers past num_hidden_layers (DeepSeek-V3's multi-token-prediction
        layer, which greedy decoding does not use)."""
        if self.tp.ep and ".mlp.experts." in name:
            return True
        parts = name.split(".")
        return (
            name.startswith("model.layers.")
            and parts[2].isdigit()
            and int(parts[2]) >= self.config.num_layers
        )

    def tie_weights(self) -> None:
        self.lm_head.weight = self.model.embed_tokens.weight

    def rope(self, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of each position's angles ([T, 1, rope_dim / 2]), in fp32 then cast, as transformers."""
        angles = positions.float()[:, None] * self.inv_freq.float()[None, :]
        cos, sin = angles.cos() * self.rope_factor, angles.sin() * self.rope_factor
        return cos.to(dtype)[:, None, :], sin.to(dtype)[:, None, :]

    @torch.inference_mode()
    def forward(self, input_ids, positions, kv_cache, meta: AttentionMeta, logit_rows):
        """As `LlamaForCausalLM.forward`; `kv_cache` is a latent pool (`KVCache` with one part per layer)."""
        if not self.fused:
            with torch.inference_mode(False), torch.no_grad():
                for layer in self.model.layers:
                    layer.mlp.fuse()
            self.fused = True
        h = self.model.embed_tokens(input_ids)
        cos, sin = self.rope(positions, h.dtype)
        for i, layer in enumerate(self.model.layers):
            h = layer(h, cos, sin, kv_cache.latent(i), meta)
        if logit_rows is None:
            return None
        h = self.model.norm(h.index_select(0, logit_rows))
        return self.lm_head(h).float()
