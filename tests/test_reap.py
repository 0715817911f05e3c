"""The suite's safety net: what a test's deployment leaves running is killed after the test."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import reap, wait_for


def test_reap_kills_a_leftover_deployment_process_and_its_group(tmp_path):
    home = tmp_path / "home"
    env = {**os.environ, "DISAGGCTL_HOME": str(home)}
    # a server's shape: its own session, a child in its group (which inherits the variable)
    code = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); time.sleep(600)"
    leader = subprocess.Popen([sys.executable, "-c", code], env=env, start_new_session=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    try:
        wait_for(lambda: len(_group(leader.pid)) == 2, 10, "the leftover's child")
        killed = reap(str(tmp_path))
        assert leader.pid in killed and other.pid not in killed  # the other has no DISAGGCTL_HOME under it
        assert leader.wait(10) == -9
        wait_for(lambda: not _group(leader.pid), 10, "the leftover's group to be gone")
        assert other.poll() is None
    finally:
        for p in (leader, other):
            p.kill()
            p.wait(10)


def _group(pgid: int) -> list[int]:
    import psutil

    out = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        except (OSError, psutil.Error):
            continue
    return out
