"""Launch backend for this machine: one session/process group per process, output to a log file.

A process is identified by (pid, psutil create_time, boot_id): a pid that was reused, or a record from
before a reboot, is never mistaken for ours and never signalled.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

from disaggctl.launch import preflight, state
from disaggctl.launch.backend import Started
from disaggctl.launch.state import ProcRecord, private_dir
from disaggctl.trust import ENV_FILE, ENV_HEX

KEEP_LOGS = 3  # <name>.log plus <name>.log.1 .. .2
KILL_WAIT_S = 10.0


def boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def rotate(log: Path, keep: int = KEEP_LOGS) -> None:
    """log -> log.1 -> log.2 ...; the oldest falls off."""
    for i in range(keep - 1, 0, -1):
        older = log.with_name(f"{log.name}.{i}")
        newer = log if i == 1 else log.with_name(f"{log.name}.{i - 1}")
        if newer.exists():
            os.replace(newer, older)


def _private_log(path: Path):
    """The log opened for appending, readable by its owner only (a log may quote requests and settings)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.fchmod(fd, 0o600)  # a log left by an older version keeps its mode otherwise
        return os.fdopen(fd, "ab")
    except BaseException:
        os.close(fd)
        raise


def _gone(p: psutil.Process) -> bool:
    try:
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _run(command: str, timeout: float) -> tuple[int, str, str]:
    try:
        r = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return 124, "", f"timed out after {timeout:g} s"
    return r.returncode, r.stdout, r.stderr


class LocalBackend:
    """The launch backend (launch/backend.py) for processes on this machine."""

    kind = "local"

    def __init__(self, host: Any = None) -> None:
        # Popen objects of what this CLI invocation started: polling them reaps our own zombies and
        # gives the exit code when a process dies while `up` waits for it.
        self._children: dict[int, subprocess.Popen] = {}

    @classmethod
    def preflight(
        cls, host: Any, processes: list, sglang_version: str | None, connect_timeout_s: float
    ) -> list[preflight.Problem]:
        """The same checks as on a remote host, through `sh -c`."""
        return preflight.check_host(host, processes, _run, sglang_version)

    def run_dir(self, deployment: str) -> str:
        return str(state.log_dir(deployment))

    def remove_private_files(self, recs: list[ProcRecord]) -> None:
        """Nothing: local processes read the deployment's own secret file, which `down` removes."""

    # -- start --------------------------------------------------------------------------------------

    def start(self, spec: Any, run_dir: str, secret_file: str | None = None) -> Started:
        """Start `spec` with its output in `run_dir`/NAME.log; `secret_file` (the deployment secret, a
        0600 file) is handed over by name in the environment, never on the command line."""
        directory = private_dir(run_dir)
        log_path = directory / f"{spec.name}.log"
        rotate(log_path)
        env = {**os.environ, **{k: str(v) for k, v in (spec.env or {}).items()}}
        if secret_file is not None:
            env.pop(ENV_HEX, None)  # a key from the caller's own environment is not this deployment's
            env[ENV_FILE] = str(secret_file)
        with _private_log(log_path) as log:
            try:
                proc = subprocess.Popen(
                    [str(a) for a in spec.argv],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    close_fds=True,
                    start_new_session=True,  # own session and group: Ctrl-C here never reaches it
                )
            except OSError as e:
                raise RuntimeError(f"cannot start {spec.name}: {spec.argv[0]}: {e.strerror}") from e
        self._children[proc.pid] = proc
        # The child cannot have been reaped yet (only we could), so its create_time is readable.
        created = psutil.Process(proc.pid).create_time()
        return Started(pid=proc.pid, start_time=created, boot_id=boot_id(), log_path=str(log_path))

    # -- identity -----------------------------------------------------------------------------------

    def process(self, rec: ProcRecord) -> psutil.Process | None:
        """The live process the record names, or None if it is gone, a zombie, or the pid was reused."""
        child = self._children.get(rec.pid)
        if child is not None:
            child.poll()
        if self._other_boot(rec):
            return None
        try:
            p = psutil.Process(rec.pid)
            same = abs(p.create_time() - float(rec.start_time)) < 0.05
        except (psutil.NoSuchProcess, ValueError):
            return None
        if not same or _gone(p):
            return None
        return p

    def alive(self, rec: ProcRecord) -> bool:
        return self.process(rec) is not None

    def exit_code(self, rec: ProcRecord) -> int | None:
        """The exit status of a process this invocation started and that has ended, else None."""
        child = self._children.get(rec.pid)
        return None if child is None else child.poll()

    # -- stop ---------------------------------------------------------------------------------------

    def stop(self, rec: ProcRecord, grace_s: float) -> str:
        """TERM the process group (and descendants that left it), wait `grace_s`, KILL what is left.
        -> "stopped" | "killed" | "gone"."""
        pgid = rec.pid  # start_new_session made it the group leader
        leader = self.process(rec)
        if leader is None:
            self._reap(rec)
            if self._other_boot(rec) or self._pid_reused(rec):
                return "gone"
            # The leader died but members of its group may live on. Linux never hands out a pid that is
            # still some group's id, so a group with this id is still the one our leader created.
            tree = self._group(pgid)
            if not tree:
                return "gone"
        else:
            # Snapshot before signalling: a descendant that called setsid is no longer in the group and
            # would be orphaned (and unfindable) once its parent dies.
            tree = [leader]
            with contextlib.suppress(psutil.NoSuchProcess):
                tree += leader.children(recursive=True)
            tree += [p for p in self._group(pgid) if p.pid not in {t.pid for t in tree}]
        self._signal(pgid, tree, signal.SIGTERM)
        if self._wait(pgid, tree, grace_s, rec):
            return "stopped"
        self._signal(pgid, tree, signal.SIGKILL)
        if self._wait(pgid, tree, KILL_WAIT_S, rec):
            return "killed"
        left = [p.pid for p in tree if not _gone(p)] + [p.pid for p in self._group(pgid)]
        raise RuntimeError(f"{rec.name}: still running after SIGKILL: {sorted(set(left))}")

    @staticmethod
    def _other_boot(rec: ProcRecord) -> bool:
        now = boot_id()
        return bool(rec.boot_id and now and rec.boot_id != now)

    @staticmethod
    def _pid_reused(rec: ProcRecord) -> bool:
        try:
            p = psutil.Process(rec.pid)
            return not _gone(p) and abs(p.create_time() - float(rec.start_time)) >= 0.05
        except (psutil.NoSuchProcess, ValueError):
            return False

    @staticmethod
    def _group(pgid: int) -> list[psutil.Process]:
        members = []
        for p in psutil.process_iter():
            try:
                if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                    members.append(p)
            except (OSError, psutil.NoSuchProcess):
                continue
        return members

    @staticmethod
    def _signal(pgid: int, tree: list[psutil.Process], sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
        for p in tree:
            # psutil refuses to signal a Process whose pid was reused since the snapshot
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                p.send_signal(sig)

    def _wait(self, pgid: int, tree: list[psutil.Process], timeout_s: float, rec: ProcRecord) -> bool:
        deadline = time.monotonic() + timeout_s
        while True:
            self._reap(rec)
            if all(_gone(p) for p in tree) and not self._group(pgid):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def _reap(self, rec: ProcRecord) -> None:
        child = self._children.get(rec.pid)
        if child is not None:
            child.poll()

    # -- logs ---------------------------------------------------------------------------------------

    def read_log(self, rec: ProcRecord, tail: int | None = None) -> list[str]:
        """The log's lines (the last `tail` ones if given); [] when there is no log."""
        try:
            with open(rec.log_path, "rb") as f:
                lines = f.read().decode(errors="replace").splitlines()
        except FileNotFoundError:
            return []
        return lines if tail is None else lines[-tail:] if tail > 0 else []

    def follow_log(
        self, rec: ProcRecord, tail: int = 0, stop: threading.Event | None = None
    ) -> Iterator[str]:
        """The last `tail` lines, then new lines as they are written; follows a rotated (new) file.
        Ends when `stop` is set (checked about five times a second) or when the generator is closed."""
        path = rec.log_path
        f = None
        inode = None
        buf = b""
        try:
            with contextlib.suppress(FileNotFoundError):
                f = open(path, "rb")
                inode = os.fstat(f.fileno()).st_ino
                *old, buf = f.read().split(b"\n")
                for raw in old[-tail:] if tail > 0 else []:
                    yield raw.decode(errors="replace")
            while stop is None or not stop.is_set():
                if f is None:
                    try:
                        f = open(path, "rb")
                    except FileNotFoundError:
                        time.sleep(0.2)
                        continue
                    inode = os.fstat(f.fileno()).st_ino
                chunk = f.read(65536)
                if chunk:
                    buf += chunk
                    *lines, buf = buf.split(b"\n")
                    for raw in lines:
                        yield raw.decode(errors="replace")
                    continue
                try:
                    if os.stat(path).st_ino != inode:  # rotated by a new `up`: read the new file
                        f.close()
                        f, buf = None, b""
                        continue
                except FileNotFoundError:
                    pass
                time.sleep(0.2)
        finally:
            if f is not None:
                f.close()
