"""Results: the JSON document, the A/B comparison's rows and the plot (the command line draws the
tables: disaggctl/cli/bench.py)."""

from __future__ import annotations

import json
from pathlib import Path

from disaggctl.bench.metrics import LATENCY_METRICS, STATS, RequestRecord

SCHEMA_VERSION = 1

# Keys every result document has, with their JSON types (None where a value may be null).
REQUIRED = {
    "schema_version": (int,),
    "context": (dict,),
    "duration": (float, int),
    "completed": (int,),
    "failed": (int,),
    "total_input_tokens": (int,),
    "total_output_tokens": (int,),
    "request_throughput": (float, int),
    "input_throughput": (float, int),
    "output_throughput": (float, int),
    "total_token_throughput": (float, int),
    "concurrency": (float, int),
    "max_concurrent_requests": (int,),
    "request_goodput": (float, int, type(None)),
    "slo_attainment": (dict, type(None)),
    "errors": (dict,),
    **{f"{s}_{m}_ms": (float, int, type(None)) for m in LATENCY_METRICS for s in STATS},
}
CONTEXT_KEYS = ("url", "backend", "dataset", "num_prompts", "request_rate", "max_concurrency", "seed", "date")

COMPARE_ROWS = (
    ("completed", "completed"),
    ("failed", "failed"),
    ("request_throughput", "req/s"),
    ("request_goodput", "goodput req/s"),
    ("output_throughput", "output tok/s"),
    ("total_token_throughput", "total tok/s"),
    *(
        (f"{s}_{m}_ms", f"{s} {m.replace('_latency', '')} ms")
        for m in LATENCY_METRICS
        for s in ("mean", "median", "p99")
    ),
    ("mean_encode_ms", "mean encode ms"),
    ("p99_encode_ms", "p99 encode ms"),
)


class ResultError(ValueError):
    """A result file that cannot be read or is not a benchmark result: a one-line message."""


def result_document(metrics: dict, context: dict) -> dict:
    return {"schema_version": SCHEMA_VERSION, "context": context, **metrics}


def validate(doc: object, where: str = "result") -> dict:
    """Check a result document's required keys and their types; returns it or raises ResultError."""
    if not isinstance(doc, dict):
        raise ResultError(f"{where}: not a JSON object")
    for key, types in REQUIRED.items():
        if key not in doc:
            raise ResultError(f"{where}: missing key {key!r} (not a `disaggctl bench --json` result?)")
        value = doc[key]
        if isinstance(value, bool) or not isinstance(value, types):
            raise ResultError(f"{where}: {key!r} has type {type(value).__name__}")
    if doc["schema_version"] > SCHEMA_VERSION:
        raise ResultError(
            f"{where}: schema_version {doc['schema_version']} is newer than this disaggctl reads"
        )
    missing = [k for k in CONTEXT_KEYS if k not in doc["context"]]
    if missing:
        raise ResultError(f"{where}: context lacks {', '.join(missing)}")
    return doc


def load_result(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ResultError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ResultError(f"{path}: cannot read a JSON result: {e}") from None
    return validate(doc, str(path))


def write_result(doc: dict, path: Path) -> None:
    path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


def fmt_number(value: object, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


def ratio(a: object, b: object) -> float | None:
    """b / a, or None where either is not a number or a is 0."""
    return b / a if isinstance(a, int | float) and isinstance(b, int | float) and a else None


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def compare_rows(a: dict, b: dict) -> list[tuple[str, object, object, float | None]]:
    """(label, A value, B value, B/A) for the key metrics; the ratio is None where A is 0 or missing."""
    rows = []
    for key, label in COMPARE_ROWS:
        va, vb = a.get(key), b.get(key)
        rows.append((label, va, vb, ratio(va, vb)))
    return rows


class PlotUnavailable(RuntimeError):
    pass


def check_plot_support() -> None:
    """Fail before the run, not after it, when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotUnavailable(
            "--plot needs matplotlib: pip install 'disaggctl[plot]' (or pip install matplotlib)"
        ) from None


def plot(records: list[RequestRecord], path: Path, title: str) -> None:
    """CDFs of TTFT, ITL and E2E latency, and a timeline of every request, into one PNG."""
    check_plot_support()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in records if r.ok]
    series = {
        "TTFT (ms)": [r.ttft * 1000 for r in done if r.ttft is not None],
        "ITL (ms)": [g * 1000 for r in done for g in r.itls],
        "E2E latency (ms)": [r.e2e * 1000 for r in done],
    }
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, (label, values) in zip(axes.flat, series.items(), strict=False):
        values = sorted(values)
        if values:
            ax.plot(values, [(i + 1) / len(values) for i in range(len(values))])
        ax.set_xlabel(label)
        ax.set_ylabel("fraction of samples")
        ax.grid(alpha=0.3)
    ax = axes.flat[3]
    if records:
        t0 = min(r.send_time for r in records)
        for i, r in enumerate(records):
            ax.hlines(i, r.send_time - t0, r.end_time - t0, colors="tab:blue" if r.ok else "tab:red", lw=1)
        firsts = [(r.chunk_times[0] - t0, i) for i, r in enumerate(records) if r.chunk_times]
        if firsts:
            ax.scatter([x for x, _ in firsts], [y for _, y in firsts], s=4, c="black", label="first token")
            ax.legend(loc="lower right")
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("request (line: send to end; red: failed)")
    ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
