"""Addresses of KV pages in a paged pool, and the merged write list that ships them.

A pool is one contiguous tensor in one of two orders. Page-major (what the runtime allocates):
`[num_pages, num_layers, parts, page_size, num_kv_heads, head_dim]`, page `p` of (layer, part) at
`base + ((p * num_layers + layer) * parts + part) * page_bytes`, so a run of pages is one range across
every layer. Layer-major: `[num_layers, parts, num_pages, ...]`, at
`base + ((layer * parts + part) * num_pages + p) * page_bytes`, a run of pages one range per (layer,
part). `parts` is the pool's own (2: K and V; 1: MLA's latent), said by its layout; the writes below cover
every part of every layer whatever it is. Every Mooncake entry costs tens of microseconds (about 20 over
same-host NVLink), so pages contiguous on both sides are sent as one range, and ranges that continue
each other are joined: page-major pools ship a prompt in as many entries as it has page runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

_FIELDS = ("base_ptr", "num_layers", "num_pages", "page_bytes", "page_size", "parts")


@dataclass(frozen=True)
class KvLayout:
    """Where a KV pool lives in memory. `page_size` is tokens per page; `page_bytes` is one (layer, part)
    page; `parts` the slabs per layer (2: K and V; 1: a latent)."""

    base_ptr: int
    num_layers: int
    num_pages: int
    page_bytes: int
    page_size: int
    parts: int = 2
    page_major: bool = False  # the order of the pool's dimensions (module docstring)

    def __post_init__(self) -> None:
        if not isinstance(self.page_major, bool):
            raise ValueError(f"KV layout field page_major must be true or false, got {self.page_major!r}")
        for name in _FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"KV layout field {name} must be an integer, got {value!r}")
            if value <= 0:
                raise ValueError(f"KV layout field {name} must be positive, got {value}")
        if self.page_bytes % self.page_size:
            raise ValueError(f"page_bytes {self.page_bytes} is not a multiple of page_size {self.page_size}")
        if self.parts not in (1, 2):
            raise ValueError(f"KV layout parts must be 1 (a latent) or 2 (K and V), got {self.parts}")

    @property
    def token_bytes(self) -> int:
        """Bytes of one token in one (layer, part) page."""
        return self.page_bytes // self.page_size

    @property
    def slab_bytes(self) -> int:
        """Bytes of all pages of one (layer, part)."""
        return self.num_pages * self.page_bytes

    @property
    def total_bytes(self) -> int:
        return self.num_slabs * self.slab_bytes

    @property
    def num_slabs(self) -> int:
        """(layer, part) slabs, each `num_pages` pages."""
        return self.num_layers * self.parts

    @property
    def slab_stride(self) -> int:
        """Bytes from a page of one (layer, part) to the same page of the next."""
        return self.page_bytes if self.page_major else self.slab_bytes

    @property
    def page_stride(self) -> int:
        """Bytes from a page of one (layer, part) to the next page of it."""
        return self.num_slabs * self.page_bytes if self.page_major else self.page_bytes

    def page_addr(self, layer: int, kv: int, page: int) -> int:
        if not (0 <= layer < self.num_layers and 0 <= kv < self.parts and 0 <= page < self.num_pages):
            raise IndexError(f"(layer {layer}, part {kv}, page {page}) is outside this KV layout")
        return self.base_ptr + (layer * self.parts + kv) * self.slab_stride + page * self.page_stride

    def incompatibility(self, other: KvLayout) -> str | None:
        """Why pages of `other` cannot be copied byte for byte into this pool, or None if they can."""
        for name in ("num_layers", "parts", "page_bytes", "page_size"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                return f"{name} differs: {theirs} vs {mine} here"
        return None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> KvLayout:
        if not isinstance(data, Mapping):
            raise ValueError(f"KV layout must be an object, got {type(data).__name__}")
        missing = [name for name in _FIELDS if name not in data and name != "parts"]
        if missing:
            raise ValueError(f"KV layout is missing {', '.join(missing)}")
        # a layout without parts is a K/V pool's (the only kind there was before latent pools), one
        # without page_major a layer-major one's (the only order there was before)
        return cls(**{name: data[name] for name in (*_FIELDS, "page_major") if name in data})

    @classmethod
    def from_tensor(cls, pool: Any, page_major: bool = False) -> KvLayout:
        """Layout of a contiguous tensor (torch or numpy): `[pages, layers, parts, page_size, kv_heads,
        head_dim]` when `page_major`, else `[layers, parts, pages, page_size, kv_heads, head_dim]`."""
        shape = tuple(pool.shape)
        parts_dim = 2 if page_major else 1
        if len(shape) != 6 or shape[parts_dim] not in (1, 2):
            order = "pages, layers, parts" if page_major else "layers, parts, pages"
            raise ValueError(
                f"KV pool must be [{order} (parts 1 or 2), page_size, heads, dim], got shape {shape}"
            )
        if hasattr(pool, "data_ptr"):
            contiguous, ptr, itemsize = pool.is_contiguous(), pool.data_ptr(), pool.element_size()
        else:
            contiguous, ptr, itemsize = pool.flags["C_CONTIGUOUS"], pool.ctypes.data, pool.itemsize
        if not contiguous:
            raise ValueError("KV pool tensor must be contiguous")
        if page_major:
            pages, layers, parts, page_size, heads, dim = shape
        else:
            layers, parts, pages, page_size, heads, dim = shape
        return cls(ptr, layers, pages, page_size * heads * dim * itemsize, page_size, parts, page_major)


def _page_array(pages: Sequence[int], layout: KvLayout, side: str) -> np.ndarray:
    arr = np.asarray(pages, dtype=np.int64).reshape(-1)
    if arr.size and (arr.min() < 0 or arr.max() >= layout.num_pages):
        bad = int(arr[(arr < 0) | (arr >= layout.num_pages)][0])
        raise ValueError(f"{side} page id {bad} is outside the pool (0..{layout.num_pages - 1})")
    return arr


def _run_start(pages: Sequence[int], layout: KvLayout) -> int | None:
    """The first page of `pages` if they are one ascending run inside the pool, else None."""
    first, n = pages[0], len(pages)
    if not isinstance(first, int) or first < 0 or first + n > layout.num_pages or pages[-1] != first + n - 1:
        return None
    as_list = pages if isinstance(pages, list) else list(pages)
    return first if as_list == list(range(first, first + n)) else None


def _repeats(pages: np.ndarray, steps: np.ndarray) -> bool:
    """Whether a page occurs twice. An ascending list (what the allocator hands out) cannot: checking that
    is a tenth of the sort it spares (a hand-off's host time is the larger part of a same-host one)."""
    return not (steps > 0).all() and np.unique(pages).size != pages.size


def _runs(
    src: np.ndarray, dst: np.ndarray, dst_steps: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Maximal runs where both page lists step by +1: (src_start, dst_start, count) arrays."""
    if src.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    dst_steps = np.diff(dst) if dst_steps is None else dst_steps
    breaks = (np.diff(src) != 1) | (dst_steps != 1)
    starts = np.concatenate(([0], np.flatnonzero(breaks) + 1))
    counts = np.diff(np.concatenate((starts, [src.size])))
    return src[starts], dst[starts], counts


def merge_runs(src_pages: Sequence[int], dst_pages: Sequence[int]) -> list[tuple[int, int, int]]:
    """Group page pairs into maximal runs contiguous on both sides, in order: [(src_start, dst_start, count)]."""
    if len(src_pages) != len(dst_pages):
        raise ValueError(
            f"page lists differ in length: {len(src_pages)} source vs {len(dst_pages)} destination"
        )
    src = np.asarray(src_pages, dtype=np.int64).reshape(-1)
    dst = np.asarray(dst_pages, dtype=np.int64).reshape(-1)
    s, d, n = _runs(src, dst)
    return list(zip(s.tolist(), d.tolist(), n.tolist(), strict=True))


def _join_adjacent(srcs: np.ndarray, dsts: np.ndarray, lens: np.ndarray):
    """Join consecutive entries that continue each other on both sides."""
    if srcs.size < 2:
        return srcs, dsts, lens
    follows = (srcs[1:] == srcs[:-1] + lens[:-1]) & (dsts[1:] == dsts[:-1] + lens[:-1])
    starts = np.concatenate(([0], np.flatnonzero(~follows) + 1))
    return srcs[starts], dsts[starts], np.add.reduceat(lens, starts)


def kv_write_batches(
    src_layout: KvLayout,
    src_pages: Sequence[int],
    dst_layout: KvLayout,
    dst_pages: Sequence[int],
    num_tokens: int | None = None,
) -> tuple[list[int], list[int], list[int]]:
    """The (srcs, dsts, lens) of one batched write copying every layer's parts (K and V, or the latent) of
    `src_pages` to `dst_pages`.

    Page lists are in token order. With `num_tokens`, only the used part of the last page is sent when both
    pools are layer-major; a page-major pool gets its last page whole (the unused tail is the destination
    sequence's own, unread, slots), which keeps a run of pages one entry instead of one per (layer, part).
    """
    reason = dst_layout.incompatibility(src_layout)
    if reason:
        raise ValueError(f"KV layouts are incompatible: {reason}")
    if len(src_pages) != len(dst_pages):
        raise ValueError(
            f"page lists differ in length: {len(src_pages)} source vs {len(dst_pages)} destination"
        )
    count = len(src_pages)
    page_bytes = src_layout.page_bytes
    tail_bytes = page_bytes
    if num_tokens is not None:
        capacity = count * src_layout.page_size
        if not capacity - src_layout.page_size < num_tokens <= capacity:
            raise ValueError(f"{num_tokens} tokens do not fill exactly {count} pages of {src_layout.page_size}")
        if not (src_layout.page_major or dst_layout.page_major):
            tail_bytes = (num_tokens - (count - 1) * src_layout.page_size) * src_layout.token_bytes
    if count == 0:
        return [], [], []
    if src_layout.page_major and dst_layout.page_major:
        # the usual prompt: one run of pages on each side, one range; found without numpy, whose fixed
        # costs are most of a same-host hand-off of a short prompt
        s0, d0 = _run_start(src_pages, src_layout), _run_start(dst_pages, dst_layout)
        if s0 is not None and d0 is not None:
            stride = src_layout.page_stride
            return [src_layout.base_ptr + s0 * stride], [dst_layout.base_ptr + d0 * stride], [count * stride]
    src = _page_array(src_pages, src_layout, "source")
    dst = _page_array(dst_pages, dst_layout, "destination")
    dst_steps = np.diff(dst)
    if _repeats(dst, dst_steps):
        raise ValueError("destination page list repeats a page")
    slabs = np.arange(src_layout.num_slabs, dtype=np.int64)
    if src_layout.page_major and dst_layout.page_major:
        # a run of pages contiguous on both sides is one range over every (layer, part): no per-slab list
        # (a 16k-token prompt would be 49k entries to join, about a millisecond of host time)
        s_start, d_start, counts = _runs(src, dst, dst_steps)
        stride = src_layout.page_stride  # equal on both sides: same layers, parts and page bytes
        srcs = src_layout.base_ptr + s_start * stride
        dsts = dst_layout.base_ptr + d_start * stride
        return srcs.tolist(), dsts.tolist(), (counts * stride).tolist()
    if src_layout.page_major or dst_layout.page_major:
        # one entry per (page, slab) in the source's address order; joining chains what is contiguous
        if src_layout.page_major:
            page_of, slab_of = np.repeat(np.arange(src.size), slabs.size), np.tile(slabs, src.size)
        else:
            page_of, slab_of = np.tile(np.arange(src.size), slabs.size), np.repeat(slabs, src.size)
        srcs = src_layout.base_ptr + slab_of * src_layout.slab_stride + src[page_of] * src_layout.page_stride
        dsts = dst_layout.base_ptr + slab_of * dst_layout.slab_stride + dst[page_of] * dst_layout.page_stride
        lens = np.full(srcs.size, page_bytes, dtype=np.int64)
        srcs, dsts, lens = _join_adjacent(srcs, dsts, lens)
        return srcs.tolist(), dsts.tolist(), lens.tolist()
    s_start, d_start, counts = _runs(src, dst, dst_steps)
    run_lens = counts * page_bytes
    run_lens[-1] -= page_bytes - tail_bytes
    srcs = src_layout.base_ptr + slabs[:, None] * src_layout.slab_bytes + s_start[None, :] * page_bytes
    dsts = dst_layout.base_ptr + slabs[:, None] * dst_layout.slab_bytes + d_start[None, :] * page_bytes
    lens = np.broadcast_to(run_lens, srcs.shape)
    srcs, dsts, lens = _join_adjacent(
        srcs.reshape(-1), dsts.reshape(-1), np.ascontiguousarray(lens).reshape(-1)
    )
    return srcs.tolist(), dsts.tolist(), lens.tolist()


@dataclass(frozen=True)
class RankPool:
    """One tensor-parallel rank's KV pool as a peer sees it: its Mooncake session, its layout, and which KV
    heads its pages hold (`head_start .. head_start + num_heads - 1`, `head_bytes` each per token)."""

    session_id: str
    layout: KvLayout
    head_start: int
    num_heads: int
    head_bytes: int

    def __post_init__(self) -> None:
        for name in ("head_start", "num_heads", "head_bytes"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or value < (0 if name == "head_start" else 1)
            ):
                raise ValueError(
                    f"rank pool field {name} must be a {'non-negative' if name == 'head_start' else 'positive'} integer, got {value!r}"
                )
        if self.num_heads * self.head_bytes != self.layout.token_bytes:
            raise ValueError(
                f"{self.num_heads} heads of {self.head_bytes} bytes do not make the layout's "
                f"{self.layout.token_bytes} bytes per token"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "layout": self.layout.to_dict(),
            "head_start": self.head_start,
            "num_heads": self.num_heads,
            "head_bytes": self.head_bytes,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RankPool:
        if not isinstance(data, Mapping):
            raise ValueError(f"rank pool must be an object, got {type(data).__name__}")
        session = data.get("session_id")
        if not isinstance(session, str) or len(session) > 300:
            raise ValueError(f"rank pool session_id must be a string, got {str(session)[:80]!r}")
        return cls(
            session,
            KvLayout.from_dict(data.get("layout")),
            data.get("head_start"),
            data.get("num_heads"),
            data.get("head_bytes"),
        )


def pools_incompatibility(src: Sequence[RankPool], dst: Sequence[RankPool]) -> str | None:
    """Why the KV of one server's ranks cannot be copied into another's, or None: same layers, page size
    and bytes per head, and both sides' ranks together hold the same heads."""
    for side, pools in (("source", src), ("destination", dst)):
        if not pools:
            return f"the {side} has no KV pool"
        # ranks with the same heads are replicas (MLA's latent is whole on every rank)
        covered = sorted({(p.head_start, p.num_heads) for p in pools})
        start = 0
        for head_start, n in covered:
            if head_start != start:
                return f"the {side} ranks' KV heads do not cover 0..N-1 without gaps"
            start += n
    heads = {
        side: sum(n for _, n in {(p.head_start, p.num_heads) for p in pools})
        for side, pools in (("src", src), ("dst", dst))
    }
    if heads["src"] != heads["dst"]:
        return f"KV heads differ: {heads['src']} vs {heads['dst']}"
    a, b = src[0], dst[0]
    for name in ("num_layers", "parts", "page_size"):
        if getattr(a.layout, name) != getattr(b.layout, name):
            return f"{name} differs: {getattr(a.layout, name)} vs {getattr(b.layout, name)}"
    if a.head_bytes != b.head_bytes:
        return f"bytes per head differ (dtype or head_dim): {a.head_bytes} vs {b.head_bytes}"
    return None


def write_pairs(src: Sequence[RankPool], dst: Sequence[RankPool]) -> list[tuple[int, RankPool, RankPool]]:
    """(source rank, source pool, destination pool) of every write that moves one request's KV: each
    destination rank gets every head it holds exactly once. Source ranks holding the same heads are replicas
    (a latent pool under tensor parallelism); the destinations are spread over them rather than each
    replica writing the same bytes again."""
    replicas: dict[tuple[int, int], list[int]] = {}
    for i, p in enumerate(src):
        replicas.setdefault((p.head_start, p.num_heads), []).append(i)
    pairs = []
    for j, d in enumerate(dst):
        for (start, n), ranks in replicas.items():
            if start < d.head_start + d.num_heads and d.head_start < start + n:
                i = ranks[j % len(ranks)]
                pairs.append((i, src[i], d))
    return pairs


def rank_write_batches(
    src: RankPool, src_pages: Sequence[int], dst: RankPool, dst_pages: Sequence[int], num_tokens: int
) -> tuple[list[int], list[int], list[int]]:
    """The write that copies the KV heads `src` and `dst` share, for `num_tokens` tokens; empty when they
    share none. Equal head ranges copy whole pages (merged runs); different ones copy each token's share of
    heads, which no two tokens have contiguous on both sides."""
    lo = max(src.head_start, dst.head_start)
    hi = min(src.head_start + src.num_heads, dst.head_start + dst.num_heads)
    if lo >= hi:
        return [], [], []
    if (src.head_start, src.num_heads) == (dst.head_start, dst.num_heads):
        return kv_write_batches(src.layout, src_pages, dst.layout, dst_pages, num_tokens)
    s_lay, d_lay = src.layout, dst.layout
    src_arr = _page_array(src_pages, s_lay, "source")
    dst_arr = _page_array(dst_pages, d_lay, "destination")
    if src_arr.size != dst_arr.size or not src_arr.size * s_lay.page_size >= num_tokens > 0:
        raise ValueError(
            f"{num_tokens} tokens do not fit {src_arr.size} source / {dst_arr.size} destination pages"
        )
    tokens = np.arange(num_tokens, dtype=np.int64)
    page_idx, offset = tokens // s_lay.page_size, tokens % s_lay.page_size
    slabs = np.arange(s_lay.num_slabs, dtype=np.int64)[:, None]

    def addresses(pool: RankPool, pages: np.ndarray) -> np.ndarray:
        """[slabs, tokens]: where each token's shared heads start, per (layer, part)."""
        lay = pool.layout
        within = (
            pages[page_idx] * lay.page_stride
            + offset * lay.token_bytes
            + (lo - pool.head_start) * pool.head_bytes
        )
        return lay.base_ptr + slabs * lay.slab_stride + within[None, :]

    srcs, dsts = addresses(src, src_arr), addresses(dst, dst_arr)
    lens = np.full(srcs.size, (hi - lo) * src.head_bytes, dtype=np.int64)
    srcs, dsts, lens = _join_adjacent(srcs.reshape(-1), dsts.reshape(-1), lens)
    return srcs.tolist(), dsts.tolist(), lens.tolist()
