"""The KV page pool: allocator bookkeeping, contiguity, quarantine, and the layout peers address pages by."""

from __future__ import annotations

import random

import pytest
import torch

from disaggctl.runtime.kv_cache import KVCache, PageAllocator


def test_allocate_prefers_contiguous_runs_and_returns_none_when_full():
    a = PageAllocator(10)
    first = a.allocate(3)
    assert first == [0, 1, 2]
    second = a.allocate(4)
    assert second == [3, 4, 5, 6]
    a.free(first)
    # a run of 3 at the front fits a 3-page request; a 4-page one skips the hole for the run at the end
    assert a.allocate(3) == [0, 1, 2]
    a.free([0, 1, 2])
    assert a.allocate(3) == [0, 1, 2] and a.num_free == 3
    assert a.allocate(4) is None  # not enough room: None, nothing taken
    assert a.num_free == 3
    a.free([0, 1, 2])
    assert a.allocate(4) == [0, 1, 2, 7]  # fragmented: the lowest free pages
    assert a.allocate(3) is None
    assert a.allocate(2) == [8, 9] and a.num_free == 0


def test_allocate_after_continues_a_run():
    a = PageAllocator(8)
    a.allocate(2)
    a.allocate(2)  # pages 2, 3
    assert a.allocate(1, after=1) == [4]  # 2 is taken: the first free run instead
    assert a.allocate(1, after=4) == [5]
    assert a.allocate(2, after=6) is not None
    a.check()


def test_free_rejects_double_free_and_foreign_pages():
    a = PageAllocator(4)
    pages = a.allocate(2)
    a.free(pages)
    with pytest.raises(ValueError, match="double free"):
        a.free(pages)
    with pytest.raises(ValueError, match="outside the pool"):
        a.free([4])
    with pytest.raises(ValueError, match="double free"):
        a.free([3])


def test_free_later_keeps_pages_out_until_due():
    now = [100.0]
    a = PageAllocator(4, clock=lambda: now[0])
    pages = a.allocate(4)
    a.free_later(pages[:2], after_s=5.0)
    assert a.num_quarantined == 2 and a.num_free == 0 and a.num_used == 2
    assert a.allocate(1) is None
    now[0] += 4.9
    assert a.allocate(1) is None
    now[0] += 0.2
    assert a.allocate(2) == [0, 1]
    assert a.num_quarantined == 0
    a.check([pages[2:], [0, 1]])


def test_fenced_pages_serve_local_steps_at_once_and_peers_only_once_the_step_is_done():
    """Pages freed while a step still runs on the device may get that step's KV writes: our own later
    steps (queued behind it) may reuse them, a peer's write (not ordered after it) may not."""
    a = PageAllocator(6)
    pages = a.allocate(4)
    a.fence = 1  # step 1 is in flight
    a.free(pages[:2])
    assert a.num_free == 2 and a.num_fenced == 2 and a.available(local=False) == 2
    assert a.allocate(3, local=False) is None
    assert a.allocate(2, local=False) == [4, 5]
    a.fence = 2
    a.free(pages[2:3])  # behind step 2 now
    local = a.allocate(1)
    assert local == [0] and a.num_fenced == 2
    a.unfence(1)  # step 1 done: page 1 is free, page 2 waits for step 2
    assert a.num_free == 1 and a.num_fenced == 1 and a.allocate(1, local=False) == [1]
    a.fence = None
    a.unfence()
    assert a.num_free == 1 and a.num_fenced == 0 and a.allocate(1, local=False) == [2]
    a.check([local, [4, 5], [1], [2], pages[3:]])


def test_random_operations_keep_bookkeeping_consistent():
    rng = random.Random(0)
    now = [0.0]
    a = PageAllocator(64, clock=lambda: now[0])
    owners: list[list[int]] = []
    for step in range(2000):
        a.fence = step if rng.random() < 0.5 else None
        if rng.random() < 0.2:
            a.unfence(step - rng.randint(0, 3))
        op = rng.random()
        if op < 0.5:
            pages = a.allocate(rng.randint(1, 9), local=rng.random() < 0.7)
            if pages is not None:
                assert len(set(pages)) == len(pages)
                owners.append(pages)
        elif owners and op < 0.85:
            a.free(owners.pop(rng.randrange(len(owners))))
        elif owners:
            a.free_later(owners.pop(rng.randrange(len(owners))), rng.random())
        now[0] += 0.05
        a.check(owners)
    held = sum(len(p) for p in owners)
    assert a.num_free + a.num_fenced + a.num_quarantined + held == 64


def test_integrity_check_catches_a_shared_page():
    a = PageAllocator(8)
    p = a.allocate(2)
    q = a.allocate(2)
    with pytest.raises(AssertionError, match="two owners"):
        a.check([p, q, [p[0]]])
    with pytest.raises(AssertionError, match="used pages != owned pages"):
        a.check([p])


def test_layout_addresses_match_the_tensor():
    cache = KVCache(3, 5, 4, 2, 8, torch.float16, "cpu")
    lay = cache.describe()
    t = cache.tensor
    assert t.is_contiguous()
    assert lay["page_bytes"] == 4 * 2 * 8 * 2 and lay["num_pages"] == 5 and lay["page_size"] == 4
    assert lay["total_bytes"] == t.numel() * 2 and lay["dtype"] == "float16"
    assert lay["page_major"] is True
    layout = cache.layout()
    for layer in range(3):
        for kv in range(2):
            for page in range(5):
                # page-major, written out: every (layer, part) of page p, then page p + 1
                addr = lay["base_ptr"] + ((page * 3 + layer) * 2 + kv) * lay["page_bytes"]
                assert t[page, layer, kv].data_ptr() == addr == layout.page_addr(layer, kv, page)
                assert (cache.k if kv == 0 else cache.v)(layer)[page].data_ptr() == addr
    assert cache.pages_for(8) == 2 and cache.pages_for(9) == 3


def test_flat_rows_address_every_slot_of_a_layer():
    from disaggctl.runtime.kv_cache import flat_rows

    cache = KVCache(3, 5, 4, 2, 8, torch.float32, "cpu")
    cache.tensor.copy_(torch.randn(cache.tensor.shape))
    for layer in range(3):
        pages = cache.v(layer)
        flat = flat_rows(pages)
        for page in range(5):
            for offset in range(4):
                assert torch.equal(flat[page * cache.page_rows + offset], pages[page, offset])
    latent = KVCache(2, 3, 4, 1, 6, torch.float32, "cpu", parts=1)
    latent.tensor.copy_(torch.randn(latent.tensor.shape))
    assert torch.equal(latent.latent(1)[2 * latent.page_rows + 3], latent.tensor[2, 1, 0, 3, 0])
