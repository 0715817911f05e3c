"""Benchmark arithmetic, workloads and the result document, checked against numpy and direct formulas."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from disaggctl.bench import metrics, report, workload
from disaggctl.bench.metrics import RequestRecord
from disaggctl.bench.run import BenchInputError, parse_slo


def synthetic_records(
    seed: int, n: int, n_failed: int = 0, tokens_per_chunk: int | None = 1
) -> list[RequestRecord]:
    """Requests with random send times, TTFTs, chunk gaps and lengths (seconds)."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        send = float(rng.uniform(0, 5))
        out = int(rng.integers(1, 40))
        chunks = out if tokens_per_chunk == 1 else max(1, out // 3)
        first = send + float(rng.uniform(0.01, 0.5))
        gaps = rng.exponential(0.02, size=chunks - 1)
        times = [first, *(first + np.cumsum(gaps)).tolist()]
        rec = RequestRecord(
            prompt_len=int(rng.integers(10, 100)),
            output_len=out,
            send_time=send,
            end_time=times[-1] + float(rng.uniform(0, 0.01)),
            chunk_times=times,
            chunk_tokens=[tokens_per_chunk] * chunks,
            prompt_tokens=int(rng.integers(10, 100)),
            output_tokens=out,
        )
        if i < n_failed:
            rec.error = "HTTP 500: boom" if i % 2 else "timeout"
        records.append(rec)
    return records


@pytest.mark.parametrize("n", [1, 2, 7, 100, 1001])
def test_percentile_matches_numpy(n):
    values = np.random.default_rng(n).normal(size=n).tolist()
    for p in (0, 1, 25, 50, 90, 99, 99.9, 100):
        assert metrics.percentile(values, p) == pytest.approx(np.percentile(values, p), rel=1e-12, abs=1e-12)


def test_percentile_of_nothing_is_an_error():
    with pytest.raises(ValueError):
        metrics.percentile([], 50)


@pytest.mark.parametrize("tokens_per_chunk", [1, None])
def test_summary_matches_independent_computation(tokens_per_chunk):
    records = synthetic_records(seed=3, n=200, n_failed=9, tokens_per_chunk=tokens_per_chunk)
    duration = 7.5
    m = metrics.summarize(records, duration)

    ok = [r for r in records if r.error is None]
    send = np.array([r.send_time for r in ok])
    first = np.array([r.chunk_times[0] for r in ok])
    end = np.array([r.end_time for r in ok])
    out = np.array([r.output_tokens for r in ok])
    ttft = (first - send) * 1000
    e2e = (end - send) * 1000
    multi = out > 1
    tpot = (e2e[multi] - ttft[multi]) / (out[multi] - 1)
    itl = np.concatenate([np.diff(r.chunk_times) for r in ok]) * 1000

    assert m["completed"] == len(ok) == 191
    assert m["failed"] == 9
    assert m["errors"] == {"timeout": 5, "HTTP 500: boom": 4}
    assert m["total_input_tokens"] == sum(r.prompt_tokens for r in ok)
    assert m["total_output_tokens"] == int(out.sum())
    assert m["request_throughput"] == pytest.approx(len(ok) / duration)
    assert m["output_throughput"] == pytest.approx(out.sum() / duration)
    assert m["input_throughput"] == pytest.approx(sum(r.prompt_tokens for r in ok) / duration)
    assert m["total_token_throughput"] == pytest.approx(m["input_throughput"] + m["output_throughput"])
    assert m["concurrency"] == pytest.approx(e2e.sum() / 1000 / duration)
    for name, arr in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2e_latency", e2e)):
        assert m[f"mean_{name}_ms"] == pytest.approx(arr.mean())
        assert m[f"median_{name}_ms"] == pytest.approx(np.median(arr))
        assert m[f"std_{name}_ms"] == pytest.approx(arr.std())
        assert m[f"p90_{name}_ms"] == pytest.approx(np.percentile(arr, 90))
        assert m[f"p99_{name}_ms"] == pytest.approx(np.percentile(arr, 99))
        assert m[f"max_{name}_ms"] == pytest.approx(arr.max())
    if tokens_per_chunk is None:
        assert m["mean_tokens_per_chunk"] is None
    else:
        assert m["mean_tokens_per_chunk"] == pytest.approx(1.0)


def test_multi_token_chunks_count_as_one_gap():
    # One request, 9 tokens in 3 chunks of 3: two ITL gaps, but TPOT spreads over 8 tokens.
    rec = RequestRecord(
        prompt_len=4, output_len=9, send_time=10.0, end_time=10.5,
        chunk_times=[10.1, 10.3, 10.5], chunk_tokens=[3, 3, 3], prompt_tokens=4, output_tokens=9,
    )  # fmt: skip
    m = metrics.summarize([rec], 1.0)
    assert m["mean_itl_ms"] == pytest.approx(200.0)
    assert m["mean_tpot_ms"] == pytest.approx((500.0 - 100.0) / 8)
    assert m["mean_tokens_per_chunk"] == pytest.approx(3.0)


def test_goodput_and_slo_attainment():
    records = synthetic_records(seed=11, n=300, n_failed=20)
    slo = {"ttft": 250.0, "tpot": 20.0, "e2e": 900.0}
    duration = 6.0
    m = metrics.summarize(records, duration, slo)

    ok = np.array([r.error is None for r in records])
    ttft = np.array([(r.chunk_times[0] - r.send_time) * 1000 for r in records])
    e2e = np.array([(r.end_time - r.send_time) * 1000 for r in records])
    out = np.array([r.output_tokens for r in records])
    tpot = np.where(out > 1, (e2e - ttft) / np.maximum(out - 1, 1), 0.0)
    meets = {"ttft": ok & (ttft <= 250), "tpot": ok & (tpot <= 20), "e2e": ok & (e2e <= 900)}
    good = meets["ttft"] & meets["tpot"] & meets["e2e"]
    assert 0 < good.sum() < ok.sum()  # the SLOs split the population, or this test checks nothing
    assert m["request_goodput"] == pytest.approx(good.sum() / duration)
    for key in slo:
        assert m["slo_attainment"][key] == pytest.approx(meets[key].mean())
    assert m["slo_attainment"]["all"] == pytest.approx(good.mean())


def test_peak_concurrency_against_brute_force():
    records = synthetic_records(seed=5, n=80)
    brute = max(sum(r.send_time <= t < r.end_time for r in records) for t in (r.send_time for r in records))
    assert metrics.peak_concurrency(records) == brute


def test_all_failed_gives_nulls_not_crashes():
    records = synthetic_records(seed=1, n=4, n_failed=4)
    m = metrics.summarize(records, 1.0)
    assert m["completed"] == 0 and m["failed"] == 4
    assert m["mean_ttft_ms"] is None and m["p99_itl_ms"] is None
    assert m["request_throughput"] == 0


def _context() -> dict:
    return {
        "url": "http://127.0.0.1:1", "backend": "generate", "dataset": "random", "num_prompts": 3,
        "request_rate": "inf", "max_concurrency": None, "seed": 0, "date": "2025-01-01T00:00:00+00:00",
    }  # fmt: skip


def test_result_document_schema_roundtrip(tmp_path):
    m = metrics.summarize(synthetic_records(seed=2, n=30, n_failed=3), 4.0, {"ttft": 300.0})
    doc = report.result_document(m, _context())
    path = tmp_path / "r.json"
    report.write_result(doc, path)
    loaded = report.load_result(path)
    assert loaded["schema_version"] == report.SCHEMA_VERSION
    for key, types in report.REQUIRED.items():
        assert isinstance(loaded[key], types), key
    for key in ("completed", "total_input_tokens", "request_throughput", "output_throughput", "mean_ttft_ms",
                "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "mean_itl_ms", "p99_itl_ms",
                "mean_e2e_latency_ms"):  # fmt: skip
        assert isinstance(loaded[key], int | float), key
    assert loaded["errors"] == m["errors"]


def test_result_validation_rejects_bad_documents(tmp_path):
    good = report.result_document(metrics.summarize(synthetic_records(seed=2, n=5), 1.0), _context())
    for breaks in ("missing", "type", "context"):
        doc = json.loads(json.dumps(good))
        if breaks == "missing":
            del doc["p99_ttft_ms"]
        elif breaks == "type":
            doc["completed"] = "5"
        else:
            del doc["context"]["seed"]
        path = tmp_path / f"{breaks}.json"
        path.write_text(json.dumps(doc))
        with pytest.raises(report.ResultError):
            report.load_result(path)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(report.ResultError, match="bad.json"):
        report.load_result(bad)


def test_compare_ratios():
    a = metrics.summarize(synthetic_records(seed=2, n=40), 4.0)
    b = metrics.summarize(synthetic_records(seed=9, n=40), 2.0)
    rows = {label: (va, vb, ratio) for label, va, vb, ratio in report.compare_rows(a, b)}
    va, vb, ratio = rows["p99 itl ms"]
    assert (va, vb) == (a["p99_itl_ms"], b["p99_itl_ms"])
    assert ratio == pytest.approx(b["p99_itl_ms"] / a["p99_itl_ms"])
    assert rows["req/s"][2] == pytest.approx(2.0)  # same count, half the duration
    assert rows["failed"][2] is None  # 0 failures on side A: no ratio


def test_parse_slo():
    assert parse_slo("ttft=200ms,tpot=50,e2e=2.5s") == {"ttft": 200.0, "tpot": 50.0, "e2e": 2500.0}
    assert parse_slo("e2el=100ms") == {"e2e": 100.0}
    for bad in ("ttft", "ttft=fast", "speed=3ms", "ttft=0ms", ""):
        with pytest.raises(BenchInputError):
            parse_slo(bad)


def test_random_ids_lengths_and_range():
    items = workload.random_ids(random.Random(0), 50, 100, 20, 0.25, vocab_size=321)
    assert len(items) == 50
    for it in items:
        assert it.prompt is None and len(it.input_ids) == it.prompt_len
        assert 75 <= it.prompt_len <= 125 and 15 <= it.output_len <= 25
        assert all(0 <= t < 321 for t in it.input_ids)
    assert len({it.prompt_len for it in items}) > 1
    again = workload.random_ids(random.Random(0), 50, 100, 20, 0.25, vocab_size=321)
    assert [it.input_ids for it in again] == [it.input_ids for it in items]
    exact = workload.random_ids(random.Random(1), 10, 64, 8, 0.0, vocab_size=50)
    assert {(len(it.input_ids), it.output_len) for it in exact} == {(64, 8)}
    with pytest.raises(workload.WorkloadError):
        workload.sample_lengths(random.Random(0), 1, 10, 1.5)


def test_random_text_sized_by_the_measured_ratio():
    items = workload.random_text(random.Random(0), 5, 200, 8, 0.0, tokens_per_word=2.0, overhead=10.0)
    assert all(len(it.prompt.split()) == 95 for it in items)
    assert len({it.prompt for it in items}) == 5


def test_arrivals():
    assert workload.arrival_times(random.Random(0), 4, float("inf")) == [0.0] * 4
    times = workload.arrival_times(random.Random(0), 20000, 50.0)
    gaps = np.diff(times)
    assert times[0] == 0.0 and (gaps >= 0).all()
    assert gaps.mean() == pytest.approx(1 / 50.0, rel=0.03)
    assert gaps.std() == pytest.approx(1 / 50.0, rel=0.05)  # exponential: std == mean
    with pytest.raises(workload.WorkloadError):
        workload.arrival_times(random.Random(0), 3, 0.0)


def test_dataset_files(tmp_path):
    share = tmp_path / "sg.json"
    share.write_text(json.dumps([
        {"conversations": [{"from": "human", "value": "hello there"}, {"from": "gpt", "value": "hi"}]},
        {"conversations": [{"from": "system", "value": "sys"}, {"from": "human", "value": "second"}]},
        {"conversations": []},
        {"id": "no conversations"},
    ]))  # fmt: skip
    assert workload.load_sharegpt(share) == ["hello there", "second"]
    items = workload.file_prompts(random.Random(0), ["a b", "c"], 5, 8, 0.0)
    assert sorted(it.prompt for it in items[:2]) == ["a b", "c"] and len(items) == 5

    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt": "one"}\n"two"\n\n{"text": "three"}\n')
    assert workload.load_prompts(jl) == ["one", "two", "three"]
    txt = tmp_path / "p.txt"
    txt.write_text("first line\n\n{not json}\n")
    assert workload.load_prompts(txt) == ["first line", "{not json}"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": 3}\n')
    with pytest.raises(workload.WorkloadError, match="bad.jsonl:1"):
        workload.load_prompts(bad)
    with pytest.raises(workload.WorkloadError, match="no such file"):
        workload.load_sharegpt(tmp_path / "missing.json")
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(workload.WorkloadError, match="no conversation"):
        workload.load_sharegpt(tmp_path / "empty.json")


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "p.png"
    report.plot(synthetic_records(seed=4, n=30, n_failed=2), path, "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
