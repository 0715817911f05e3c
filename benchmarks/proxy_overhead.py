"""What a PD proxy adds: latency and throughput of our proxy vs a mini_lb-style peer vs no proxy at all.

Every piece runs in its own process: a prefill backend and a decode backend (minimal aiohttp servers that
answer `/generate` at once, as JSON or as an SSE stream of --chunks events), our proxy (`disaggctl serve
proxy`), the peer (benchmarks/minilb_peer.py, FastAPI + a ClientSession per request, after SGLang's
mini_lb), and a closed-loop load generator (aiohttp; each of --concurrency clients sends its next request
as soon as the previous one is fully read). "direct" sends the same requests straight to the decode
backend: the added latency of a proxy is its latency minus direct's, at the same percentile.

    python benchmarks/proxy_overhead.py                     # markdown table on stdout
    python benchmarks/proxy_overhead.py --json out.json     # and every number as JSON

Needs fastapi, uvicorn and orjson for the peer (benchmark-only dependencies); `--no-peer` skips it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REQUEST = {"text": "The quick brown fox", "sampling_params": {"max_new_tokens": 16, "temperature": 0}}


# ---- backend process ----


def run_backend(port: int, chunks: int) -> None:
    from aiohttp import web

    answer = json.dumps(
        {
            "text": " jumps over the lazy dog" * 2,
            "output_ids": list(range(16)),
            "meta_info": {
                "id": "x",
                "prompt_tokens": 4,
                "completion_tokens": 16,
                "finish_reason": {"type": "length"},
            },
        }
    ).encode()
    event = b"data: " + answer + b"\n\n"

    async def health(request):
        return web.json_response({"status": "ok"})

    async def generate(request):
        body = await request.json()
        if not body.get("stream"):
            return web.Response(body=answer, content_type="application/json")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        # A proxy may hang up on the prefill's stream without reading it (the peer does): not an error here.
        with contextlib.suppress(ConnectionError):
            for _ in range(chunks):
                await resp.write(event)
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_post("/generate", generate)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


# ---- load generator process ----


async def load(url: str, concurrency: int, duration_s: float, warmup_s: float, stream: bool) -> dict:
    import aiohttp

    body = json.dumps({**REQUEST, "stream": stream}).encode()
    headers = {"Content-Type": "application/json"}
    latencies: list[float] = []
    late: list[float] = []  # started in the window, finished after it: counted apart, never dropped
    errors = 0
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=30)) as session:
        start = time.perf_counter()
        measure_from = start + warmup_s
        stop_at = measure_from + duration_s

        async def client() -> None:
            nonlocal errors
            while True:
                t0 = time.perf_counter()
                if t0 >= stop_at:
                    return
                try:
                    async with session.post(url + "/generate", data=body, headers=headers) as r:
                        await r.read()
                        ok = r.status == 200
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    ok = False
                t1 = time.perf_counter()
                if t0 >= measure_from:
                    if not ok:
                        errors += 1
                    elif t1 <= stop_at:
                        latencies.append(t1 - t0)
                    else:
                        late.append(t1 - t0)

        await asyncio.gather(*(client() for _ in range(concurrency)))
    latencies.sort()

    def pct(q: float) -> float:
        return (
            latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else float("nan")
        )

    return {
        "requests": len(latencies),
        "errors": errors,
        "late": len(late),
        "late_max_ms": max(late) * 1000 if late else 0.0,
        "rps": len(latencies) / duration_s,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "mean_ms": sum(latencies) / len(latencies) * 1000 if latencies else float("nan"),
    }


# ---- orchestration ----


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(proc: subprocess.Popen, n: int = 2000) -> str:
    proc.stderr.flush()
    proc.stderr.seek(0)
    return proc.stderr.read()[-n:].decode(errors="replace")


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 30) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(
                f"error: {url} exited with status {proc.returncode} before it was healthy:\n{log_tail(proc)}"
            )
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise SystemExit(f"error: {url} not healthy within {timeout_s:g} s")


def start(argv: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # stderr goes to a file, not a pipe: nobody reads a pipe during the runs, and a server that logs a
    # warning per request (the peer's unclosed prefill connections) blocks once the pipe's 64 KiB fill up
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=tempfile.TemporaryFile(), env=env)


def measure(url: str, args: argparse.Namespace, concurrency: int, stream: bool) -> dict:
    argv = [
        sys.executable, __file__, "_load", "--url", url, "--concurrency", str(concurrency),
        "--duration", str(args.duration), "--warmup", str(args.warmup),
    ]  # fmt: skip
    if stream:
        argv.append("--stream")
    out = subprocess.run(argv, capture_output=True, text=True, timeout=args.duration + args.warmup + 60)
    if out.returncode != 0:
        raise SystemExit(f"error: load generator failed against {url}:\n{out.stderr}")
    return json.loads(out.stdout)


def run_all(args: argparse.Namespace) -> dict:
    ports = {name: free_port() for name in ("prefill", "decode", "ours", "peer")}
    url = {name: f"http://127.0.0.1:{p}" for name, p in ports.items()}
    bootstrap = free_port()
    procs: list[subprocess.Popen] = []
    try:
        for role in ("prefill", "decode"):
            procs.append(
                start(
                    [
                        sys.executable,
                        __file__,
                        "_backend",
                        "--port",
                        str(ports[role]),
                        "--chunks",
                        str(args.chunks),
                    ]
                )
            )
            wait_healthy(url[role], procs[-1])
        pd = ["--prefill", url["prefill"], "--bootstrap-port", str(bootstrap), "--decode", url["decode"]]
        procs.append(start([sys.executable, "-m", "disaggctl", "serve", "proxy", "--port", str(ports["ours"]),
                            "--log-level", "WARNING", *pd]))  # fmt: skip
        wait_healthy(url["ours"], procs[-1])
        targets = {"direct": url["decode"], "ours": url["ours"]}
        if not args.no_peer:
            procs.append(
                start([sys.executable, str(HERE / "minilb_peer.py"), "--port", str(ports["peer"]), *pd])
            )
            wait_healthy(url["peer"], procs[-1])
            targets["peer"] = url["peer"]
        results = []
        for stream in (False, True):
            for c in args.concurrency:
                for rnd in range(args.rounds):
                    for target, turl in targets.items():
                        r = measure(turl, args, c, stream)
                        r.update(target=target, stream=stream, concurrency=c, round=rnd)
                        print(
                            f"  {'stream' if stream else 'json':6} c={c:<3} {target:6} "
                            f"p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  {r['rps']:.0f} req/s"
                            + (f"  errors {r['errors']}" if r["errors"] else "")
                            + (f"  late {r['late']} (max {r['late_max_ms']:.0f} ms)" if r["late"] else ""),
                            file=sys.stderr,
                        )
                        results.append(r)
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
    return {
        "config": {
            "duration_s": args.duration, "warmup_s": args.warmup, "rounds": args.rounds, "chunks": args.chunks,
            "concurrency": args.concurrency, "cpus": os.cpu_count(), "python": platform.python_version(),
            "machine": platform.machine(),
        },
        "runs": results,
        "summary": summarize(results),
    }  # fmt: skip


def summarize(runs: list[dict]) -> list[dict]:
    """Per (stream, concurrency, target): the round with the most requests/s (least disturbed on a shared
    machine) and the latency it adds over direct."""
    best: dict[tuple, dict] = {}
    for r in runs:
        key = (r["stream"], r["concurrency"], r["target"])
        if key not in best or r["rps"] > best[key]["rps"]:
            best[key] = r
    rows = []
    for (stream, c, target), r in sorted(
        best.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] != "direct")
    ):
        d = best[(stream, c, "direct")]
        rows.append(
            {
                "stream": stream,
                "concurrency": c,
                "target": target,
                "p50_ms": r["p50_ms"],
                "p99_ms": r["p99_ms"],
                "rps": r["rps"],
                "errors": r["errors"],
                "late": r["late"],
                "added_p50_ms": r["p50_ms"] - d["p50_ms"],
                "added_p99_ms": r["p99_ms"] - d["p99_ms"],
            }
        )
    return rows


def markdown(result: dict) -> str:
    rows = result["summary"]
    out = [
        "| answer | concurrency | target | p50 ms | p99 ms | added p50 ms | added p99 ms | req/s | errors/late |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {'SSE' if r['stream'] else 'JSON'} | {r['concurrency']} | {r['target']} | {r['p50_ms']:.2f} | "
            f"{r['p99_ms']:.2f} | {r['added_p50_ms']:+.2f} | {r['added_p99_ms']:+.2f} | {r['rps']:.0f} | {r['errors']}/{r['late']} |"
        )
    by = {(r["stream"], r["concurrency"], r["target"]): r for r in rows}
    ratios = []
    for stream, c, target in by:
        if target != "ours" or (stream, c, "peer") not in by:
            continue
        o, p = by[(stream, c, "ours")], by[(stream, c, "peer")]
        ratios.append(
            f"- {'SSE' if stream else 'JSON'}, concurrency {c}: req/s ours/peer = {_ratio(o['rps'], p['rps'])}; "
            f"added p50 peer/ours = {_ratio(p['added_p50_ms'], o['added_p50_ms'])}; "
            f"added p99 peer/ours = {_ratio(p['added_p99_ms'], o['added_p99_ms'])}"
        )
    return "\n".join(out + ([""] + ratios if ratios else []))


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b > 0 else "n/a (divisor is 0)"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_backend":
        ap = argparse.ArgumentParser()
        ap.add_argument("--port", type=int, required=True)
        ap.add_argument("--chunks", type=int, required=True)
        a = ap.parse_args(sys.argv[2:])
        run_backend(a.port, a.chunks)
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_load":
        ap = argparse.ArgumentParser()
        ap.add_argument("--url", required=True)
        ap.add_argument("--concurrency", type=int, required=True)
        ap.add_argument("--duration", type=float, required=True)
        ap.add_argument("--warmup", type=float, required=True)
        ap.add_argument("--stream", action="store_true")
        a = ap.parse_args(sys.argv[2:])
        print(json.dumps(asyncio.run(load(a.url, a.concurrency, a.duration, a.warmup, a.stream))))
        return
    ap = argparse.ArgumentParser(description="Proxy overhead: ours vs a mini_lb-style peer vs direct.")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--duration", type=float, default=4.0, help="measured seconds per run")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds run before measuring")
    ap.add_argument("--rounds", type=int, default=1, help="runs per point; the best is reported")
    ap.add_argument("--chunks", type=int, default=16, help="SSE events per streamed answer")
    ap.add_argument("--no-peer", action="store_true", help="skip the mini_lb-style peer")
    ap.add_argument("--json", metavar="PATH", help="also write every number here")
    args = ap.parse_args()
    if (
        min(args.concurrency) < 1
        or args.duration <= 0
        or args.warmup < 0
        or args.rounds < 1
        or args.chunks < 1
    ):
        ap.error("--concurrency, --rounds and --chunks must be >= 1, --duration > 0, --warmup >= 0")
    result = run_all(args)
    print(markdown(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
