"""Chaos soak: a 2P2D deployment (builtin:tiny on CPU) under steady load while workers are killed, frozen and
restarted, and the proxy killed once. Does it keep serving, does every request end, is every KV page back?

    python benchmarks/soak.py --minutes 10 [--concurrency 4] [--json soak.json]

`disaggctl up` in a private DISAGGCTL_HOME, then a closed loop of streamed `/generate` requests through the
proxy (`disaggctl bench`'s client: disaggctl/bench/client.py), each bounded by --timeout. The first
--interval seconds are fault-free; then every --interval seconds one fault on a random worker, the three
kinds taking turns in random order:
  kill     SIGKILL (its process group); the keeper restarts it after its back-off
  freeze   SIGSTOP for --freeze seconds, then SIGCONT
  restart  SIGTERM (a graceful stop: it drains what it runs); the keeper starts it again
and once, in the middle, `kill` of the proxy itself. Workers and the proxy have `restart: always`, so a
graceful stop is restarted too. A fault is over ("recovered") once the proxy counts the worker healthy
again (for the proxy: once it answers /health).

Reported: requests sent / succeeded / failed (by error; "clear" when the message names the worker it is
about or is the proxy's own connection going away) / hung (no answer within --timeout); the proxy's
retries and breaker openings; for each fault, p99 end-to-end latency and successful requests per second
in the --window seconds before it, while it lasts, and in the --window seconds after recovery; and KV
pages leaked: each worker's `disaggctl_kv_pages_used` once the load stopped and every worker is healthy,
and `disaggctl_kv_pages_quarantined` after the quarantine period (30 s) and one more round of requests
(the runtime hands quarantined pages back when it next allocates).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from disaggctl.bench.client import Target, new_session, send, server_vocab_size
from disaggctl.bench.metrics import RequestRecord
from disaggctl.bench.workload import random_ids

WORKERS = ("prefill-0", "prefill-1", "decode-0", "decode-1")
FAULTS = ("kill", "freeze", "restart")
QUARANTINE_S = 30.0  # the runtime's quarantine of pages whose hand-off failed unproven


def free_block(n: int) -> int:
    """The first of `n` consecutive free loopback ports."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 60000 - n)
        socks = []
        try:
            for port in range(base, base + n):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError("no block of free ports")


def topology(path: Path) -> Path:
    base = free_block(7)  # prefills, their bootstraps, decodes, proxy
    path.write_text(
        f"""\
name: soak
model: {{path: builtin:tiny}}
hosts:
  - {{name: local, address: 127.0.0.1, gpus: 0, python: {json.dumps(sys.executable)}}}
transfer: {{protocol: tcp, timeout_s: 10}}
prefill: {{replicas: 2, port: {base}, bootstrap_port: {base + 2}, restart: always}}
decode: {{replicas: 2, port: {base + 4}, restart: always}}
proxy: {{port: {base + 6}, restart: always}}
"""
    )
    return path


class Cli:
    def __init__(self, home: str):
        self.env = {**os.environ, "DISAGGCTL_HOME": home}

    def run(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "disaggctl", *args],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
        )

    def status(self) -> dict:
        return json.loads(self.run("status", "--json", timeout=60).stdout)

    def procs(self) -> dict[str, dict]:
        return {p["name"]: p for p in self.status()["processes"]}


def get(url: str, timeout: float = 5.0) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.read()
    except (OSError, urllib.error.HTTPError):
        return None


def metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


@dataclass
class Fault:
    at: float  # perf_counter
    target: str
    kind: str
    recovered: float | None = None
    note: str = ""


@dataclass
class Soak:
    args: argparse.Namespace
    cli: Cli
    proxy: str
    records: list[RequestRecord] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    # the proxy's counters, summed over its restarts (a restarted proxy counts from 0)
    counters: dict[str, float] = field(default_factory=dict)
    last_seen: dict[str, float] = field(default_factory=dict)

    # -- load

    async def load(self, vocab: int) -> None:
        a = self.args
        target = Target(self.proxy, "generate")
        rng = random.Random(a.seed)
        async with new_session(a.timeout) as session:

            async def client() -> None:
                while not self.stop.is_set():
                    (item,) = random_ids(rng, 1, a.input_len, a.output_len, 0.5, vocab)
                    rec = await send(session, target, item)
                    self.records.append(rec)
                    if rec.error is not None:
                        # as a client would: a proxy that refuses connections is not hammered in a loop
                        await asyncio.sleep(a.pause)

            await asyncio.gather(*(client() for _ in range(a.concurrency)))

    # -- chaos

    def scrape_proxy(self) -> None:
        text = get(self.proxy + "/metrics")
        if text is None:
            return
        text = text.decode()
        for name in ("disaggctl_proxy_retries_total", "disaggctl_proxy_worker_breaker_opens_total"):
            value = metric(text, name)
            if value < self.last_seen.get(name, 0.0):  # a new proxy
                self.last_seen[name] = 0.0
            self.counters[name] = self.counters.get(name, 0.0) + value - self.last_seen.get(name, 0.0)
            self.last_seen[name] = value

    def in_rotation(self, url: str) -> bool:
        """Healthy by the proxy's probes, and its breaker letting requests (or a trial) through."""
        raw = get(self.proxy + "/workers")
        if raw is None:
            return False
        workers = json.loads(raw)["workers"]
        return any(w["url"] == url and w["healthy"] and w["breaker"] != "open" for w in workers)

    async def wait(self, cond, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if await asyncio.to_thread(cond):
                return True
            await asyncio.sleep(0.5)
        return False

    async def fault(self, target: str, kind: str) -> None:
        procs = await asyncio.to_thread(self.cli.procs)
        p = procs[target]
        f = Fault(time.perf_counter(), target, kind)
        self.faults.append(f)
        print(f"[{self.elapsed(f.at):6.1f} s] {kind} {target} (pid {p['pid']})", flush=True)
        if kind == "kill":
            os.killpg(p["pid"], signal.SIGKILL)
        elif kind == "restart":
            os.kill(p["pid"], signal.SIGTERM)
        else:
            os.killpg(p["pid"], signal.SIGSTOP)
            try:
                await asyncio.sleep(self.args.freeze)
            finally:
                os.killpg(p["pid"], signal.SIGCONT)
        if target == "proxy":
            ok = await self.wait(lambda: get(self.proxy + "/health") is not None, 120)
        else:
            if kind != "freeze":
                # the old instance out of rotation first, so that "healthy" is the new one's
                await self.wait(lambda: p["pid"] != self.cli.procs()[target]["pid"], 120)
            ok = await self.wait(lambda: self.in_rotation(p["url"]), 120)
        f.recovered = time.perf_counter() if ok else None
        f.note = "" if ok else "not back within 120 s"
        print(f"[{self.elapsed(time.perf_counter()):6.1f} s]   recovered: {f.note or 'yes'}", flush=True)

    async def chaos(self) -> None:
        a = self.args
        rng = random.Random(a.seed + 1)
        # faults at interval, 2 * interval, ...; the last interval is fault-free
        n = int(a.minutes * 60 // a.interval) - 1
        proxy_at = n // 2
        kinds: list[str] = []
        for i in range(n):
            await asyncio.sleep(max(0.0, self.t0 + (i + 1) * a.interval - time.perf_counter()))
            self.scrape_proxy()
            if i == proxy_at:
                await self.fault("proxy", "kill")
            else:
                if not kinds:  # every kind of fault as often as the others, in random order
                    kinds = rng.sample(FAULTS, len(FAULTS))
                await self.fault(rng.choice(WORKERS), kinds.pop())
            self.scrape_proxy()

    def elapsed(self, t: float) -> float:
        return t - self.t0

    async def run(self, vocab: int) -> None:
        self.t0 = time.perf_counter()

        async def stopper() -> None:
            await asyncio.sleep(self.args.minutes * 60)
            self.stop.set()

        chaos = asyncio.create_task(self.chaos())
        await asyncio.gather(self.load(vocab), stopper())
        await chaos
        self.scrape_proxy()


# -- results ------------------------------------------------------------------------------------------


def p99(values: list[float]) -> float | None:
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * 0.99
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def classify(rec: RequestRecord, proxy: str) -> str:
    if rec.error is None:
        return "ok"
    if rec.error == "timeout":
        return "hung"
    if re.search(r"\b(prefill|decode) https?://", rec.error):
        return "failed_clear"  # the proxy's answer names the worker it is about
    host_port = proxy.split("://", 1)[1]
    # the client's only connection is to the proxy: it going away (refused, reset, cut) is the proxy's
    if (
        rec.error == "server disconnected"
        or host_port in rec.error
        or rec.error.startswith("broken stream")
        or (rec.error.startswith("ClientOSError") and "Connection reset" in rec.error)
    ):
        return "failed_proxy_gone"
    return "failed_other"


def window(records: list[RequestRecord], start: float, end: float) -> dict:
    """Requests sent in [start, end): how many, their p99 and rate of success; and the failures that
    ended in it, whenever sent (a fault fails the requests in flight, sent before it)."""
    sent = [r for r in records if start <= r.send_time < end]
    ok = [r for r in sent if r.error is None]
    span = max(end - start, 1e-9)
    lat = p99([r.e2e for r in ok])
    return {
        "sent": len(sent),
        "p99_ms": round(lat * 1000, 1) if lat is not None else None,
        "ok_per_s": round(len(ok) / span, 2),
        "failed_ended": sum(1 for r in records if r.error is not None and start <= r.end_time < end),
    }


def settle(soak: Soak) -> dict:
    """Pages in use once the load stopped and every worker is healthy; quarantined ones after the
    quarantine period and one more round of requests."""
    cli = soak.cli
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        procs = cli.procs()
        if all(procs[n]["healthy"] for n in WORKERS) and all(
            soak.in_rotation(procs[n]["url"]) for n in WORKERS
        ):
            break
        time.sleep(1)
    urls = {n: p["url"] for n, p in cli.procs().items() if n in WORKERS}

    def pages() -> dict[str, dict[str, float]]:
        out = {}
        for n, u in urls.items():
            text = (get(u + "/metrics") or b"").decode()
            out[n] = {
                "used": metric(text, "disaggctl_kv_pages_used"),
                "quarantined": metric(text, "disaggctl_kv_pages_quarantined"),
                "running": metric(text, "disaggctl_num_requests_running"),
            }
        return out

    deadline = time.monotonic() + 60
    settled = pages()
    while time.monotonic() < deadline and any(v["used"] or v["running"] for v in settled.values()):
        time.sleep(1)
        settled = pages()
    time.sleep(QUARANTINE_S + 5)
    body = json.dumps({"text": "after the soak", "sampling_params": {"max_new_tokens": 4}}).encode()
    answered = 0
    for _ in range(8):  # round robin: every prefill and decode gets some
        req = urllib.request.Request(soak.proxy + "/generate", body, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                answered += r.status == 200
        except OSError:
            pass
    time.sleep(2)
    after = pages()
    return {
        "after_load": settled,
        "after_quarantine": after,
        "requests_after": answered,
        "leaked": int(
            sum(v["used"] for v in settled.values()) + sum(v["quarantined"] for v in after.values())
        ),
        "used_at_end": int(sum(v["used"] for v in after.values())),
    }


def report(soak: Soak, pages: dict, machine: dict) -> dict:
    a = soak.args
    recs = soak.records
    kinds: dict[str, int] = {}
    errors: dict[str, int] = {}
    for r in recs:
        k = classify(r, soak.proxy)
        kinds[k] = kinds.get(k, 0) + 1
        if r.error is not None:
            msg = re.sub(r"\b\d{6,}\b", "N", r.error)  # rooms, rids
            errors[f"[{k}] {msg}"] = errors.get(f"[{k}] {msg}", 0) + 1
    faults = []
    for f in soak.faults:
        end = f.recovered or f.at
        faults.append(
            {
                "at_s": round(soak.elapsed(f.at), 1),
                "target": f.target,
                "fault": f.kind,
                "recovered_after_s": round(f.recovered - f.at, 1) if f.recovered else None,
                "note": f.note,
                "before": window(recs, f.at - a.window, f.at),
                "during": window(recs, f.at, end),
                "after": window(recs, end, end + a.window),
                "errors": sorted(
                    {r.error for r in recs if r.error is not None and f.at <= r.end_time < end + a.window}
                ),
            }
        )
    return {
        "machine": machine,
        "settings": {k: v for k, v in vars(a).items() if k != "json_path"},
        "requests": {
            "sent": len(recs),
            **{
                k: kinds.get(k, 0)
                for k in ("ok", "failed_clear", "failed_proxy_gone", "failed_other", "hung")
            },
        },
        "errors": dict(sorted(errors.items(), key=lambda kv: -kv[1])),
        "proxy": {k.removeprefix("disaggctl_proxy_"): int(v) for k, v in soak.counters.items()},
        "baseline": window(recs, soak.t0, soak.t0 + a.interval),
        "faults": faults,
        # successful requests per second in 10 s steps, by send time
        "timeline_ok_per_s": [
            window(recs, soak.t0 + t, soak.t0 + t + 10)["ok_per_s"] for t in range(0, int(a.minutes * 60), 10)
        ],
        "pages": pages,
    }


def machine_info() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for pkg in ("torch", "aiohttp", "mooncake-transfer-engine-non-cuda", "mooncake-transfer-engine"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        **versions,
        "date": time.strftime("%Y-%m-%d"),
        "load_average_before": os.getloadavg()[0],
    }


def print_table(doc: dict) -> None:
    r = doc["requests"]
    print(
        f"\nrequests: sent {r['sent']}, ok {r['ok']}, failed with a clear error {r['failed_clear']}, "
        f"failed as the proxy went away {r['failed_proxy_gone']}, failed otherwise {r['failed_other']}, "
        f"hung {r['hung']}"
    )
    print(f"proxy: {doc['proxy']}")
    b = doc["baseline"]
    print(f"baseline (first {doc['settings']['interval']:g} s): p99 {b['p99_ms']} ms, {b['ok_per_s']} ok/s")
    print(
        "\n| t (s) | target | fault | back after (s) | p99 before / during / after (ms) "
        "| ok/s before / after (after/before) | failed, from the fault to 30 s after recovery |"
    )
    print("|---|---|---|---|---|---|---|")
    for f in doc["faults"]:
        before, after = f["before"]["ok_per_s"], f["after"]["ok_per_s"]
        ratio = f"{after / before:.0%}" if before else "-"
        print(
            f"| {f['at_s']} | {f['target']} | {f['fault']} | {f['recovered_after_s']} | "
            f"{f['before']['p99_ms']} / {f['during']['p99_ms']} / {f['after']['p99_ms']} | "
            f"{before} / {after} ({ratio}) | {f['during']['failed_ended'] + f['after']['failed_ended']} |"
        )
    p = doc["pages"]
    print(f"\npages leaked: {p['leaked']} (in use at the end: {p['used_at_end']})")
    print("errors:")
    for msg, n in doc["errors"].items():
        print(f"  {n:5d}  {msg}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument(
        "--interval", type=float, default=60.0, help="seconds between faults (and before the first)"
    )
    ap.add_argument("--freeze", type=float, default=10.0, help="seconds a frozen worker stays stopped")
    ap.add_argument("--concurrency", type=int, default=4, help="requests in flight (closed loop)")
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--timeout", type=float, default=60.0, help="a request with no answer by then is hung")
    ap.add_argument("--window", type=float, default=30.0, help="seconds before a fault and after recovery")
    ap.add_argument("--pause", type=float, default=1.0, help="seconds a client waits after a failed request")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", dest="json_path")
    a = ap.parse_args()
    if a.minutes * 60 < 2 * a.interval:
        sys.exit("--minutes must leave room for at least one fault (2 x --interval)")
    machine = machine_info()
    with tempfile.TemporaryDirectory() as home:
        cli = Cli(home)
        topo = topology(Path(home) / "soak.yaml")
        res = cli.run("up", str(topo), "--timeout", "300")
        if res.returncode != 0:
            sys.exit(f"up failed:\n{res.stdout}\n{res.stderr}")
        proxy = cli.procs()["proxy"]["url"]
        try:

            async def go() -> Soak:
                soak = Soak(a, cli, proxy)
                async with new_session(30) as session:
                    vocab = await server_vocab_size(session, proxy) or 1024
                await soak.run(vocab)
                return soak

            soak = asyncio.run(go())
            print("load stopped; waiting for every worker, then the quarantine period", flush=True)
            pages = settle(soak)
            doc = report(soak, pages, machine)
            doc["keeper"] = {n: p["restarts"] for n, p in cli.procs().items()}
        finally:
            for p in cli.status().get("processes") or []:
                try:
                    os.killpg(p["pid"], signal.SIGCONT)  # a stopped process would not act on SIGTERM
                except (ProcessLookupError, PermissionError):
                    pass
            down = cli.run("down", "--timeout", "10")
            print(down.stdout.strip(), down.stderr.strip(), sep="\n")
    print_table(doc)
    print(f"keeper restarts: {doc['keeper']}")
    print(f"machine: {doc['machine']}; load average at the end: {os.getloadavg()[0]:.1f}")
    if a.json_path:
        Path(a.json_path).write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
