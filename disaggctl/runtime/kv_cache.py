"""The KV pool: one tensor for every layer's pages, and the allocator that hands pages out.

The pool is `[num_pages, num_layers, parts, page_size, num_kv_heads, head_dim]`, contiguous, so the
transfer layer registers one memory region once and computes any page's address from `layout()`. `parts`
is 2 (K and V) for per-head attention, 1 for a latent pool (MLA: one "head" of the compressed latent per
token; `pool_shape` decides). Page-major, so that a run of pages is one range of memory across every
layer: a PD hand-off is then one Mooncake entry per run, not one per run and (layer, part) (about 20 us
each over same-host NVLink; docs/design-changes.md). The allocator prefers contiguous runs of pages.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np

FREE, USED, QUARANTINED, FENCED = 0, 1, 2, 3


class PageAllocator:
    """Page ids 0..num_pages-1. Not thread-safe: the engine thread owns it."""

    def __init__(self, num_pages: int, clock=time.monotonic):
        if num_pages < 1:
            raise ValueError(f"a KV pool needs at least one page, got {num_pages}")
        self.num_pages = num_pages
        self.state = np.zeros(num_pages, dtype=np.int8)
        self._quarantine: list[tuple[float, list[int]]] = []  # (release time, pages)
        self._clock = clock
        self.num_free = num_pages
        # While a step runs on the device after the host moved on (the engine's overlap), a page freed now
        # may still receive that step's KV write. Such a page is FENCED until the step is done: our own
        # later steps, queued behind it on the same stream, may reuse it at once; a peer writing through
        # Mooncake is not ordered after it, so pages for remote KV come from FREE pages only.
        self.fence: int | None = None  # the step a free must wait for; None: nothing in flight
        self._fence_step = np.zeros(num_pages, dtype=np.int64)
        self.num_fenced = 0

    @property
    def num_used(self) -> int:
        return int((self.state == USED).sum())

    @property
    def num_quarantined(self) -> int:
        return sum(len(p) for _, p in self._quarantine)

    def available(self, local: bool = True) -> int:
        """Pages an allocation can have: `local` (written by this server's own steps) may take fenced ones."""
        return self.num_free + (self.num_fenced if local else 0)

    def _usable(self, local: bool) -> np.ndarray:
        if local and self.num_fenced:
            return (self.state == FREE) | (self.state == FENCED)
        return self.state == FREE

    def _all_usable(self, start: int, n: int, local: bool) -> bool:
        part = self.state[start : start + n]
        return bool(((part == FREE) | ((part == FENCED) & local)).all())

    def allocate(self, n: int, after: int | None = None, local: bool = True) -> list[int] | None:
        """`n` free pages, or None when there are not enough. `after`: try to continue that page's run first.
        `local=False`: pages a peer will write into (never a fenced page)."""
        self.reclaim()
        if n <= 0:
            return []
        if n > self.available(local):
            return None
        if after is not None and after + n < self.num_pages and self._all_usable(after + 1, n, local):
            pages = np.arange(after + 1, after + 1 + n)
        elif n == 1 and not (local and self.num_fenced):  # a decode step's next page, without the run search
            pages = np.array([int(np.argmax(self.state == FREE))])
        else:
            usable = self._usable(local)
            pages = self._first_run(n, usable)
            if pages is None:  # fragmented: the lowest free pages, which are still mostly runs
                pages = np.flatnonzero(usable)[:n]
        fenced = int((self.state[pages] == FENCED).sum()) if self.num_fenced else 0
        self.state[pages] = USED
        self.num_free -= n - fenced
        self.num_fenced -= fenced
        return pages.tolist()

    def _first_run(self, n: int, usable: np.ndarray) -> np.ndarray | None:
        free = np.concatenate(([0], usable.view(np.int8), [0]))
        edges = np.diff(free)
        starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        fits = np.flatnonzero(ends - starts >= n)
        if not fits.size:
            return None
        start = starts[fits[0]]
        return np.arange(start, start + n)

    def _check_used(self, pages: list[int]) -> np.ndarray:
        arr = np.asarray(pages, dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= self.num_pages):
            raise ValueError(f"page id outside the pool of {self.num_pages} pages")
        if len(set(pages)) != len(pages) or (self.state[arr] != USED).any():
            raise ValueError("freeing pages that are not allocated (double free?)")
        return arr

    def free(self, pages: list[int]) -> None:
        arr = self._check_used(pages)
        if self.fence is not None:
            self.state[arr] = FENCED
            self._fence_step[arr] = self.fence
            self.num_fenced += arr.size
            return
        self.state[arr] = FREE
        self.num_free += arr.size

    def unfence(self, through: int | None = None) -> None:
        """Steps up to `through` are done on the device (None: every step): their fenced pages are free."""
        if not self.num_fenced:
            return
        done = self.state == FENCED
        if through is not None:
            done &= self._fence_step <= through
        n = int(done.sum())
        self.state[done] = FREE
        self.num_free += n
        self.num_fenced -= n

    def free_later(self, pages: list[int], after_s: float) -> None:
        """Free the pages only after `after_s`: a failed remote write may still land in them meanwhile."""
        arr = self._check_used(pages)
        self.state[arr] = QUARANTINED
        self._quarantine.append((self._clock() + after_s, arr.tolist()))

    def reclaim(self) -> None:
        now = self._clock()
        keep = []
        for due, pages in self._quarantine:
            if due <= now:
                self.state[pages] = FREE
                self.num_free += len(pages)
            else:
                keep.append((due, pages))
        self._quarantine = keep

    def check(self, owned: list[list[int]] | None = None) -> None:
        """Raise AssertionError if the bookkeeping is inconsistent (and, given the owners' page lists,
        if a page is owned twice or an owner holds a page that is not marked used)."""
        assert self.num_free == int((self.state == FREE).sum()), "free count drifted"
        assert self.num_fenced == int((self.state == FENCED).sum()), "fenced count drifted"
        quarantined = [p for _, pages in self._quarantine for p in pages]
        assert len(quarantined) == len(set(quarantined)), "page quarantined twice"
        assert (self.state[quarantined] == QUARANTINED).all(), "quarantined page in the wrong state"
        assert int((self.state == QUARANTINED).sum()) == len(quarantined), "untracked quarantined page"
        if owned is not None:
            flat = [p for pages in owned for p in pages]
            assert len(flat) == len(set(flat)), "a page has two owners"
            assert sorted(flat) == np.flatnonzero(self.state == USED).tolist(), "used pages != owned pages"


class PoolShape(NamedTuple):
    """What one rank's pool holds per token and layer: `parts` (2: K and V; 1: a latent) of `num_heads`
    heads from `head_start`, `head_dim` wide."""

    parts: int
    head_start: int
    num_heads: int
    head_dim: int


def pool_shape(mc, tp) -> PoolShape:
    """The pool a model (`ModelConfig`) needs on a rank (`TensorParallel`). Per-head attention: K and V of
    the rank's share of the KV heads. MLA: the latent and the roped key part, one "head" per token, whole on
    every rank (every query head reads all of it, so tensor parallelism replicates it)."""
    if mc.mla:
        return PoolShape(1, 0, 1, mc.kv_lora_rank + mc.qk_rope_head_dim)
    head_start, heads = tp.head_range(mc.num_kv_heads)
    return PoolShape(2, head_start, heads, mc.head_dim)


class KVCache:
    """The page pool of one rank: the only place that knows its shape.

    One contiguous tensor `[num_pages, num_layers, parts, page_size, kv_heads, head_dim]`: page p of
    (layer, part) starts at `base_ptr + ((p * num_layers + layer) * parts + part) * page_bytes` (what
    `layout()` tells a peer). A layer's part is a strided `[num_pages, page_size, kv_heads, head_dim]`
    view (`k`, `v`); as flat token rows (`flat_rows`) token slot `page * page_rows + offset` of it is one
    row, `page_rows` being the rows from a page to the next. With tensor parallelism a rank holds heads
    `head_start .. head_start + kv_heads - 1` of every page; page ids are the same on every rank. A latent
    pool (`parts` 1) is read with `latent`, a K/V pool with `k` and `v`.

    `scratch`: one page more than the allocator hands out, page id `num_pages`, owned by no sequence: the
    padding rows of a CUDA-graph step write their keys there (`cuda_graph.py`).
    """

    def __init__(
        self,
        num_layers,
        num_pages,
        page_size,
        num_kv_heads,
        head_dim,
        dtype,
        device,
        head_start: int = 0,
        scratch: bool = False,
        parts: int = 2,
    ):
        import torch

        if parts not in (1, 2):
            raise ValueError(f"a KV pool holds K and V (2 parts) or a latent (1), got {parts}")
        total = num_pages + (1 if scratch else 0)
        self.tensor = torch.zeros(
            (total, num_layers, parts, page_size, num_kv_heads, head_dim), dtype=dtype, device=device
        )
        self.page_size = page_size
        self.head_start = head_start
        self.allocator = PageAllocator(num_pages)
        self.scratch_page = num_pages if scratch else None
        # each (layer, part) view made once: a step asks for every layer's, and `flat_rows` remembers
        # the rows of a view it has seen (a few microseconds a layer, which a small model's step notices)
        self._parts = [[self.tensor[:, layer, part] for part in range(parts)] for layer in range(num_layers)]

    @property
    def num_pages(self) -> int:
        return self.allocator.num_pages

    @property
    def num_kv_heads(self) -> int:
        return self.tensor.shape[4]

    @property
    def head_bytes(self) -> int:
        """Bytes of one head of one token in one (layer, k/v) page."""
        return self.tensor.shape[5] * self.tensor.element_size()

    @classmethod
    def of_shape(
        cls, shape: PoolShape, num_layers, num_pages, page_size, dtype, device, scratch: bool = False
    ) -> KVCache:
        return cls(
            num_layers,
            num_pages,
            page_size,
            shape.num_heads,
            shape.head_dim,
            dtype,
            device,
            head_start=shape.head_start,
            scratch=scratch,
            parts=shape.parts,
        )

    @property
    def parts(self) -> int:
        return self.tensor.shape[2]

    @property
    def page_rows(self) -> int:
        """Token rows from a slot of one page to the same slot of the next, in a layer's flat rows."""
        return self.tensor.shape[1] * self.parts * self.page_size

    def k(self, layer: int):
        """Keys of one layer: [num_pages, page_size, kv_heads, head_dim] (a strided view)."""
        if self.parts != 2:
            raise TypeError("a latent pool has no separate keys; read it with latent()")
        return self._parts[layer][0]

    def v(self, layer: int):
        if self.parts != 2:
            raise TypeError("a latent pool has no separate values; read it with latent()")
        return self._parts[layer][1]

    def latent(self, layer: int):
        """One layer of a latent pool as flat token rows: [rows, head_dim], slot `page * page_rows + offset`."""
        if self.parts != 1:
            raise TypeError("a K/V pool has no latent; read it with k() and v()")
        return flat_rows(self._parts[layer][0])[:, 0]

    @staticmethod
    def page_bytes_all_layers(num_layers, page_size, num_kv_heads, head_dim, itemsize, parts: int = 2) -> int:
        return num_layers * parts * page_size * num_kv_heads * head_dim * itemsize

    def layout(self):
        """Where this pool lives, for a peer that writes into it (`transfer.kv_layout.KvLayout`)."""
        from disaggctl.transfer.kv_layout import KvLayout

        return KvLayout.from_tensor(self.tensor, page_major=True)

    def describe(self) -> dict:
        """The layout plus what it does not carry (heads, dtype, device), for logs and /server_info."""
        t = self.tensor
        return {
            **self.layout().to_dict(),
            "parts": self.parts,
            "num_kv_heads": self.num_kv_heads,
            "head_start": self.head_start,
            "head_dim": t.shape[5],
            "dtype": str(t.dtype).removeprefix("torch."),
            "device": str(t.device),
            "total_bytes": t.numel() * t.element_size(),
        }

    def pages_for(self, num_tokens: int) -> int:
        """Pages that `num_tokens` tokens occupy."""
        return pages_for(num_tokens, self.page_size)


def flat_rows(pages):
    """A `[num_pages, page_size, heads, dim]` view of one layer's part (`KVCache.k`), as token rows
    `[rows, heads, dim]`: slot `page * page_rows + offset` is one row, where `page_rows` is the page stride
    over the row stride. The rows between pages belong to other layers and are never addressed."""
    # kept on the view itself (KVCache makes each view once), so a step does not rebuild it per layer;
    # a dict keyed by tensors cannot do this (tensor == tensor is elementwise)
    rows = pages.__dict__.get("_flat_rows")
    if rows is None:
        rows = pages.__dict__["_flat_rows"] = _flat_rows(pages)
    return rows


def _flat_rows(pages):
    num_pages, page_size = pages.shape[:2]
    row_stride = pages.stride(1)
    if pages.stride(0) % row_stride or any(
        st != want for st, want in zip(pages.stride()[2:], _packed(pages.shape[2:]), strict=True)
    ):
        raise ValueError(f"KV pages of strides {pages.stride()} are not token rows")
    rows = (num_pages - 1) * (pages.stride(0) // row_stride) + page_size
    return pages.as_strided((rows, *pages.shape[2:]), (row_stride, *pages.stride()[2:]))


def _packed(shape) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


def page_rows_of(pages) -> int:
    """`page_rows` of a `[num_pages, page_size, heads, dim]` pages view (see `flat_rows`)."""
    return pages.stride(0) // pages.stride(1)


def pages_for(num_tokens: int, page_size: int) -> int:
    """Pages that `num_tokens` tokens occupy at `page_size` tokens a page (the one ceil-division)."""
    return -(-num_tokens // page_size)
