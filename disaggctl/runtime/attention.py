"""Paged attention over one flat step: prefill chunks and decode tokens side by side.

A step feeds each scheduled sequence `q_len` new tokens (a prefill chunk, or 1 for decode) whose keys go to
the end of that sequence's `kv_len` cached tokens. Rows of `q` are the sequences' new tokens back to back.
`AttentionMeta` is built once per step and shared by every layer. `paged_attention` is the one entry point.
Decode rows go either to the pure-torch reference (gather the keys, then matmuls: CPU, and the test
oracle) or, when the meta was built for it (`paged_decode`, CUDA with Triton), to the paged kernel of
`triton_attention.py`, which reads the pages in place; prefill pieces always take SDPA.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from disaggctl.runtime.kv_cache import flat_rows, page_rows_of


@dataclass
class SeqSlice:
    """One sequence's part of a step: `q_len` new tokens at positions `kv_len - q_len .. kv_len - 1`."""

    q_len: int
    kv_len: int
    pages: Sequence[int]


@dataclass
class PrefillGroup:
    """Prefill pieces of one (q_len, kv_len) shape, attended to in one batched SDPA call."""

    rows: torch.Tensor  # [G, q_len] rows of q, one line per sequence
    kv_slots: torch.Tensor  # [G, kv_len] cache slots of each sequence's keys, in position order
    mask: torch.Tensor | None  # [q_len, kv_len] bool, None when plain causal (no cached prefix)


@dataclass
class AttentionMeta:
    scale: float
    page_size: int
    page_rows: int  # token rows from a page to the next in a layer's flat rows (kv_cache.flat_rows)
    slot_mapping: torch.Tensor  # [T] cache slot of each new token
    q_lens: list[int]
    kv_lens: list[int]
    block_table: torch.Tensor  # [B, max_pages] int32 page ids (padding 0): what paged kernels read
    # rows with a single new token are batched together: one gather and two matmuls per layer
    decode_rows: torch.Tensor | None = None  # [Bd]; None with decode_slots set: every row, in order
    decode_slots: torch.Tensor | None = None  # [Bd, Lmax]
    decode_mask: torch.Tensor | None = None  # [Bd, Lmax] True where a key exists
    prefills: list[PrefillGroup] = field(default_factory=list)
    # paged decode kernel: each decoding row's page ids and key count (new token included)
    decode_table: torch.Tensor | None = None  # [Bd, pages] int32
    decode_lens: torch.Tensor | None = None  # [Bd] int32
    # per-step tensors derived at the first layer and reused by the others (decode mask bias, gather rows)
    cache: dict = field(default_factory=dict, repr=False)

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[0])


def build_meta(
    seqs: Sequence[SeqSlice],
    page_size: int,
    scale: float,
    device,
    paged_decode: bool = False,
    page_rows: int | None = None,
) -> AttentionMeta:
    """Describe one step for the attention kernels (host work: numpy, then one copy per tensor).
    `paged_decode`: decode rows go to the paged kernel, which needs their pages and lengths, not slots.
    `page_rows`: the pool's (`KVCache.page_rows`; default `page_size`, a pool of one layer's pages).

    Vectorised over sequences: at decode batch sizes a per-sequence Python loop here costs more than the
    step's attention does on a GPU. Only prefill pieces, few per step, are handled one by one.
    """
    page_rows = page_rows or page_size
    q_lens = np.fromiter((s.q_len for s in seqs), dtype=np.int64, count=len(seqs))
    kv_lens = np.fromiter((s.kv_len for s in seqs), dtype=np.int64, count=len(seqs))
    num_pages = np.fromiter((len(s.pages) for s in seqs), dtype=np.int64, count=len(seqs))
    bad = (kv_lens > num_pages * page_size) | (q_lens < 1) | (q_lens > kv_lens)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"bad step slice: q_len {q_lens[i]}, kv_len {kv_lens[i]}, {num_pages[i]} pages")
    table = np.zeros((len(seqs), int(num_pages.max())), dtype=np.int64)
    table[np.arange(table.shape[1])[None, :] < num_pages[:, None]] = np.fromiter(
        (p for s in seqs for p in s.pages), dtype=np.int64, count=int(num_pages.sum())
    )
    row_starts = np.cumsum(q_lens) - q_lens
    total = int(q_lens.sum())
    seq_of_row = np.repeat(np.arange(len(seqs)), q_lens)
    positions = np.arange(total) - row_starts[seq_of_row] + (kv_lens - q_lens)[seq_of_row]
    slot_mapping = table[seq_of_row, positions // page_size] * page_rows + positions % page_size

    # (q_len, kv_len) -> (rows, kv slots) of each piece: equal shapes share one SDPA call per layer
    groups: dict[tuple[int, int], tuple[list[np.ndarray], list[np.ndarray]]] = {}
    for i in np.flatnonzero(q_lens > 1).tolist():
        q_len, kv_len = int(q_lens[i]), int(kv_lens[i])
        rows, slots = groups.setdefault((q_len, kv_len), ([], []))
        rows.append(np.arange(row_starts[i], row_starts[i] + q_len))
        kv_pos = np.arange(kv_len)
        slots.append(table[i, kv_pos // page_size] * page_rows + kv_pos % page_size)
    prefills = []
    for (q_len, kv_len), (rows, slots) in groups.items():
        mask = None
        if kv_len != q_len:  # causal, shifted by the cached prefix
            q_pos = torch.arange(kv_len - q_len, kv_len, device=device)
            mask = torch.arange(kv_len, device=device)[None, :] <= q_pos[:, None]
        prefills.append(
            PrefillGroup(
                torch.from_numpy(np.stack(rows)).to(device),
                torch.from_numpy(np.stack(slots)).to(device),
                mask,
            )
        )
    meta = AttentionMeta(
        scale=scale,
        page_size=page_size,
        page_rows=page_rows,
        slot_mapping=torch.from_numpy(slot_mapping).to(device),
        q_lens=q_lens.tolist(),
        kv_lens=kv_lens.tolist(),
        block_table=torch.from_numpy(table).to(device=device, dtype=torch.int32),
        prefills=prefills,
    )
    decoding = np.flatnonzero(q_lens == 1)
    if decoding.size:
        if decoding.size != total:  # a pure decode step needs no row gather and scatter
            meta.decode_rows = torch.from_numpy(row_starts[decoding]).to(device)
        decode_kv = kv_lens[decoding]
        if paged_decode:
            table_d = table[decoding] if decoding.size != len(seqs) else table
            meta.decode_table = torch.from_numpy(table_d.astype(np.int32)).to(device)
            meta.decode_lens = torch.from_numpy(decode_kv.astype(np.int32)).to(device)
            return meta
        lmax = int(decode_kv.max())
        pages_d = table[decoding, : (lmax + page_size - 1) // page_size]
        slots = (pages_d[:, :, None] * page_rows + np.arange(page_size)).reshape(decoding.size, -1)[:, :lmax]
        valid = np.arange(lmax)[None, :] < decode_kv[:, None]
        # Masked slots still go through the matmul (weight 0, but 0 * NaN is NaN): point them at the
        # sequence's own first key, never at unwritten or foreign bytes (a late remote write, say).
        slots = np.where(valid, slots, slots[:, :1])
        meta.decode_slots = torch.from_numpy(np.ascontiguousarray(slots)).to(device)
        meta.decode_mask = torch.from_numpy(valid).to(device)
    return meta


def rows(cache: torch.Tensor, meta: AttentionMeta) -> torch.Tensor:
    """One layer's pages as the flat token rows that the meta's slots index."""
    if page_rows_of(cache) != meta.page_rows:
        raise ValueError(f"the step was described for {meta.page_rows} rows a page, the pool has {page_rows_of(cache)}")
    return flat_rows(cache)


def store_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k, v, meta: AttentionMeta) -> None:
    """Write the step's new keys/values ([T, kv_heads, head_dim]) into their slots of one layer's pages."""
    rows(k_cache, meta).index_copy_(0, meta.slot_mapping, k)
    rows(v_cache, meta).index_copy_(0, meta.slot_mapping, v)


def _decode_attention(q, kf, vf, meta: AttentionMeta) -> torch.Tensor:
    """q: [Bd, H, D] one token per sequence -> [Bd, H, D].

    Hand-written rather than SDPA: with a padding mask and grouped KV heads SDPA takes its math path,
    about fifteen small kernels per layer; this is five. Query heads h*G .. h*G+G-1 share KV head h, as
    in transformers' repeat_kv, so the group folds into the matmul's row dimension.
    """
    bd, heads, dim = q.shape
    kv_heads = kf.shape[1]
    key = ("decode", q.dtype, kv_heads)
    if key not in meta.cache:
        bias = torch.zeros(meta.decode_mask.shape, dtype=q.dtype, device=q.device)
        bias.masked_fill_(~meta.decode_mask, float("-inf"))
        bias = bias[:, None, None, :].expand(-1, kv_heads, 1, -1).reshape(bd * kv_heads, 1, -1)
        # rows of the [slots * kv_heads, D] view, in [Bd, Hkv, L] order: index_select with one flat
        # index costs a fraction of the host time of advanced indexing with two
        head_ids = torch.arange(kv_heads, device=q.device)[None, :, None]
        rows = (meta.decode_slots[:, None, :] * kv_heads + head_ids).reshape(-1)
        meta.cache[key] = (bias, rows)
    bias, rows = meta.cache[key]
    k = kf.view(-1, dim).index_select(0, rows).view(bd * kv_heads, -1, dim)  # [Bd*Hkv, L, D]
    v = vf.view(-1, dim).index_select(0, rows).view(bd * kv_heads, -1, dim)
    qg = q.reshape(bd * kv_heads, heads // kv_heads, dim)
    scores = torch.baddbmm(bias, qg, k.transpose(1, 2), alpha=meta.scale)
    # softmax accumulates in fp32 and rounds once, as transformers' eager attention does
    return torch.bmm(torch.softmax(scores, dim=-1), v).view(bd, heads, dim)


def _decode_rows(q, k_cache, v_cache, meta: AttentionMeta) -> torch.Tensor:
    """Attention of the decode rows' queries [Bd, H, D]."""
    if meta.decode_lens is not None:
        from disaggctl.runtime.triton_attention import decode_attention

        return decode_attention(q, k_cache, v_cache, meta.decode_table, meta.decode_lens, meta.scale)
    return _decode_attention(q.contiguous(), rows(k_cache, meta), rows(v_cache, meta), meta)


def paged_attention(q, k_cache, v_cache, meta: AttentionMeta) -> torch.Tensor:
    """q: [T, heads, head_dim]; caches: one layer's [num_pages, page_size, kv_heads, head_dim].
    Decode rows as `_decode_rows` says; each prefill group gathers its keys by slot, then SDPA with the
    right causal offset."""
    decoding = meta.decode_slots is not None or meta.decode_lens is not None
    if decoding and meta.decode_rows is None:
        return _decode_rows(q, k_cache, v_cache, meta)
    kf, vf = rows(k_cache, meta), rows(v_cache, meta)
    out = torch.empty_like(q)
    if decoding:
        o = _decode_rows(q.index_select(0, meta.decode_rows), k_cache, v_cache, meta)
        out.index_copy_(0, meta.decode_rows, o)
    for p in meta.prefills:
        qp = q[p.rows].transpose(1, 2)  # [G, H, n, D]
        k = kf[p.kv_slots].transpose(1, 2)  # [G, Hkv, kv_len, D]
        v = vf[p.kv_slots].transpose(1, 2)
        o = F.scaled_dot_product_attention(
            qp, k, v, attn_mask=p.mask, is_causal=p.mask is None, scale=meta.scale, enable_gqa=True
        )
        out.index_copy_(0, p.rows.reshape(-1), o.transpose(1, 2).reshape(-1, *q.shape[1:]))
    return out
