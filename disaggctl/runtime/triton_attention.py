"""Paged decode attention in Triton: each query token reads its sequence's pages where they lie.

The torch reference (`attention._decode_attention`) gathers every cached key and value of a decoding
sequence into a fresh tensor per layer per step; at long contexts that copy is most of the step. Here a
program reads the keys of one KV head straight from the pages named by the block table, with all the
query heads that share that KV head (GQA) as the rows of one small matmul.

Split-KV ("flash-decoding"): a sequence's context is cut into up to `splits` chunks handled by
separate programs, whose partial softmax states a second kernel combines, so that a batch of one long
sequence still fills the GPU. `splits` follows the batch size only (about `TARGET_PROGRAMS` programs in
all), never the lengths, which live on the device: a CUDA graph captured for a batch size stays valid for
any context. Where a split starts depends on the sequence's length and `splits`, so one batch size gives
the same bits eagerly and in a graph.

Everything the kernels read is a tensor (block table, lengths), nothing is a Python value that changes
per step: that is what lets a captured graph replay them with new contents.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_SPLITS = 32  # programs per (sequence, KV head); short contexts use fewer, the rest exit at once
TARGET_PROGRAMS = 2048  # enough to fill a GPU's SMs a few times over; more only adds empty programs
# block shapes measured on an H200 (benchmarks/paged_attention.py, docs/benchmarks.md)
MIN_SPLIT_TOKENS = 256  # below this a split costs more in its launch and combine than it saves
BLOCK_N = 64  # keys per inner iteration
NUM_WARPS = 4


def num_splits(batch: int, kv_heads: int) -> int:
    """Programs per (sequence, KV head): a power of two, from the batch shape alone."""
    want = max(1, TARGET_PROGRAMS // max(1, batch * kv_heads))
    return min(MAX_SPLITS, 1 << (want.bit_length() - 1))


@triton.jit
def _partial_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, lens_ptr, acc_ptr, ml_ptr,
    scale,
    stride_qb, stride_qh,
    stride_kpage, stride_kslot, stride_khead,
    stride_vpage, stride_vslot, stride_vhead,
    stride_tb,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr, BLOCK: tl.constexpr, SPLITS: tl.constexpr, MIN_SPLIT: tl.constexpr,
    IEEE: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    num_heads = tl.num_programs(1) * GROUP
    seq_len = tl.load(lens_ptr + b)
    split_len = tl.maximum(tl.cdiv(seq_len, SPLITS), MIN_SPLIT)
    split_len = tl.cdiv(split_len, BLOCK) * BLOCK
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kvh * GROUP + offs_g
    g_ok = offs_g < GROUP
    d_ok = offs_d < HEAD_DIM
    out_rows = (b * num_heads + heads) * SPLITS + split  # [BLOCK_G] rows of the partial buffers
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=g_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for t0 in range(start, end, BLOCK):
        offs_n = t0 + tl.arange(0, BLOCK)
        n_ok = offs_n < end
        page = tl.load(table_ptr + b * stride_tb + offs_n // PAGE, mask=n_ok, other=0)
        page = page.to(tl.int64)
        offset = offs_n % PAGE
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(
            k_ptr + (page * stride_kpage + offset * stride_kslot)[:, None] + kvh * stride_khead + offs_d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(n_ok[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_ptr + (page * stride_vpage + offset * stride_vslot)[:, None] + kvh * stride_vhead + offs_d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        # probabilities rounded to the values' dtype before the matmul, as transformers' eager path does
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    # a split past the sequence's end stores the empty state (m = -inf, l = 0), which the combine skips
    tl.store(
        acc_ptr + out_rows[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=g_ok[:, None] & d_ok[None, :]
    )
    tl.store(ml_ptr + out_rows * 2, m_i, mask=g_ok)
    tl.store(ml_ptr + out_rows * 2 + 1, l_i, mask=g_ok)


@triton.jit
def _combine_kernel(
    acc_ptr, ml_ptr, out_ptr, stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    h = tl.program_id(1)
    row0 = (b * tl.num_programs(1) + h) * SPLITS
    offs_s = tl.arange(0, SPLITS)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m = tl.load(ml_ptr + (row0 + offs_s) * 2)
    l_sum = tl.load(ml_ptr + (row0 + offs_s) * 2 + 1)
    m_max = tl.max(m, 0)
    live = m > float("-inf")
    w = tl.where(live, tl.exp(m - m_max), 0.0)
    denom = tl.sum(w * l_sum, 0)
    acc = tl.load(
        acc_ptr + (row0 + offs_s)[:, None] * HEAD_DIM + offs_d[None, :], mask=live[:, None] & d_ok[None, :], other=0.0
    )
    out = tl.sum(acc * w[:, None], 0) / tl.where(denom > 0, denom, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_ok)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    block_n: int = BLOCK_N,
    min_split: int = MIN_SPLIT_TOKENS,
    num_warps: int = NUM_WARPS,
) -> torch.Tensor:
    """One new token per sequence. q: [B, heads, head_dim]; caches: one layer's
    [num_pages, page_size, kv_heads, head_dim] (any strides between pages, slots and heads, unit stride
    within a head); block_table: [B, max_pages] int32; seq_lens: [B] int32, the keys each sequence has,
    including its new token (0: a padding row, whose output is zeros). Returns [B, heads, head_dim]."""
    batch, heads, dim = q.shape
    _, page, kv_heads, _ = k_cache.shape
    if q.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("decode_attention needs unit stride within a head")
    group = heads // kv_heads
    block_d = triton.next_power_of_2(dim)
    splits = num_splits(batch, kv_heads)
    acc = torch.empty((batch * heads * splits, dim), dtype=torch.float32, device=q.device)
    ml = torch.empty((batch * heads * splits, 2), dtype=torch.float32, device=q.device)
    _partial_kernel[(batch, kv_heads, splits)](
        q, k_cache, v_cache, block_table, seq_lens, acc, ml,
        scale,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_table.stride(0),
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=dim, BLOCK_D=block_d,
        PAGE=page, BLOCK=block_n, SPLITS=splits, MIN_SPLIT=min_split,
        IEEE=q.dtype == torch.float32, num_warps=num_warps,
    )  # fmt: skip
    if out is None:
        out = torch.empty_like(q)
    _combine_kernel[(batch, heads)](
        acc, ml, out, out.stride(0), out.stride(1), HEAD_DIM=dim, BLOCK_D=block_d, SPLITS=splits
    )
    return out
