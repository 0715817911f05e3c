"""Decode steps replayed as CUDA graphs, one per padded batch size.

A decode step of a small model is hundreds of short kernels; launched one by one from Python the GPU
waits on the host most of the step. Captured once per batch-size bucket and replayed, a step costs one
launch. A graph replays fixed addresses, so every input lives in a static buffer that each step fills:
token ids, positions, the slot each new key goes to, the block table and each sequence's key count. A
batch smaller than its bucket is padded with rows of length 0: their keys go to a scratch page that no
sequence owns, and the paged kernel returns zeros for them.

Only pure decode steps of at most the largest bucket replay; a step with a prefill chunk, or a bigger
batch, runs eagerly. Both paths use the same attention kernel (`triton_attention`), and a padded row
never touches a real row's arithmetic, so a token comes out the same whichever path produced it.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from disaggctl.runtime.attention import AttentionMeta

log = logging.getLogger("disaggctl.runtime.cuda_graph")

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def buckets_for(max_batch: int) -> list[int]:
    """The padded batch sizes to capture: powers of two below `max_batch`, and `max_batch` itself."""
    sizes = [b for b in BUCKETS if b < max_batch]
    return sizes + [max_batch]


class DecodeGraphs:
    """The captured decode steps of one rank's model (every rank of a TP server captures its shard)."""

    def __init__(self, model, kv_cache, scale: float, max_batch: int, max_len: int, sample_rows: bool):
        self.model = model
        self.kv_cache = kv_cache
        self.scale = scale
        self.page_size = page = kv_cache.page_size
        self.page_rows = kv_cache.page_rows
        self.sample_rows = sample_rows
        self.sizes = buckets_for(max_batch)
        self.width = -(-max_len // page)  # block-table columns: the pages of the longest sequence
        dev = kv_cache.tensor.device
        largest = self.sizes[-1]
        scratch = kv_cache.scratch_page
        if scratch is None:
            raise ValueError("CUDA graphs need a KV pool with a scratch page for padding rows")
        self.pad_slot = scratch * self.page_rows
        self.input_ids = torch.zeros(largest, dtype=torch.long, device=dev)
        self.positions = torch.zeros(largest, dtype=torch.long, device=dev)
        self.slots = torch.full((largest,), self.pad_slot, dtype=torch.long, device=dev)
        self.table = torch.zeros((largest, self.width), dtype=torch.int32, device=dev)
        self.lens = torch.zeros(largest, dtype=torch.int32, device=dev)
        self.rows = torch.arange(largest, device=dev)
        # The host's inputs go up in one asynchronous copy from pinned memory. A copy from pageable memory
        # would first wait for everything queued before it, so the host could not queue step n+1 while
        # step n runs (the engine's overlap). Two pinned buffers take turns: a buffer is written again
        # only once its copy has run (the event), which the overlap's one step in flight makes immediate.
        cap = largest * (4 + self.width + 2)  # ids, positions, slots, lens, table; late rows and sources
        self._pinned = [torch.empty(cap, dtype=torch.long, pin_memory=True) for _ in range(2)]
        self._copied: list[torch.cuda.Event | None] = [None, None]
        self._turn = 0
        self._landing = torch.empty(cap, dtype=torch.long, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor | None] = {}
        self.pool = None
        self.capture_s = 0.0
        self.replays = 0

    def _meta(self, size: int) -> AttentionMeta:
        return AttentionMeta(
            scale=self.scale,
            page_size=self.page_size,
            page_rows=self.page_rows,
            slot_mapping=self.slots[:size],
            q_lens=[1] * size,
            kv_lens=[0] * size,  # not read on this path: the kernel reads `decode_lens`
            block_table=self.table[:size],
            decode_table=self.table[:size],
            decode_lens=self.lens[:size],
        )

    def _run(self, size: int):
        rows = self.rows[:size] if self.sample_rows else None
        return self.model(self.input_ids[:size], self.positions[:size], self.kv_cache, self._meta(size), rows)

    def capture(self) -> None:
        """Capture every bucket, largest first (its memory then serves the smaller ones from one pool)."""
        began = time.perf_counter()
        self.slots.fill_(self.pad_slot)
        self.lens.zero_()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for size in reversed(self.sizes):
                for _ in range(2):  # warm-up: Triton compiles, cuBLAS picks its kernels, outside capture
                    self._run(size)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        for size in reversed(self.sizes):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = self._run(size)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[size] = graph
            self.outputs[size] = out
        torch.cuda.synchronize()
        self.capture_s = time.perf_counter() - began
        log.info(
            "captured decode CUDA graphs for batch sizes %s in %.2f s",
            ",".join(map(str, self.sizes)),
            self.capture_s,
        )

    def fits(self, slices: list[tuple[int, int, list[int]]], logit_rows: list[int]) -> bool:
        """Whether this step can replay: decode rows only, each one sampling, within the largest bucket."""
        n = len(slices)
        return (
            0 < n <= self.sizes[-1]
            and len(logit_rows) == n
            and all(q == 1 and len(pages) <= self.width for q, _, pages in slices)
        )

    def _upload(self, parts: list[np.ndarray]) -> torch.Tensor:
        """The int64 arrays, back to back, on the device: one asynchronous copy through pinned memory."""
        turn, self._turn = self._turn, self._turn ^ 1
        if self._copied[turn] is not None:
            self._copied[turn].synchronize()
        staging = self._pinned[turn].numpy()
        at = 0
        for part in parts:
            staging[at : at + part.size] = part.ravel()
            at += part.size
        landed = self._landing[:at]
        landed.copy_(self._pinned[turn][:at], non_blocking=True)
        self._copied[turn] = torch.cuda.Event()
        self._copied[turn].record()
        return landed

    def replay(self, input_ids: list[int], positions: list[int], slices, late=None) -> torch.Tensor | None:
        """Fill the static inputs, replay the bucket's graph; logits of the real rows (or None). `late`:
        rows whose id the previous step sampled on the device (`model_runner.LateTokens`)."""
        n = len(slices)
        size = next(b for b in self.sizes if b >= n)
        page = self.page_size
        lens = np.fromiter((kv for _, kv, _ in slices), dtype=np.int64, count=n)
        counts = np.fromiter((len(p) for _, _, p in slices), dtype=np.int64, count=n)
        width = int(counts.max())
        table = np.zeros((n, width), dtype=np.int64)
        table[np.arange(width)[None, :] < counts[:, None]] = np.fromiter(
            (p for _, _, pages in slices for p in pages), dtype=np.int64, count=int(counts.sum())
        )
        pos = np.asarray(positions, dtype=np.int64)
        slots = table[np.arange(n), pos // page] * self.page_rows + pos % page
        parts = [np.asarray(input_ids, dtype=np.int64), pos, slots, lens, table]
        gather = late is not None and not late.in_order
        if gather:
            parts += [np.asarray(late.rows, dtype=np.int64), np.asarray(late.sources, dtype=np.int64)]
        landed = self._upload(parts)
        # into the static buffers, on the device; the rows from n to the bucket's size keep padding
        self.input_ids[:n].copy_(landed[:n])
        self.positions[:n].copy_(landed[n : 2 * n])
        self.slots[:n].copy_(landed[2 * n : 3 * n])
        self.lens[:n].copy_(landed[3 * n : 4 * n])
        end = 4 * n + n * width
        self.table[:n, :width].copy_(landed[4 * n : end].view(n, width))
        if gather:
            k = len(late.rows)
            self.input_ids[landed[end : end + k]] = late.tokens[landed[end + k : end + 2 * k]]
        elif late is not None:
            late.fill(self.input_ids)
        if size > n:  # rows a larger batch filled before: padding again
            self.slots[n:size].fill_(self.pad_slot)
            self.lens[n:size].zero_()
        self.graphs[size].replay()
        self.replays += 1
        out = self.outputs[size]
        return None if out is None else out[:n]
