"""`disaggctl bench`: a serving benchmark against the deployment's proxy or any --url.

Only typer is imported at module level: `disaggctl status` imports the CLI, and aiohttp/rich load
inside the command.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

DATASETS = ("random", "sharegpt", "prompts")
BACKEND_CHOICES = ("auto", "generate", "openai", "openai-chat")
SLO_UNITS = {"ms": 1.0, "s": 1000.0, "us": 0.001}
SLO_ALIASES = {"ttft": "ttft", "tpot": "tpot", "e2e": "e2e", "e2el": "e2e"}


@dataclass
class Settings:
    url: str
    backend: str
    model: str | None
    dataset: str
    dataset_path: Path | None
    input_len: int
    output_len: int
    range_ratio: float
    num_prompts: int
    request_rate: float
    max_concurrency: int | None
    warmup: int
    seed: int
    slo_ms: dict[str, float] | None
    timeout: float
    vocab_size: int | None
    ignore_eos: bool
    deployment: str | None
    prompts: list[str] | None  # the dataset file's prompts, read before any request goes out


class BenchInputError(ValueError):
    """Bad command-line input: printed as one line, exit code 2."""


def parse_slo(text: str) -> dict[str, float]:
    """`ttft=200ms,tpot=50ms,e2e=2s` -> {"ttft": 200.0, "tpot": 50.0, "e2e": 2000.0} (milliseconds;
    a bare number is milliseconds)."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|us)?\s*", value)
        name = SLO_ALIASES.get(key.strip().lower())
        if not sep or m is None or name is None:
            raise BenchInputError(
                f"--slo: cannot read {part!r}; expected KEY=VALUE[ms|s] with KEY one of ttft, tpot, e2e "
                "(e.g. --slo ttft=200ms,tpot=50ms)"
            )
        ms = float(m.group(1)) * SLO_UNITS[m.group(2) or "ms"]
        if ms <= 0:
            raise BenchInputError(f"--slo: {name} must be positive")
        out[name] = ms
    if not out:
        raise BenchInputError("--slo is empty")
    return out


def deployment_url() -> tuple[str, str | None]:
    """The running deployment's proxy URL and deployment name, from the launcher's state file."""
    try:
        from disaggctl.launch import state
    except ImportError:
        state = None
    find = getattr(state, "proxy_url", None)
    if find is None:
        raise BenchInputError("cannot locate a running deployment: pass --url http://HOST:PORT")
    found = find()
    if not found:
        raise BenchInputError("no running deployment (see `disaggctl status`): start one or pass --url")
    return (found, None) if isinstance(found, str) else (found[0], found[1])


def _check_inputs(
    dataset: str, dataset_path: Path | None, backend: str, num_prompts: int, input_len: int, output_len: int,
    request_rate: float, max_concurrency: int | None, warmup: int, timeout: float,
) -> None:  # fmt: skip
    if dataset not in DATASETS:
        raise BenchInputError(f"--dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
    if backend not in BACKEND_CHOICES:
        raise BenchInputError(f"--backend must be one of {', '.join(BACKEND_CHOICES)}, got {backend!r}")
    if dataset != "random" and dataset_path is None:
        raise BenchInputError(f"--dataset {dataset} needs --dataset-path FILE")
    if dataset == "random" and dataset_path is not None:
        raise BenchInputError("--dataset-path goes with --dataset sharegpt or prompts")
    for name, value in (
        ("--num-prompts", num_prompts),
        ("--input-len", input_len),
        ("--output-len", output_len),
    ):
        if value < 1:
            raise BenchInputError(f"{name} must be at least 1, got {value}")
    if math.isnan(request_rate) or request_rate <= 0:
        raise BenchInputError(f"--request-rate must be positive or inf, got {request_rate}")
    if max_concurrency is not None and max_concurrency < 1:
        raise BenchInputError(f"--max-concurrency must be at least 1, got {max_concurrency}")
    if warmup < 0:
        raise BenchInputError(f"--warmup must be 0 or more, got {warmup}")
    if not timeout > 0:
        raise BenchInputError(f"--timeout must be positive, got {timeout}")


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
    dataset: Annotated[str, typer.Option(help="random | sharegpt | prompts.")] = "random",
    dataset_path: Annotated[
        Path | None, typer.Option(help="ShareGPT JSON, or a prompts file (.jsonl, or one prompt per line).")
    ] = None,
    input_len: Annotated[int, typer.Option(help="Prompt tokens (random dataset).")] = 1024,
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
) -> None:
    from rich.console import Console

    from disaggctl.bench import report, workload

    err = Console(stderr=True, soft_wrap=True)
    out = Console()
    try:
        if compare is not None:
            a, b = (report.load_result(p) for p in compare)
            report.render_compare(a, b, (str(compare[0]), str(compare[1])), out)
            return
        _check_inputs(
            dataset, dataset_path, backend, num_prompts, input_len, output_len,
            request_rate, max_concurrency, warmup, timeout,
        )  # fmt: skip
        slo_ms = parse_slo(slo) if slo is not None else None
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
            deployment=deployment, prompts=prompts,
        )  # fmt: skip
    except (BenchInputError, workload.WorkloadError, report.ResultError, report.PlotUnavailable) as e:
        err.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(2) from None
    raise typer.Exit(_run(settings, json_path, plot, out, err))


def _raise_fd_limit(needed: int) -> None:
    """Each request in flight holds a socket; a low soft limit would fail requests with EMFILE."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < needed:
            resource.setrlimit(
                resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else needed, hard)
            )
    except (ImportError, ValueError, OSError):
        pass


async def _make_workload(session, target, s: Settings, err):
    """A function (rng, n) -> items for the chosen dataset, after sizing prompts against the server.
    Returns it and the prompt format ("token_ids" or "text")."""
    from disaggctl.bench import client, workload

    if s.prompts is not None:
        prompts = s.prompts

        def from_file(rng, n):
            return workload.file_prompts(rng, prompts, n, s.output_len, s.range_ratio)

        return from_file, "text"
    if target.backend == "generate":
        vocab = s.vocab_size or await client.server_vocab_size(session, target.url)
        if vocab:

            def ids(rng, n):
                return workload.random_ids(rng, n, s.input_len, s.output_len, s.range_ratio, vocab)

            return ids, "token_ids"
        err.print(
            "[yellow]warning:[/yellow] the server reports no vocab_size (/server_info, /v1/models) and no "
            "--vocab-size was given: sending text prompts sized by measurement",
            highlight=False,
        )
    per_word, overhead = await client.measure_tokens_per_word(session, target, list(workload.WORDS))

    def text(rng, n):
        return workload.random_text(rng, n, s.input_len, s.output_len, s.range_ratio, per_word, overhead)

    return text, "text"


async def _measure(s: Settings, err):
    """Probe the server, build the workload, warm up, run. Returns (records, duration, last send
    offset, arrivals, context)."""
    import datetime
    import random
    import socket

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from disaggctl import __version__
    from disaggctl.bench import client, workload

    _raise_fd_limit(s.num_prompts + s.warmup + 64)
    url = client.base_url(s.url)
    async with client.new_session(s.timeout) as session:
        await client.check_ready(session, url)
        backend = s.backend if s.backend != "auto" else await client.detect_backend(session, url)
        model = s.model
        if backend != "generate" and model is None:
            model = await client.served_model(session, url)
            if model is None:
                raise BenchInputError(f"{url}/v1/models names no model: pass --model")
        target = client.Target(url=url, backend=backend, model=model, ignore_eos=s.ignore_eos)
        make, prompt_format = await _make_workload(session, target, s, err)
        items = make(random.Random(s.seed), s.num_prompts)
        arrivals = workload.arrival_times(random.Random(s.seed + 1), s.num_prompts, s.request_rate)

        if s.warmup:
            warm = make(random.Random(s.seed + 2), s.warmup)
            with err.status(f"warming up ({s.warmup} requests)"):
                warm_records, _, _ = await client.run_load(
                    session, target, warm, [0.0] * len(warm), s.max_concurrency
                )
            bad = [r for r in warm_records if not r.ok]
            if bad:
                err.print(f"[yellow]warning:[/yellow] {len(bad)} warm-up request(s) failed: {bad[0].error}")

        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[failed]} failed"),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=err) as progress:
            task = progress.add_task("benchmark", total=len(items), failed=0)
            failed = 0

            def done(rec) -> None:
                nonlocal failed
                failed += not rec.ok
                progress.update(task, advance=1, failed=failed)

            records, duration, last_send = await client.run_load(
                session, target, items, arrivals, s.max_concurrency, done
            )

    context = {
        "url": url,
        "deployment": s.deployment,
        "backend": backend,
        "model": model,
        "dataset": s.dataset,
        "dataset_path": str(s.dataset_path) if s.dataset_path else None,
        "prompt_format": prompt_format,
        "input_len": s.input_len if s.dataset == "random" else None,
        "output_len": s.output_len,
        "range_ratio": s.range_ratio,
        "num_prompts": s.num_prompts,
        "request_rate": s.request_rate if math.isfinite(s.request_rate) else "inf",
        "max_concurrency": s.max_concurrency,
        "warmup": s.warmup,
        "seed": s.seed,
        "ignore_eos": s.ignore_eos,
        "temperature": target.temperature,
        "timeout_s": s.timeout,
        "slo": s.slo_ms,
        "achieved_send_rate": (len(items) - 1) / last_send if len(items) > 1 and last_send > 0 else None,
        "client_host": socket.gethostname(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "disaggctl_version": __version__,
    }
    return records, duration, last_send, arrivals, context


def _warn_rate(s: Settings, arrivals: list[float], last_send: float, err) -> None:
    """Warn when requests went out slower than the Poisson schedule asked (the concurrency cap or the
    client held them back): the offered load was then lower than --request-rate."""
    if not math.isfinite(s.request_rate) or len(arrivals) < 2 or arrivals[-1] <= 0:
        return
    scheduled = (len(arrivals) - 1) / arrivals[-1]
    achieved = (len(arrivals) - 1) / last_send if last_send > 0 else math.inf
    if achieved < 0.9 * scheduled:
        why = "--max-concurrency held requests back" if s.max_concurrency else "the client could not keep up"
        err.print(
            f"[yellow]warning:[/yellow] requests went out at {achieved:.2f} req/s, below the requested "
            f"{s.request_rate:g} req/s (this run's schedule: {scheduled:.2f} req/s): {why}",
            highlight=False,
        )


def _run(s: Settings, json_path: Path | None, plot_path: Path | None, out, err) -> int:
    """Run the benchmark and report. Exit code: 0, 1 when every request failed, 2 for bad input."""
    import asyncio

    from disaggctl.bench import metrics, report
    from disaggctl.bench.client import StreamError, Unreachable
    from disaggctl.bench.workload import WorkloadError

    try:
        records, duration, last_send, arrivals, context = asyncio.run(_measure(s, err))
    except (BenchInputError, WorkloadError, StreamError, Unreachable) as e:
        err.print(f"[red]error:[/red] {e}", highlight=False)
        return 2
    doc = report.result_document(metrics.summarize(records, duration, s.slo_ms), context)
    report.render(doc, out)
    _warn_rate(s, arrivals, last_send, err)
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
