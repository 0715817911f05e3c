"""Time from `disaggctl up` to a healthy deployment (every process healthy, proxy last), and `down`.

    python benchmarks/up_time.py [topologies/local-1p1d.yaml] --repeat 3

Each round runs the CLI as a user would, in a private DISAGGCTL_HOME, and sends one request through the
proxy before `down` so that a deployment that only looks healthy is not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request


def cli(*args: str, env: dict) -> float:
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "disaggctl", *args], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        sys.exit(f"disaggctl {' '.join(args)} failed:\n{res.stdout}\n{res.stderr}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("topology", nargs="?", default="topologies/local-1p1d.yaml")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--proxy", default="http://127.0.0.1:8000", help="the topology's proxy URL")
    ap.add_argument("--json", dest="json_path")
    a = ap.parse_args()
    ups, downs = [], []
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "DISAGGCTL_HOME": home}
        for i in range(a.repeat):
            ups.append(cli("up", a.topology, env=env))
            body = json.dumps({"text": "Hello", "sampling_params": {"max_new_tokens": 4}}).encode()
            req = urllib.request.Request(a.proxy + "/generate", data=body)
            with urllib.request.urlopen(req, timeout=60) as r:
                assert r.status == 200
            downs.append(cli("down", env=env))
            print(f"round {i + 1}: up {ups[-1]:.2f} s, down {downs[-1]:.2f} s", flush=True)
    result = {
        "topology": a.topology,
        "up_s": ups,
        "down_s": downs,
        "up_median_s": statistics.median(ups),
        "down_median_s": statistics.median(downs),
    }
    print(json.dumps(result, indent=2))
    if a.json_path:
        with open(a.json_path, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
