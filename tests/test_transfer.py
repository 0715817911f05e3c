"""The Mooncake transfer layer: page addressing, run merging, and real writes into a second process."""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import random
import select
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch

from disaggctl.transfer import mooncake
from disaggctl.transfer.kv_layout import KvLayout, kv_write_batches, merge_runs
from disaggctl.transfer.mooncake import MooncakeAgent, MooncakeUnavailableError, TransferError

PEER_SCRIPT = Path(__file__).with_name("transfer_peer.py")
FILL_BYTE = 0xA5
# Small pool shaped like the engine's: [layers, 2, pages, page_size, kv_heads, head_dim], bf16.
LAYERS, PAGE_SIZE, HEADS, DIM = 2, 4, 2, 8
PEER_PAGES, SRC_PAGES = 32, 24
AGENT_TIMEOUT_S = 2.0


def random_pool(pages: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randint(
        0, 256, (LAYERS, 2, pages, PAGE_SIZE, HEADS, DIM * 2), dtype=torch.uint8, generator=gen
    )
    return raw.view(torch.bfloat16)


def pool_nbytes(pool: torch.Tensor) -> int:
    return pool.numel() * pool.element_size()


def page_bytes_of(pool: torch.Tensor, layer: int, kv: int, page: int) -> bytes:
    return pool[layer, kv, page].contiguous().view(torch.uint8).numpy().tobytes()


def expected_crcs(
    src: torch.Tensor, src_pages, dst_pages, num_pages: int, num_tokens: int | None
) -> list[int]:
    """Per-page crc32 the destination pool should hold, built by tensor indexing (not by address math)."""
    fill = bytes([FILL_BYTE]) * (PAGE_SIZE * HEADS * DIM * 2)
    pages = {}
    for i, (s, d) in enumerate(zip(src_pages, dst_pages, strict=True)):
        pages[d] = (s, PAGE_SIZE)
        if num_tokens is not None and i == len(src_pages) - 1:
            pages[d] = (s, num_tokens - i * PAGE_SIZE)
    out = []
    for layer in range(LAYERS):
        for kv in range(2):
            for page in range(num_pages):
                if page not in pages:
                    out.append(zlib.crc32(fill))
                    continue
                s, used = pages[page]
                cut = used * HEADS * DIM * 2
                out.append(zlib.crc32(page_bytes_of(src, layer, kv, s)[:cut] + fill[cut:]))
    return out


class Peer:
    """tests/transfer_peer.py in a subprocess: a registered KV pool in another process."""

    def __init__(self, pages: int = PEER_PAGES):
        args = [sys.executable, str(PEER_SCRIPT), "--layers", str(LAYERS), "--pages", str(pages)]
        args += ["--page-size", str(PAGE_SIZE), "--heads", str(HEADS), "--dim", str(DIM)]
        self.proc = subprocess.Popen(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        hello = json.loads(self._readline(60))
        self.session_id = hello["session_id"]
        self.layout = KvLayout.from_dict(hello["layout"])

    def _readline(self, timeout: float) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError("transfer peer did not answer")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"transfer peer exited with {self.proc.wait(5)}")
        return line

    def crcs(self) -> list[int]:
        self.proc.stdin.write("crc\n")
        self.proc.stdin.flush()
        return json.loads(self._readline(30))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


@pytest.fixture(scope="module")
def agent():
    with MooncakeAgent("127.0.0.1", "tcp", timeout_s=AGENT_TIMEOUT_S) as a:
        yield a


@pytest.fixture(scope="module")
def source(agent):
    pool = random_pool(SRC_PAGES, seed=1)
    agent.register(pool.data_ptr(), pool_nbytes(pool))
    yield pool, KvLayout.from_tensor(pool)
    agent.unregister(pool.data_ptr())


@pytest.fixture
def peer():
    p = Peer()
    yield p
    p.kill()


# --- addressing and merging (no Mooncake) ---------------------------------------------------------------


def test_page_addr_matches_tensor_indexing():
    pool = random_pool(7, seed=0)
    layout = KvLayout.from_tensor(pool)
    assert layout.page_bytes == PAGE_SIZE * HEADS * DIM * 2
    for layer in range(LAYERS):
        for kv in range(2):
            for page in range(7):
                assert layout.page_addr(layer, kv, page) == pool[layer, kv, page].data_ptr()
    with pytest.raises(IndexError):
        layout.page_addr(0, 2, 0)
    assert KvLayout.from_dict(json.loads(json.dumps(layout.to_dict()))) == layout


def random_page_lists(rng: random.Random, n: int, pool: int) -> tuple[list[int], list[int]]:
    """Distinct pages in segments that are sometimes contiguous, sometimes shuffled, on each side."""

    def side() -> list[int]:
        pages = list(range(pool))
        start = rng.randrange(pool - n + 1)
        if rng.random() < 0.5:
            return pages[start : start + n]
        chosen = rng.sample(pages, n)
        # Sort some stretches so real runs of +1 appear among the random ones.
        cut = rng.randrange(n + 1)
        return sorted(chosen[:cut]) + chosen[cut:]

    return side(), side()


def test_merge_runs_reconstructs_the_pairs():
    rng = random.Random(1234)
    for _ in range(500):
        n = rng.randrange(0, 40)
        src, dst = random_page_lists(rng, n, 64)
        runs = merge_runs(src, dst)
        rebuilt = [(s + i, d + i) for s, d, count in runs for i in range(count)]
        assert rebuilt == list(zip(src, dst, strict=True))
        assert all(count >= 1 for _, _, count in runs)
        # Maximal: no run continues the previous one on both sides.
        for (s0, d0, c0), (s1, d1, _) in zip(runs, runs[1:], strict=False):
            assert not (s1 == s0 + c0 and d1 == d0 + c0)


def test_merge_runs_contiguous_and_split():
    assert merge_runs([3, 4, 5], [10, 11, 12]) == [(3, 10, 3)]
    assert merge_runs([3, 4, 5], [10, 11, 20]) == [(3, 10, 2), (5, 20, 1)]
    assert merge_runs([], []) == []
    with pytest.raises(ValueError, match="differ in length"):
        merge_runs([1, 2], [1])


def copy_locally(srcs, dsts, lens) -> None:
    for s, d, n in zip(srcs, dsts, lens, strict=True):
        ctypes.memmove(d, s, n)


def test_kv_write_batches_copies_the_right_bytes():
    """Apply the batches with memmove and compare every page with tensor indexing, for random page lists."""
    rng = random.Random(7)
    src = random_pool(SRC_PAGES, seed=3)
    src_layout = KvLayout.from_tensor(src)
    for _ in range(60):
        dst = torch.empty((LAYERS, 2, PEER_PAGES, PAGE_SIZE, HEADS, DIM), dtype=torch.bfloat16)
        dst.view(torch.uint8).fill_(FILL_BYTE)
        n = rng.randrange(1, SRC_PAGES + 1)
        src_pages, _ = random_page_lists(rng, n, SRC_PAGES)
        _, dst_pages = random_page_lists(rng, n, PEER_PAGES)
        num_tokens = rng.choice([None, (n - 1) * PAGE_SIZE + rng.randrange(1, PAGE_SIZE + 1)])
        batches = kv_write_batches(src_layout, src_pages, KvLayout.from_tensor(dst), dst_pages, num_tokens)
        copy_locally(*batches)
        crcs = [
            zlib.crc32(row.tobytes())
            for row in dst.view(torch.uint8).reshape(LAYERS * 2 * PEER_PAGES, -1).numpy()
        ]
        assert crcs == expected_crcs(src, src_pages, dst_pages, PEER_PAGES, num_tokens)


def test_kv_write_batches_merges_across_layers_when_layouts_allow():
    same = KvLayout(1 << 20, LAYERS, 8, 256, 4)
    other = KvLayout(1 << 30, LAYERS, 8, 256, 4)
    srcs, dsts, lens = kv_write_batches(same, range(8), other, range(8))
    assert (srcs, dsts, lens) == ([same.base_ptr], [other.base_ptr], [same.total_bytes])
    # A partial last page breaks every (layer, k/v) slab apart again.
    _, _, lens = kv_write_batches(same, range(8), other, range(8), num_tokens=8 * 4 - 1)
    assert lens == [8 * 256 - 64] * (LAYERS * 2)
    # Whole-slab runs cannot join when the pools have different page counts.
    bigger = KvLayout(1 << 30, LAYERS, 9, 256, 4)
    _, _, lens = kv_write_batches(same, range(8), bigger, range(8))
    assert lens == [8 * 256] * (LAYERS * 2)


@pytest.mark.parametrize("src_major,dst_major", [(True, True), (True, False), (False, True)])
def test_page_major_pools_get_the_right_bytes(src_major, dst_major):
    """The runtime's pools are page-major ([pages, layers, parts, ...]); copying between either order must
    put every used token of every (layer, part) where tensor indexing says, and touch no other page."""
    rng = random.Random(11)

    def pool(pages: int, page_major: bool, seed: int | None) -> torch.Tensor:
        shape = (pages, LAYERS, 2) if page_major else (LAYERS, 2, pages)
        t = torch.empty((*shape, PAGE_SIZE, HEADS, DIM), dtype=torch.bfloat16)
        if seed is None:
            t.view(torch.uint8).fill_(FILL_BYTE)
        else:
            t.view(torch.uint8).copy_(torch.randint(0, 256, t.view(torch.uint8).shape, dtype=torch.uint8))
        return t

    def page(t: torch.Tensor, page_major: bool, p: int, layer: int, kv: int) -> torch.Tensor:
        return t[p, layer, kv] if page_major else t[layer, kv, p]

    for _ in range(30):
        src, dst = pool(SRC_PAGES, src_major, 1), pool(PEER_PAGES, dst_major, None)
        n = rng.randrange(1, SRC_PAGES + 1)
        src_pages, _ = random_page_lists(rng, n, SRC_PAGES)
        _, dst_pages = random_page_lists(rng, n, PEER_PAGES)
        tokens = (n - 1) * PAGE_SIZE + rng.randrange(1, PAGE_SIZE + 1)
        copy_locally(
            *kv_write_batches(
                KvLayout.from_tensor(src, page_major=src_major),
                src_pages,
                KvLayout.from_tensor(dst, page_major=dst_major),
                dst_pages,
                tokens,
            )
        )
        for i, (sp, dp) in enumerate(zip(src_pages, dst_pages, strict=True)):
            used = min(PAGE_SIZE, tokens - i * PAGE_SIZE)
            for layer in range(LAYERS):
                for kv in range(2):
                    want = page(src, src_major, sp, layer, kv)[:used]
                    assert torch.equal(
                        page(dst, dst_major, dp, layer, kv)[:used].view(torch.uint8), want.view(torch.uint8)
                    )
        untouched = set(range(PEER_PAGES)) - set(dst_pages)
        for dp in untouched:
            for layer in range(LAYERS):
                assert (page(dst, dst_major, dp, layer, 0).view(torch.uint8) == FILL_BYTE).all()


def test_page_major_runs_are_one_entry_each():
    a = KvLayout(1 << 20, LAYERS, 16, 256, 4, page_major=True)
    b = KvLayout(1 << 30, LAYERS, 16, 256, 4, page_major=True)
    run = LAYERS * 2 * 256  # one page of every (layer, part)
    srcs, dsts, lens = kv_write_batches(a, [3, 4, 5, 9, 10], b, [0, 1, 2, 7, 8], num_tokens=5 * 4 - 1)
    assert lens == [3 * run, 2 * run]  # two runs; the last page goes whole
    assert srcs == [a.base_ptr + 3 * run, a.base_ptr + 9 * run]
    assert dsts == [b.base_ptr, b.base_ptr + 7 * run]


def test_page_major_write_list_moves_each_page_to_its_pair_whatever_the_runs():
    """One run on each side takes a path without numpy; scattered pages the general one: both must send
    every layer of source page i to destination page i, and nothing else."""
    rng = random.Random(0)
    src_layout = KvLayout(1 << 20, 3, 40, 64, 4, page_major=True)
    dst_layout = KvLayout(1 << 30, 3, 40, 64, 4, page_major=True)
    stride = src_layout.page_stride
    for case in range(300):
        n = rng.randint(1, 12)
        if case % 2:
            s0, d0 = rng.randrange(0, 41 - n), rng.randrange(0, 41 - n)
            src, dst = list(range(s0, s0 + n)), list(range(d0, d0 + n))
        else:
            src, dst = rng.sample(range(40), n), rng.sample(range(40), n)
        srcs, dsts, lens = kv_write_batches(src_layout, src, dst_layout, dst)
        if case % 2:
            assert len(lens) == 1
        moved = {}
        for a, b, m in zip(srcs, dsts, lens, strict=True):
            assert m % stride == 0 and (a - src_layout.base_ptr) % stride == 0
            for k in range(m // stride):
                moved[(a - src_layout.base_ptr) // stride + k] = (b - dst_layout.base_ptr) // stride + k
        assert moved == dict(zip(src, dst, strict=True)), (src, dst)


def test_kv_write_batches_rejects_bad_input():
    a = KvLayout(4096, 2, 8, 256, 4)
    with pytest.raises(ValueError, match="page_bytes differs"):
        kv_write_batches(a, [0], KvLayout(4096, 2, 8, 512, 4), [0])
    with pytest.raises(ValueError, match="num_layers differs"):
        kv_write_batches(a, [0], KvLayout(4096, 3, 8, 256, 4), [0])
    with pytest.raises(ValueError, match="outside the pool"):
        kv_write_batches(a, [0, 8], a, [0, 1])
    with pytest.raises(ValueError, match="repeats"):
        kv_write_batches(a, [0, 1], a, [3, 3])
    with pytest.raises(ValueError, match="repeats"):  # not ascending: the full check
        kv_write_batches(a, [0, 1, 2], a, [5, 2, 5])
    page_major = KvLayout(4096, 2, 8, 256, 4, page_major=True)
    with pytest.raises(ValueError, match="repeats"):
        kv_write_batches(page_major, [0, 1, 2], page_major, [4, 1, 4])
    assert len(kv_write_batches(page_major, [0, 1, 2], page_major, [6, 1, 4])[0]) == 3  # descending is fine
    with pytest.raises(ValueError, match="do not fill"):
        kv_write_batches(a, [0, 1], a, [2, 3], num_tokens=4)
    with pytest.raises(ValueError, match="must be positive"):
        KvLayout.from_dict({"base_ptr": 1, "num_layers": 0, "num_pages": 1, "page_bytes": 4, "page_size": 1})
    with pytest.raises(ValueError, match="missing"):
        KvLayout.from_dict({"base_ptr": 1})


# --- environment and set-up -----------------------------------------------------------------------------


def test_transport_env_bounds_every_timeout():
    env = mooncake.transport_env("tcp", 2.0, {"MC_TCP_PROTO": "1"})
    assert env["MC_FORCE_TCP"] == "1"
    assert env["MC_TRANSFER_TIMEOUT"] == "5"  # Mooncake clamps below 5 s anyway
    assert env["MC_TCP_PROGRESS_TIMEOUT_SEC"] == env["MC_TCP_STATUS_TIMEOUT_SEC"] == "2"
    assert env["MC_TCP_PROTO"] is None and env["MC_LOG_LEVEL"] == "WARNING"
    env = mooncake.transport_env("rdma", 45.5, {"MC_LOG_LEVEL": "ERROR"})
    assert (
        env["MC_FORCE_TCP"] is None and env["MC_TRANSFER_TIMEOUT"] == "46" and env["MC_LOG_LEVEL"] == "ERROR"
    )


def test_transport_selection(monkeypatch):
    assert mooncake.select_transport("tcp", None, False) == "tcp"
    monkeypatch.setattr(mooncake, "rdma_devices", lambda: [])
    assert mooncake.select_transport("auto", None, False) == "tcp"
    with pytest.raises(MooncakeUnavailableError, match="no RDMA device"):
        mooncake.select_transport("rdma", None, False)
    with pytest.raises(MooncakeUnavailableError, match="CUDA build"):
        mooncake.select_transport("nvlink", None, False)
    with pytest.raises(ValueError, match="unknown transfer protocol"):
        mooncake.select_transport("udp", None, False)
    monkeypatch.setattr(mooncake, "rdma_devices", lambda: ["mlx5_0", "mlx5_1"])
    assert mooncake.select_transport("auto", None, False) == "rdma"
    assert mooncake.select_transport("rdma", "mlx5_1", False) == "rdma"
    with pytest.raises(MooncakeUnavailableError, match="mlx5_7 not found"):
        mooncake.select_transport("rdma", "mlx5_0,mlx5_7", False)


def test_missing_mooncake_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "mooncake.engine", None)
    with pytest.raises(
        MooncakeUnavailableError, match="pip install mooncake-transfer-engine-non-cuda.*libibverbs1"
    ):
        mooncake.load_engine_module()


def test_register_rejects_overlap(agent):
    buf = torch.zeros(4096, dtype=torch.uint8)
    agent.register(buf.data_ptr(), 4096)
    try:
        with pytest.raises(TransferError, match="overlaps"):
            agent.register(buf.data_ptr() + 1024, 1024)
    finally:
        agent.unregister(buf.data_ptr())
    with pytest.raises(ValueError, match="not registered"):
        agent.unregister(buf.data_ptr())


# --- real writes into another process ---------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_written_pages_arrive_intact(agent, source, peer):
    src, src_layout = source
    assert agent.probe(peer.session_id)
    cases = [
        ("contiguous", list(range(2, 12)), list(range(17, 27)), None),
        ("fragmented", [0, 1, 2, 9, 5, 6, 20, 21, 13], [30, 3, 4, 5, 11, 12, 0, 1, 8], None),
        ("partial last page", [7, 8, 9, 15], [25, 26, 14, 15], 3 * PAGE_SIZE + 1),
    ]
    written: dict[int, tuple[int, int | None]] = {}
    for name, src_pages, dst_pages, num_tokens in cases:
        srcs, dsts, lens = kv_write_batches(src_layout, src_pages, peer.layout, dst_pages, num_tokens)
        agent.write(peer.session_id, srcs, dsts, lens)
        # The peer's pool accumulates writes; rebuild the expectation from every write so far.
        for i, (s, d) in enumerate(zip(src_pages, dst_pages, strict=True)):
            last = num_tokens is not None and i == len(src_pages) - 1
            written[d] = (s, num_tokens - i * PAGE_SIZE if last else None)
        full = [d for d, (_, used) in written.items() if used is None]
        partial = [(d, s, used) for d, (s, used) in written.items() if used is not None]
        expected = expected_crcs(src, [written[d][0] for d in full], full, PEER_PAGES, None)
        for d, s, used in partial:
            one = expected_crcs(src, [s], [d], PEER_PAGES, used)
            for slab in range(LAYERS * 2):
                expected[slab * PEER_PAGES + d] = one[slab * PEER_PAGES + d]
        assert peer.crcs() == expected, name


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_write_to_dead_peer_fails_fast(agent, source, peer):
    _, src_layout = source
    batches = kv_write_batches(src_layout, [0, 1, 5], peer.layout, [3, 4, 9])
    agent.write(peer.session_id, *batches)
    peer.kill()
    started = time.monotonic()
    with pytest.raises(TransferError) as info:
        agent.write(peer.session_id, *batches)
    assert time.monotonic() - started < 3.0
    assert info.value.peer == peer.session_id
    assert not agent.probe(peer.session_id, timeout_s=2)
    # A session that never existed fails at once too.
    started = time.monotonic()
    with pytest.raises(TransferError):
        agent.write("127.0.0.1:1", *batches)
    assert time.monotonic() - started < 1.0


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_hung_peer_is_bounded_by_our_deadline_and_never_blocks_the_loop(agent, source, peer):
    """A frozen peer never contacted before blocks Mooncake ~60 s; our deadline must end the wait."""
    _, src_layout = source
    batches = kv_write_batches(src_layout, [0], peer.layout, [0])
    os.kill(peer.proc.pid, signal.SIGSTOP)
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.05)
            ticks += 1

    async def attempt():
        tick_task = asyncio.create_task(ticker())
        started = time.monotonic()
        try:
            with pytest.raises(TransferError, match="no completion"):
                # as the engine issues hand-off writes: on a worker thread, awaited from the loop
                await asyncio.to_thread(agent.write, peer.session_id, *batches)
            return time.monotonic() - started
        finally:
            tick_task.cancel()

    try:
        elapsed = asyncio.run(attempt())
    finally:
        # Killing the peer also frees the pool thread still stuck in Mooncake's handshake.
        peer.kill()
    assert elapsed < agent.deadline_s(sum(batches[2])) + 1.0
    assert ticks >= elapsed / 0.05 * 0.5, "the event loop was blocked during the write"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_writes_larger_than_one_mooncake_batch_arrive_intact(agent):
    """Mooncake's TCP transport rejects batches of more than ~2k entries; the agent must split them."""
    pages = 600
    src = random_pool(pages, seed=5)
    agent.register(src.data_ptr(), pool_nbytes(src))
    big = Peer(pages=2 * pages)
    try:
        src_pages, dst_pages = list(range(pages)), [2 * i for i in range(pages)]  # no run longer than a page
        batches = kv_write_batches(KvLayout.from_tensor(src), src_pages, big.layout, dst_pages)
        assert len(batches[0]) == pages * 2 * LAYERS > 2100
        agent.write(big.session_id, *batches)
        assert big.crcs() == expected_crcs(src, src_pages, dst_pages, 2 * pages, None)
    finally:
        big.kill()
        agent.unregister(src.data_ptr())
