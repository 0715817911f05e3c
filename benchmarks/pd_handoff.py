"""What the KV hand-off costs in a PD deployment's time to first token, per prompt length.

Starts a prefill, a decode and the proxy (`disaggctl serve ...`, a random model of the Qwen2.5-0.5B shape
built with transformers, or `--model DIR`), sends one streamed request at a time, and reports the client's
TTFT beside the prefill's own hand-off time for that request (`disaggctl_kv_handoff_seconds_total` in the
prefill's /metrics, from submitting the Mooncake writes to the last one's end). Medians of `--reps`.

    python benchmarks/pd_handoff.py --device cuda --protocol nvlink --tokens 1024 16384
    python benchmarks/pd_handoff.py --device cpu --protocol tcp --tokens 256 1024 --model builtin:tiny
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# the shape benchmarks/decode.py measures (this script's folder is on sys.path when it runs)
from decode import QWEN25_05B_SHAPE  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port: int, path: str, timeout: float = 5.0) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def wait_healthy(port: int, proc: subprocess.Popen, what: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{what} exited with {proc.returncode}")
        try:
            if get(port, "/health")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    sys.exit(f"{what} not healthy after {timeout:.0f} s")


def handoff_seconds(port: int) -> tuple[float, int]:
    _, text = get(port, "/metrics")
    seconds = re.search(r"^disaggctl_kv_handoff_seconds_total\{[^}]*\} (\S+)$", text, re.M)
    count = re.search(r"^disaggctl_kv_handoffs_total\{[^}]*\} (\S+)$", text, re.M)
    if not seconds or not count:
        sys.exit("the prefill's /metrics has no hand-off counters")
    return float(seconds.group(1)), int(float(count.group(1)))


def ttft(port: int, ids: list[int], timeout: float) -> float:
    """Seconds from sending a streamed request to its first token event."""
    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": 2, "temperature": 0}, "stream": True}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        began = time.perf_counter()
        conn.request("POST", "/generate", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            sys.exit(f"request failed: {resp.status} {resp.read()[:300]!r}")
        first = None
        for line in resp:
            if line.startswith(b"data: {") and first is None:
                event = json.loads(line[6:])
                if "error" in event:
                    sys.exit(f"request failed: {event['error']}")
                first = time.perf_counter() - began
        return first
    finally:
        conn.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--protocol", default="tcp", help="transfer protocol: tcp, rdma, nvlink")
    ap.add_argument("--model", default="qwen2.5-0.5b-shape", help="qwen2.5-0.5b-shape, builtin:NAME or a dir")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 16384])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory(prefix="disaggctl-handoff-")
    model = args.model
    if model == "qwen2.5-0.5b-shape":
        import torch
        from transformers import AutoModelForCausalLM, Qwen2Config

        from disaggctl.runtime.builtin import resolve_model

        # builtin:tiny's tokenizer (the servers need one), and the vocabulary cut to its size: the KV per
        # token, which the hand-off moves, is the Qwen2.5-0.5B shape's all the same
        tokenizer = Path(resolve_model("builtin:tiny"))
        torch.manual_seed(0)
        shape = {
            **QWEN25_05B_SHAPE,
            "vocab_size": json.loads((tokenizer / "config.json").read_text())["vocab_size"],
        }
        AutoModelForCausalLM.from_config(Qwen2Config(**shape)).to(torch.bfloat16).save_pretrained(tmp.name)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tokenizer / name, Path(tmp.name) / name)
        model = tmp.name
    longest = max(args.tokens) + 8
    pages = 2 * (-(-longest // 16)) + 8
    env = {**os.environ, "DISAGGCTL_SECRET": os.urandom(32).hex()}
    boot, pport, dport, xport = free_port(), free_port(), free_port(), free_port()
    common = ["--model", model, "--device", args.device, "--dtype", args.dtype, "--max-pages", str(pages)]
    common += ["--max-model-len", str(longest + 8), "--transfer-protocol", args.protocol]
    serve = [sys.executable, "-m", "disaggctl", "serve"]
    procs = []
    try:
        procs.append(
            subprocess.Popen(
                [*serve, "prefill", "--port", str(pport), "--bootstrap-port", str(boot), *common]
                + ["--decode-peer", f"decode-0=http://127.0.0.1:{dport}"],
                env=env,
            )
        )
        procs.append(
            subprocess.Popen(
                [*serve, "decode", "--port", str(dport), *common, "--prefill-bootstrap", f"127.0.0.1:{boot}"],
                env=env,
            )
        )
        wait_healthy(pport, procs[0], "prefill")
        wait_healthy(dport, procs[1], "decode")
        procs.append(
            subprocess.Popen(
                [*serve, "proxy", "--port", str(xport), "--prefill", f"http://127.0.0.1:{pport}"]
                + ["--bootstrap-port", str(boot), "--decode", f"http://127.0.0.1:{dport}"],
                env=env,
            )
        )
        wait_healthy(xport, procs[2], "proxy")
        rng = random.Random(0)
        vocab = 1000  # prompt ids below every built-in tokenizer's size
        rows = []
        for n in args.tokens:
            ttft(xport, [rng.randrange(vocab) for _ in range(n)], 600)  # warm-up at this length
            ttfts, shares, handoffs = [], [], []
            for _ in range(args.reps):
                before, count0 = handoff_seconds(pport)
                t = ttft(xport, [rng.randrange(vocab) for _ in range(n)], 600)
                after, count1 = handoff_seconds(pport)
                if count1 != count0 + 1:
                    sys.exit(f"expected one hand-off, the prefill counted {count1 - count0}")
                ttfts.append(t)
                handoffs.append(after - before)
                shares.append((after - before) / t)
            row = {
                "tokens": n,
                "ttft_ms": round(statistics.median(ttfts) * 1e3, 2),
                "handoff_ms": round(statistics.median(handoffs) * 1e3, 3),
                "handoff_share_of_ttft": round(statistics.median(shares), 4),
                "reps": args.reps,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
        print("| prompt tokens | TTFT ms | hand-off ms | hand-off / TTFT |")
        print("|---:|---:|---:|---:|")
        for r in rows:
            print(
                f"| {r['tokens']} | {r['ttft_ms']} | {r['handoff_ms']} | {100 * r['handoff_share_of_ttft']:.2f}% |"
            )
        if args.json:
            Path(args.json).write_text(
                json.dumps({"device": args.device, "protocol": args.protocol, "rows": rows})
            )
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        tmp.cleanup()


if __name__ == "__main__":
    main()
