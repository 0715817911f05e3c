"""A real two-host deployment over SSH: `disaggctl up / status / down` against the netns lab (netns_hosts).

Prefill on h0, decode on h1 (each its own network namespace with its own sshd), the proxy on h0; the CLI
runs in the switch namespace, where both hosts are remote. A greedy request through the proxy must give
exactly what a colocated server of the same model gives: the decode never computes the prompt, so its
KV has to have crossed from h0 to h1 over Mooncake TCP.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import free_port, wait_for

pytest_plugins = ["netns_hosts"]
pytestmark = pytest.mark.netns

CLI_TIMEOUT_S = 180
HEALTH_TIMEOUT_S = 120
PROMPTS = [
    "The capital of France is",
    # several KV pages (page size 16): the hand-off writes every layer's pages, not just one
    "Once upon a time, in a village between two rivers, there lived an old clockmaker who repaired "
    "every clock in the valley except his own, which had stopped at a quarter past four.",
]
MAX_NEW_TOKENS = 24


def topology(lab, path: Path, name: str, **host_overrides) -> Path:
    """Prefill on h0, decode on h1, proxy on h0; `host_overrides[hN]` replaces fields of host hN."""
    hosts = []
    for h in lab.hosts:
        entry = {
            "name": h.name,
            "address": h.address,
            "gpus": 0,
            "python": sys.executable,
            "run_dir": str(lab.workdir / name / h.name),
            "ssh": lab.ssh_settings(),
        }
        entry.update(host_overrides.get(h.name, {}))
        hosts.append(entry)
    doc = {
        "name": name,
        "model": {"path": "builtin:tiny", "dtype": "float32"},
        "hosts": hosts,
        "transfer": {"backend": "mooncake", "protocol": "tcp", "timeout_s": 20},
        "prefill": {"replicas": 1, "hosts": [hosts[0]["name"]]},
        "decode": {"replicas": 1, "hosts": [hosts[1]["name"]]},
        "proxy": {"host": hosts[0]["name"], "port": 8000},
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def cli(lab, home: Path, *args: str, timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess:
    """`disaggctl ARGS` in the switch namespace (the controller), with a private DISAGGCTL_HOME."""
    argv = ["ip", "netns", "exec", lab.switch, sys.executable, "-m", "disaggctl", *args]
    env = {**os.environ, "DISAGGCTL_HOME": str(home)}
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)


def serving(lab, netns: str) -> list[str]:
    """Command lines of `disaggctl serve` processes whose network namespace is `netns`.

    (`ip netns exec NS pgrep` would not do: network namespaces do not separate pids, so pgrep there sees
    every process of the machine.)"""
    found = []
    for pid in lab.pids(netns):
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        args = raw.rstrip(b"\0").decode(errors="replace").split("\0")
        if "disaggctl" in args and "serve" in args:
            found.append(" ".join(args))
    return found



def http_json(url: str, body: dict | None = None, timeout: float = 60) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def http_text(url: str, timeout: float = 10) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return r.status == 200
    except (OSError, urllib.error.HTTPError):
        return False


def greedy(url: str, prompt: str) -> dict:
    body = {"text": prompt, "sampling_params": {"max_new_tokens": MAX_NEW_TOKENS, "temperature": 0}}
    return http_json(url + "/generate", body)


def metric(text: str, name: str) -> float:
    line = next(x for x in text.splitlines() if x.startswith(f"disaggctl_{name}{{"))
    return float(line.rsplit(" ", 1)[1])


@pytest.fixture
def reference(tmp_path):
    """A colocated builtin:tiny server on this machine's loopback: the answers the deployment must match."""
    port = free_port()
    argv = [sys.executable, "-m", "disaggctl", "serve", "colocated", "--model", "builtin:tiny"]
    argv += ["--dtype", "float32", "--device", "cpu", "--host", "127.0.0.1", "--port", str(port)]
    log = tmp_path / "reference.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc, f"http://127.0.0.1:{port}", log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def test_two_host_prefill_decode_over_ssh_matches_colocated(netns_lab, reference, tmp_path):
    lab = netns_lab
    ref_proc, ref_url, ref_log = reference  # loads while `up` runs
    home = tmp_path / "home"
    home.mkdir()
    topo = topology(lab, tmp_path / "two-host.yaml", "netns-1p1d")
    h0, h1 = lab.host("h0"), lab.host("h1")

    plan = cli(lab, home, "plan", str(topo), "--json", timeout=60)
    assert plan.returncode == 0, plan.stderr
    planned = json.loads(plan.stdout)["plan"]
    assert planned["kind"] == "xpyd" and not any(h["local"] for h in planned["hosts"])

    t0 = time.monotonic()
    up = cli(lab, home, "up", str(topo), "--timeout", str(HEALTH_TIMEOUT_S))
    up_s = time.monotonic() - t0
    try:
        assert up.returncode == 0, f"up failed:\n{up.stdout}\n{up.stderr}"
        assert f"proxy: http://{h0.address}:8000" in up.stdout

        # each process runs on its host: in that host's network namespace, listening on its address
        on_h0, on_h1 = serving(lab, h0.netns), serving(lab, h1.netns)
        assert sorted(c.split(" serve ")[1].split()[0] for c in on_h0) == ["prefill", "proxy"], on_h0
        assert [c.split(" serve ")[1].split()[0] for c in on_h1] == ["decode"], on_h1
        assert f"--advertise-host {h0.address}" in next(c for c in on_h0 if " serve prefill " in c)
        assert f"--advertise-host {h1.address}" in on_h1[0]
        assert "--transfer-protocol tcp" in on_h1[0]

        st = cli(lab, home, "status", "--json", timeout=60)
        assert st.returncode == 0, st.stderr
        doc = json.loads(st.stdout)
        procs = {p["name"]: p for p in doc["processes"]}
        assert doc["healthy"] and set(procs) == {"prefill-0", "decode-0", "proxy"}
        assert {n: (p["host"], p["alive"], p["healthy"]) for n, p in procs.items()} == {
            "prefill-0": ("h0", True, True),
            "decode-0": ("h1", True, True),
            "proxy": ("h0", True, True),
        }

        wait_for(lambda: healthy(ref_url) or ref_proc.poll() is not None, HEALTH_TIMEOUT_S, "the reference")
        assert ref_proc.poll() is None, ref_log.read_text(errors="replace")[-2000:]
        expected = [greedy(ref_url, prompt) for prompt in PROMPTS]

        with lab.controller():  # the hosts' addresses exist only behind the switch
            got = [greedy(procs["proxy"]["url"], prompt) for prompt in PROMPTS]
            prefill_metrics = http_text(procs["prefill-0"]["url"] + "/metrics")
            decode_metrics = http_text(procs["decode-0"]["url"] + "/metrics")
        for prompt, want, have in zip(PROMPTS, expected, got, strict=True):
            assert have["output_ids"] == want["output_ids"], prompt
            assert have["text"] == want["text"] and len(have["output_ids"]) > 0
            assert have["meta_info"]["finish_reason"] == want["meta_info"]["finish_reason"]
        assert got[-1]["meta_info"]["prompt_tokens"] > 2 * 16, "the long prompt should span several pages"
        # both sides served both requests: h0 computed the prompts, h1 generated the tokens after the first
        assert metric(prefill_metrics, "request_success_total") == len(PROMPTS)
        assert metric(decode_metrics, "request_success_total") == len(PROMPTS)
        assert metric(decode_metrics, "generation_tokens_total") == sum(len(g["output_ids"]) for g in got)
        # each side's Mooncake agent is named by its own host's address, over TCP (logs read over SSH)
        logs = cli(lab, home, "logs", "--no-color", timeout=60)
        assert logs.returncode == 0, logs.stderr
        assert (
            f"mooncake agent {h0.address}:" in logs.stdout and f"mooncake agent {h1.address}:" in logs.stdout
        )
        assert logs.stdout.count("transport tcp (protocol tcp)") == 2, logs.stdout
    finally:
        t1 = time.monotonic()
        down = cli(lab, home, "down", "--timeout", "10", timeout=120)
        down_s = time.monotonic() - t1
    assert down.returncode == 0, f"down failed:\n{down.stdout}\n{down.stderr}"
    assert "stopped 4 process(es)" in down.stdout  # prefill, decode, proxy, and the keeper up left running
    assert "keeper: stopped" in down.stderr
    # nothing of the deployment is left on either host, and the state is gone
    assert wait_for(lambda: not serving(lab, h0.netns) and not serving(lab, h1.netns), 10, "no serve left")
    after = cli(lab, home, "status", "--json", timeout=60)
    assert after.returncode == 1 and "no deployment" in after.stderr
    print(f"\nup (2 hosts over SSH, 1P1D + proxy) {up_s:.1f} s, down {down_s:.1f} s")


@pytest.mark.parametrize("problem", ["unreachable", "wrong-host-key"])
def test_up_refuses_a_bad_host_and_starts_nothing(netns_lab, tmp_path, problem):
    lab = netns_lab
    home = tmp_path / "home"
    home.mkdir()
    if problem == "unreachable":
        override = {"name": "ghost", "address": lab.spare_address}
        expect = f"host ghost: cannot connect to {lab.spare_address}:22"
    else:
        # known_hosts pins h0's key for h1's address: what a reinstalled or spoofed host looks like
        wrong = tmp_path / "known_hosts_wrong"
        pub = (lab.workdir / "host_h0.pub").read_text().split()
        wrong.write_text(f"{lab.host('h1').address} {pub[0]} {pub[1]}\n")
        override = {"ssh": lab.ssh_settings(known_hosts=str(wrong))}
        expect = f"host h1: the host key of {lab.host('h1').address} does not match known_hosts"
    topo = topology(lab, tmp_path / "bad.yaml", f"netns-{problem}", h1=override)

    t0 = time.monotonic()
    up = cli(lab, home, "up", str(topo), "--timeout", "30", timeout=60)
    elapsed = time.monotonic() - t0
    assert up.returncode == 1, f"{up.stdout}\n{up.stderr}"
    assert f"error: pre-flight: {expect}" in up.stderr, up.stderr
    assert "host h0" not in up.stderr  # the good host passed its checks
    assert elapsed < 30, elapsed
    # nothing started on the good host (not even its run directory was made) and no state was written
    assert serving(lab, lab.host("h0").netns) == []
    assert not (lab.workdir / f"netns-{problem}").exists()
    assert list(home.rglob("state.json")) == []
    st = cli(lab, home, "status", timeout=60)
    assert st.returncode == 1 and "no deployment" in st.stderr
