"""Continuous batching: which sequences run in the next step, and how many of their tokens.

A step mixes decode tokens (one per running sequence) with prefill chunks (at most `chunk_size` prompt
tokens in all), so a long prompt never stalls the decodes beside it. A sequence gets the pages for its
whole prompt when admitted, and one more page whenever decoding fills the last; when the pool runs dry,
the newest running sequence is preempted (pages freed, re-queued to be recomputed from its tokens).
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from disaggctl.runtime.kv_cache import PageAllocator, pages_for
from disaggctl.runtime.sampling import SamplingParams

# The token of a sequence that a launched step is still sampling (the engine's overlap). Never a valid id:
# a bug that fed it to the model would fail on the embedding instead of producing plausible text.
PLACEHOLDER = -1


class Status(enum.Enum):
    WAITING = "waiting"  # queued, no pages
    RUNNING = "running"  # in the batch (prefilling or decoding)
    WAITING_KV = "waiting_kv"  # remote_kv: pages allocated, KV being written by a peer
    HELD = "held"  # prefill_only: prefilled, pages kept until released
    DONE = "done"


@dataclass(eq=False)
class Sequence:
    rid: str
    tokens: list[int]  # prompt + generated so far
    prompt_len: int
    params: SamplingParams
    mode: str = "normal"
    request: Any = None  # the engine's Request (callback), opaque here
    generator: Any = None
    pages: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose KV is in the pool
    status: Status = Status.WAITING
    preemptions: int = 0

    @property
    def num_output(self) -> int:
        """Tokens generated so far (a token still being sampled not counted)."""
        return len(self.tokens) - self.prompt_len - (bool(self.tokens) and self.tokens[-1] == PLACEHOLDER)

    @property
    def remaining(self) -> int:
        """Tokens to feed before the next sample: the prompt (chunk by chunk), then 1 per decode step."""
        return len(self.tokens) - self.num_computed


@dataclass
class Step:
    rows: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, tokens fed this step)
    kv_waits: list[Sequence] = field(default_factory=list)  # remote_kv sequences that just got pages
    failed: list[tuple[Sequence, str]] = field(default_factory=list)  # can never run: why
    preempted: list[Sequence] = field(default_factory=list)


class Scheduler:
    def __init__(self, allocator: PageAllocator, page_size: int, max_batch: int, chunk_size: int):
        self.allocator = allocator
        self.page_size = page_size
        self.max_batch = max_batch
        self.chunk_size = chunk_size
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.parked: dict[str, Sequence] = {}  # WAITING_KV and HELD: pages held, nothing to compute
        self.num_preemptions = 0

    def pages_needed(self, num_tokens: int) -> int:
        return pages_for(num_tokens, self.page_size)

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def schedule(self) -> Step:
        step = Step()
        self._decode_rows(step)
        budget = self.chunk_size
        for seq in self.running:
            if seq.remaining > 1 and budget > 0:
                n = min(seq.remaining, budget)
                step.rows.append((seq, n))
                budget -= n
        self._admit(step, budget)
        return step

    def _decode_rows(self, step: Step) -> None:
        i = 0
        while i < len(self.running):  # oldest first, so preemption takes from the unscheduled end
            seq = self.running[i]
            if seq.remaining != 1:
                i += 1
                continue
            if self.pages_needed(seq.num_computed + 1) > len(seq.pages):
                page = None
                while page is None:
                    page = self.allocator.allocate(1, after=seq.pages[-1] if seq.pages else None)
                    if page is None:
                        victim = self.running[-1]
                        self._preempt(victim, step)
                        if victim is seq:
                            break
                if page is None:
                    continue  # seq itself was preempted; running[i] is now the next one
                seq.pages += page
            step.rows.append((seq, 1))
            i += 1

    def _preempt(self, seq: Sequence, step: Step) -> None:
        self.running.remove(seq)
        self.allocator.free(seq.pages)
        seq.pages, seq.num_computed = [], 0
        seq.status = Status.WAITING
        seq.preemptions += 1
        seq.mode = "normal" if seq.mode == "remote_kv" else seq.mode  # its KV is gone: recompute locally
        self.num_preemptions += 1
        step.preempted.append(seq)
        self.waiting.appendleft(seq)

    def _admit(self, step: Step, budget: int) -> None:
        # keep a page per decoding sequence free, so admission does not force an immediate preemption
        reserve = sum(1 for s in self.running if s.remaining == 1)
        while self.waiting and len(self.running) + len(self.parked) < self.max_batch:
            seq = self.waiting[0]
            need = self.pages_needed(len(seq.tokens))
            if need > self.allocator.num_pages:
                self.waiting.popleft()
                seq.status = Status.DONE
                step.failed.append(
                    (
                        seq,
                        f"request needs {need} KV pages ({len(seq.tokens)} tokens) but the pool has only "
                        f"{self.allocator.num_pages} pages of {self.page_size} tokens",
                    )
                )
                continue
            remote = seq.mode == "remote_kv"
            if not remote and budget <= 0:
                break
            self.allocator.reclaim()
            if self.allocator.available(local=not remote) - need < (reserve if self.running else 0):
                break
            pages = self.allocator.allocate(need, local=not remote)
            if pages is None:
                break
            self.waiting.popleft()
            seq.pages = pages
            if remote:
                seq.status = Status.WAITING_KV
                self.parked[seq.rid] = seq
                step.kv_waits.append(seq)
                continue
            seq.status = Status.RUNNING
            self.running.append(seq)
            n = min(seq.remaining, budget)
            step.rows.append((seq, n))
            budget -= n

    def kv_arrived(self, seq: Sequence) -> None:
        """The remote prefill wrote the prompt's KV: the sequence decodes from here."""
        del self.parked[seq.rid]
        seq.num_computed = seq.prompt_len
        seq.status = Status.RUNNING
        self.running.append(seq)

    def hold(self, seq: Sequence) -> None:
        """prefill_only: out of the batch, pages kept until released."""
        self.running.remove(seq)
        seq.status = Status.HELD
        self.parked[seq.rid] = seq

    def remove(self, seq: Sequence, quarantine_s: float | None = None) -> None:
        """The sequence leaves for good; its pages are freed (after `quarantine_s` if given)."""
        if seq.status == Status.DONE:
            return
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.parked.pop(seq.rid, None)
        if seq.pages:
            if quarantine_s:
                self.allocator.free_later(seq.pages, quarantine_s)
            else:
                self.allocator.free(seq.pages)
        seq.pages = []
        seq.status = Status.DONE

    def check(self) -> None:
        owners = [s.pages for s in self.running] + [s.pages for s in self.parked.values()]
        assert all(not s.pages for s in self.waiting), "a waiting sequence holds pages"
        self.allocator.check(owners)
