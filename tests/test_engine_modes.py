"""The engine's three modes, run on its own step thread, and how it fails.

The PD hand-off is reproduced in-process: engine A runs `prefill_only`, its pages' KV is copied into the
pages engine B allotted for `remote_kv` (a plain tensor copy stands in for the Mooncake write), and B's
tokens must equal those of a `normal` run, which themselves equal transformers'.
"""

from __future__ import annotations

import queue
import re
import sys

import pytest
import torch
from test_runtime_vs_hf import build_model, greedy, hf_greedy, prompts

from disaggctl.runtime.config import EngineConfig
from disaggctl.runtime.engine import Engine, Request, RequestEvent
from disaggctl.runtime.sampling import SamplingParams

TIMEOUT_S = 30
OVERLAP = False  # set per test by the `overlap_schedule` fixture


@pytest.fixture(autouse=True, params=[False, True], ids=["settled-each-step", "overlap"])
def overlap_schedule(request, monkeypatch):
    """Every test twice: each step settled before the next, and the next queued before the previous is
    read (the CUDA default, forced here on the CPU)."""
    monkeypatch.setattr(sys.modules[__name__], "OVERLAP", request.param)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen3")
    hf = build_model("qwen3", out)
    return str(out), hf


def make_engine(path: str, start: bool = True, **kw) -> Engine:
    kw = {"max_pages": 48, "page_size": 4, "chunk_size": 5, "overlap_schedule": OVERLAP, **kw}
    engine = Engine(EngineConfig(model=path, device="cpu", dtype="float32", **kw))
    if start:
        engine.start()
    return engine


class Events:
    """Collects one engine's events per request id, on the test thread."""

    def __init__(self):
        self.q: queue.Queue[RequestEvent] = queue.Queue()
        self.by_rid: dict[str, list[RequestEvent]] = {}

    def __call__(self, ev: RequestEvent) -> None:
        self.q.put(ev)

    def wait(self, rid: str, pred) -> RequestEvent:
        for ev in self.by_rid.get(rid, []):
            if pred(ev):
                return ev
        while True:
            ev = self.q.get(timeout=TIMEOUT_S)
            self.by_rid.setdefault(ev.rid, []).append(ev)
            if ev.rid == rid and pred(ev):
                return ev

    def finish(self, rid: str) -> RequestEvent:
        return self.wait(rid, lambda e: e.finished)

    def tokens(self, rid: str) -> list[int]:
        return [t for ev in self.by_rid[rid] for t in ev.token_ids]


def test_prefill_only_then_remote_kv_equals_normal(tiny):
    path, hf = tiny
    batch = prompts(hf.config.vocab_size, lens=(9, 3, 14))
    want = [hf_greedy(hf, p)[0] for p in batch]
    a, b = make_engine(path), make_engine(path, max_pages=40)
    ea, eb = Events(), Events()
    try:
        # B takes an unrelated request first, so its pages for the hand-off are not A's page ids
        b.add_request(Request("other", batch[1], greedy(), on_event=eb))
        for i, p in enumerate(batch):
            rid = f"r{i}"
            b.add_request(Request(rid, p, greedy(), mode="remote_kv", on_event=eb))
            dst = eb.wait(rid, lambda e: e.kind == "kv_pages").page_ids
            a.add_request(Request(rid, p, greedy(), mode="prefill_only", on_event=ea))
            done = ea.wait(rid, lambda e: e.kind == "prefilled")
            assert len(done.page_ids) == len(dst) == -(-len(p) // 4)
            assert a.stats()["held"] == 1
            # B's pages receive A's pages, every layer, K and V: what the transfer engine does
            b.kv_cache.tensor[dst] = a.kv_cache.tensor[done.page_ids]  # page-major: pages first
            a.release(rid)
            b.kv_arrived(rid, done.token_ids[0], done.logprobs[0])
            end = eb.finish(rid)
            assert end.finish_reason == "length" and end.error is None
            assert eb.tokens(rid) == want[i], f"prompt {i}"
        assert eb.finish("other").error is None and eb.tokens("other") == want[1]
        assert a.stats()["pages_used"] == 0 and a.stats()["held"] == 0
        assert b.stats()["pages_used"] == 0
    finally:
        a.stop()
        b.stop()


def test_kv_failed_quarantines_pages_and_spares_others(tiny):
    path, hf = tiny
    p = prompts(hf.config.vocab_size, lens=(10, 6))
    engine = make_engine(path)
    ev = Events()
    try:
        engine.add_request(Request("remote", p[0], greedy(), mode="remote_kv", on_event=ev))
        pages = ev.wait("remote", lambda e: e.kind == "kv_pages").page_ids
        engine.add_request(Request("local", p[1], greedy(), on_event=ev))
        engine.kv_failed("remote", "peer timed out")
        err = ev.finish("remote")
        assert err.kind == "error" and "peer timed out" in err.error
        assert ev.finish("local").error is None and ev.tokens("local") == hf_greedy(hf, p[1])[0]
        stats = engine.stats()
        assert stats["pages_quarantined"] == len(pages) and stats["pages_used"] == 0
        assert engine.kv_cache.allocator.num_free == 48 - len(pages)
    finally:
        engine.stop()


def test_quarantine_ends(tiny):
    path, hf = tiny
    engine = make_engine(path, quarantine_s=0.0)
    ev = Events()
    try:
        engine.add_request(Request("r", [1, 2, 3, 4, 5], greedy(), mode="remote_kv", on_event=ev))
        ev.wait("r", lambda e: e.kind == "kv_pages")
        engine.abort("r")  # pages a peer may be writing: quarantined, even on abort
        assert ev.finish("r").finish_reason == "abort"
        engine.kv_cache.allocator.reclaim()
        assert engine.kv_cache.allocator.num_free == 48
    finally:
        engine.stop()


def test_abort_mid_decode_frees_pages(tiny):
    path, hf = tiny
    engine = make_engine(path)
    ev = Events()
    try:
        engine.add_request(Request("long", [3, 1, 4, 1, 5], greedy(150), on_event=ev))
        ev.wait("long", lambda e: len(ev.tokens("long")) >= 3)
        engine.abort("long")
        assert ev.finish("long").finish_reason == "abort"
        assert 3 <= len(ev.tokens("long")) < 150
        assert engine.stats()["pages_used"] == 0 and engine.stats()["running"] == 0
    finally:
        engine.stop()


def test_bad_requests_get_clear_errors_and_engine_goes_on(tiny):
    path, hf = tiny
    engine = make_engine(path, max_model_len=64, max_pages=8)
    ev = Events()
    vocab = hf.config.vocab_size
    cases = {
        "long": ([1] * 64, greedy(), "context is 64 tokens"),
        "vocab": ([1, vocab], greedy(), f"in \\[0, {vocab}\\)"),
        "empty": ([], greedy(), "prompt is empty"),
        "pool": ([1] * 40, greedy(), "pool has 8"),
        "topk": ([1, 2], SamplingParams(top_k=0), "top_k"),
    }
    try:
        for rid, (ids, params, _) in cases.items():
            engine.add_request(Request(rid, ids, params, on_event=ev))
        engine.add_request(Request("ok", [1, 2, 3], greedy(4), on_event=ev))
        engine.add_request(Request("ok", [1, 2, 3], greedy(4), on_event=ev))  # duplicate rid
        for rid, (_, _, msg) in cases.items():
            err = ev.finish(rid)
            assert err.kind == "error"
            assert re.search(msg, err.error), err.error
        dup = ev.wait("ok", lambda e: e.kind == "error")
        assert "already in the engine" in dup.error
        assert ev.wait("ok", lambda e: e.finish_reason == "length").token_ids
        assert engine.alive()
    finally:
        engine.stop()


def test_step_error_fails_only_that_step(tiny):
    path, hf = tiny
    engine = make_engine(path)
    ev = Events()
    real_forward = engine.model.forward
    calls = {"n": 0}

    def failing_once(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected kernel failure")
        return real_forward(*args, **kw)

    engine.model.forward = failing_once
    try:
        engine.add_request(Request("victim", [1, 2, 3], greedy(4), on_event=ev))
        err = ev.finish("victim")
        assert err.kind == "error" and "injected kernel failure" in err.error
        engine.add_request(Request("after", [1, 2, 3], greedy(4), on_event=ev))
        assert ev.finish("after").finish_reason == "length"
        assert engine.alive() and engine.stats()["pages_used"] == 0
    finally:
        engine.stop()


def test_sampling_seed_top_k_and_stop_tokens(tiny):
    path, hf = tiny
    engine = make_engine(path)
    ev = Events()
    p = prompts(hf.config.vocab_size, lens=(6,))[0]
    want = hf_greedy(hf, p)[0]
    try:
        seeded = SamplingParams(max_new_tokens=12, temperature=1.5, top_p=0.9, seed=7, ignore_eos=True)
        engine.add_request(Request("s1", p, seeded, on_event=ev))
        ev.finish("s1")
        # same seed, now batched beside other requests: same tokens
        engine.add_request(Request("noise", p[:3], greedy(12), on_event=ev))
        engine.add_request(Request("s2", p, seeded, on_event=ev))
        ev.finish("s2")
        assert ev.tokens("s1") == ev.tokens("s2")
        assert ev.tokens("s1") != want  # 12 tokens at T=1.5 from a random model: greedy would be a fluke
        top1 = SamplingParams(max_new_tokens=12, temperature=1.0, top_k=1, seed=3, ignore_eos=True)
        engine.add_request(Request("k1", p, top1, on_event=ev))
        ev.finish("k1")
        assert ev.tokens("k1") == want[:12]
        stop = SamplingParams(max_new_tokens=20, temperature=0, stop_token_ids=[want[4]], ignore_eos=True)
        engine.add_request(Request("stop", p, stop, on_event=ev))
        end = ev.finish("stop")
        first = want.index(want[4])
        assert end.finish_reason == "stop" and end.matched == want[4]
        assert ev.tokens("stop") == want[: first + 1]
    finally:
        engine.stop()


def test_logprobs_are_model_logprobs(tiny):
    path, hf = tiny
    p = prompts(hf.config.vocab_size, lens=(5,))[0]
    engine = make_engine(path)
    ev = Events()
    try:
        params = SamplingParams(max_new_tokens=6, temperature=0.8, seed=1, ignore_eos=True)
        engine.add_request(Request("r", p, params, on_event=ev))
        ev.finish("r")
        toks = ev.tokens("r")
        lps = [lp for e in ev.by_rid["r"] for lp in e.logprobs]
        with torch.no_grad():
            logits = hf(torch.tensor([p + toks])).logits[0, len(p) - 1 : -1]
        want = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(toks)[:, None])[:, 0]
        assert lps == pytest.approx(want.tolist(), abs=1e-4)
    finally:
        engine.stop()


def test_garbage_in_unwritten_kv_slots_never_reaches_the_output(tiny):
    """Pages come back from other requests (or from a late remote write) holding anything, NaN included;
    a request reads only the slots it wrote, padding and page tails included."""
    path, hf = tiny
    batch = prompts(hf.config.vocab_size, lens=(3, 9, 14))
    want = [hf_greedy(hf, p)[0] for p in batch]
    engine = make_engine(path, start=False, chunk_size=512)
    engine.kv_cache.tensor.fill_(float("nan"))
    engine.start()
    events = Events()
    try:
        for i, p in enumerate(batch):
            engine.add_request(Request(f"r{i}", p, greedy(), on_event=events))
        for i in range(len(batch)):
            assert events.finish(f"r{i}").error is None
            assert events.tokens(f"r{i}") == want[i], f"prompt {i}"
    finally:
        engine.stop()
