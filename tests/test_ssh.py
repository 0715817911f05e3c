"""The SSH launch backend and pre-flight, against real sshd hosts in network namespaces (netns_hosts)."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid

import pytest
from conftest import wait_for

from disaggctl.launch import ssh
from disaggctl.launch.backend import record
from disaggctl.launch.preflight import preflight
from disaggctl.launch.ssh import SshBackend, SshError, SshTarget, connection
from disaggctl.topology.spec import HostSpec, ProcessSpec
from disaggctl.trust import DeploymentKey

pytest_plugins = ["netns_hosts"]
pytestmark = pytest.mark.netns


class FakePlan:
    """Only `processes` is read by pre-flight; a whole Plan needs a topology file this module has no use for."""

    sglang_version = None

    def __init__(self, processes):
        self.processes = processes


@pytest.fixture
def lab(netns_lab):
    """The lab, with this test's thread inside the switch namespace (where the hosts are reachable)."""
    with netns_lab.controller():
        yield netns_lab
        ssh.close_all()


def host_spec(lab, name: str, **ssh_overrides) -> HostSpec:
    h = lab.host(name)
    return HostSpec(
        name=h.name,
        address=h.address,
        gpus=0,
        nics=[],
        local=False,
        backend="ssh",
        ssh=lab.ssh_settings(**ssh_overrides),
        python=sys.executable,
        run_dir=None,
    )


def process_spec(
    lab, name: str, host: str, argv: list[str], port: int, env: dict | None = None
) -> ProcessSpec:
    h = lab.host(host)
    return ProcessSpec(
        name=name,
        role="proxy",
        replica=0,
        host=host,
        address=h.address,
        bind=h.address,
        gpus=[],
        base_gpu_id=None,
        nics=[],
        tp=1,
        dp=1,
        ep=1,
        port=port,
        bootstrap_port=None,
        argv=argv,
        env=env or {"PYTHONUNBUFFERED": "1"},
    )


def run_dir(lab) -> str:
    return str(lab.workdir / f"run-{uuid.uuid4().hex[:8]}")


def group_members(lab, host: str, pgid: int) -> list[str]:
    """Live processes of the process group `pgid` on that host (zombies waiting for init do not count)."""
    res = lab.exec_in(lab.host(host).netns, ["ps", "-e", "-o", "pgid=,stat=,pid=,args="])
    return [
        line for line in res.stdout.splitlines() if int(line.split()[0]) == pgid and line.split()[1][0] != "Z"
    ]


def http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


# -- connecting -----------------------------------------------------------------------------------------


def test_connection_is_reused_and_lands_on_the_right_host(lab):
    for name in ("h0", "h1"):
        target = SshTarget.from_host(host_spec(lab, name))
        first = connection(target)
        assert connection(target) is first
        res = first.run("hostname; echo $SSH_CONNECTION")
        hostname, conn_line = res.stdout.split("\n")[:2]
        assert res.rc == 0 and hostname == name
        assert conn_line.split()[2] == lab.host(name).address


def test_jump_host_reaches_the_target_through_the_jump(lab):
    jump = f"{lab.user}@{lab.host('h0').address}:22"
    backend = SshBackend(host_spec(lab, "h1", jump=jump))
    res = backend.run("hostname; echo $SSH_CONNECTION")
    hostname, conn_line = res.stdout.split("\n")[:2]
    assert hostname == "h1"
    # sshd on h1 sees the connection coming from h0 (the jump), not from the controller
    assert conn_line.split()[0] == lab.host("h0").address


def test_unreachable_host_fails_fast_naming_it(lab):
    ghost = host_spec(lab, "h0").model_copy(update={"name": "ghost", "address": lab.spare_address})
    t0 = time.monotonic()
    with pytest.raises(SshError) as err:
        SshBackend(ghost, connect_timeout_s=4).run("true")
    elapsed = time.monotonic() - t0
    assert err.value.reason == "unreachable"
    assert "ghost" in str(err.value) and lab.spare_address in str(err.value)
    assert elapsed < 6, elapsed
    problems = preflight([ghost], FakePlan([]), connect_timeout_s=4)
    assert [(p.host, p.check) for p in problems] == [("ghost", "reachable")]


def test_changed_host_key_is_refused_even_with_accept_new(lab):
    # known_hosts pins h1's key for h0's address: exactly what a changed (or spoofed) host looks like
    h0, h1 = lab.host("h0"), lab.host("h1")
    wrong = lab.workdir / "known_hosts_wrong"
    pub = (lab.workdir / "host_h1.pub").read_text().split()
    wrong.write_text(f"{h0.address} {pub[0]} {pub[1]}\n")
    for accept_new in (False, True):
        spec = host_spec(lab, "h0", known_hosts=str(wrong), insecure_accept_new_host_keys=accept_new)
        with pytest.raises(SshError) as err:
            SshBackend(spec).run("true")
        assert err.value.reason == "host-key-changed", err.value
        assert "h0" in str(err.value) and "does not match" in str(err.value)
        assert isinstance(err.value.__cause__, __import__("paramiko").BadHostKeyException)
    assert wrong.read_text().count("\n") == 1  # nothing was added
    assert h1.address not in wrong.read_text()


def test_unknown_host_key_rejected_by_default_added_with_accept_new(lab):
    empty = lab.workdir / f"known_hosts_{uuid.uuid4().hex[:6]}"
    empty.write_text("")
    with pytest.raises(SshError) as err:
        SshBackend(host_spec(lab, "h0", known_hosts=str(empty))).run("true")
    assert err.value.reason == "host-key-unknown" and "h0" in str(err.value)
    assert empty.read_text() == ""

    res = SshBackend(host_spec(lab, "h0", known_hosts=str(empty), insecure_accept_new_host_keys=True)).run(
        "hostname"
    )
    assert res.stdout.strip() == "h0"
    real = (lab.workdir / "host_h0.pub").read_text().split()
    assert empty.read_text().split() == [lab.host("h0").address, real[0], real[1]]
    ssh.close_all()
    # the key it learned is now enforced without the insecure flag
    assert SshBackend(host_spec(lab, "h0", known_hosts=str(empty))).run("hostname").stdout.strip() == "h0"


# -- pre-flight -----------------------------------------------------------------------------------------


def test_preflight_passes_on_both_hosts_and_names_every_problem(lab):
    hosts = [host_spec(lab, "h0"), host_spec(lab, "h1")]
    ok = [
        process_spec(lab, "proxy", "h0", ["true"], 18000),
        process_spec(lab, "decode-0", "h1", ["--model", "builtin:tiny"], 18001),
    ]
    t0 = time.monotonic()
    assert preflight(hosts, FakePlan(ok)) == []
    clean_s = time.monotonic() - t0

    busy = process_spec(lab, "proxy", "h0", ["true"], 22)  # sshd listens there
    model = lab.workdir / "no-such-model"
    missing = process_spec(lab, "prefill-0", "h1", ["serve", "--model", str(model)], 18002)
    elsewhere = process_spec(lab, "decode-0", "h1", ["true"], 18003).model_copy(
        update={"bind": lab.host("h0").address}
    )
    bad_python = host_spec(lab, "h1").model_copy(update={"python": "/nonexistent/bin/python3"})
    problems = preflight(hosts, FakePlan([busy, missing, elsewhere]))
    text = [str(p) for p in problems]
    assert [(p.host, p.check) for p in problems] == [("h0", "ports"), ("h1", "ports"), ("h1", "paths")], text
    assert "port 22 (proxy) is already in use" in text[0] and text[0].startswith("host h0:")
    assert "not an address of this host" in text[1]
    assert str(model) in text[2]
    problems = preflight([bad_python], FakePlan([]))
    assert [(p.host, p.check) for p in problems] == [("h1", "disaggctl")]
    assert "/nonexistent/bin/python3 not found" in str(problems[0])
    print(f"\npre-flight of 2 hosts (connect + 2 commands each): {clean_s:.2f} s")


# -- processes ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_remote_proxy_start_health_status_logs_stop(lab):
    h0, h1 = lab.host("h0"), lab.host("h1")
    port = 18080
    argv = [sys.executable, "-m", "disaggctl", "serve", "proxy", "--host", h0.address, "--port", str(port)]
    argv += ["--worker", f"http://{h1.address}:18081"]
    spec = process_spec(lab, "proxy", "h0", argv, port)
    backend = SshBackend(host_spec(lab, "h0"))
    t0 = time.monotonic()
    rec = record(spec, backend.start(spec, run_dir(lab)), "h")
    start_s = time.monotonic() - t0
    assert rec.host == "h0" and rec.log_path.endswith("/proxy.log") and rec.boot_id
    try:
        health = f"{spec.url}{spec.health_path}"
        wait_for(lambda: http_status(health) == 200, 30, f"{health} to answer 200")
        healthy_s = time.monotonic() - t0
        assert backend.alive(rec)

        # the process is detached from the SSH session: drop every connection, it stays up
        ssh.close_all()
        assert backend.alive(rec) and http_status(health) == 200
        assert group_members(lab, "h0", rec.pid), "pgrep sees no process in the group"

        assert backend.read_log(rec), "the proxy wrote nothing to its log"
        stop = threading.Event()
        lines: list[str] = []

        def follow():
            for line in backend.follow_log(rec, tail=3, stop=stop):
                lines.append(line)

        follower = threading.Thread(target=follow, daemon=True)
        follower.start()
        wait_for(lambda: lines, 10, "follow_log to yield the last lines")
        stop.set()
        follower.join(5)
        assert not follower.is_alive(), "follow_log did not end after stop was set"
        assert lines == backend.read_log(rec, tail=3)[: len(lines)]
    finally:
        outcome = backend.stop(rec, grace_s=10)
    assert outcome == "stopped"
    assert not backend.alive(rec)
    assert group_members(lab, "h0", rec.pid) == []
    assert http_status(health) is None
    assert backend.stop(rec, grace_s=1) == "gone"
    print(f"\nremote start {start_s:.2f} s, healthy after {healthy_s:.2f} s")


@pytest.mark.slow
def test_shell_metacharacters_arrive_verbatim(lab, tmp_path):
    marker = f"/tmp/dctl-pwned-{uuid.uuid4().hex[:8]}"
    env_value = f"$(touch {marker}) `touch {marker}` ' \" \\ ; & | > *"
    args = [f"; rm -rf {marker}.dir; touch {marker}", "$HOME", "a b", "*", "'"]
    out = tmp_path / "seen.json"
    code = (
        "import json, os, sys, time; "
        f"json.dump({{'env': os.environ['EVIL'], 'argv': sys.argv[1:]}}, open({str(out)!r}, 'w')); "
        "print('ready', flush=True); time.sleep(60)"
    )
    spec = process_spec(
        lab, "evil-0", "h1", [sys.executable, "-c", code, *args], 18090, env={"EVIL": env_value}
    )
    backend = SshBackend(host_spec(lab, "h1"))
    rec = record(spec, backend.start(spec, run_dir(lab) + "/with space; $(touch " + marker + ")"), "h")
    try:
        wait_for(out.exists, 10, "the process to record what it saw")
        seen = json.loads(wait_for(lambda: out.read_text() or None, 5, "the record to be written"))
        assert seen == {"env": env_value, "argv": args}
        assert "with space; $(touch" in rec.log_path
        wait_for(lambda: backend.read_log(rec) == ["ready"], 5, "the log line")
    finally:
        assert backend.stop(rec, grace_s=5) == "stopped"
    assert not os.path.exists(marker)


@pytest.mark.slow
def test_secret_and_environment_reach_the_process_but_no_command_line(lab, tmp_path):
    key = DeploymentKey.generate()
    local_secret = key.write(tmp_path / "secret")
    token = f"tok-{uuid.uuid4().hex}"
    out = tmp_path / "seen.json"
    code = (
        "import json, os, stat, time; p = os.environ['DISAGGCTL_SECRET_FILE']; "
        "seen = {'file': p, 'mode': stat.S_IMODE(os.stat(p).st_mode), 'key': open(p).read().strip(), "
        "'token': os.environ['API_TOKEN']}; "
        f"json.dump(seen, open({str(out)!r}, 'w')); print('ready', flush=True); time.sleep(60)"
    )
    env = {"PYTHONUNBUFFERED": "1", "API_TOKEN": token}
    spec = process_spec(lab, "worker-0", "h1", [sys.executable, "-c", code], 18096, env=env)
    backend = SshBackend(host_spec(lab, "h1"))
    directory = run_dir(lab)
    netns = lab.host("h1").netns
    # Every command line on the machine (the namespaces share one process table), read all through the
    # start: the launch script's shell lives only a few tens of milliseconds, `ps` is too slow for it.
    cmdlines: list[bytes] = []
    done = threading.Event()

    def sample():
        while not done.is_set():
            for pid in os.listdir("/proc"):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        cmdlines.append(f.read())
                except OSError:
                    continue

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        rec = record(spec, backend.start(spec, directory, secret_file=str(local_secret)), "h")
    finally:
        done.set()
        sampler.join(30)
    try:
        seen = json.loads(wait_for(lambda: out.exists() and out.read_text() or None, 10, "what it saw"))
        remote_secret = os.path.join(os.path.realpath(directory), "secret")
        assert seen == {"file": remote_secret, "mode": 0o600, "key": key.hex(), "token": token}
        assert any(b"umask 077" in c for c in cmdlines), "the sampler never saw the launch script"
        assert not any(token.encode() in c or key.hex().encode() in c for c in cmdlines)
        ps = lab.exec_in(netns, ["ps", "-e", "-o", "args="]).stdout
        assert code[:40] in ps and token not in ps and key.hex() not in ps
        for name in ("secret", "worker-0.env", "worker-0.log", "worker-0.pid"):
            assert os.stat(os.path.join(directory, name)).st_mode & 0o777 == 0o600, name
        assert os.stat(directory).st_mode & 0o777 == 0o700
    finally:
        assert backend.stop(rec, grace_s=5) == "stopped"
    backend.remove_private_files([rec])
    assert not os.path.exists(remote_secret) and not os.path.exists(os.path.join(directory, "worker-0.env"))
    assert backend.read_log(rec) == ["ready"]  # the log stays


@pytest.mark.slow
def test_stop_kills_term_ignoring_group_and_escaped_children(lab):
    tag = str(uuid.uuid4().int % 90 + 10)  # digits: it becomes part of sleep's duration
    code = (
        "import signal, subprocess, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        f"subprocess.Popen(['sleep', '301{tag}']); "  # same group
        f"subprocess.Popen(['setsid', 'sleep', '302{tag}']); "  # escaped into its own session
        "print('up', flush=True); time.sleep(300)"
    )
    spec = process_spec(lab, "stubborn", "h0", [sys.executable, "-c", code], 18091)
    backend = SshBackend(host_spec(lab, "h0"))
    rec = record(spec, backend.start(spec, run_dir(lab)), "h")
    netns = lab.host("h0").netns

    def sleepers() -> list[str]:
        res = lab.exec_in(netns, ["pgrep", "-a", "-f", f"sleep 30[12]{tag}"])
        return res.stdout.splitlines()

    wait_for(lambda: len(sleepers()) == 2, 10, "both children")
    t0 = time.monotonic()
    assert backend.stop(rec, grace_s=1) == "killed"
    assert 1 <= time.monotonic() - t0 < 8
    assert sleepers() == [] and group_members(lab, "h0", rec.pid) == []


@pytest.mark.slow
def test_identity_check_never_signals_a_different_process(lab):
    spec = process_spec(lab, "sleeper", "h1", [sys.executable, "-c", "import time; time.sleep(60)"], 18092)
    backend = SshBackend(host_spec(lab, "h1"))
    rec = record(spec, backend.start(spec, run_dir(lab)), "h")
    try:
        assert backend.alive(rec)
        reused = rec.model_copy(update={"start_time": str(int(rec.start_time) + 1)})
        rebooted = rec.model_copy(update={"boot_id": "00000000-0000-0000-0000-000000000000"})
        for impostor in (reused, rebooted):
            assert not backend.alive(impostor)
            assert backend.stop(impostor, grace_s=1) == "gone"
        assert backend.alive(rec), "a record that does not match must never be signalled"
    finally:
        assert backend.stop(rec, grace_s=5) == "stopped"


def test_start_failure_names_host_and_directory(lab):
    blocker = lab.workdir / f"a-file-{uuid.uuid4().hex[:6]}"
    blocker.write_text("")
    spec = process_spec(lab, "p", "h0", ["true"], 18093)
    with pytest.raises(SshError) as err:
        SshBackend(host_spec(lab, "h0")).start(spec, str(blocker / "run"))
    assert err.value.reason == "start" and "host h0" in str(err.value) and str(blocker) in str(err.value)


def test_bad_names_are_refused_before_anything_runs(lab):
    backend = SshBackend(host_spec(lab, "h0"))
    bad_env = process_spec(lab, "ok", "h0", ["true"], 18094, env={"A;touch x": "1"})
    with pytest.raises(SshError, match="environment variable name"):
        backend.start(bad_env, run_dir(lab))
    bad_name = process_spec(lab, "../escape", "h0", ["true"], 18095)
    with pytest.raises(SshError, match="not a plain file name"):
        backend.start(bad_name, run_dir(lab))
    problems = preflight([host_spec(lab, "h0")], FakePlan([bad_env, bad_name]))
    assert [(p.host, p.check) for p in problems] == [("h0", "spec"), ("h0", "spec")]
