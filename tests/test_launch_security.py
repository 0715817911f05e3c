"""What `up` does with the deployment secret and with values that must stay private: one 0600 secret per
deployment, handed to every process by file name (never on a command line, in the plan or in a log),
reused while anything runs, removed by `down`; private state, lock and log files; SSH launch scripts
that hold no environment value. Real processes: the CLI as a subprocess, the launch script run by `sh`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from conftest import wait_for
from test_launch_e2e import run, status_doc, topology, wait_gone

from disaggctl.launch.ssh import SshBackend, env_file, secret_command
from disaggctl.topology.spec import HostSpec, ProcessSpec
from disaggctl.trust import DeploymentKey

SECRET_ENV = "DISAGGCTL_SECRET_FILE"


def mode(path) -> int:
    return os.stat(path).st_mode & 0o777


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


def cmdline_of(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


# -- the SSH launch script, without SSH -----------------------------------------------------------------

# Values a shell must not interpret, and that must not show in `ps`.
TOKEN = "tok-5c2b1e"
TRICKY = "$(touch /tmp/dctl-no) `x` ' \" \\ ; & | > * \n second line"


def remote_backend() -> SshBackend:
    # never connects: only the scripts it would send are looked at
    host = HostSpec(name="far", address="10.255.0.9", gpus=0, nics=[], local=False, backend="ssh", python="python3")
    return SshBackend(host)


def spec(name: str, argv: list[str], env: dict[str, str]) -> ProcessSpec:
    return ProcessSpec(
        name=name, role="proxy", replica=0, host="far", address="10.255.0.9", bind="10.255.0.9", gpus=[],
        base_gpu_id=None, nics=[], tp=1, dp=1, ep=1, port=9, bootstrap_port=None, argv=argv, env=env,
    )  # fmt: skip


def test_ssh_scripts_hold_no_environment_value_and_create_private_files():
    env = {"PYTHONUNBUFFERED": "1", "API_TOKEN": TOKEN, "ODD": TRICKY}
    script = remote_backend().start_command(spec("w-0", ["python3", "-c", "pass"], env), "~/run/x")
    assert TOKEN not in script and "tok-" not in script and "second line" not in script
    assert not any(name in script for name in env)  # not even the names: they are in the file
    assert script.startswith("umask 077\n") and "umask 022" not in script
    # the values travel in the file (read back through sh in the next test)
    assert b"API_TOKEN=tok-5c2b1e\n" in env_file(env)
    secret = secret_command("~/run/x", 65)
    assert secret.startswith("umask 077\n") and "-eq 65" in secret


@pytest.fixture
def groups():
    """Process groups a test started; every one is killed at the end, whatever the test did."""
    started: list[int] = []
    yield started
    for pgid in started:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert wait_gone(started) == []


@pytest.mark.slow
def test_start_script_run_by_sh_gives_the_process_its_environment_and_no_value_in_ps(tmp_path, groups):
    """The exact script `SshBackend.start` sends, run by a local `sh` with the environment file on stdin
    (what sshd does with it), here where /proc can be read."""
    key = DeploymentKey.generate()
    run_dir = tmp_path / "run dir"
    secret = subprocess.run(
        ["sh", "-c", secret_command(str(run_dir), len(key.hex()) + 1)],
        input=(key.hex() + "\n").encode(),
        capture_output=True,
        timeout=30,
    )
    assert secret.returncode == 0, secret.stderr
    remote_secret = f"{secret.stdout.decode().strip()}/secret"
    assert mode(remote_secret) == 0o600 and DeploymentKey.read(remote_secret).key_id == key.key_id

    env = {"PYTHONUNBUFFERED": "1", "API_TOKEN": TOKEN, "ODD": TRICKY, SECRET_ENV: remote_secret}
    argv = [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(120)"]
    data = env_file(env)
    script = remote_backend().start_command(spec("w-0", argv, env), str(run_dir), len(data))
    res = subprocess.run(["sh", "-c", script], input=data, capture_output=True, timeout=30)
    assert res.returncode == 0, res.stderr
    pid = int(res.stdout.split()[0])
    groups.append(pid)
    # the leader writes its pid, then execs the server: read /proc only once the server has said "up"
    wait_for(lambda: (run_dir / "w-0.log").read_text().startswith("up"), 30, "the process's first line")
    seen = environ_of(pid)
    assert {k: seen.get(k) for k in env} == env
    assert TOKEN not in cmdline_of(pid) and "second line" not in cmdline_of(pid)
    assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1] == [a.encode() for a in argv]
    assert mode(run_dir) == 0o700
    for name in ("w-0.env", "w-0.pid", "w-0.log"):
        assert mode(run_dir / name) == 0o600, name
    assert not os.path.exists("/tmp/dctl-no")

    # a cut connection (fewer bytes than announced) starts nothing and leaves no short file
    res = subprocess.run(["sh", "-c", script.replace("w-0", "w-1")], input=data[:-3], capture_output=True)
    assert res.returncode == 96 and not (run_dir / "w-1.env").exists() and not (run_dir / "w-1.log").exists()


# -- `disaggctl up` on this machine ---------------------------------------------------------------------


@pytest.fixture
def teardown(cli):
    """`down` at the end whatever the test did, and every process it started checked gone."""
    pids: list[int] = []
    yield pids
    run(cli, "down", "--timeout", "5", timeout=60)
    assert wait_gone(pids) == []


def up(cli, topo: Path, pids: list[int]) -> dict:
    res = run(cli, "up", str(topo), "--timeout", "180")
    _, doc = status_doc(cli)
    if doc:
        pids.extend(p["pid"] for p in doc["processes"] if p["pid"] not in pids)
    assert res.returncode == 0, f"up failed:\n{res.stdout}\n{res.stderr}"
    return {p["name"]: p for p in doc["processes"]}


@pytest.mark.slow
def test_up_makes_one_private_secret_reuses_it_and_down_removes_it(cli, disaggctl_home, tmp_path, teardown):
    topo = topology(tmp_path / "topo.yaml", "sec")
    procs = up(cli, topo, teardown)
    home = disaggctl_home / "sec"
    secret = home / "secret"
    key = DeploymentKey.read(secret)  # refuses a file others can read
    assert mode(secret) == 0o600 and mode(home) == 0o700 and mode(home / "logs") == 0o700
    assert mode(home / "state.json") == 0o600 and mode(home / ".lock") == 0o600
    logs = sorted(p.name for p in (home / "logs").iterdir())
    assert logs == ["colocated-0.log", "proxy.log"] and all(mode(home / "logs" / n) == 0o600 for n in logs)

    # every process has the file's name in its environment; nothing carries the key itself
    for p in procs.values():
        env = environ_of(p["pid"])
        assert env[SECRET_ENV] == str(secret) and "DISAGGCTL_SECRET" not in env
        assert key.hex() not in cmdline_of(p["pid"]) and "DISAGGCTL" not in cmdline_of(p["pid"])
    plan = run(cli, "plan", str(topo), "--json")
    assert plan.returncode == 0 and "DISAGGCTL_SECRET" not in plan.stdout and key.hex() not in plan.stdout
    hashes = json.loads(plan.stdout)["spec_hashes"]
    state_text = (home / "state.json").read_text()
    assert key.hex() not in state_text and str(secret) not in state_text
    assert {p["name"]: p["spec_hash"] for p in json.loads(state_text)["processes"]} == hashes
    for n in logs:
        assert key.hex() not in (home / "logs" / n).read_text()

    # a second up keeps everything, and the secret
    again = run(cli, "up", str(topo))
    assert again.returncode == 0 and "already running" in again.stdout, again.stderr
    assert DeploymentKey.read(secret).hex() == key.hex()

    # a restarted process gets the key the kept one has
    os.killpg(procs["colocated-0"]["pid"], signal.SIGKILL)
    assert wait_gone([procs["colocated-0"]["pid"]]) == []
    after = up(cli, topo, teardown)
    assert (
        after["proxy"]["pid"] == procs["proxy"]["pid"]
        and after["colocated-0"]["pid"] != procs["colocated-0"]["pid"]
    )
    assert DeploymentKey.read(secret).hex() == key.hex()
    assert environ_of(after["colocated-0"]["pid"])[SECRET_ENV] == str(secret)

    down = run(cli, "down", "--timeout", "10", timeout=60)
    assert down.returncode == 0, down.stderr
    assert wait_gone(list(teardown)) == []
    assert not secret.exists() and not (home / "state.json").exists()
    left = {p.name for p in (home / "logs").iterdir()}  # logs stay for the post-mortem, private
    assert left == {*logs, "colocated-0.log.1"} and all(mode(home / "logs" / n) == 0o600 for n in left)

    # a fresh start after down never inherits the old key
    fresh = up(cli, topo, teardown)
    assert DeploymentKey.read(secret).hex() != key.hex()
    assert environ_of(fresh["proxy"]["pid"])[SECRET_ENV] == str(secret)


@pytest.mark.slow
def test_failed_up_leaves_no_secret(cli, disaggctl_home, tmp_path, teardown):
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()  # passes pre-flight; the worker exits while loading it
    topo = topology(tmp_path / "bad.yaml", "bad", model=str(not_a_model))
    res = run(cli, "up", str(topo), "--timeout", "120")
    assert res.returncode == 1 and "colocated-0 exited" in res.stderr, res.stderr
    assert (disaggctl_home / "bad" / "logs" / "colocated-0.log").exists()  # it did get started
    assert not (disaggctl_home / "bad" / "secret").exists()
    assert not (disaggctl_home / "bad" / "state.json").exists()
    left = [
        p for p in psutil.process_iter(["cmdline"]) if str(not_a_model) in " ".join(p.info["cmdline"] or [])
    ]
    assert left == []
