"""Mixture-of-experts decoders: Qwen3-MoE (a Qwen3 with some MLPs replaced by routed experts).

Routing as transformers does it: softmax over the experts in fp32, the top `num_experts_per_tok`, optionally
renormalised (`norm_topk_prob`), cast back to the activations' dtype; each token's output is the weighted sum
of its experts' outputs. Over tensor-parallel ranks the experts are either split like the dense MLP (each
rank a slice of every expert's intermediate units, `ep_size` 1) or spread whole (expert parallelism: rank r
holds experts r*E/N .. (r+1)*E/N - 1). Tokens are whole on every rank (attention's all-reduce made them so),
so dispatch is local: each rank runs the tokens routed to its experts, and one all-reduce per layer combines
the ranks' partial sums (docs/topology.md says why all-to-all is not needed without attention-DP).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from disaggctl.runtime.config import ModelConfig
from disaggctl.runtime.models.llama import MLP, LlamaForCausalLM, dense_mlp
from disaggctl.runtime.parallel import TensorParallel


class SparseMoE(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel):
        super().__init__()
        self.tp = tp
        self.top_k = cfg.num_experts_per_tok
        self.norm_topk_prob = cfg.norm_topk_prob
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)  # the router, replicated
        if tp.ep:
            per = tp.split(cfg.num_experts, "num_experts")
            owned, inter = range(tp.rank * per, (tp.rank + 1) * per), cfg.moe_intermediate_size
        else:
            owned, inter = (
                range(cfg.num_experts),
                tp.split(cfg.moe_intermediate_size, "moe_intermediate_size"),
            )
        # keyed by the checkpoint's expert index, so that names load as they are (experts.<i>.gate_proj...)
        self.experts = nn.ModuleDict(
            {str(i): MLP(cfg.hidden_size, inter, False, tp, reduce=False) for i in owned}
        )

    def fuse(self) -> None:
        for expert in self.experts.values():
            expert.fuse()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(F.linear(x, self.gate.weight), dim=-1, dtype=torch.float32)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        hit = torch.unique(chosen).tolist()  # one host sync per layer: which of the experts have tokens
        for e in hit:
            expert = self.experts[str(e)] if str(e) in self.experts else None
            if expert is None:
                continue  # another rank's expert
            token, slot = torch.where(chosen == e)
            y = expert(x.index_select(0, token)) * weights[token, slot, None]
            out.index_add_(0, token, y)
        return self.tp.all_reduce(out)


def qwen3_moe_mlp(cfg: ModelConfig, tp: TensorParallel, layer: int) -> nn.Module:
    return SparseMoE(cfg, tp) if layer in cfg.sparse_layers else dense_mlp(cfg, tp, layer)


class Qwen3MoeForCausalLM(LlamaForCausalLM):
    mlp_for = staticmethod(qwen3_moe_mlp)
    cuda_graphs = False  # the experts a step hits are read back to the host (data-dependent shapes)

    def foreign(self, name: str) -> bool:
        # with expert parallelism, other ranks' experts are in the checkpoint but not in this shard
        return self.tp.ep and ".mlp.experts." in name
