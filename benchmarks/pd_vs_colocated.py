"""PD-disaggregated vs colocated serving on the same model and resources, under a mixed load.

The case disaggregation exists for: short-prompt requests are decoding when long prompts arrive. In a
colocated server every long prefill stalls the running decodes (ITL spikes, seen in p99); with PD the
prefill runs elsewhere and decode only pays for the KV hand-off. The same seeded workload (Poisson
arrivals, a fraction of long prompts among short ones, EOS ignored) runs against each deployment.

    python benchmarks/pd_vs_colocated.py                     # up/bench/down both topologies in turn
    python benchmarks/pd_vs_colocated.py --pd-url http://127.0.0.1:8000 --colocated-url http://...:8100
                                                             # deployments already running: just measure
Results: a side-by-side table on stdout, and `<out-dir>/{colocated,pd}.json` (the `disaggctl bench --json`
document, so `disaggctl bench --compare` reads them).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import math
import random
import subprocess
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from disaggctl import __version__
from disaggctl.bench import client, metrics, report, workload
from disaggctl.bench.run import BenchInputError, deployment_url

# (label, result key, which requests): the rows of the side-by-side table.
ROWS = (
    ("TTFT mean ms (all)", "mean_ttft_ms", "all"),
    ("TTFT p99 ms (all)", "p99_ttft_ms", "all"),
    ("TTFT p99 ms (short prompts)", "p99_ttft_ms", "short"),
    ("TTFT p99 ms (long prompts)", "p99_ttft_ms", "long"),
    ("ITL median ms (all)", "median_itl_ms", "all"),
    ("ITL p99 ms (all)", "p99_itl_ms", "all"),
    ("ITL max ms (all)", "max_itl_ms", "all"),
    ("TPOT p99 ms (all)", "p99_tpot_ms", "all"),
    ("E2E p99 ms (all)", "p99_e2e_latency_ms", "all"),
    ("output tok/s", "output_throughput", "all"),
    ("completed", "completed", "all"),
    ("failed", "failed", "all"),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pd", default="topologies/local-1p1d.yaml", help="PD topology file")
    ap.add_argument("--colocated", default="topologies/local-colocated.yaml", help="colocated topology file")
    ap.add_argument("--pd-url", help="measure this running PD proxy instead of bringing --pd up")
    ap.add_argument("--colocated-url", help="measure this running server instead of bringing --colocated up")
    ap.add_argument("--num-prompts", type=int, default=48)
    ap.add_argument("--long-fraction", type=float, default=0.25, help="share of long-prompt requests")
    ap.add_argument("--long-len", type=int, default=1024, help="long prompt tokens")
    ap.add_argument("--short-len", type=int, default=32, help="short prompt tokens")
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--request-rate", type=float, default=4.0, help="requests/s, Poisson")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab-size", type=int, help="token id range, when the server does not report it")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    ap.add_argument("--up-timeout", type=float, default=600.0, help="seconds for `disaggctl up`")
    ap.add_argument("--out-dir", type=Path, default=Path("bench-results"))
    args = ap.parse_args(argv)
    if not 0 < args.long_fraction < 1:
        ap.error("--long-fraction must be between 0 and 1")
    if min(args.num_prompts, args.long_len, args.short_len, args.output_len) < 1:
        ap.error("--num-prompts and the lengths must be at least 1")
    if args.long_len <= args.short_len:
        ap.error("--long-len must be greater than --short-len")
    return args


def mixed_items(rng: random.Random, args: argparse.Namespace, vocab: int) -> list[workload.WorkItem]:
    n_long = max(1, round(args.num_prompts * args.long_fraction))
    long = workload.random_ids(rng, n_long, args.long_len, args.output_len, 0.0, vocab)
    short = workload.random_ids(rng, args.num_prompts - n_long, args.short_len, args.output_len, 0.0, vocab)
    items = long + short
    rng.shuffle(items)
    return items


async def measure(url: str, args: argparse.Namespace, err: Console) -> tuple[dict, dict[str, dict]]:
    """Run the mixed load against `url`. Returns the result document and the metrics of the short-
    and long-prompt requests on their own."""
    url = client.base_url(url)
    async with client.new_session(args.timeout) as session:
        await client.check_ready(session, url)
        vocab = args.vocab_size or await client.server_vocab_size(session, url)
        if not vocab:
            raise BenchInputError(f"{url} reports no vocab_size: pass --vocab-size")
        target = client.Target(url=url, backend="generate")
        items = mixed_items(random.Random(args.seed), args, vocab)
        arrivals = workload.arrival_times(random.Random(args.seed + 1), len(items), args.request_rate)
        if args.warmup:
            warm = mixed_items(random.Random(args.seed + 2), args, vocab)[: args.warmup]
            await client.run_load(session, target, warm, [0.0] * len(warm), None)
        with err.status(f"{url}: {len(items)} requests at {args.request_rate:g} req/s"):
            records, duration, _ = await client.run_load(session, target, items, arrivals, None)
    context = {
        "url": url,
        "backend": "generate",
        "dataset": "mixed",
        "prompt_format": "token_ids",
        "long_len": args.long_len,
        "short_len": args.short_len,
        "long_fraction": args.long_fraction,
        "output_len": args.output_len,
        "num_prompts": len(items),
        "request_rate": args.request_rate if math.isfinite(args.request_rate) else "inf",
        "max_concurrency": None,
        "warmup": args.warmup,
        "seed": args.seed,
        "ignore_eos": True,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "disaggctl_version": __version__,
    }
    doc = report.result_document(metrics.summarize(records, duration), context)
    by_kind = {
        kind: metrics.summarize(
            [r for r in records if (r.prompt_len == args.long_len) == (kind == "long")], duration
        )
        for kind in ("short", "long")
    }
    return doc, by_kind


def cli(*argv: str, timeout: float) -> int:
    return subprocess.run([sys.executable, "-m", "disaggctl", *argv], timeout=timeout).returncode


def run_one(name: str, topology: str, url: str | None, args: argparse.Namespace, err: Console, at=None):
    """Bring the topology up (unless a URL was given), measure, bring it down. `at(url)` measures (default:
    this script's mixed load); `args.up_timeout` bounds `up`."""
    at = at or (lambda u: asyncio.run(measure(u, args, err)))
    if url is not None:
        return at(url)
    if not Path(topology).exists():
        raise BenchInputError(f"{topology}: no such topology file")
    err.print(f"[bold]{name}[/bold]: disaggctl up {topology}", highlight=False)
    try:
        if cli("up", topology, timeout=args.up_timeout) != 0:
            raise BenchInputError(f"`disaggctl up {topology}` failed (see `disaggctl logs`)")
        proxy, _ = deployment_url()
        return at(proxy)
    finally:
        cli("down", timeout=120)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    err = Console(stderr=True, soft_wrap=True)
    results = {}
    try:
        for name, topology, url in (
            ("colocated", args.colocated, args.colocated_url),
            ("pd", args.pd, args.pd_url),
        ):
            results[name] = run_one(name, topology, url, args, err)
    except (BenchInputError, client.Unreachable, subprocess.TimeoutExpired) as e:
        err.print(f"[red]error:[/red] {e}", highlight=False)
        return 1
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, (doc, _) in results.items():
        report.write_result(doc, args.out_dir / f"{name}.json")

    table = Table(title=f"PD vs colocated: {args.num_prompts} requests, {args.long_fraction:.0%} long "
                  f"({args.long_len} tok) among short ({args.short_len} tok), {args.output_len} out, "
                  f"{args.request_rate:g} req/s")  # fmt: skip
    for col in ("metric", "colocated", "PD", "PD/colocated"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for label, key, kind in ROWS:
        a = results["colocated"][0] if kind == "all" else results["colocated"][1][kind]
        b = results["pd"][0] if kind == "all" else results["pd"][1][kind]
        va, vb = a.get(key), b.get(key)
        shown = report.fmt_ratio(report.ratio(va, vb))
        table.add_row(label, report.fmt_number(va), report.fmt_number(vb), shown)
    Console().print(table)
    err.print(f"results in {args.out_dir}/colocated.json and {args.out_dir}/pd.json", highlight=False)
    failed = sum(doc["failed"] for doc, _ in results.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
