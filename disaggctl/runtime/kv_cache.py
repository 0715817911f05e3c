"""The KV pool: one tensor for every layer's pages, and the allocator that hands pages out.

The pool is `[num_layers, 2, num_pages, page_size, num_kv_heads, head_dim]`, contiguous, so the transfer
layer registers one memory region once and computes any page's address from `layout()`. The allocator
prefers contiguous runs of pages: adjacent pages on both sides of a transfer merge into one write.
"""

from __future__ import annotations

import time

import numpy as np

FREE, USED, QUARANTINED = 0, 1, 2


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

    @property
    def num_used(self) -> int:
        return int((self.state == USED).sum())

    @property
    def num_quarantined(self) -> int:
        return sum(len(p) for _, p in self._quarantine)

    def allocate(self, n: int, after: int | None = None) -> list[int] | None:
        """`n` free pages, or None when there are not enough. `after`: try to continue that page's run first."""
        self.reclaim()
        if n <= 0:
            return []
        if n > self.num_free:
            return None
        if (
            after is not None
            and after + n < self.num_pages
            and not self.state[after + 1 : after + 1 + n].any()
        ):
            pages = np.arange(after + 1, after + 1 + n)
        else:
            pages = self._first_run(n)
            if pages is None:  # fragmented: the lowest free pages, which are still mostly runs
                pages = np.flatnonzero(self.state == FREE)[:n]
        self.state[pages] = USED
        self.num_free -= n
        return pages.tolist()

    def _first_run(self, n: int) -> np.ndarray | None:
        free = np.concatenate(([0], (self.state == FREE).view(np.int8), [0]))
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
        self.state[arr] = FREE
        self.num_free += arr.size

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
        quarantined = [p for _, pages in self._quarantine for p in pages]
        assert len(quarantined) == len(set(quarantined)), "page quarantined twice"
        assert (self.state[quarantined] == QUARANTINED).all(), "quarantined page in the wrong state"
        assert int((self.state == QUARANTINED).sum()) == len(quarantined), "untracked quarantined page"
        if owned is not None:
            flat = [p for pages in owned for p in pages]
            assert len(flat) == len(set(flat)), "a page has two owners"
            assert sorted(flat) == np.flatnonzero(self.state == USED).tolist(), "used pages != owned pages"


class KVCache:
    """The page pool of one rank: the only place that knows its shape.

    One contiguous tensor `[num_layers, 2, num_pages, page_size, kv_heads, head_dim]`: page p of (layer, k/v)
    starts at `base_ptr + ((layer * 2 + k_or_v) * num_pages + p) * page_bytes` (what `layout()` tells a
    peer), and token slot `s` of a layer is `page * page_size + offset`. With tensor parallelism a rank holds
    heads `head_start .. head_start + kv_heads - 1` of every page; page ids are the same on every rank.

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
    ):
        import torch

        total = num_pages + (1 if scratch else 0)
        self.tensor = torch.zeros(
            (num_layers, 2, total, page_size, num_kv_heads, head_dim), dtype=dtype, device=device
        )
        self.page_size = page_size
        self.head_start = head_start
        self.allocator = PageAllocator(num_pages)
        self.scratch_page = num_pages if scratch else None

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

    def k(self, layer: int):
        """Keys of one layer: [num_pages, page_size, kv_heads, head_dim]."""
        return self.tensor[layer, 0]

    def v(self, layer: int):
        return self.tensor[layer, 1]

    @staticmethod
    def page_bytes_all_layers(num_layers, page_size, num_kv_heads, head_dim, itemsize) -> int:
        return num_layers * 2 * page_size * num_kv_heads * head_dim * itemsize

    def layout(self):
        """Where this pool lives, for a peer that writes into it (`transfer.kv_layout.KvLayout`)."""
        from disaggctl.transfer.kv_layout import KvLayout

        return KvLayout.from_tensor(self.tensor)

    def describe(self) -> dict:
        """The layout plus what it does not carry (heads, dtype, device), for logs and /server_info."""
        t = self.tensor
        return {
            **self.layout().to_dict(),
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


def pages_for(num_tokens: int, page_size: int) -> int:
    """Pages that `num_tokens` tokens occupy at `page_size` tokens a page (the one ceil-division)."""
    return -(-num_tokens // page_size)
