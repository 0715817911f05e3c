"""Fixtures shared by every test module. Module-specific fixtures live beside their tests."""

from __future__ import annotations

import socket
import sys

import pytest


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
