"""`disaggctl up` of an engine: sglang deployment runs the rendered commands for real: pre-flight, start
order, health, `down`. SGLang is stood in for by modules on the hosts' interpreter path
(`sglang.launch_server`, `sglang_router.launch_router`) that record how they were started and answer
/health, so the test checks what a real SGLang would have been given, argument for argument."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

from conftest import free_block, free_port

from disaggctl.topology.load import load_topology
from disaggctl.topology.plan import build_plan
from disaggctl.topology.sglang_args import PINNED_SGLANG

SERVER = r"""
import http.server, json, os, signal, sys


class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *a):
        pass


def main():
    args = sys.argv[1:]
    host = args[args.index("--host") + 1] if "--host" in args else "127.0.0.1"
    port = int(args[args.index("--port") + 1])
    env = {k: v for k, v in os.environ.items() if k.startswith(("MC_", "SGLANG_", "PYTHONUNBUFFERED"))}
    with open(os.path.join(RECORDS, "%d.json" % port), "w") as f:
        json.dump({"module": __spec__.name, "args": args, "env": env}, f)
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    http.server.HTTPServer((host, port), Health).serve_forever()


if __name__ == "__main__":  # pre-flight imports the module: only `-m` serves
    main()
"""


def stand_in_python(tmp_path: Path) -> tuple[str, Path]:
    site, records = tmp_path / "site", tmp_path / "records"
    records.mkdir()
    body = f"RECORDS = {str(records)!r}\n{SERVER}"
    for package in ("sglang", "sglang_router"):
        (site / package).mkdir(parents=True)
    (site / "sglang" / "__init__.py").write_text(f'__version__ = "{PINNED_SGLANG}"\n')
    (site / "sglang" / "launch_server.py").write_text(body)
    (site / "sglang_router" / "__init__.py").write_text("")
    (site / "sglang_router" / "launch_router.py").write_text(body)
    wrapper = tmp_path / "python"
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH={site} exec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper), records


def test_up_runs_the_rendered_sglang_commands(cli, disaggctl_home, tmp_path):
    python, records = stand_in_python(tmp_path)
    ports = [free_port() for _ in range(5)]
    ports[2] = free_block(2)  # the two decodes listen on ports[2] and ports[2] + 1
    topo = tmp_path / "sglang.yaml"
    topo.write_text(
        f"""\
name: sgl-e2e
engine: sglang
model: {{path: Qwen/Qwen2.5-0.5B-Instruct}}
hosts: [{{name: local, address: 127.0.0.1, gpus: 0, python: {python}}}]
transfer: {{protocol: tcp, timeout_s: 20}}
prefill: {{port: {ports[0]}, bootstrap_port: {ports[1]}}}
decode: {{replicas: 2, port: {ports[2]}}}
proxy: {{port: {ports[4]}}}
"""
    )
    plan = build_plan(load_topology(topo), str(topo))
    up = subprocess.run(
        [*cli, "up", str(topo), "--timeout", "60"], capture_output=True, text=True, timeout=240
    )
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        for p in plan.processes:
            rec = json.loads((records / f"{p.port}.json").read_text())
            assert rec["module"] == p.argv[2] and rec["args"] == p.argv[3:], p.name
            for key, value in p.env.items():
                assert rec["env"].get(key) == value, (p.name, key)
        router = plan.process("proxy").argv
        assert router[2:4] == ["sglang_router.launch_router", "--pd-disaggregation"]
        assert json.loads((records / f"{ports[2]}.json").read_text())["env"]["MC_FORCE_TCP"] == "1"
        status = subprocess.run([*cli, "status", "--json"], capture_output=True, text=True, timeout=60)
        doc = json.loads(status.stdout)
        assert status.returncode == 0 and doc["healthy"], status.stdout
        assert sorted(r["name"] for r in doc["processes"]) == sorted(p.name for p in plan.processes)
    finally:
        down = subprocess.run([*cli, "down", "--timeout", "5"], capture_output=True, text=True, timeout=60)
    assert down.returncode == 0, down.stdout + down.stderr
    time.sleep(0.2)
    for port in (ports[0], ports[2], ports[4]):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"something still listens on {port}"


def test_up_stops_at_preflight_when_a_host_lacks_sglang(cli, disaggctl_home, tmp_path):
    wrapper = tmp_path / "python"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')  # this interpreter has no sglang
    wrapper.chmod(0o755)
    topo = tmp_path / "sglang.yaml"
    topo.write_text(
        f"name: sgl-pf\nengine: sglang\nmodel: {{path: Qwen/Qwen2.5-0.5B-Instruct}}\n"
        f"hosts: [{{name: box, address: 127.0.0.1, python: {wrapper}}}]\n"
        f"prefill: {{port: {free_port()}}}\ndecode: {{port: {free_port()}}}\nproxy: {{port: {free_port()}}}\n"
    )
    up = subprocess.run(
        [*cli, "up", str(topo), "--timeout", "30"], capture_output=True, text=True, timeout=240
    )
    assert up.returncode != 0
    out = up.stdout + up.stderr
    assert "host box:" in out and "cannot import sglang" in out, out
    status = subprocess.run([*cli, "status"], capture_output=True, text=True, timeout=60)
    assert status.returncode != 0  # nothing was started
