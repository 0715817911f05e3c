"""Where each KV byte goes when prefill and decode split heads differently: the write lists of
`rank_write_batches`, applied with memmove between real pools, must put every token's heads exactly where a
decode rank keeps them, whatever the two sides' tensor-parallel sizes."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from disaggctl.transfer.kv_layout import (
    KvLayout,
    RankPool,
    pools_incompatibility,
    rank_write_batches,
    write_pairs,
)

LAYERS, PAGE, HEADS, DIM = 2, 4, 4, 3
ITEM = 4  # float32


def pools(tp: int, pages: int, rng) -> list[tuple[np.ndarray, RankPool]]:
    out = []
    for r in range(tp):
        h = HEADS // tp
        t = rng.standard_normal((LAYERS, 2, pages, PAGE, h, DIM)).astype(np.float32)
        out.append((t, RankPool(f"127.0.0.1:{15000 + r}", KvLayout.from_tensor(t), r * h, h, DIM * ITEM)))
    return out


def full_heads(side: list[tuple[np.ndarray, RankPool]], pages: list[int], tokens: int) -> np.ndarray:
    """[layers, 2, tokens, HEADS, DIM]: the whole KV of the prompt, heads in order."""
    parts = [t[:, :, pages].reshape(LAYERS, 2, -1, t.shape[4], DIM)[:, :, :tokens] for t, _ in side]
    return np.concatenate(parts, axis=3)


@pytest.mark.parametrize("p_tp,d_tp", [(1, 1), (2, 2), (2, 1), (1, 2), (4, 2), (2, 4), (4, 1)])
def test_every_token_lands_in_the_decode_ranks_heads(p_tp, d_tp):
    rng = np.random.default_rng(p_tp * 10 + d_tp)
    tokens = 4 * PAGE + 3  # a partial last page
    src_pages, dst_pages = [5, 6, 9, 10, 2], [1, 2, 3, 7, 8]
    prefill, decode = pools(p_tp, 12, rng), pools(d_tp, 12, rng)
    before = [t.copy() for t, _ in decode]
    assert pools_incompatibility([p for _, p in prefill], [p for _, p in decode]) is None
    for _, src, dst in write_pairs([p for _, p in prefill], [p for _, p in decode]):
        srcs, dsts, lens = rank_write_batches(src, src_pages, dst, dst_pages, tokens)
        for s, d, n in zip(srcs, dsts, lens, strict=True):
            ctypes.memmove(d, s, n)
    assert np.array_equal(full_heads(decode, dst_pages, tokens), full_heads(prefill, src_pages, tokens))
    # nothing outside the prompt's slots changed: other pages and the unused end of the last page
    for (t, _), old in zip(decode, before, strict=True):
        untouched = np.ones(t.shape[2:4], dtype=bool)
        for i, p in enumerate(dst_pages):
            untouched[p, : min(PAGE, tokens - i * PAGE)] = False
        assert np.array_equal(t[:, :, untouched], old[:, :, untouched])


def test_equal_splits_send_whole_pages_and_different_splits_one_entry_per_token():
    rng = np.random.default_rng(0)
    (_, a), (_, b) = pools(1, 8, rng)[0], pools(1, 8, rng)[0]
    srcs, _, _ = rank_write_batches(a, [0, 1, 2], b, [3, 4, 5], 3 * PAGE)
    assert len(srcs) == LAYERS * 2  # three contiguous pages: one range per layer and k/v
    (_, half), _ = pools(2, 8, rng)
    srcs, _, lens = rank_write_batches(half, [0, 1, 2], b, [3, 4, 5], 3 * PAGE)
    assert len(srcs) == LAYERS * 2 * 3 * PAGE and set(lens) == {2 * DIM * ITEM}


def test_pools_that_cannot_pair_are_named():
    rng = np.random.default_rng(1)
    p = [x for _, x in pools(2, 8, rng)]
    assert "KV heads differ" in pools_incompatibility(p[:1], [x for _, x in pools(1, 8, rng)])
    odd = RankPool("h:1", KvLayout(1 << 20, LAYERS, 8, PAGE * HEADS * 8, PAGE), 0, HEADS, 8)
    assert "bytes per head" in pools_incompatibility(p, [odd])


def latent_pools(tp: int, pages: int, rng, dim: int = 5) -> list[tuple[np.ndarray, RankPool]]:
    """MLA's pools: one part per layer, one "head" of the latent, the same on every rank (replicated)."""
    t = rng.standard_normal((LAYERS, 1, pages, PAGE, 1, dim)).astype(np.float32)
    ranks = [t.copy() for _ in range(tp)]
    return [
        (r, RankPool(f"127.0.0.1:{16000 + i}", KvLayout.from_tensor(r), 0, 1, dim * ITEM))
        for i, r in enumerate(ranks)
    ]


@pytest.mark.parametrize("p_tp,d_tp", [(1, 1), (2, 2), (2, 1), (1, 2), (4, 2)])
def test_a_latent_pool_moves_whole_to_every_decode_rank_once(p_tp, d_tp):
    rng = np.random.default_rng(p_tp * 10 + d_tp)
    tokens = 2 * PAGE + 1
    src_pages, dst_pages = [3, 4, 8], [4, 5, 9]
    prefill, decode = latent_pools(p_tp, 10, rng), latent_pools(d_tp, 10, rng)
    src_pools, dst_pools = [p for _, p in prefill], [p for _, p in decode]
    assert pools_incompatibility(src_pools, dst_pools) is None
    pairs = write_pairs(src_pools, dst_pools)
    # one write per decode rank, from source replicas taken in turn
    assert [d.session_id for _, _, d in pairs] == [p.session_id for p in dst_pools]
    assert [i for i, _, _ in pairs] == [j % p_tp for j in range(d_tp)]
    for _, src, dst in pairs:
        srcs, dsts, lens = rank_write_batches(src, src_pages, dst, dst_pages, tokens)
        assert len(srcs) == LAYERS * 2  # pages 3-4 / 4-5 run together; one part a layer
        for s, d, n in zip(srcs, dsts, lens, strict=True):
            ctypes.memmove(d, s, n)
    want = prefill[0][0][:, :, src_pages].reshape(LAYERS, 1, -1, 1, 5)[:, :, :tokens]
    for t, _ in decode:
        assert np.array_equal(t[:, :, dst_pages].reshape(LAYERS, 1, -1, 1, 5)[:, :, :tokens], want)


def test_a_latent_pool_does_not_pair_with_a_kv_pool():
    rng = np.random.default_rng(2)
    kv = [p for _, p in pools(1, 8, rng)]
    latent = [p for _, p in latent_pools(1, 8, rng, dim=HEADS * DIM * 2)]
    assert "KV heads differ" in pools_incompatibility(latent, kv)
    assert "parts differ" in (KvLayout.incompatibility(kv[0].layout, latent[0].layout) or "")
