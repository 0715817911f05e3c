"""Decode on CUDA: the paged Triton kernel and CUDA-graph replay. Skipped where there is no CUDA device.

The oracles: the torch reference attention (`build_meta` without `paged_decode`) for the kernel, and
`transformers` for what the engine generates in fp32, with graphs on and off; in bf16 graphs on and off
must agree token for token (same kernel, padding rows never touch real rows)."""

from __future__ import annotations

import pytest
import torch
from hf_reference import hf_greedy
from test_pd_e2e import model_dir  # noqa: F401

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lens", [[1, 17, 300], [4500], [16, 0, 33]])
def test_paged_kernel_matches_the_torch_reference(dtype, lens):
    from disaggctl.runtime.attention import SeqSlice, build_meta, paged_attention
    from disaggctl.runtime.kv_cache import KVCache

    torch.manual_seed(0)
    page, kv_heads, heads, dim = 16, 2, 14, 64
    # the engine's page-major pool: a layer's pages are strided views, rows `page_rows` apart
    cache = KVCache(3, 400, page, kv_heads, dim, dtype, "cuda")
    cache.tensor.copy_(torch.randn(cache.tensor.shape, device="cuda"))
    kc, vc = cache.k(1), cache.v(1)
    perm = torch.randperm(cache.num_pages).tolist()
    real = [n for n in lens if n > 0]
    seqs, start = [], 0
    for n in real:
        count = -(-n // page)
        seqs.append(SeqSlice(q_len=1, kv_len=n, pages=perm[start : start + count]))
        start += count
    q = torch.randn(len(seqs), heads, dim, device="cuda").to(dtype)

    def meta(paged: bool):
        return build_meta(seqs, page, dim**-0.5, "cuda", paged_decode=paged, page_rows=cache.page_rows)

    ref = paged_attention(q, kc, vc, meta(False))
    got = paged_attention(q, kc, vc, meta(True))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, ref, atol=tol, rtol=tol)


def _engine(model: str, dtype: str, cuda_graph: bool, max_batch: int = 8, overlap: bool | None = None):
    from disaggctl.runtime.config import EngineConfig
    from disaggctl.runtime.engine import Engine

    cfg = EngineConfig(
        model=model,
        device="cuda",
        dtype=dtype,
        page_size=16,
        max_pages=256,
        max_batch=max_batch,
        cuda_graph=cuda_graph,
        overlap_schedule=overlap,
    )
    return Engine(cfg)


def _generate(engine, prompts: list[list[int]], n: int) -> list[list[int]]:
    from disaggctl.runtime.engine import Request
    from disaggctl.runtime.sampling import SamplingParams

    out: dict[str, list[int]] = {}
    done: set[str] = set()

    def on_event(ev):
        assert ev.error is None, ev.error
        out.setdefault(ev.rid, []).extend(ev.token_ids)
        if ev.finished:
            done.add(ev.rid)

    # different lengths: the batch shrinks as requests finish, so several buckets replay, padded
    for i, p in enumerate(prompts):
        params = SamplingParams(max_new_tokens=n + 3 * i, temperature=0.0, ignore_eos=True)
        engine.add_request(Request(f"r{i}", p, params, on_event=on_event))
    for _ in range(10_000):
        if len(done) == len(prompts):
            break
        engine.step()
    return [out[f"r{i}"] for i in range(len(prompts))]


PROMPTS = [[5, 6, 7, 8, 9], [100, 200, 300], list(range(40, 77)), [9] * 20, [1, 2]]


@pytest.mark.parametrize("overlap", [None, False], ids=["overlap-by-default", "settled-each-step"])
def test_graph_decode_in_fp32_equals_transformers(model_dir, overlap):  # noqa: F811
    engine = _engine(model_dir, "float32", cuda_graph=True, overlap=overlap)
    try:
        assert engine.runner.graphs is not None, "no CUDA graphs were captured"
        assert engine.overlap is (overlap is None)  # on by default on CUDA
        got = _generate(engine, PROMPTS, 12)
        replays = engine.runner.graphs.replays
    finally:
        engine.stop()
    for i, (p, tokens) in enumerate(zip(PROMPTS, got, strict=True)):
        assert tokens == hf_greedy(model_dir, p, 12 + 3 * i), f"prompt {i}"
    assert replays > 10, "decode steps did not replay the graphs"


def test_graph_and_eager_decode_agree_in_bf16(model_dir):  # noqa: F811
    # one request: the same matmul shapes on both paths (a padded bucket may pick other bf16 kernels)
    runs = {}
    for graphs in (True, False):
        engine = _engine(model_dir, "bfloat16", cuda_graph=graphs)
        try:
            assert (engine.runner.graphs is not None) == graphs
            runs[graphs] = _generate(engine, PROMPTS[2:3], 40)
        finally:
            engine.stop()
    assert runs[True] == runs[False]
