"""Tensor parallelism: which rank holds which slice of each weight, and the one collective the model needs.

Megatron-style split of a Llama-style decoder over `size` ranks: q/k/v and gate/up are column-parallel (each
rank computes its heads / its slice of the intermediate), o_proj and down_proj are row-parallel (each rank
multiplies its slice, then one all-reduce sums the partial outputs). Embedding, norms and the LM head are
replicated: at the sizes the embedded runtime serves they cost less than the collectives that splitting
them would add, and every rank then has whole hidden states. KV heads are split like query heads, so each
rank's KV pool holds `num_kv_heads / size` heads; a model whose heads do not divide is refused up front.
Collectives run over `torch.distributed`: gloo on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch

# Parameter name suffix -> the dimension split over ranks (0: output rows, 1: input columns).
# MLA (DeepSeek): q_b_proj and kv_b_proj are per head, so column-split; q_a and kv_a_proj_with_mqa make the
# latent every head reads, so replicated.
_COLUMN = (
    "q_proj.weight",
    "k_proj.weight",
    "v_proj.weight",
    "gate_proj.weight",
    "up_proj.weight",
    "q_b_proj.weight",
    "kv_b_proj.weight",
)
_COLUMN_BIAS = ("q_proj.bias", "k_proj.bias", "v_proj.bias", "gate_proj.bias", "up_proj.bias")
_ROW = ("o_proj.weight", "down_proj.weight")


@dataclass(frozen=True)
class TensorParallel:
    """This process's place among the ranks of one server (size 1: no parallelism, no process group)."""

    rank: int = 0
    size: int = 1
    ep: bool = False  # experts spread whole over the ranks instead of split like the dense MLP

    @property
    def enabled(self) -> bool:
        return self.size > 1

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum the ranks' partial results in place (row-parallel outputs)."""
        if self.size > 1:
            torch.distributed.all_reduce(t)
        return t

    def split(self, total: int, what: str) -> int:
        if total % self.size:
            raise ValueError(f"{what} ({total}) is not divisible by the tensor-parallel size {self.size}")
        return total // self.size

    def head_range(self, heads: int) -> tuple[int, int]:
        """(first head, head count) of this rank's share of `heads`."""
        n = self.split(heads, "heads")
        return self.rank * n, n


def shard_dim(name: str, ep: bool = False) -> int | None:
    """The dimension of parameter `name` that is split over ranks, or None when it is replicated (or, with
    expert parallelism, an expert's weight: a rank holds its experts whole)."""
    if ep and ".experts." in name:
        return None
    if name.endswith(_COLUMN) or name.endswith(_COLUMN_BIAS):
        return 0
    if name.endswith(_ROW):
        return 1
    return None


def shard(name: str, tensor_slice, shape: tuple[int, ...], tp: TensorParallel) -> torch.Tensor:
    """This rank's slice of a checkpoint tensor (`tensor_slice`: a safetensors slice or a tensor)."""
    dim = shard_dim(name, tp.ep)
    if dim is None or not tp.enabled:
        return tensor_slice[:]
    n = tp.split(shape[dim], name)
    lo, hi = tp.rank * n, (tp.rank + 1) * n
    return tensor_slice[lo:hi] if dim == 0 else tensor_slice[:, lo:hi]


def check_divisible(cfg, size: int, ep: bool = False) -> str | None:
    """Why a model (a `ModelConfig`) cannot be split over `size` ranks, or None."""
    checks = [
        ("num_attention_heads", cfg.num_heads),
        ("num_key_value_heads", cfg.num_kv_heads),
        ("intermediate_size", cfg.intermediate_size),
    ]
    if cfg.num_experts:
        checks.append(
            ("num_experts", cfg.num_experts) if ep else ("moe_intermediate_size", cfg.moe_intermediate_size)
        )
    for what, n in checks:
        if n % size:
            return f"{what} {n} is not divisible by tp {size}"
    return None


def init_process_group(
    tp: TensorParallel, address: str, port: int, device: str, timeout_s: float, a2a: str = "none"
) -> None:
    """Join the server's ranks (gloo on CPU, NCCL on CUDA; `a2a` mooncake: Mooncake's process group, which
    its CUDA wheel registers with torch as "mooncake" and "mooncake-cpu"). Every collective is bounded by `timeout_s`, so a
    rank that dies fails its peers' next collective instead of hanging them. CPU ranks share the host's
    cores: each takes its share of intra-op threads rather than all of them (N ranks x all cores would
    oversubscribe and spin in each other's way)."""
    if not tp.enabled:
        return
    if not device.startswith("cuda") and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // tp.size))
    if torch.distributed.is_initialized():
        raise RuntimeError("this process already has a tensor-parallel group (one engine per process)")
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if a2a == "mooncake":
        try:
            import mooncake.ep  # noqa: F401  (the EP buffer; pre-flight checked both are there)
            import mooncake.pg  # noqa: F401  (registers the backends on import)
        except ImportError as e:
            raise RuntimeError(
                f"moe_a2a_backend mooncake needs mooncake.ep and mooncake.pg (the CUDA build of "
                f"mooncake-transfer-engine): {e}"
            ) from e
        backend = "mooncake" if device.startswith("cuda") else "mooncake-cpu"
    torch.distributed.init_process_group(
        backend,
        init_method=f"tcp://{address}:{port}",
        rank=tp.rank,
        world_size=tp.size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def destroy_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        try:
            torch.distributed.destroy_process_group()
        except Exception:  # a peer already gone: nothing left to tear down cleanly
            pass
