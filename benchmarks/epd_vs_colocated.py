"""EPD (encoder -> prefill -> decode) vs a colocated multimodal server, on the same model, under the same
seeded image workload.

Colocated, one server decodes and checks each image, runs the vision tower, prefills and decodes: every
encode sits in the same step loop as everyone's decode. With EPD the proxy sends the images to an encoder
first, which writes the embeddings into the prefill's buffer through Mooncake; the prefill only splices
them in. The run is `disaggctl bench --dataset random-image` (the library: same workload, same seed, same
arrivals, EOS ignored) against each deployment; EPD answers also say the encoder's share of TTFT
(`Server-Timing: encode`).

    python benchmarks/epd_vs_colocated.py                  # up/bench/down both topologies in turn
    python benchmarks/epd_vs_colocated.py --epd-url http://127.0.0.1:8000 --colocated-url http://...:8100
                                                           # deployments already running: just measure
Results: a side-by-side table on stdout, and `<out-dir>/{colocated,epd}.json` (`disaggctl bench --json`
documents, so `disaggctl bench --compare` reads them).
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
from pathlib import Path

# up, measure, down: as benchmarks/pd_vs_colocated.py does it (this script's folder is on sys.path)
from pd_vs_colocated import run_one  # noqa: E402
from rich.console import Console
from rich.table import Table

from disaggctl.bench import client, metrics, report, workload
from disaggctl.bench.run import BenchInputError, Progress, Settings, measure

ROWS = (
    ("TTFT mean ms", "mean_ttft_ms"),
    ("TTFT median ms", "median_ttft_ms"),
    ("TTFT p99 ms", "p99_ttft_ms"),
    ("encoder mean ms (part of TTFT)", "mean_encode_ms"),
    ("encoder p99 ms", "p99_encode_ms"),
    ("TPOT median ms", "median_tpot_ms"),
    ("ITL p99 ms", "p99_itl_ms"),
    ("E2E p99 ms", "p99_e2e_latency_ms"),
    ("request/s", "request_throughput"),
    ("output tok/s", "output_throughput"),
    ("prompt tokens / request", None),
    ("completed", "completed"),
    ("failed", "failed"),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epd", default="topologies/local-epd.yaml", help="EPD topology file")
    ap.add_argument(
        "--colocated", default="topologies/local-colocated-llava.yaml", help="colocated topology file"
    )
    ap.add_argument("--epd-url", help="measure this running EPD proxy instead of bringing --epd up")
    ap.add_argument("--colocated-url", help="measure this running server instead of bringing --colocated up")
    ap.add_argument("--num-prompts", type=int, default=40)
    ap.add_argument("--image-count", type=int, default=1, help="images per request")
    ap.add_argument("--image-size", default="336x336", help="WIDTHxHEIGHT of each (random) image")
    ap.add_argument("--input-len", type=int, default=64, help="text tokens per prompt (besides the images)")
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--request-rate", type=float, default=4.0, help="requests/s, Poisson (inf: all at once)")
    ap.add_argument("--backend", default="generate", choices=["generate", "openai-chat"])
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    ap.add_argument("--up-timeout", type=float, default=600.0, help="seconds for `disaggctl up`")
    ap.add_argument("--out-dir", type=Path, default=Path("bench-results"))
    args = ap.parse_args(argv)
    if min(args.num_prompts, args.input_len, args.output_len) < 1:
        ap.error("--num-prompts and the lengths must be at least 1")
    try:
        args.size = workload.parse_image_size(args.image_size)
    except workload.WorkloadError as e:
        ap.error(str(e))
    return args


def settings(url: str, args: argparse.Namespace) -> Settings:
    return Settings(
        url=url, backend=args.backend, model=None, dataset="random-image", dataset_path=None,
        input_len=args.input_len, output_len=args.output_len, range_ratio=0.0, num_prompts=args.num_prompts,
        request_rate=args.request_rate, max_concurrency=None, warmup=args.warmup, seed=args.seed, slo_ms=None,
        timeout=args.timeout, vocab_size=None, ignore_eos=True, deployment=None, prompts=None,
        image_count=args.image_count, image_size=args.size,
    )  # fmt: skip


class Say(Progress):
    def __init__(self, err: Console):
        self.err = err

    def warn(self, message: str) -> None:
        self.err.print(f"[yellow]warning:[/yellow] {message}", highlight=False)


def bench(url: str, args: argparse.Namespace, err: Console) -> dict:
    with err.status(f"{url}: {args.num_prompts} image requests at {args.request_rate:g} req/s"):
        records, duration, _, _, context = asyncio.run(measure(settings(url, args), Say(err)))
    return report.result_document(metrics.summarize(records, duration), context)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    err = Console(stderr=True, soft_wrap=True)
    results = {}
    try:
        for name, topology, url in (
            ("colocated", args.colocated, args.colocated_url),
            ("epd", args.epd, args.epd_url),
        ):
            results[name] = run_one(name, topology, url, args, err, at=lambda u: bench(u, args, err))
    except (BenchInputError, workload.WorkloadError, client.Unreachable, client.StreamError) as e:
        err.print(f"[red]error:[/red] {e}", highlight=False)
        return 1
    except subprocess.TimeoutExpired as e:
        err.print(f"[red]error:[/red] {e}", highlight=False)
        return 1
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, doc in results.items():
        report.write_result(doc, args.out_dir / f"{name}.json")

    table = Table(
        title=f"EPD vs colocated: {args.num_prompts} requests of {args.image_count} {args.image_size} image(s) "
        f"+ {args.input_len} text tokens, {args.output_len} out, {args.request_rate:g} req/s, {args.backend}"
    )
    for col in ("metric", "colocated", "EPD", "EPD/colocated"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for label, key in ROWS:
        a, b = results["colocated"], results["epd"]
        if key is None:  # the server's count: the text and each image's tokens
            va, vb = (d["total_input_tokens"] / d["completed"] if d["completed"] else None for d in (a, b))
        else:
            va, vb = a.get(key), b.get(key)
        shown = report.fmt_ratio(report.ratio(va, vb))
        table.add_row(label, report.fmt_number(va), report.fmt_number(vb), shown)
    Console().print(table)
    err.print(f"results in {args.out_dir}/colocated.json and {args.out_dir}/epd.json", highlight=False)
    return 1 if any(doc["failed"] for doc in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
