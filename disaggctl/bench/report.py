"""Presenting results: the JSON document, the console table, the A/B comparison and the plot."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

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

LATENCY_TITLES = {"ttft": "Time to first token", "tpot": "Time per output token (excl. 1st)",
                  "itl": "Inter-chunk latency", "e2e_latency": "End-to-end latency"}  # fmt: skip
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


def render(doc: dict, console: Console) -> None:
    """The console report: totals, then one block per latency metric, then SLOs and errors."""
    ctx = doc["context"]
    table = Table(title=f"disaggctl bench: {ctx.get('url')} ({ctx.get('backend')})", show_header=False)
    table.add_column("metric")
    table.add_column("value", justify="right")
    rate = ctx.get("request_rate")
    rows = [
        ("Successful requests", fmt_number(doc["completed"])),
        ("Failed requests", fmt_number(doc["failed"])),
        ("Request rate (configured)", str(rate)),
        ("Max concurrency (configured)", str(ctx.get("max_concurrency") or "-")),
        ("Benchmark duration (s)", fmt_number(doc["duration"])),
        ("Total input tokens", fmt_number(doc["total_input_tokens"])),
        ("Total output tokens", fmt_number(doc["total_output_tokens"])),
        ("Request throughput (req/s)", fmt_number(doc["request_throughput"])),
        ("Request goodput (req/s)", fmt_number(doc["request_goodput"])),
        ("Input token throughput (tok/s)", fmt_number(doc["input_throughput"])),
        ("Output token throughput (tok/s)", fmt_number(doc["output_throughput"])),
        ("Total token throughput (tok/s)", fmt_number(doc["total_token_throughput"])),
        ("Concurrency (mean in flight)", fmt_number(doc["concurrency"])),
        ("Peak concurrent requests", fmt_number(doc["max_concurrent_requests"])),
    ]
    if doc.get("mean_tokens_per_chunk") is not None:
        rows.append(("Tokens per chunk (mean)", fmt_number(doc["mean_tokens_per_chunk"])))
    for name, value in rows:
        table.add_row(name, value)
    for metric in LATENCY_METRICS:
        table.add_section()
        table.add_row(f"[bold]{LATENCY_TITLES[metric]}[/bold]", "")
        for stat in STATS:
            table.add_row(f"  {stat} (ms)", fmt_number(doc[f"{stat}_{metric}_ms"]))
    if doc.get("slo_attainment"):
        table.add_section()
        slo = ctx.get("slo") or {}
        for key, frac in doc["slo_attainment"].items():
            label = f"within {key} <= {slo[key]:g} ms" if key in slo else "within all SLOs"
            table.add_row(label, f"{frac * 100:.1f}%")
    console.print(table)
    if doc["errors"]:
        errors = Table(title="Errors", show_header=True)
        errors.add_column("count", justify="right")
        errors.add_column("error")
        for message, count in doc["errors"].items():
            errors.add_row(str(count), message)
        console.print(errors)


def compare_rows(a: dict, b: dict) -> list[tuple[str, object, object, float | None]]:
    """(label, A value, B value, B/A) for the key metrics; the ratio is None where A is 0 or missing."""
    rows = []
    for key, label in COMPARE_ROWS:
        va, vb = a.get(key), b.get(key)
        ratio = vb / va if isinstance(va, int | float) and isinstance(vb, int | float) and va else None
        rows.append((label, va, vb, ratio))
    return rows


def render_compare(a: dict, b: dict, names: tuple[str, str], console: Console) -> None:
    table = Table(title="disaggctl bench: A vs B")
    table.add_column("metric")
    table.add_column(f"A: {names[0]}", justify="right")
    table.add_column(f"B: {names[1]}", justify="right")
    table.add_column("B/A", justify="right")
    for label, va, vb, ratio in compare_rows(a, b):
        table.add_row(label, fmt_number(va), fmt_number(vb), "-" if ratio is None else f"{ratio:.2f}x")
    for side, doc in (("A", a), ("B", b)):
        ctx = doc["context"]
        console.print(
            f"{side}: {ctx.get('url')} backend={ctx.get('backend')} dataset={ctx.get('dataset')} "
            f"rate={ctx.get('request_rate')} concurrency={ctx.get('max_concurrency')} "
            f"prompts={ctx.get('num_prompts')} date={ctx.get('date')}"
        )
    console.print(table)


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
