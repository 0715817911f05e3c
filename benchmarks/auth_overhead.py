"""What the deployment secret costs: PD request latency and throughput with the proofs vs a checkout from
before them, in the same run, on the same machine.

Both trees run the same 1P1D topology of builtin:tiny on loopback (Mooncake TCP), one after the other in
alternating rounds (A B A B ...), each through its own `disaggctl up` with its own state directory. The
baseline tree is a `git worktree` of `--baseline` (the commit before the proofs landed), imported through
PYTHONPATH, so the launcher, proxy and workers are all the old code. A closed-loop client sends short
requests through the proxy: one new token (the hand-off and the proxy dominate) and 16 new tokens.
Per request, the current tree adds: an HMAC over the body at the proxy for each of prefill and decode, a
check of each at the workers, a signed registration and a signed answer on the bootstrap.

    python benchmarks/auth_overhead.py                  # markdown table on stdout
    python benchmarks/auth_overhead.py --json out.json  # and every number as JSON
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BASELINE = "01087db"  # main just before the deployment secret


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def topology(path: Path, name: str) -> int:
    proxy = free_port()
    path.write_text(
        f"""\
name: {name}
model: {{path: builtin:tiny}}
hosts:
  - {{name: local, address: 127.0.0.1, gpus: 0, python: {json.dumps(sys.executable)}}}
transfer: {{protocol: tcp, timeout_s: 10}}
prefill: {{replicas: 1, port: {free_port()}, bootstrap_port: {free_port()}}}
decode: {{replicas: 1, port: {free_port()}}}
proxy: {{host: local, port: {proxy}}}
"""
    )
    return proxy


class Tree:
    """One source tree's deployment: `up` once, requests in rounds, `down` at the end."""

    def __init__(self, label: str, source: Path, work: Path):
        self.label = label
        self.work = work / label
        self.work.mkdir()
        self.env = {**os.environ, "DISAGGCTL_HOME": str(self.work / "home"), "PYTHONPATH": str(source)}
        self.file = self.work / "topology.yaml"
        self.proxy = f"http://127.0.0.1:{topology(self.file, f'auth-{label}')}"
        self.samples: dict[str, list[list[float]]] = {}

    def cli(self, *args: str, timeout: float = 300) -> None:
        res = subprocess.run(
            [sys.executable, "-m", "disaggctl", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if res.returncode != 0:
            raise RuntimeError(
                f"{self.label}: disaggctl {' '.join(args)} failed:\n{res.stdout}\n{res.stderr}"
            )

    def up(self) -> None:
        self.cli("up", str(self.file), "--timeout", "240")

    def down(self) -> None:
        self.cli("down", timeout=120)


def one_request(url: str, new_tokens: int, seed: int) -> float:
    body = json.dumps(
        {
            "text": f"request {seed}: the quick brown fox jumps over the lazy dog",
            "sampling_params": {"max_new_tokens": new_tokens, "temperature": 0, "ignore_eos": True},
        }
    ).encode()
    req = urllib.request.Request(url + "/generate", data=body, headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=60) as r:
        r.read()
        if r.status != 200:
            raise RuntimeError(f"status {r.status}")
    return time.perf_counter() - t0


def closed_loop(url: str, new_tokens: int, concurrency: int, requests: int) -> tuple[list[float], float]:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        lat = list(pool.map(lambda i: one_request(url, new_tokens, i), range(requests)))
    return lat, requests / (time.perf_counter() - t0)


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def hmac_cost(reps: int = 20000) -> dict[str, float]:
    sys.path.insert(0, str(ROOT))
    from disaggctl.trust import DeploymentKey

    key = DeploymentKey.generate()
    out = {}
    for size in (256, 4096, 65536):
        body = os.urandom(size)
        t0 = time.perf_counter()
        for _ in range(reps):
            key.verify("POST", "/generate", body, key.sign("POST", "/generate", body))
        out[f"sign+verify {size} B (us)"] = (time.perf_counter() - t0) / reps * 1e6
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", default=DEFAULT_BASELINE, help="git ref of the tree without the proofs")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=120, help="per round, shape and tree")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="auth-overhead-"))
    base_src = work / "baseline-src"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base_src), args.baseline],
        check=True,
        capture_output=True,
    )
    trees = [Tree("baseline", base_src, work), Tree("current", ROOT, work)]
    shapes = [("1 token, c=1", 1, 1), ("1 token, c=8", 1, 8), ("16 tokens, c=8", 16, 8)]
    try:
        for t in trees:
            t.up()
        for t in trees:  # warm-up: first requests compile/allocate
            closed_loop(t.proxy, 4, 4, 16)
        for _ in range(args.rounds):
            for t in trees:
                for label, n, c in shapes:
                    lat, rps = closed_loop(t.proxy, n, c, args.requests)
                    t.samples.setdefault(label, []).append([*lat, -rps])
    finally:
        for t in trees:
            try:
                t.down()
            except Exception as e:  # keep going: the other tree must be stopped too
                print(f"warning: {e}", file=sys.stderr)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base_src)], check=False)
        shutil.rmtree(work, ignore_errors=True)

    rows = []
    for label, _, _ in shapes:
        row = {"shape": label}
        for t in trees:
            runs = t.samples[label]
            lat = [x for r in runs for x in r if x >= 0]
            rps = statistics.median(-r[-1] for r in runs)
            row[t.label] = {"p50_ms": pct(lat, 0.5) * 1e3, "p99_ms": pct(lat, 0.99) * 1e3, "req_s": rps}
        b, c = row["baseline"], row["current"]
        row["ratio"] = {k: c[k] / b[k] for k in b}
        rows.append(row)
    micro = hmac_cost()
    print(
        f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}"
    )
    print(
        f"baseline: {args.baseline}; {args.rounds} alternating rounds x {args.requests} requests per shape\n"
    )
    print(
        "| shape | p50 ms before | p50 ms now | ratio | p99 ms before | p99 ms now | ratio | req/s before | req/s now | ratio |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        b, c, q = r["baseline"], r["current"], r["ratio"]
        print(
            f"| {r['shape']} | {b['p50_ms']:.1f} | {c['p50_ms']:.1f} | {q['p50_ms']:.2f} | {b['p99_ms']:.1f} | "
            f"{c['p99_ms']:.1f} | {q['p99_ms']:.2f} | {b['req_s']:.1f} | {c['req_s']:.1f} | {q['req_s']:.2f} |"
        )
    print()
    for k, v in micro.items():
        print(f"- {k}: {v:.1f}")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"rows": rows, "hmac": micro, "baseline": args.baseline}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
