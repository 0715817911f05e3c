"""The launch backend seam: how the launcher reaches the processes of one host.

A backend starts a process of the plan on its host and answers for it afterwards: whether that very
instance is alive (never a reused pid), how it exited, stopping it, its log, and the host's pre-flight
checks. Its `start` returns what identifies the instance (`Started`); `record` turns that into the
state's ProcRecord, the one place a process's record is made (by `up` and by the keeper alike).

A host's `backend` in the plan (default `local` for this machine's addresses, `ssh` for any other)
picks the class from REGISTRY, imported on first use: paramiko is imported only when a host needs SSH.
A new kind of backend (Kubernetes, Slurm) is one module with a class like these and one line here.
"""

from __future__ import annotations

import importlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from disaggctl.launch.state import HostRecord, ProcRecord

# host kind -> "module:class"
REGISTRY: dict[str, str] = {
    "local": "disaggctl.launch.local:LocalBackend",
    "ssh": "disaggctl.launch.ssh:SshBackend",
}


@dataclass(frozen=True)
class Started:
    """What identifies a started instance: a later check compares all of it, so a reused pid or a
    record from before a reboot is never taken for this process."""

    pid: int
    start_time: float | str  # psutil create_time locally; /proc start ticks remotely
    boot_id: str | None
    log_path: str


class Backend(Protocol):
    kind: ClassVar[str]

    def __init__(self, host: Any) -> None: ...

    def run_dir(self, deployment: str) -> str:
        """Where the host keeps the deployment's logs (and what start leaves beside them)."""
        ...

    def start(self, spec: Any, run_dir: str, secret_file: str | None = None) -> Started:
        """Start the plan's process `spec`; `secret_file` is the local 0600 file of the deployment
        secret, which the process gets by name (never by value on a command line)."""
        ...

    def alive(self, rec: ProcRecord) -> bool:
        """Whether the instance `rec` names runs; raises when the host cannot be asked."""
        ...

    def exit_code(self, rec: ProcRecord) -> int | None:
        """How the instance ended, when the backend knows (else None)."""
        ...

    def stop(self, rec: ProcRecord, grace_s: float) -> str:
        """TERM, wait `grace_s`, KILL. -> "stopped" | "killed" | "gone"."""
        ...

    def read_log(self, rec: ProcRecord, tail: int | None = None) -> list[str]: ...

    def follow_log(
        self, rec: ProcRecord, tail: int = 0, stop: threading.Event | None = None
    ) -> Iterator[str]: ...

    def remove_private_files(self, recs: list[ProcRecord]) -> None:
        """Remove the copies of the secret that `start` made on the host for these (stopped) processes."""
        ...

    @classmethod
    def preflight(
        cls, host: Any, processes: list, sglang_version: str | None, connect_timeout_s: float
    ) -> list:
        """The host's pre-flight problems (launch/preflight.py's Problem) for `processes`, before
        anything starts."""
        ...


def backend_class(kind: str) -> type[Backend]:
    try:
        module, _, name = REGISTRY[kind].partition(":")
    except KeyError:
        raise ValueError(f"unknown launch backend {kind!r} (known: {', '.join(REGISTRY)})") from None
    return getattr(importlib.import_module(module), name)


class Backends:
    """One backend per host for the lifetime of one command."""

    def __init__(self) -> None:
        self._made: dict[str, Backend] = {}
        self._lock = threading.Lock()

    def get(self, host: HostRecord) -> Backend:
        with self._lock:
            if host.name not in self._made:
                self._made[host.name] = backend_class(host.backend)(host)
            return self._made[host.name]

    def reached(self, name: str) -> bool:
        """Whether this command made a backend for the host `name`."""
        with self._lock:
            return name in self._made


def record(spec: Any, started: Started, spec_hash: str) -> ProcRecord:
    """The state's record of the plan's process `spec`, started as `started`."""
    return ProcRecord(
        name=spec.name,
        host=spec.host,
        pid=started.pid,
        start_time=started.start_time,
        boot_id=started.boot_id,
        log_path=started.log_path,
        started_at=time.time(),
        spec_hash=spec_hash,
        url=spec.url,
        role=spec.role,
        address=spec.address,
        gpus=list(spec.gpus),
        nics=list(spec.nics),
        tp=spec.tp,
        port=spec.port,
        bootstrap_port=spec.bootstrap_port,
        health_path=spec.health_path,
    )
