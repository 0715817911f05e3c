"""Benchmark metrics: pure arithmetic on the timestamps the client recorded for each request.

Definitions (the same as vLLM's `bench serve` and SGLang's `bench_serving`):
- TTFT: first chunk carrying a token minus send time.
- E2E latency: end of the stream minus send time.
- TPOT: (E2E - TTFT) / (output_tokens - 1), per request; requests with one output token have none.
- ITL: the gap between consecutive chunks that carry tokens, pooled over requests. A chunk that carries
  k tokens counts as one gap (the user saw k tokens arrive at once), so ITL and TPOT differ when servers
  batch several tokens per chunk.
- Encode time (image requests through an EPD proxy): what the server says its encoders took for the
  request (`Server-Timing: encode`), part of TTFT; over the requests that report it.
- Percentiles interpolate linearly between closest ranks (numpy's default), std is the population std.
Times are seconds in, milliseconds out.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

# The distribution statistics reported for every latency metric, in this order.
STATS = ("mean", "median", "std", "p90", "p99", "max")
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2e_latency")
SLO_KEYS = ("ttft", "tpot", "e2e")


@dataclass
class RequestRecord:
    """What happened to one request, as seen by the client (monotonic clock, seconds)."""

    prompt_len: int  # tokens asked for by the workload (the server's count wins when it reports one)
    output_len: int  # max new tokens asked for
    send_time: float = 0.0
    end_time: float = 0.0
    chunk_times: list[float] = field(default_factory=list)  # arrival of each chunk that carried tokens
    chunk_tokens: list[int | None] = field(default_factory=list)  # tokens in that chunk; None: not reported
    prompt_tokens: int | None = None  # reported by the server
    output_tokens: int | None = None  # reported by the server
    encode_time: float | None = None  # seconds the server's encoders took (Server-Timing), if it says
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.send_time if self.chunk_times else None

    @property
    def e2e(self) -> float:
        return self.end_time - self.send_time

    @property
    def tpot(self) -> float | None:
        ttft = self.ttft
        if ttft is None or not self.output_tokens or self.output_tokens < 2:
            return None
        return (self.e2e - ttft) / (self.output_tokens - 1)

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:], strict=False)]


def percentile(values: list[float], p: float) -> float:
    """Linear interpolation between closest ranks, like numpy.percentile's default method."""
    if not values:
        raise ValueError("percentile of an empty list")
    s = sorted(values)
    rank = (len(s) - 1) * p / 100.0
    lo = math.floor(rank)
    hi = math.ceil(rank)
    return s[lo] + (s[hi] - s[lo]) * (rank - lo)


def distribution(values: list[float]) -> dict[str, float | None]:
    """mean/median/std/p90/p99/max of `values`; every entry None when there are no values."""
    if not values:
        return dict.fromkeys(STATS)
    mean = sum(values) / len(values)
    return {
        "mean": mean,
        "median": percentile(values, 50),
        "std": math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "max": max(values),
    }


def meets_slo(rec: RequestRecord, slo_ms: dict[str, float]) -> dict[str, bool]:
    """Per SLO key: did this request meet it. Failed requests meet none; a request without a TPOT
    (one output token) meets a TPOT SLO, as in vLLM's goodput."""
    out = {}
    for key, limit in slo_ms.items():
        if not rec.ok:
            out[key] = False
        elif key == "ttft":
            out[key] = rec.ttft is not None and rec.ttft * 1000 <= limit
        elif key == "tpot":
            out[key] = rec.tpot is None or rec.tpot * 1000 <= limit
        elif key == "e2e":
            out[key] = rec.e2e * 1000 <= limit
        else:
            raise ValueError(f"unknown SLO {key!r}; expected one of {', '.join(SLO_KEYS)}")
    return out


def peak_concurrency(records: list[RequestRecord]) -> int:
    """Most requests in flight at once (sweep over send/end events; an end at the same instant as a
    send is counted first)."""
    events = sorted([(r.send_time, 1) for r in records] + [(r.end_time, -1) for r in records])
    peak = cur = 0
    for _, step in events:
        cur += step
        peak = max(peak, cur)
    return peak


def summarize(records: list[RequestRecord], duration: float, slo_ms: dict[str, float] | None = None) -> dict:
    """The metrics of one run. `duration`: seconds from the start of the run to the end of its last
    request. Keys follow vLLM's / SGLang's result JSON where they mean the same thing."""
    if duration <= 0:
        raise ValueError(f"duration must be positive, got {duration}")
    slo_ms = slo_ms or {}
    done = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    in_tokens = sum(r.prompt_tokens if r.prompt_tokens is not None else r.prompt_len for r in done)
    out_tokens = sum(r.output_tokens or 0 for r in done)

    out: dict = {
        "duration": duration,
        "completed": len(done),
        "failed": len(failed),
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(done) / duration,
        "input_throughput": in_tokens / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        # SGLang's "concurrency": the mean number of requests in flight.
        "concurrency": sum(r.e2e for r in done) / duration,
        "max_concurrent_requests": peak_concurrency(records),
    }
    series = {
        "ttft": [r.ttft for r in done if r.ttft is not None],
        "tpot": [t for t in (r.tpot for r in done) if t is not None],
        "itl": [g for r in done for g in r.itls],
        "e2e_latency": [r.e2e for r in done],
    }
    for name in LATENCY_METRICS:
        for stat, value in distribution(series[name]).items():
            out[f"{stat}_{name}_ms"] = None if value is None else value * 1000
    encoded = [r.encode_time for r in done if r.encode_time is not None]
    out["encoded_requests"] = len(encoded)
    for stat, value in distribution(encoded).items():
        out[f"{stat}_encode_ms"] = None if value is None else value * 1000
    known = [t for r in done for t in r.chunk_tokens if t is not None]
    out["mean_tokens_per_chunk"] = sum(known) / len(known) if known else None

    if slo_ms:
        verdicts = [meets_slo(r, slo_ms) for r in records]
        good = sum(all(v.values()) for v in verdicts)
        out["request_goodput"] = good / duration
        n = len(records) or 1
        out["slo_attainment"] = {k: sum(v[k] for v in verdicts) / n for k in slo_ms}
        out["slo_attainment"]["all"] = good / n
    else:
        out["request_goodput"] = None
        out["slo_attainment"] = None
    out["errors"] = dict(Counter(r.error for r in failed).most_common())
    return out
