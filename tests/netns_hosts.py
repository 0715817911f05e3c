"""Two "hosts" on one machine: network namespaces with their own sshd, behind a private switch namespace.

Layout (all addresses exist only inside namespaces this fixture creates, so nothing can leave the box):

    <prefix>-sw   bridge br0 10.N.M.1/24   the controller runs here (see `NetnsLab.controller`)
    <prefix>-h0   eth0 10.N.M.11/24        sshd on :22, hostname h0 (own UTS namespace)
    <prefix>-h1   eth0 10.N.M.12/24        sshd on :22, hostname h1

Every host gets its own generated host key; one client key is authorized on all of them and a
known_hosts file pins the generated host keys (no trust-on-first-use). Teardown kills every process
left in the namespaces (sshd and whatever the tests launched through it), then deletes them.

Use from a test module with `pytest_plugins = ["netns_hosts"]` and the `netns_lab` fixture.
Needs root, iproute2, util-linux `unshare` and openssh-server; otherwise the fixture skips and says why.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

CLONE_NEWNET = 0x40000000
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


@dataclass
class NetnsHost:
    name: str
    address: str
    netns: str
    host_key: Path
    sshd: subprocess.Popen | None = None


@dataclass
class NetnsLab:
    switch: str
    switch_address: str
    hosts: list[NetnsHost]
    workdir: Path
    client_key: Path
    known_hosts: Path
    user: str = "root"
    spare_address: str = ""  # in the subnet, assigned to nobody: an unreachable host
    _namespaces: list[str] = field(default_factory=list)

    def host(self, name: str) -> NetnsHost:
        return next(h for h in self.hosts if h.name == name)

    def exec_in(self, netns: str, argv: list[str], timeout: float = 20) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["ip", "netns", "exec", netns, *argv], capture_output=True, text=True, timeout=timeout
        )

    def pids(self, netns: str) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True, timeout=10)
        return [int(p) for p in out.stdout.split()]

    def ssh_settings(self, **overrides) -> dict:
        settings = {
            "user": self.user,
            "port": 22,
            "key": str(self.client_key),
            "known_hosts": str(self.known_hosts),
        }
        settings.update(overrides)
        return settings

    @contextlib.contextmanager
    def controller(self):
        """Run the calling thread (and threads it starts meanwhile) inside the switch namespace.

        The network namespace is per thread, so this affects only sockets opened by this thread and
        by threads it creates while inside; the previous namespace is restored on exit.
        """
        libc = ctypes.CDLL(None, use_errno=True)
        own = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{self.switch}", os.O_RDONLY)
        try:
            if libc.setns(target, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns into the switch namespace failed")
            try:
                yield self
            finally:
                if libc.setns(own, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns back to the original namespace failed")
        finally:
            os.close(own)
            os.close(target)


def _run(argv: list[str], timeout: float = 20) -> None:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({res.returncode}): {res.stderr.strip()}")


def _missing_prerequisite() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "unshare", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (iproute2 / util-linux / openssh-client)"
    if not os.access(SSHD, os.X_OK):
        return "sshd is not installed (apt-get install openssh-server)"
    return None


def _sshd_config(host: NetnsHost, lab_dir: Path) -> Path:
    conf = lab_dir / f"sshd_{host.name}.conf"
    conf.write_text(
        "\n".join(
            [
                f"ListenAddress {host.address}",
                "Port 22",
                f"HostKey {host.host_key}",
                f"PidFile {lab_dir}/sshd_{host.name}.pid",
                f"AuthorizedKeysFile {lab_dir}/authorized_keys",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "PermitRootLogin prohibit-password",
                "UsePAM no",
                "StrictModes no",
                "MaxStartups 100",
                "",
            ]
        )
    )
    return conf


def _wait_listening(log: Path, sshd: subprocess.Popen, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and "Server listening" in log.read_text(errors="replace"):
            return
        if sshd.poll() is not None:
            break
        time.sleep(0.05)
    text = log.read_text(errors="replace") if log.exists() else ""
    raise RuntimeError(f"sshd did not start listening within {timeout} s: {text[-2000:]}")


def teardown(lab: NetnsLab) -> None:
    """Kill every process in our namespaces (a namespace with live processes outlives `ip netns del`)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for ns in lab._namespaces:
            for pid in lab.pids(ns):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        if sig == signal.SIGTERM:
            time.sleep(0.3)
    for host in lab.hosts:
        if host.sshd is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                host.sshd.wait(timeout=5)
    for ns in reversed(lab._namespaces):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def make_lab(lab_dir: Path, n_hosts: int = 2) -> NetnsLab:
    prefix = f"dctl{os.getpid() % 100000}{random.randrange(36**3):03x}"
    net = f"10.{random.randrange(64, 250)}.{random.randrange(1, 250)}"
    lab = NetnsLab(
        switch=f"{prefix}-sw",
        switch_address=f"{net}.1",
        hosts=[],
        workdir=lab_dir,
        client_key=lab_dir / "client",
        known_hosts=lab_dir / "known_hosts",
        spare_address=f"{net}.99",
    )
    try:
        _run(["ip", "netns", "add", lab.switch])
        lab._namespaces.append(lab.switch)
        sw = ["ip", "-n", lab.switch]
        _run([*sw, "link", "set", "lo", "up"])
        _run([*sw, "link", "add", "br0", "type", "bridge"])
        _run([*sw, "addr", "add", f"{lab.switch_address}/24", "dev", "br0"])
        _run([*sw, "link", "set", "br0", "up"])
        _run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "disaggctl-test", "-f", str(lab.client_key)]
        )
        (lab_dir / "authorized_keys").write_text((lab_dir / "client.pub").read_text())
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege-separation directory on Debian
        known = []
        for i in range(n_hosts):
            host = NetnsHost(
                name=f"h{i}",
                address=f"{net}.{11 + i}",
                netns=f"{prefix}-h{i}",
                host_key=lab_dir / f"host_h{i}",
            )
            _run(["ip", "netns", "add", host.netns])
            lab._namespaces.append(host.netns)
            lab.hosts.append(host)
            _run([*sw, "link", "add", f"v{i}", "type", "veth", "peer", "name", "eth0", "netns", host.netns])
            _run([*sw, "link", "set", f"v{i}", "master", "br0", "up"])
            hn = ["ip", "-n", host.netns]
            _run([*hn, "addr", "add", f"{host.address}/24", "dev", "eth0"])
            _run([*hn, "link", "set", "eth0", "up"])
            _run([*hn, "link", "set", "lo", "up"])
            _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", host.name, "-f", str(host.host_key)])
            pub = (lab_dir / f"host_h{i}.pub").read_text().split()
            known.append(f"{host.address} {pub[0]} {pub[1]}")
            conf = _sshd_config(host, lab_dir)
            log = lab_dir / f"sshd_{host.name}.log"
            host.sshd = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    host.netns,
                    "unshare",
                    "--uts",
                    "sh",
                    "-c",
                    f'hostname {host.name} && exec {SSHD} -D -f "$0" -E "$1"',
                    str(conf),
                    str(log),
                ],  # fmt: skip
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        lab.known_hosts.write_text("\n".join(known) + "\n")
        for host in lab.hosts:
            _wait_listening(lab_dir / f"sshd_{host.name}.log", host.sshd)
    except Exception:
        teardown(lab)
        raise
    return lab


@pytest.fixture(scope="module")
def netns_lab(tmp_path_factory):
    """A switch namespace and two sshd hosts (h0, h1); torn down after the module."""
    reason = _missing_prerequisite()
    if reason:
        pytest.skip(f"multi-host SSH tests skipped: {reason}")
    lab_dir = tmp_path_factory.mktemp("netns-lab")
    try:
        lab = make_lab(lab_dir)
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        if "Operation not permitted" in str(e) or "Permission denied" in str(e):
            pytest.skip(f"multi-host SSH tests skipped: cannot create network namespaces: {e}")
        raise
    try:
        yield lab
    finally:
        teardown(lab)
