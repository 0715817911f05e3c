"""Deployment state (atomic write, lock, lookup), the local backend's identity checks and group stop,
the health probe and the log view, with real processes and a real HTTP server on loopback."""

from __future__ import annotations

import http.server
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, field

import psutil
import pytest
from conftest import free_port, wait_for

from disaggctl.launch import backend as launch_backend
from disaggctl.launch import health, logview, state, supervisor
from disaggctl.launch.local import LocalBackend, rotate
from disaggctl.launch.state import DeploymentState, HostRecord, ProcRecord
from disaggctl.trust import DeploymentKey


@dataclass
class Spec:
    """The ProcessSpec fields the local backend reads."""

    name: str
    argv: list[str]
    host: str = "local"
    env: dict[str, str] = field(default_factory=dict)
    url: str = "http://127.0.0.1:9"
    role: str = "colocated"
    address: str = "127.0.0.1"
    gpus: list[int] = field(default_factory=list)
    nics: list[str] = field(default_factory=list)
    tp: int = 1
    port: int = 9
    bootstrap_port: int | None = None
    health_path: str = "/health"


def started(backend: LocalBackend, spec: Spec, run_dir: str, **kw) -> ProcRecord:
    """Start `spec` as `up` does: the backend starts it, the record is made of what it returns."""
    return launch_backend.record(spec, backend.start(spec, run_dir, **kw), "h")


def make_state(name: str = "demo", procs: list[ProcRecord] | None = None) -> DeploymentState:
    return DeploymentState(
        name=name,
        created_at=time.time(),
        hosts=[HostRecord(name="local", address="127.0.0.1", local=True)],
        processes=procs or [],
    )


def record(
    name: str = "p", pid: int = 1, role: str = "colocated", url: str = "http://127.0.0.1:9"
) -> ProcRecord:
    return ProcRecord(
        name=name, host="local", pid=pid, start_time=0.0, log_path="/nonexistent", started_at=time.time(),
        spec_hash="h", url=url, role=role,
    )  # fmt: skip


# -- state file -----------------------------------------------------------------------------------------


def test_save_load_roundtrip_and_no_temp_files(disaggctl_home):
    st = make_state(procs=[record("prefill-0", 123, "prefill"), record("proxy", 456, "proxy")])
    path = state.save(st)
    assert path == disaggctl_home / "demo" / "state.json"
    assert state.load("demo") == st
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.json"]
    assert state.deployments() == ["demo"]
    assert state.resolve_name(None) == "demo"
    assert state.proxy_url() == ("http://127.0.0.1:9", "demo")


def test_failed_write_keeps_the_previous_state(disaggctl_home, monkeypatch):
    old = make_state(procs=[record("a", 1)])
    state.save(old)
    new = make_state(procs=[record("a", 1), record("b", 2)])

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(state.os, "replace", broken_replace)
        with pytest.raises(OSError):
            state.save(new)
    assert state.load("demo") == old
    assert sorted(p.name for p in (disaggctl_home / "demo").iterdir()) == ["state.json"]


def mode(path) -> int:
    return os.stat(path).st_mode & 0o777


@pytest.fixture
def open_umask():
    """umask 0: what the code creates must be private by itself, not thanks to the caller's umask."""
    old = os.umask(0)
    yield
    os.umask(old)


def test_state_lock_and_directory_are_private(disaggctl_home, open_umask):
    # a deployment directory left open by an older version is tightened on the next write
    (disaggctl_home / "demo").mkdir(mode=0o755)
    path = state.save(make_state())
    with state.locked("demo"):
        pass
    assert mode(path) == 0o600
    assert mode(path.parent / ".lock") == 0o600
    assert mode(path.parent) == 0o700


def test_unreadable_state_is_a_clear_error(disaggctl_home):
    (disaggctl_home / "demo").mkdir()
    (disaggctl_home / "demo" / "state.json").write_text('{"name": "demo", "processes": [')
    with pytest.raises(state.StateError, match="state file .* is unreadable"):
        state.load("demo")


def test_lookup_without_or_with_several_deployments(disaggctl_home):
    with pytest.raises(state.NoDeployment):
        state.resolve_name(None)
    with pytest.raises(state.NoDeployment):
        state.resolve_name("nope")
    with pytest.raises(state.StateError, match="must be letters"):
        state.resolve_name("../etc")
    state.save(make_state("one"))
    state.save(make_state("two"))
    with pytest.raises(state.AmbiguousDeployment, match="one, two"):
        state.resolve_name(None)
    assert state.resolve_name("two") == "two"


def test_lock_excludes_a_second_holder(disaggctl_home):
    with state.locked("demo"):
        t0 = time.monotonic()
        with pytest.raises(state.StateError, match="locked by another disaggctl command"):
            with state.locked("demo", timeout_s=0.3):
                pass
        assert 0.3 <= time.monotonic() - t0 < 2
    with state.locked("demo", timeout_s=0.3):  # released on exit
        pass


def test_home_defaults_to_xdg_state(monkeypatch, tmp_path):
    monkeypatch.delenv("DISAGGCTL_HOME", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert state.home() == tmp_path / "disaggctl"


# -- local backend: identity and stop -------------------------------------------------------------------

SLEEPER = [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(120)"]

# Ignores SIGTERM, and starts a grandchild that leaves the process group with its own setsid.
STUBBORN = textwrap.dedent(
    """
    import os, signal, subprocess, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    kid = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    print("kid", kid.pid, flush=True)
    time.sleep(120)
    """
)


@pytest.fixture
def backend():
    b = LocalBackend()
    yield b
    for child in list(b._children.values()):  # nothing a failed test started may outlive it
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait(5)


@pytest.mark.slow
def test_start_records_identity_and_log(backend, tmp_path):
    rec = started(backend, Spec("w", SLEEPER, env={"MARK": "x y"}), str(tmp_path))
    assert rec.host == "local" and rec.log_path == str(tmp_path / "w.log")
    p = psutil.Process(rec.pid)
    assert os.getpgid(rec.pid) == rec.pid and os.getsid(rec.pid) == rec.pid  # own session and group
    assert float(rec.start_time) == pytest.approx(p.create_time())
    # once the process has logged, it has exec'd: before that /proc shows the forking parent's environment
    wait_for(lambda: backend.read_log(rec) == ["up"], 10, "the log line")
    assert p.environ()["MARK"] == "x y"
    assert backend.alive(rec)
    assert backend.stop(rec, 5) == "stopped"
    assert not backend.alive(rec) and not psutil.pid_exists(rec.pid)


@pytest.mark.slow
def test_start_hands_the_secret_over_by_file_name_and_keeps_files_private(
    backend, tmp_path, monkeypatch, open_umask
):
    key = DeploymentKey.generate()
    secret = key.write(tmp_path / "secret")
    # a key in the caller's own environment belongs to something else: it must not reach the process
    monkeypatch.setenv("DISAGGCTL_SECRET", "ab" * 16)
    run_dir = tmp_path / "logs"
    rec = started(backend, Spec("w", SLEEPER, env={"MARK": "x"}), str(run_dir), secret_file=str(secret))
    p = psutil.Process(rec.pid)
    wait_for(lambda: backend.read_log(rec) == ["up"], 10, "the log line")  # exec'd: its own environment
    environ = p.environ()
    assert environ["DISAGGCTL_SECRET_FILE"] == str(secret) and "DISAGGCTL_SECRET" not in environ
    assert DeploymentKey.from_env(environ).key_id == key.key_id
    assert not any(key.hex() in a or "DISAGGCTL" in a for a in p.cmdline())
    assert mode(run_dir) == 0o700 and mode(rec.log_path) == 0o600
    assert backend.stop(rec, 5) == "stopped"


@pytest.mark.slow
def test_reused_pid_is_never_signalled(backend, tmp_path):
    rec = started(backend, Spec("w", SLEEPER), str(tmp_path))
    other = rec.model_copy(update={"start_time": float(rec.start_time) - 100})  # as if the pid was reused
    assert not backend.alive(other)
    assert backend.stop(other, 1) == "gone"
    assert backend.alive(rec), "a record whose start time differs must not signal the live process"
    wrong_boot = rec.model_copy(update={"boot_id": "another-boot"})
    assert not backend.alive(wrong_boot) and backend.stop(wrong_boot, 1) == "gone"
    assert backend.alive(rec)
    assert backend.stop(rec, 5) == "stopped"


@pytest.mark.slow
def test_zombie_counts_as_dead(tmp_path):
    b = LocalBackend()
    rec = started(b, Spec("w", [sys.executable, "-c", "pass"]), str(tmp_path))
    child = b._children.pop(rec.pid)  # keep the backend from reaping it: it stays a zombie
    wait_for(lambda: psutil.Process(rec.pid).status() == psutil.STATUS_ZOMBIE, 10, "a zombie")
    assert not b.alive(rec)
    assert b.stop(rec, 1) == "gone"
    child.wait(5)


@pytest.mark.slow
def test_stop_kills_the_group_and_escaped_descendants(backend, tmp_path):
    rec = started(backend, Spec("stubborn", [sys.executable, "-c", STUBBORN]), str(tmp_path))
    wait_for(lambda: backend.read_log(rec), 10, "the grandchild's pid")
    kid = int(backend.read_log(rec)[0].split()[1])
    assert os.getpgid(kid) != rec.pid  # escaped the group
    t0 = time.monotonic()
    assert backend.stop(rec, 0.5) == "killed"  # ignores SIGTERM
    assert time.monotonic() - t0 < 5
    wait_for(
        lambda: not psutil.pid_exists(kid) or psutil.Process(kid).status() == psutil.STATUS_ZOMBIE, 5, "kid"
    )
    assert not psutil.pid_exists(rec.pid)


@pytest.mark.slow
def test_stale_record_with_a_surviving_group_member(tmp_path):
    """The leader crashed, its child lives on in the group: stop finds and stops the child."""
    b = LocalBackend()
    code = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); print('ok', flush=True)"
    rec = started(b, Spec("w", [sys.executable, "-c", code]), str(tmp_path))
    wait_for(lambda: not b.alive(rec), 10, "the leader to exit")
    survivors = [p for p in psutil.process_iter() if _pgid(p.pid) == rec.pid]
    assert survivors, "the child should still be running in the leader's group"
    assert b.stop(rec, 5) == "stopped"
    wait_for(
        lambda: not [p for p in psutil.process_iter() if _pgid(p.pid) == rec.pid], 5, "the group to empty"
    )


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def test_log_rotation_keeps_three(tmp_path):
    log = tmp_path / "w.log"
    for i in range(5):
        rotate(log)
        log.write_text(f"run {i}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.log", "w.log.1", "w.log.2"]
    assert [(tmp_path / n).read_text() for n in ("w.log", "w.log.1", "w.log.2")] == [
        "run 4\n",
        "run 3\n",
        "run 2\n",
    ]


def test_follow_log_yields_tail_then_new_lines_then_stops(backend, tmp_path):
    log = tmp_path / "w.log"
    log.write_text("one\ntwo\nthree\n")
    rec = record().model_copy(update={"log_path": str(log)})
    stop = threading.Event()
    got: list[str] = []
    reader = threading.Thread(
        target=lambda: got.extend(backend.follow_log(rec, tail=2, stop=stop)), daemon=True
    )
    reader.start()
    wait_for(lambda: got == ["two", "three"], 5, f"the last two lines, got {got}")
    with open(log, "a") as f:
        f.write("four\nfi")
        f.flush()
        time.sleep(0.5)
        f.write("ve\n")
    wait_for(lambda: got == ["two", "three", "four", "five"], 5, f"followed lines, got {got}")
    stop.set()
    reader.join(2)
    assert not reader.is_alive()


# -- health probe ---------------------------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    status = 503

    def do_GET(self):
        if self.path == "/slow":
            time.sleep(3)
        self.send_response(_Handler.status if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_health_probe_states():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        assert health.probe(url) == health.Health(False, 503, "loading")
        _Handler.status = 200
        assert health.probe(url).ok
        assert health.probe(url, "/other") == health.Health(False, 404, "HTTP 404")
        t0 = time.monotonic()
        slow = health.probe(url, "/slow", timeout_s=0.3)
        assert not slow.ok and "no answer" in slow.detail and time.monotonic() - t0 < 2
    finally:
        srv.shutdown()
        srv.server_close()
    assert health.probe(f"http://127.0.0.1:{free_port()}").detail == "not listening"
    assert not health.probe("ftp://x").ok


# -- supervisor pieces ----------------------------------------------------------------------------------


def test_levels_follow_the_start_order():
    roles = ["proxy", "decode", "prefill", "colocated", "prefill", "encoder"]
    grouped = supervisor.levels(list(enumerate(roles)), role=lambda it: it[1])
    assert [[r for _, r in g] for g in grouped] == [
        ["encoder"],
        ["prefill", "prefill"],
        ["decode"],
        ["colocated"],
        ["proxy"],
    ]


@pytest.mark.slow
def test_status_and_down_of_stale_state(disaggctl_home, tmp_path):
    """A record whose process died (killed -9) shows dead; down cleans the state without signalling."""
    b = LocalBackend()
    rec = started(b, Spec("colocated-0", SLEEPER), str(tmp_path))
    state.save(make_state(procs=[rec]))
    os.kill(rec.pid, signal.SIGKILL)
    b._children[rec.pid].wait(5)
    rows = supervisor.status(state.load("demo"))
    assert [(r.rec.name, r.alive, r.health, r.healthy) for r in rows] == [("colocated-0", False, None, False)]
    assert supervisor.down("demo", grace_s=1) == [("colocated-0", "gone")]
    assert state.load("demo") is None and state.deployments() == []


# -- log view -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_prefixes_and_colours(monkeypatch):
    p = logview.Prefixer(["prefill-0", "proxy"], colour=False)
    assert p("proxy", "hi") == "proxy     | hi"
    coloured = logview.Prefixer(["prefill-0", "proxy"], colour=True)("proxy", "hi")
    assert coloured == f"\x1b[{logview.colour_of('proxy')}mproxy     |\x1b[0m hi"
    assert logview.colour_of("decode-1") == logview.colour_of("decode-1")
    # stable across interpreters (not Python's per-process salted hash)
    other = subprocess.run(
        [sys.executable, "-c", "from disaggctl.launch.logview import colour_of; print(colour_of('decode-1'))"],
        capture_output=True, text=True, timeout=30, env={**os.environ, "PYTHONHASHSEED": "123"},
    )  # fmt: skip
    assert other.stdout.strip() == logview.colour_of("decode-1")

    class Tty:
        def __init__(self, tty: bool):
            self.tty = tty

        def isatty(self):
            return self.tty

    monkeypatch.delenv("NO_COLOR", raising=False)
    assert logview.want_colour(False, Tty(True)) and not logview.want_colour(True, Tty(True))
    assert not logview.want_colour(False, Tty(False))
    monkeypatch.setenv("NO_COLOR", "1")
    assert not logview.want_colour(False, Tty(True))


def test_select_by_name_or_role():
    recs = [
        record("prefill-0", role="prefill"),
        record("prefill-1", role="prefill"),
        record("proxy", role="proxy"),
    ]
    assert [r.name for r in logview.select(recs, "prefill")] == ["prefill-0", "prefill-1"]
    assert [r.name for r in logview.select(recs, "prefill-1")] == ["prefill-1"]
    assert len(logview.select(recs, None)) == 3
    with pytest.raises(ValueError, match="no process or role 'decode'"):
        logview.select(recs, "decode")


def test_a_host_backend_is_chosen_by_its_kind_and_an_unknown_one_is_named():
    assert launch_backend.backend_class("local") is LocalBackend
    with pytest.raises(ValueError, match=r"unknown launch backend 'slurm' \(known: local, ssh\)"):
        launch_backend.backend_class("slurm")
    older = HostRecord.model_validate({"name": "far", "address": "10.0.0.9", "local": False})
    assert older.backend == "ssh"  # a state file written before hosts named their backend
