"""`disaggctl bench`: a serving benchmark against the deployment's proxy or any --url (the run itself is
disaggctl/bench/run.py; here: options, progress on stderr, the tables on stdout, exit codes).

Only typer is imported at module level: `disaggctl status` imports the CLI, and aiohttp/rich load
inside the command.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Annotated, Any

import typer


def bench(
    url: Annotated[
        str | None,
        typer.Option(help="Server root (http://HOST:PORT). Default: the running deployment's proxy."),
    ] = None,
    backend: Annotated[
        str,
        typer.Option(help="generate (SGLang /generate) | openai | openai-chat | auto (generate if served)."),
    ] = "auto",
    model: Annotated[
        str | None, typer.Option(help="Model name for OpenAI APIs. Default: from /v1/models.")
    ] = None,
    dataset: Annotated[
        str, typer.Option(help="random | random-image (random text and noise PNGs) | sharegpt | prompts.")
    ] = "random",
    dataset_path: Annotated[
        Path | None, typer.Option(help="ShareGPT JSON, or a prompts file (.jsonl, or one prompt per line).")
    ] = None,
    input_len: Annotated[
        int, typer.Option(help="Prompt tokens (random datasets; text only for images).")
    ] = 1024,
    output_len: Annotated[int, typer.Option(help="New tokens per request (EOS ignored unless told).")] = 128,
    range_ratio: Annotated[
        float, typer.Option(help="Lengths uniform within len*(1-r)..len*(1+r); 0 = exact (vLLM's meaning).")
    ] = 0.0,
    num_prompts: Annotated[int, typer.Option(help="Requests to measure.")] = 100,
    request_rate: Annotated[
        float, typer.Option(help="Requests/s, Poisson arrivals; inf = all at once.")
    ] = math.inf,
    max_concurrency: Annotated[int | None, typer.Option(help="At most this many requests in flight.")] = None,
    warmup: Annotated[int, typer.Option(help="Requests sent and discarded before the measured run.")] = 1,
    seed: Annotated[int, typer.Option(help="Seed of prompts, lengths and arrivals.")] = 0,
    slo: Annotated[
        str | None, typer.Option(help="SLOs for goodput, e.g. ttft=200ms,tpot=50ms,e2e=5s.")
    ] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the result document here.")] = None,
    plot: Annotated[
        Path | None, typer.Option(help="Write latency CDFs and a request timeline (PNG).")
    ] = None,
    compare: Annotated[
        tuple[Path, Path] | None, typer.Option(help="Compare two --json results (A B) instead of running.")
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds allowed per request, stream included.")] = 600.0,
    vocab_size: Annotated[
        int | None,
        typer.Option(help="Token id range for random prompts, when the server does not report it."),
    ] = None,
    ignore_eos: Annotated[bool, typer.Option(help="Ask for exactly --output-len tokens.")] = True,
    image_count: Annotated[int, typer.Option(help="Images per request (random-image).")] = 1,
    image_size: Annotated[str, typer.Option(help="WIDTHxHEIGHT of each image (random-image).")] = "336x336",
) -> None:
    from rich.console import Console

    from disaggctl.bench import report, workload
    from disaggctl.bench.run import BenchInputError, Settings, check_inputs, deployment_url, parse_slo

    err = Console(stderr=True, soft_wrap=True)
    out = Console()
    try:
        if compare is not None:
            a, b = (report.load_result(p) for p in compare)
            render_compare(a, b, (str(compare[0]), str(compare[1])), out)
            return
        check_inputs(
            dataset, dataset_path, backend, num_prompts, input_len, output_len,
            request_rate, max_concurrency, warmup, timeout,
        )  # fmt: skip
        slo_ms = parse_slo(slo) if slo is not None else None
        size = workload.parse_image_size(image_size)
        if not 1 <= image_count <= workload.MAX_IMAGES_PER_REQUEST:
            raise BenchInputError(
                f"--image-count must be 1..{workload.MAX_IMAGES_PER_REQUEST}, got {image_count}"
            )
        if plot is not None:
            report.check_plot_support()
        prompts = None
        if dataset_path is not None:
            load = workload.load_sharegpt if dataset == "sharegpt" else workload.load_prompts
            prompts = load(dataset_path)
        deployment = None
        if url is None:
            url, deployment = deployment_url()
        settings = Settings(
            url=url, backend=backend, model=model, dataset=dataset, dataset_path=dataset_path,
            input_len=input_len, output_len=output_len, range_ratio=range_ratio, num_prompts=num_prompts,
            request_rate=request_rate, max_concurrency=max_concurrency, warmup=warmup, seed=seed,
            slo_ms=slo_ms, timeout=timeout, vocab_size=vocab_size, ignore_eos=ignore_eos,
            deployment=deployment, prompts=prompts, image_count=image_count, image_size=size,
        )  # fmt: skip
    except (BenchInputError, workload.WorkloadError, report.ResultError, report.PlotUnavailable) as e:
        err.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(2) from None
    raise typer.Exit(_run(settings, json_path, plot, out, err))


class _RichProgress:
    """bench/run.py's Progress on the terminal: warnings, a spinner while warming up, a bar while measuring."""

    def __init__(self, err: Any) -> None:
        self.err = err

    def warn(self, message: str) -> None:
        self.err.print(f"[yellow]warning:[/yellow] {message}", highlight=False)

    def warming_up(self, n: int):
        return self.err.status(f"warming up ({n} requests)")

    @contextlib.contextmanager
    def measuring(self, total: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[failed]} failed"),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=self.err) as progress:
            task = progress.add_task("benchmark", total=total, failed=0)
            failed = 0

            def done(rec) -> None:
                nonlocal failed
                failed += not rec.ok
                progress.update(task, advance=1, failed=failed)

            yield done


def _run(s: Any, json_path: Path | None, plot_path: Path | None, out: Any, err: Any) -> int:
    """Run the benchmark and report. Exit code: 0, 1 when every request failed, 2 for bad input."""
    import asyncio

    from disaggctl.bench import metrics, report
    from disaggctl.bench.client import StreamError, Unreachable
    from disaggctl.bench.run import BenchInputError, measure, rate_warning
    from disaggctl.bench.workload import WorkloadError

    try:
        records, duration, last_send, arrivals, context = asyncio.run(measure(s, _RichProgress(err)))
    except (BenchInputError, WorkloadError, StreamError, Unreachable) as e:
        err.print(f"[red]error:[/red] {e}", highlight=False)
        return 2
    doc = report.result_document(metrics.summarize(records, duration, s.slo_ms), context)
    render(doc, out)
    slow = rate_warning(s, arrivals, last_send)
    if slow:
        err.print(f"[yellow]warning:[/yellow] {slow}", highlight=False)
    try:
        if json_path is not None:
            report.write_result(doc, json_path)
            err.print(f"result written to {json_path}", highlight=False)
        if plot_path is not None:
            report.plot(records, plot_path, f"{context['url']} ({context['backend']}, {context['dataset']})")
            err.print(f"plot written to {plot_path}", highlight=False)
    except OSError as e:
        err.print(f"[red]error:[/red] cannot write {e.filename}: {e.strerror}", highlight=False)
        return 2
    if doc["completed"] == 0:
        err.print(
            f"[red]error:[/red] all {doc['failed']} requests failed (see Errors above)", highlight=False
        )
        return 1
    return 0


LATENCY_TITLES = {"ttft": "Time to first token", "tpot": "Time per output token (excl. 1st)",
                  "itl": "Inter-chunk latency", "e2e_latency": "End-to-end latency"}  # fmt: skip


def render(doc: dict, console: Any) -> None:
    """The console report: totals, then one block per latency metric, then SLOs and errors."""
    from rich.table import Table

    from disaggctl.bench.metrics import LATENCY_METRICS, STATS
    from disaggctl.bench.report import fmt_number

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
    if doc.get("encoded_requests"):
        rows.append(("Requests with encoder time", fmt_number(doc["encoded_requests"])))
    if doc.get("mean_tokens_per_chunk") is not None:
        rows.append(("Tokens per chunk (mean)", fmt_number(doc["mean_tokens_per_chunk"])))
    for name, value in rows:
        table.add_row(name, value)
    for metric in LATENCY_METRICS:
        table.add_section()
        table.add_row(f"[bold]{LATENCY_TITLES[metric]}[/bold]", "")
        for stat in STATS:
            table.add_row(f"  {stat} (ms)", fmt_number(doc[f"{stat}_{metric}_ms"]))
    if doc.get("encoded_requests"):
        table.add_section()
        table.add_row("[bold]Encoder time (part of TTFT)[/bold]", "")
        for stat in STATS:
            table.add_row(f"  {stat} (ms)", fmt_number(doc[f"{stat}_encode_ms"]))
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


def render_compare(a: dict, b: dict, names: tuple[str, str], console: Any) -> None:
    from rich.table import Table

    from disaggctl.bench.report import compare_rows, fmt_number, fmt_ratio

    table = Table(title="disaggctl bench: A vs B")
    table.add_column("metric")
    table.add_column(f"A: {names[0]}", justify="right")
    table.add_column(f"B: {names[1]}", justify="right")
    table.add_column("B/A", justify="right")
    for label, va, vb, ratio in compare_rows(a, b):
        table.add_row(label, fmt_number(va), fmt_number(vb), fmt_ratio(ratio))
    for side, doc in (("A", a), ("B", b)):
        ctx = doc["context"]
        console.print(
            f"{side}: {ctx.get('url')} backend={ctx.get('backend')} dataset={ctx.get('dataset')} "
            f"rate={ctx.get('request_rate')} concurrency={ctx.get('max_concurrency')} "
            f"prompts={ctx.get('num_prompts')} date={ctx.get('date')}"
        )
    console.print(table)
