"""Paged attention over one flat step: prefill chunks and decode tokens side by side.

A step feeds each scheduled sequence `q_len` new tokens (a prefill chunk, or 1 for decode) whose keys go to
the end of that sequence's `kv_len` cached tokens. Rows of `q` are the sequences' new tokens back to back.
`AttentionMeta` is built once per step and shared by every layer. `paged_attention` is the one entry point;
`KERNELS` maps a device type to a faster kernel when one is registered (a Triton or FlashInfer paged
kernel on CUDA goes there), and the pure-torch reference serves everything else.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class SeqSlice:
    """One sequence's part of a step: `q_len` new tokens at positions `kv_len - q_len .. kv_len - 1`."""

    q_len: int
    kv_len: int
    pages: Sequence[int]


@dataclass
class PrefillPiece:
    q_start: int
    q_len: int
    kv_slots: torch.Tensor  # [kv_len] cache slots of the sequence's keys, in position order
    mask: torch.Tensor | None  # [q_len, kv_len] bool, None when plain causal (no cached prefix)


@dataclass
class AttentionMeta:
    scale: float
    page_size: int
    slot_mapping: torch.Tensor  # [T] cache slot of each new token
    q_lens: list[int]
    kv_lens: list[int]
    block_table: torch.Tensor  # [B, max_pages] int32 page ids (padding 0): what paged kernels read
    # rows with a single new token are batched together: one gather and one SDPA per layer
    decode_rows: torch.Tensor | None = None  # [Bd]
    decode_slots: torch.Tensor | None = None  # [Bd, Lmax]
    decode_mask: torch.Tensor | None = None  # [Bd, 1, 1, Lmax] True where a key exists
    prefills: list[PrefillPiece] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[0])


def _slots(pages: np.ndarray, positions: np.ndarray, page_size: int) -> np.ndarray:
    return pages[positions // page_size] * page_size + positions % page_size


def build_meta(seqs: Sequence[SeqSlice], page_size: int, scale: float, device) -> AttentionMeta:
    """Describe one step for the attention kernels (host work: numpy, then one copy per tensor)."""
    slot_mapping, decode_idx, decode_kv, decode_pages = [], [], [], []
    prefills = []
    max_pages = max(len(s.pages) for s in seqs)
    table = np.zeros((len(seqs), max_pages), dtype=np.int64)
    row = 0
    for i, s in enumerate(seqs):
        pages = np.asarray(s.pages, dtype=np.int64)
        if s.kv_len > len(pages) * page_size or s.q_len < 1 or s.q_len > s.kv_len:
            raise ValueError(f"bad step slice: q_len {s.q_len}, kv_len {s.kv_len}, {len(pages)} pages")
        table[i, : len(pages)] = pages
        slot_mapping.append(_slots(pages, np.arange(s.kv_len - s.q_len, s.kv_len), page_size))
        if s.q_len == 1:
            decode_idx.append(row)
            decode_kv.append(s.kv_len)
            decode_pages.append(i)
        else:
            kv_slots = torch.from_numpy(_slots(pages, np.arange(s.kv_len), page_size)).to(device)
            mask = None
            if s.kv_len != s.q_len:  # causal, shifted by the cached prefix
                q_pos = torch.arange(s.kv_len - s.q_len, s.kv_len, device=device)
                mask = torch.arange(s.kv_len, device=device)[None, :] <= q_pos[:, None]
            prefills.append(PrefillPiece(row, s.q_len, kv_slots, mask))
        row += s.q_len
    meta = AttentionMeta(
        scale=scale,
        page_size=page_size,
        slot_mapping=torch.from_numpy(np.concatenate(slot_mapping)).to(device),
        q_lens=[s.q_len for s in seqs],
        kv_lens=[s.kv_len for s in seqs],
        block_table=torch.from_numpy(table).to(device=device, dtype=torch.int32),
        prefills=prefills,
    )
    if decode_idx:
        lmax = max(decode_kv)
        pages_d = table[decode_pages, : (lmax + page_size - 1) // page_size]
        slots = (pages_d[:, :, None] * page_size + np.arange(page_size)).reshape(len(decode_idx), -1)[
            :, :lmax
        ]
        kv_lens = np.asarray(decode_kv)
        meta.decode_rows = torch.tensor(decode_idx, device=device)
        meta.decode_slots = torch.from_numpy(np.ascontiguousarray(slots)).to(device)
        meta.decode_mask = torch.from_numpy(np.arange(lmax)[None, :] < kv_lens[:, None]).to(device)[
            :, None, None
        ]
    return meta


def store_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k, v, meta: AttentionMeta) -> None:
    """Write the step's new keys/values ([T, kv_heads, head_dim]) into their slots of one layer's pages."""
    heads, dim = k_cache.shape[-2:]
    k_cache.view(-1, heads, dim).index_copy_(0, meta.slot_mapping, k)
    v_cache.view(-1, heads, dim).index_copy_(0, meta.slot_mapping, v)


def torch_reference(q, k_cache, v_cache, meta: AttentionMeta) -> torch.Tensor:
    """Gather each sequence's keys/values by slot, then SDPA with the right causal offset."""
    heads, dim = k_cache.shape[-2:]
    kf, vf = k_cache.view(-1, heads, dim), v_cache.view(-1, heads, dim)
    out = torch.empty_like(q)
    if meta.decode_rows is not None:
        qd = q.index_select(0, meta.decode_rows).unsqueeze(2)  # [Bd, H, 1, D]
        k = kf[meta.decode_slots].transpose(1, 2)  # [Bd, Hkv, L, D]
        v = vf[meta.decode_slots].transpose(1, 2)
        o = F.scaled_dot_product_attention(
            qd, k, v, attn_mask=meta.decode_mask, scale=meta.scale, enable_gqa=True
        )
        out.index_copy_(0, meta.decode_rows, o.squeeze(2))
    for p in meta.prefills:
        qp = q[p.q_start : p.q_start + p.q_len].transpose(0, 1)  # [H, n, D]
        k = kf[p.kv_slots].transpose(0, 1)
        v = vf[p.kv_slots].transpose(0, 1)
        o = F.scaled_dot_product_attention(
            qp, k, v, attn_mask=p.mask, is_causal=p.mask is None, scale=meta.scale, enable_gqa=True
        )
        out[p.q_start : p.q_start + p.q_len] = o.transpose(0, 1)
    return out


# device type -> kernel with the signature of `torch_reference`
KERNELS: dict[str, Callable[..., torch.Tensor]] = {}


def paged_attention(q, k_cache, v_cache, meta: AttentionMeta) -> torch.Tensor:
    """q: [T, heads, head_dim]; caches: one layer's [num_pages, page_size, kv_heads, head_dim]."""
    return KERNELS.get(q.device.type, torch_reference)(q, k_cache, v_cache, meta)
