"""Continuous batching decisions, without a model: the scheduler's plan for each step."""

from __future__ import annotations

from disaggctl.runtime.kv_cache import PageAllocator
from disaggctl.runtime.sampling import SamplingParams
from disaggctl.runtime.scheduler import Scheduler, Sequence, Status


def seq(rid: str, n: int, mode: str = "normal") -> Sequence:
    return Sequence(rid=rid, tokens=list(range(n)), prompt_len=n, params=SamplingParams(), mode=mode)


def run(step) -> None:
    """What the engine does after a forward pass: count fed tokens, append a sampled token when due."""
    for s, n in step.rows:
        s.num_computed += n
        if s.num_computed == len(s.tokens):
            s.tokens.append(0)


def plan(step) -> list[tuple[str, int]]:
    return [(s.rid, n) for s, n in step.rows]


def test_chunked_prefill_runs_beside_decodes():
    sch = Scheduler(PageAllocator(32), page_size=4, max_batch=8, chunk_size=5)
    a = seq("a", 3)
    sch.add(a)
    step = sch.schedule()
    assert plan(step) == [("a", 3)]
    run(step)
    sch.add(seq("long", 12))
    # a decodes (1 token) while long's prompt goes 5 tokens a step
    step = sch.schedule()
    assert plan(step) == [("a", 1), ("long", 5)]
    run(step)
    assert plan(s := sch.schedule()) == [("a", 1), ("long", 5)]
    run(s)
    assert plan(s := sch.schedule()) == [("a", 1), ("long", 2)]
    run(s)
    assert plan(sch.schedule()) == [("a", 1), ("long", 1)]
    sch.check()


def test_chunk_budget_is_shared_and_new_requests_join_between_steps():
    sch = Scheduler(PageAllocator(32), page_size=4, max_batch=8, chunk_size=6)
    for rid, n in (("x", 4), ("y", 4), ("z", 4)):
        sch.add(seq(rid, n))
    step = sch.schedule()
    assert plan(step) == [("x", 4), ("y", 2)]  # z waits: no budget left, and holds no pages
    assert [s.rid for s in sch.waiting] == ["z"] and not sch.waiting[0].pages
    run(step)
    assert plan(sch.schedule()) == [("x", 1), ("y", 2), ("z", 4)]


def test_pool_exhaustion_preempts_the_newest():
    alloc = PageAllocator(4)
    sch = Scheduler(alloc, page_size=2, max_batch=8, chunk_size=16)
    old, new = seq("old", 4), seq("new", 3)
    sch.add(old)
    sch.add(new)
    run(sch.schedule())  # old: pages 0-1, new: pages 2-3; both sampled once
    assert alloc.num_free == 0
    step = sch.schedule()  # old needs a third page for position 4: the newest goes
    assert [s.rid for s in step.preempted] == ["new"]
    assert plan(step) == [("old", 1)]
    assert new.status == Status.WAITING and new.num_computed == 0 and not new.pages
    assert list(sch.waiting) == [new] and len(new.tokens) == 4  # recomputed later with its output token
    sch.check()


def test_a_sequence_alone_in_a_full_pool_preempts_itself_and_fails_cleanly():
    alloc = PageAllocator(2)
    sch = Scheduler(alloc, page_size=2, max_batch=8, chunk_size=16)
    s = seq("s", 4)
    sch.add(s)
    run(sch.schedule())
    step = sch.schedule()  # needs a third page; nobody else to preempt, and 5 tokens never fit 2 pages
    assert step.preempted == [s] and not step.rows
    assert [f[0] for f in step.failed] == [s] and "pool has only 2 pages" in step.failed[0][1]
    assert alloc.num_free == 2 and not sch.has_work()


def test_remote_kv_gets_pages_without_compute_and_max_batch_holds():
    sch = Scheduler(PageAllocator(16), page_size=4, max_batch=2, chunk_size=8)
    r, n, w = seq("r", 9, mode="remote_kv"), seq("n", 3), seq("w", 3)
    for s in (r, n, w):
        sch.add(s)
    step = sch.schedule()
    assert step.kv_waits == [r] and len(r.pages) == 3 and r.status == Status.WAITING_KV
    assert plan(step) == [("n", 3)]  # w waits: the batch (running + waiting for KV) is full
    assert [s.rid for s in sch.waiting] == ["w"]
    run(step)
    sch.kv_arrived(r)
    r.tokens.append(7)  # the first token, sampled by the remote prefill
    assert plan(sch.schedule()) == [("n", 1), ("r", 1)]
    sch.remove(n)
    sch.check()


def test_remote_kv_never_gets_a_page_a_step_in_flight_may_still_write():
    alloc = PageAllocator(6)
    sch = Scheduler(alloc, page_size=4, max_batch=4, chunk_size=8)
    done = seq("done", 8)
    sch.add(done)
    run(sch.schedule())  # pages 0, 1 (and the step's sample)
    alloc.fence = 1  # the engine queued step 1, which writes into done's pages
    sch.remove(done)
    r = seq("r", 20, mode="remote_kv")
    sch.add(r)
    step = sch.schedule()
    assert step.kv_waits == [] and r.status == Status.WAITING  # needs 5: 4 free, 2 fenced: it waits
    alloc.unfence(1)
    step = sch.schedule()
    assert step.kv_waits == [r] and len(r.pages) == 5
    local = seq("local", 8)
    alloc.fence = 2
    sch.remove(r)  # fenced again; a local prefill may take them at once
    sch.add(local)
    assert plan(sch.schedule()) == [("local", 8)]
