"""The keeper end to end (issue #25): `disaggctl up` of a real 1P1D deployment on loopback (builtin:tiny,
KV over Mooncake TCP) leaves a keeper; workers are SIGKILLed and what the keeper does is read from
`disaggctl status` and through the proxy. Every process any test saw is checked gone at the end, whatever
happened (the keeper starts processes of its own)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
from conftest import free_port, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

CLI_TIMEOUT_S = 240


def topology(path: Path, name: str, decode: str = "", keeper: str = "") -> Path:
    path.write_text(
        f"""\
name: {name}
model: {{path: builtin:tiny}}
hosts:
  - {{name: local, address: 127.0.0.1, gpus: 0, python: {json.dumps(sys.executable)}}}
transfer: {{protocol: tcp, timeout_s: 10}}
prefill: {{port: {free_port()}, bootstrap_port: {free_port()}}}
decode: {{port: {free_port()}{decode}}}
proxy: {{port: {free_port()}}}
keeper: {{backoff_s: 0.3{keeper}}}
"""
    )
    return path


class Deployment:
    def __init__(self, cli, topo: Path):
        self.cli = cli
        self.topo = topo
        self.pids: set[int] = set()  # every process of the deployment seen, the keeper's included

    def run(self, *args: str, timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess:
        return subprocess.run([*self.cli, *args], capture_output=True, text=True, timeout=timeout)

    def status(self) -> tuple[int, dict]:
        res = self.run("status", "--json", timeout=60)
        doc = json.loads(res.stdout)
        self.pids |= {p["pid"] for p in doc["processes"]}
        if doc["keeper"]:
            self.pids.add(doc["keeper"]["pid"])
        return res.returncode, doc

    def proc(self, name: str) -> dict:
        return next(p for p in self.status()[1]["processes"] if p["name"] == name)

    def up(self) -> None:
        res = self.run("up", str(self.topo), "--timeout", "180")
        self.status()
        assert res.returncode == 0, f"up failed:\n{res.stdout}\n{res.stderr}"
        assert "keeper: started" in res.stderr

    def kill(self, name: str) -> int:
        pid = self.proc(name)["pid"]
        os.killpg(pid, signal.SIGKILL)
        return pid

    def generate(self) -> int:
        proxy = self.proc("proxy")["url"]
        body = json.dumps({"text": "hello", "sampling_params": {"max_new_tokens": 4, "temperature": 0}})
        req = urllib.request.Request(proxy + "/generate", body.encode(), {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status if json.loads(r.read())["meta_info"]["completion_tokens"] == 4 else 0
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            return 0


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def deploy(cli, disaggctl_home, tmp_path):
    made: list[Deployment] = []

    def make(**kw) -> Deployment:
        d = Deployment(cli, topology(tmp_path / f"t{len(made)}.yaml", f"keep{len(made)}", **kw))
        made.append(d)
        d.up()
        return d

    yield make
    for d in made:
        d.run("down", "--timeout", "5", timeout=60)
        left = [p for p in d.pids if alive(p)]
        for pid in left:  # never leave a process behind, even after a failed test
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        assert left == [], f"still running after down: {left}"


def test_a_killed_decode_is_restarted_until_it_crash_loops_and_down_stops_the_keeper_first(deploy):
    d = deploy(keeper=", max_restarts: 2, window_s: 600")
    assert d.generate() == 200
    old = d.kill("decode-0")

    # the keeper starts it again (same port, same secret file), and the proxy takes it back once healthy
    def restarted():
        p = d.proc("decode-0")
        return p["pid"] != old and p["healthy"] and p["state"] == "running" and p

    p = wait_for(restarted, 120, "the keeper to restart decode-0 and see it healthy")
    assert p["restarts"] == 1 and p["restart"] == "on-failure" and "exited" in p["last_exit"]
    wait_for(lambda: d.generate() == 200, 60, "a request through the proxy to succeed again")
    code, doc = d.status()
    assert code == 0 and doc["healthy"] and doc["keeper"]["alive"]
    assert {x["name"]: x["restarts"] for x in doc["processes"]} == {"prefill-0": 0, "decode-0": 1, "proxy": 0}
    table = d.run("status", timeout=60)
    assert table.returncode == 0 and "keeper" in table.stdout and "1 (on-failure)" in table.stdout

    # killed again and again: two restarts in the window are allowed, the third death is a crash loop
    old = d.kill("decode-0")
    p = wait_for(lambda: (x := d.proc("decode-0"))["pid"] != old and x, 60, "the second restart of decode-0")
    wait_for(lambda: Path(p["log_path"]).read_text().strip(), 60, "a line in the new instance's log")
    d.kill("decode-0")
    p = wait_for(lambda: (x := d.proc("decode-0"))["state"] == "crash-loop" and x, 60, "a crash loop")
    assert p["restarts"] == 2 and not p["alive"] and p["last_exit"] == "killed by SIGKILL"
    assert p["last_log_lines"], p
    table = d.run("status", timeout=60)
    assert table.returncode == 3 and "crash-loop after 2 restart(s)" in table.stdout
    assert "its last log lines:" in table.stdout and "decode-0 | " in table.stdout

    # down: the keeper first (so that it restarts nothing down stops), then the rest; nothing left
    down = d.run("down", "--timeout", "10", timeout=60)
    assert down.returncode == 0, down.stderr
    assert (
        down.stderr.index("keeper: stopped") < down.stderr.index("proxy:") < down.stderr.index("prefill-0:")
    )
    wait_for(lambda: not any(alive(pid) for pid in d.pids), 20, "every process the deployment had to end")
    home = Path(os.environ["DISAGGCTL_HOME"]) / "keep0"
    assert not (home / "state.json").exists() and not (home / "keeper.json").exists()


def test_restart_no_leaves_a_killed_worker_dead(deploy):
    d = deploy(decode=", restart: no")  # YAML reads a bare `no` as false: taken as meant
    old = d.kill("decode-0")
    p = wait_for(
        lambda: (x := d.proc("decode-0"))["state"] == "exited" and x, 60, "the keeper to see it exit"
    )
    # decided: the keeper leaves it so (it acts on a death once, and "exited" is final)
    assert p["pid"] == old and not p["alive"] and p["restarts"] == 0 and p["restart"] == "no"
    assert "not restarted" in p["state_detail"]
    code, doc = d.status()
    assert code == 3 and not doc["healthy"] and doc["keeper"]["alive"]
    assert "decode-0: exited (status unknown" in d.run("status", timeout=60).stdout
