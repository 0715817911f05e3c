"""The state of a deployment: one JSON file per deployment, written atomically, guarded by a lock.

Layout: `$DISAGGCTL_HOME/<name>/` (default `$XDG_STATE_HOME/disaggctl/<name>/`, i.e.
`~/.local/state/disaggctl/<name>/`) holds `state.json`, `.lock`, `secret` (the deployment secret, while
anything of the deployment runs), `logs/` (local processes' logs), and the keeper's `keeper.json` (the
plan it restarts processes from) and `keeper.log`. The directory is 0700 and every
file in it 0600: logs and the environment of processes may hold what other users must not read.
The state is rewritten after every process start, so that `down` can clean up after an `up` that failed
half-way. Only stdlib and pydantic here: `disaggctl status` reads this module and must start fast.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError, model_validator

SCHEMA_VERSION = 1
STATE_FILE = "state.json"
LOCK_FILE = ".lock"
SECRET_FILE = "secret"
KEEPER_PLAN = "keeper.json"
KEEPER_LOG = "keeper.log"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class StateError(RuntimeError):
    """A state file or lock problem, with a one-line message for the user."""


class ProcRecord(BaseModel):
    """What the state keeps per started process (docs/architecture.md), plus what `status` shows."""

    name: str
    host: str
    pid: int
    start_time: float | str  # psutil create_time locally; /proc start ticks remotely
    boot_id: str | None = None
    log_path: str
    started_at: float
    spec_hash: str
    url: str
    role: str = ""
    address: str = ""
    gpus: list[int] = []
    nics: list[str] = []
    tp: int = 1  # ranks of the server (one process each, started by the server itself)
    port: int | None = None
    bootstrap_port: int | None = None
    health_path: str = "/health"
    # written by the keeper (launch/keeper.py): how often it restarted this process, and what it is
    # doing about it now ("" while it runs as started; see keeper.STATES)
    restarts: int = 0
    keeper_state: str = ""
    last_exit: str | None = None  # how the last instance ended, e.g. "killed by SIGKILL", "exit status 1"
    exited_at: float | None = None
    next_restart_at: float | None = None  # wall clock, while keeper_state is "backoff"
    log_tail: list[str] = []  # the last lines of the instance that ended, kept past the log's rotation


class HostRecord(BaseModel):
    """Enough of a HostSpec to reach the host again without the topology file."""

    name: str
    address: str
    local: bool = True
    # the launch backend that reaches it (launch/backend.py); a state written before hosts named theirs
    # has local (this machine) or ssh
    backend: str = ""
    python: str | None = None
    run_dir: str | None = None
    ssh: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _backend_of_older_state(self) -> HostRecord:
        if not self.backend:
            self.backend = "local" if self.local else "ssh"
        return self


class DeploymentState(BaseModel):
    schema_version: int = SCHEMA_VERSION
    name: str
    source: str = ""
    engine: str = "embedded"
    kind: str = ""
    created_at: float
    hosts: list[HostRecord] = []
    processes: list[ProcRecord] = []
    # the keeper process `up` leaves running (not one of the plan's processes)
    keeper: ProcRecord | None = None

    def host(self, name: str) -> HostRecord:
        for h in self.hosts:
            if h.name == name:
                return h
        raise StateError(f"state of {self.name}: process on unknown host {name!r}")

    def proxy(self) -> ProcRecord | None:
        for p in self.processes:
            if p.role == "proxy":
                return p
        return None


def home() -> Path:
    """Where deployments live: $DISAGGCTL_HOME, else $XDG_STATE_HOME/disaggctl, else ~/.local/state/disaggctl."""
    explicit = os.environ.get("DISAGGCTL_HOME")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "state"
    return base / "disaggctl"


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise StateError(f"deployment name {name!r} must be letters, digits, '.', '_' or '-'")
    return name


def deployment_dir(name: str) -> Path:
    return home() / check_name(name)


def state_path(name: str) -> Path:
    return deployment_dir(name) / STATE_FILE


def log_dir(name: str) -> Path:
    return deployment_dir(name) / "logs"


def secret_path(name: str) -> Path:
    return deployment_dir(name) / SECRET_FILE


def keeper_plan_path(name: str) -> Path:
    return deployment_dir(name) / KEEPER_PLAN


def keeper_log_path(name: str) -> Path:
    return deployment_dir(name) / KEEPER_LOG


def private_dir(path: str | Path) -> Path:
    """Make `path` (and missing parents) a directory only its owner can enter: 0700 whatever the umask.
    An existing directory is tightened too, so state written by an older version becomes private."""
    path = Path(path).expanduser()
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def ensure_deployment_dir(name: str) -> Path:
    return private_dir(deployment_dir(name))


def load(name: str) -> DeploymentState | None:
    """The deployment's state, or None when it has none."""
    path = state_path(name)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StateError(f"cannot read {path}: {e.strerror}") from e
    try:
        return DeploymentState.model_validate(json.loads(text))
    except (ValueError, ValidationError) as e:
        first = str(e).splitlines()[0]
        raise StateError(f"state file {path} is unreadable ({first}); remove it after checking") from e


def save(st: DeploymentState) -> Path:
    """Write the state atomically: a temp file in the same directory, fsync, rename, fsync the directory."""
    ensure_deployment_dir(st.name)
    return write_private(state_path(st.name), st.model_dump_json(indent=2).encode())


def write_private(path: Path, data: bytes) -> Path:
    """Replace `path` with `data` atomically, readable by its owner only."""
    # mkstemp creates the file 0600, and the rename keeps that mode
    fd, tmp = tempfile.mkstemp(prefix=".state-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def remove(name: str) -> None:
    """Forget the deployment (its logs stay for the post-mortem)."""
    with contextlib.suppress(FileNotFoundError):
        state_path(name).unlink()


def remove_keeper_plan(name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        keeper_plan_path(name).unlink()


def remove_secret(name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        secret_path(name).unlink()


def deployments() -> list[str]:
    """Names of every deployment that has a state file, sorted."""
    base = home()
    if not base.is_dir():
        return []
    return sorted(d.name for d in base.iterdir() if (d / STATE_FILE).is_file())


def resolve_name(name: str | None) -> str:
    """`name` if given, else the only deployment there is; NoDeployment or AmbiguousDeployment otherwise."""
    if name:
        check_name(name)
        if not state_path(name).is_file():
            raise NoDeployment(f"no deployment named {name!r} (state in {home()})")
        return name
    names = deployments()
    if not names:
        raise NoDeployment(f"no deployment is running (no state in {home()})")
    if len(names) > 1:
        raise AmbiguousDeployment(f"several deployments: {', '.join(names)}; pick one with --name")
    return names[0]


class NoDeployment(StateError):
    pass


class AmbiguousDeployment(StateError):
    pass


@contextlib.contextmanager
def locked(name: str, timeout_s: float = 10.0) -> Iterator[None]:
    """An exclusive flock on the deployment, so two `up`/`down` never interleave. The lock file is never
    deleted (deleting it would let a second process lock a fresh inode while the first still holds the old)."""
    path = ensure_deployment_dir(name) / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise StateError(f"cannot lock {path}: {e.strerror}") from e
                if time.monotonic() > deadline:
                    raise StateError(
                        f"deployment {name} is locked by another disaggctl command (up or down); "
                        f"waited {timeout_s:g} s"
                    ) from None
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)  # releases the lock


def proxy_url() -> tuple[str, str] | None:
    """(proxy URL, deployment name) of the only deployment with a proxy, or None. Used by `bench`."""
    found = []
    for name in deployments():
        try:
            st = load(name)
        except StateError:
            continue
        proxy = st.proxy() if st else None
        if proxy is not None:
            found.append((proxy.url, name))
    return found[0] if len(found) == 1 else None
