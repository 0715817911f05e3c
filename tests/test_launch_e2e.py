"""`disaggctl up / status / logs / down` end to end: the CLI as a subprocess, real servers on loopback
(a colocated builtin:tiny worker and the proxy), a private DISAGGCTL_HOME per test."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
from conftest import free_port

CLI_TIMEOUT_S = 240


def topology(path: Path, name: str, model: str = "builtin:tiny", policy: str = "round_robin") -> Path:
    """A colocated deployment whose dead processes stay dead: these tests check what up, status and down
    see of a killed process (the keeper's restarts are tests/test_restart_e2e.py's)."""
    worker, proxy = free_port(), free_port()
    path.write_text(
        f"""\
name: {name}
model: {{path: {json.dumps(model)}}}
hosts:
  - {{name: local, address: 127.0.0.1, gpus: 0, python: {json.dumps(sys.executable)}}}
colocated: {{replicas: 1, port: {worker}, restart: "no"}}
proxy: {{host: local, port: {proxy}, policy: {policy}, restart: "no"}}
"""
    )
    return path


def run(cli, *args, timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run([*cli, *args], capture_output=True, text=True, timeout=timeout)


def read_line(proc: subprocess.Popen, timeout: float) -> str:
    """The next line `proc` prints, without its newline; AssertionError if none comes within `timeout`."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"no output within {timeout} s"
    return proc.stdout.readline().rstrip("\n")


def status_doc(cli) -> tuple[int, dict | None]:
    res = run(cli, "status", "--json", timeout=60)
    return res.returncode, (json.loads(res.stdout) if res.stdout.strip() else None)


def group_alive(pgid: int) -> list[int]:
    """Live (non-zombie) members of a process group."""
    out = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        except (OSError, psutil.NoSuchProcess):
            continue
    return out


def wait_gone(pids: list[int], timeout_s: float = 10) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while True:
        left = [p for p in pids if group_alive(p)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


@pytest.fixture
def deployed(cli, disaggctl_home, tmp_path):
    """A running colocated+proxy deployment; torn down (and checked gone) whatever the test did."""
    topo = topology(tmp_path / "topo.yaml", "e2e")
    t0 = time.monotonic()
    res = run(cli, "up", str(topo), "--timeout", "180")
    up_s = time.monotonic() - t0
    assert res.returncode == 0, f"up failed:\n{res.stdout}\n{res.stderr}"
    code, doc = status_doc(cli)
    pids = [p["pid"] for p in doc["processes"]] if doc else []
    yield topo, res, doc, up_s
    run(cli, "down", "--timeout", "5", timeout=60)
    assert wait_gone(pids) == []


@pytest.mark.slow
def test_up_status_again_logs_down(cli, deployed, disaggctl_home):
    topo, res, doc, up_s = deployed
    print(f"\nup to healthy (colocated builtin:tiny + proxy): {up_s:.1f} s")
    assert "proxy: http://127.0.0.1:" in res.stdout and "curl -s" in res.stdout
    procs = {p["name"]: p for p in doc["processes"]}
    assert set(procs) == {"colocated-0", "proxy"}
    assert doc["healthy"] and all(p["alive"] and p["healthy"] for p in procs.values())
    # only a prefill or decode hands KV off, so only they report quarantined pages
    assert all(p["kv_pages_quarantined"] is None for p in procs.values())

    # the printed curl works against the proxy
    curl = next(line for line in res.stdout.splitlines() if "curl -s" in line)
    body = json.loads(curl.split(" -d ", 1)[1].strip("'"))
    req = urllib.request.Request(
        procs["proxy"]["url"] + "/generate", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        answer = json.loads(r.read())
    assert answer["meta_info"]["completion_tokens"] > 0

    # table form, exit 0, and fast
    t0 = time.monotonic()
    table = run(cli, "status", timeout=60)
    status_s = time.monotonic() - t0
    print(f"disaggctl status (2 processes, table): {status_s:.2f} s")
    assert table.returncode == 0, table.stderr
    assert "colocated-0" in table.stdout and "healthy" in table.stdout

    # a second up changes nothing
    again = run(cli, "up", str(topo))
    assert again.returncode == 0, again.stderr
    assert "already running" in again.stdout
    code, doc2 = status_doc(cli)
    assert code == 0 and [p["pid"] for p in doc2["processes"]] == [p["pid"] for p in doc["processes"]]

    # a changed spec is refused, nothing restarted
    changed = topo.with_name("changed.yaml")  # same ports, another proxy policy
    changed.write_text(topo.read_text().replace("policy: round_robin", "policy: random"))
    drift = run(cli, "up", str(changed))
    assert drift.returncode == 1 and "different spec for proxy" in drift.stderr, drift.stderr
    assert [p["pid"] for p in status_doc(cli)[1]["processes"]] == [p["pid"] for p in doc["processes"]]

    # logs: per-process prefixes, no colour off a TTY, role selection, -n
    logs = run(cli, "logs", timeout=60)
    assert logs.returncode == 0
    prefixes = {line.split(" | ", 1)[0].strip() for line in logs.stdout.splitlines()}
    assert prefixes == {"colocated-0", "proxy"} and "\x1b[" not in logs.stdout
    one = run(cli, "logs", "colocated", "-n", "1", timeout=60)
    assert one.returncode == 0 and len(one.stdout.splitlines()) == 1
    assert one.stdout.startswith("colocated-0 | ")
    assert run(cli, "logs", "nope", timeout=60).returncode == 2

    # logs -f shows new lines as they come, and stops on SIGINT. Each step waits for what it needs (the
    # follower's first line, then the appended one), not for a fixed time: under load the CLI can take
    # seconds to start, and a SIGINT that lands while it imports is not the one this checks.
    follower = subprocess.Popen(
        [*cli, "logs", "-f", "-n", "1", "proxy"],
        stdout=subprocess.PIPE,
        text=True,
        # Ctrl-C as a terminal delivers it: a test run started in the background inherits SIGINT ignored,
        # and a process that starts with it ignored keeps it so
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert read_line(follower, 60).startswith("proxy | "), "the follower printed no last line"
        marker = f"appended while following {time.monotonic()}"
        with open(procs["proxy"]["log_path"], "a") as log:
            log.write(marker + "\n")
        assert read_line(follower, 30) == f"proxy | {marker}"
    finally:
        follower.send_signal(signal.SIGINT)
        try:
            out, _ = follower.communicate(timeout=30)
        finally:
            if follower.poll() is None:  # never outlive the test, even when it fails
                follower.kill()
                follower.wait(10)
    assert follower.returncode == 0
    assert all(line.startswith("proxy | ") for line in out.splitlines())

    # down: reverse order, every process group gone, state removed
    pgids = [p["pid"] for p in doc["processes"]]
    down = run(cli, "down", "--timeout", "10", timeout=60)
    assert down.returncode == 0, down.stderr
    assert down.stderr.index("proxy:") < down.stderr.index("colocated-0:")
    assert wait_gone(pgids, 0) == []
    assert run(cli, "status", timeout=60).returncode == 1
    assert not (disaggctl_home / "e2e" / "state.json").exists()


@pytest.mark.slow
def test_process_that_dies_at_start(cli, disaggctl_home, tmp_path):
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()  # exists (pre-flight passes), but holds no model: the worker exits while loading
    topo = topology(tmp_path / "bad.yaml", "bad", model=str(not_a_model))
    res = run(cli, "up", str(topo), "--timeout", "120")
    assert res.returncode == 1, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: colocated-0 exited") and "before it became healthy" in last
    assert "colocated-0 | " in res.stderr  # its log tail
    assert not (disaggctl_home / "bad" / "state.json").exists()
    left = [
        p for p in psutil.process_iter(["cmdline"]) if str(not_a_model) in " ".join(p.info["cmdline"] or [])
    ]
    assert left == []
    assert run(cli, "status", timeout=60).returncode == 1


@pytest.mark.slow
def test_stale_state_after_sigkill(cli, deployed, disaggctl_home):
    _, _, doc, _ = deployed
    worker = next(p for p in doc["processes"] if p["name"] == "colocated-0")
    os.killpg(worker["pid"], signal.SIGKILL)
    assert wait_gone([worker["pid"]]) == []
    code, after = status_doc(cli)
    assert code == 3
    rows = {p["name"]: p for p in after["processes"]}
    assert rows["colocated-0"]["alive"] is False and rows["colocated-0"]["health"] == "dead"
    assert rows["proxy"]["alive"] is True and not after["healthy"]
    down = run(cli, "down", "--timeout", "5", timeout=60)
    assert down.returncode == 0, down.stderr
    assert "colocated-0: gone" in down.stderr and "proxy: stopped" in down.stderr
    assert not (disaggctl_home / "e2e" / "state.json").exists()
