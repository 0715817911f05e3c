"""Fixtures shared by every test module. Module-specific fixtures live beside their tests."""

from __future__ import annotations

import os
import random
import signal
import socket
import sys
import time

import psutil
import pytest


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_block(n: int) -> int:
    """The first of `n` consecutive free loopback ports: replicas of a role listen on `port`, `port + 1`, ...
    (a lone free port's neighbour may be any process's)."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 60000 - n)
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports found")


def wait_for(check, timeout_s: float, what: str, interval: float = 0.1):
    """Poll `check` until it returns something truthy (returned), or fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval)


def reap(home_prefix: str) -> list[int]:
    """Kill what a test's deployments left running: every process whose DISAGGCTL_HOME lies under
    `home_prefix`, with its process group (servers start in groups of their own). A test's own `down`
    and assertions come first; this runs after them, so a failed or hung `down` leaks nothing."""
    me, my_group = os.getpid(), os.getpgrp()
    killed = []
    for proc in psutil.process_iter():
        try:
            if proc.pid == me or not proc.environ().get("DISAGGCTL_HOME", "").startswith(home_prefix):
                continue
            group = os.getpgid(proc.pid)
            if group == my_group:
                os.kill(proc.pid, signal.SIGKILL)
            else:
                os.killpg(group, signal.SIGKILL)
            killed.append(proc.pid)
        except (psutil.Error, OSError):
            continue
    return killed


@pytest.fixture(autouse=True)
def _reap_test_deployments(request):
    # taken now, so tmp_path outlives this fixture's teardown
    tmp = request.getfixturevalue("tmp_path") if "tmp_path" in request.fixturenames else None
    yield
    if tmp is not None:
        reap(str(tmp))


@pytest.fixture(autouse=True, scope="session")
def _reap_session_deployments(tmp_path_factory):
    yield
    reap(str(tmp_path_factory.getbasetemp()))  # module-scoped deployments (tmp_path_factory) too


@pytest.fixture
def disaggctl_home(tmp_path, monkeypatch):
    """A private state directory, so tests never see each other's (or a user's) deployments."""
    home = tmp_path / "disaggctl-home"
    home.mkdir()
    monkeypatch.setenv("DISAGGCTL_HOME", str(home))
    return home


@pytest.fixture
def cli():
    """argv prefix that runs this checkout's CLI with the interpreter running the tests."""
    return [sys.executable, "-m", "disaggctl"]
