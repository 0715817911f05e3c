"""Tensor parallelism on CPU ranks (gloo): the engine split over 2 ranks against `transformers`, token for
token, and what happens when a rank dies."""

from __future__ import annotations

import os
import signal

import pytest
from conftest import wait_for
from test_runtime_vs_hf import PAGE, build_model, greedy, hf_greedy, prompts, run_staggered

from disaggctl.runtime.config import ConfigError, EngineConfig
from disaggctl.runtime.engine import Engine, Request

pytestmark = pytest.mark.slow


def tp_engine(path: str, tp: int, **kw) -> Engine:
    kw.setdefault("max_pages", 64)
    config = EngineConfig(model=path, page_size=PAGE, device="cpu", dtype="float32", tp_size=tp, **kw)
    return Engine(config)


@pytest.fixture
def engines():
    made: list[Engine] = []
    yield made
    for e in made:
        e.stop()


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_tp2_greedy_matches_transformers(kind, tmp_path, engines):
    """GQA with biases (llama), qk-norm with head_dim != hidden/heads (qwen3): each rank holds half the
    heads, half the MLP, and its KV heads; prefill chunks and decode batches mix in each step."""
    hf = build_model(kind, tmp_path)
    batch = prompts(hf.config.vocab_size)
    want = [hf_greedy(hf, p) for p in batch]
    for chunk in (PAGE - 1, 64):
        engine = tp_engine(str(tmp_path), 2, chunk_size=chunk)
        engines.append(engine)
        assert engine.kv_cache.num_kv_heads == 1 and len(engine.pools) == 2
        assert [p["head_start"] for p in engine.pools] == [0, 1]
        got = run_staggered(engine, batch)
        for i, (tokens, logprobs) in enumerate(want):
            assert got[str(i)]["tokens"] == tokens, f"{kind} tp2 prompt {i}, chunk {chunk}"
            assert got[str(i)]["logprobs"] == pytest.approx(logprobs, abs=1e-4)
        assert engine.stats()["pages_used"] == 0
        engine.stop()  # its process group is this process's only one


def test_heads_that_do_not_divide_are_refused(tmp_path):
    build_model("qwen2-tied", tmp_path)  # one KV head
    with pytest.raises(ConfigError, match="num_key_value_heads 1 is not divisible by tp 2"):
        tp_engine(str(tmp_path), 2)


def test_a_dead_rank_fails_the_engine_and_its_requests(tmp_path, engines):
    hf = build_model("llama", tmp_path)
    engine = tp_engine(str(tmp_path), 2)
    engines.append(engine)
    engine.start()
    events = []
    os.kill(engine.ranks.procs[0].pid, signal.SIGKILL)
    wait_for(lambda: engine.failure() is not None, 30, "rank 0 to notice its peer died")
    assert not engine.alive() and "rank 1 exited" in engine.failure()
    ids = prompts(hf.config.vocab_size)[0]
    engine.add_request(Request("r", ids, greedy(), on_event=events.append))
    wait_for(lambda: events and events[-1].finished, 60, "the request to fail")
    assert events[-1].error is not None
