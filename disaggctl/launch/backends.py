"""What the launcher and the keeper share to reach processes: one backend per host, where a host's
processes keep their logs, and the record of a started process.

A host the plan marks `local` gets `local.LocalBackend`; any other host `ssh.SshBackend` (paramiko is
imported only then).
"""

from __future__ import annotations

import threading
from typing import Any

from disaggctl.launch import state
from disaggctl.launch.local import LocalBackend
from disaggctl.launch.state import HostRecord, ProcRecord


class Backends:
    """One backend per host for the lifetime of one command."""

    def __init__(self) -> None:
        self._local = LocalBackend()
        self._remote: dict[str, Any] = {}
        self._lock = threading.Lock()

    @property
    def local(self) -> LocalBackend:
        return self._local

    def get(self, host: HostRecord) -> Any:
        if host.local:
            return self._local
        with self._lock:
            if host.name not in self._remote:
                from disaggctl.launch.ssh import SshBackend

                self._remote[host.name] = SshBackend(host)
            return self._remote[host.name]

    def reached(self, name: str) -> bool:
        """Whether this command made a backend for the remote host `name`."""
        with self._lock:
            return name in self._remote


def described(rec: ProcRecord, spec: Any, spec_hash: str) -> ProcRecord:
    """A backend's record of a started process, with what `status` shows about it from its spec."""
    return rec.model_copy(
        update={
            "spec_hash": spec_hash,
            "role": spec.role,
            "address": spec.address,
            "gpus": list(spec.gpus or []),
            "nics": list(spec.nics or []),
            "tp": spec.tp,
            "port": spec.port,
            "bootstrap_port": spec.bootstrap_port,
            "health_path": spec.health_path or "/health",
        }
    )


def run_dir(deployment: str, host: HostRecord) -> str:
    if host.local:
        return str(state.log_dir(deployment))
    return host.run_dir or f"~/.disaggctl/run/{deployment}"
