"""Fixtures shared by every test module. Module-specific fixtures live beside their tests."""

from __future__ import annotations

import random
import socket
import sys
import time

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
