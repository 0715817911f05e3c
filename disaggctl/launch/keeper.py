"""The keeper: the small process `up` leaves running, which restarts the deployment's processes that die,
by their `restart` policy (launch/restart.py), and says in the state file what it did.

It restarts a process exactly as `up` started it: the spec from the plan `up` wrote for it
(`keeper.json`), the same ports, the deployment's secret file, through the same backend; and then waits
for its health (the proxy takes a worker back only once its own probes see it healthy). Every change to
the state is made under the deployment's lock, after re-reading the state, so `up` and `down` (which
stop the keeper first, holding that lock) never race it. It polls; it holds the lock only to start a
process and to record what happened, never while a process loads.

Run as `python -m disaggctl.launch.keeper NAME`, started by `up` (`start`), stopped by `down` (`stop`).
It exits by itself once the state no longer names it as the keeper (another `up` replaced it, or the
deployment is gone). Control plane: no torch, no runtime.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import psutil

from disaggctl.launch import health, local, restart, state
from disaggctl.launch.backend import Backend, Backends, record
from disaggctl.launch.state import DeploymentState, ProcRecord
from disaggctl.trust import ENV_HEX

log = logging.getLogger("disaggctl.keeper")

POLL_S = 1.0
# `up` and `down` hold the lock for long; the keeper never waits for it, it tries again next round
LOCK_WAIT_S = 0.5
# a dead process's group members (holding its ports) are stopped before it is started again
LEFTOVER_GRACE_S = 5.0
LOG_TAIL = 20
NAME = "keeper"


# -- started and stopped by up / down ------------------------------------------------------------------


def start(plan: Any) -> ProcRecord:
    """Write the plan the keeper restarts from and start it; its record (not yet in the state)."""
    name = plan.name
    state.ensure_deployment_dir(name)
    data = plan.model_dump_json().encode()
    state.write_private(state.keeper_plan_path(name), data)
    log_path = state.keeper_log_path(name)
    local.rotate(log_path)
    # the keeper hands processes the secret's file, as `up` does; it needs no key of its own
    env = {k: v for k, v in os.environ.items() if k != ENV_HEX}
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "disaggctl.launch.keeper", name],
            stdin=subprocess.DEVNULL,
            stdout=fd,
            stderr=subprocess.STDOUT,
            env=env,
            close_fds=True,
            start_new_session=True,  # outlives `up`, never gets its terminal's signals
        )
    finally:
        os.close(fd)
    host = next((h.name for h in plan.hosts if h.local), "localhost")
    return ProcRecord(
        name=NAME,
        host=host,
        pid=proc.pid,
        start_time=psutil.Process(proc.pid).create_time(),
        boot_id=local.boot_id(),
        log_path=str(log_path),
        started_at=time.time(),
        spec_hash=hashlib.sha256(data).hexdigest()[:16],
        url="",
        role=NAME,
    )


def stop(rec: ProcRecord, grace_s: float) -> str:
    """SIGTERM the keeper alone, SIGKILL after `grace_s`. -> "stopped" | "killed" | "gone". Not the
    backend's stop, which takes descendants along: the processes the keeper restarted are its children,
    and `down` stops them in their own order."""
    proc = local.LocalBackend().process(rec)
    if proc is None:
        return "gone"
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, local.KILL_WAIT_S)):
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(sig)
        with contextlib.suppress(psutil.TimeoutExpired):
            proc.wait(wait_s)
            return "stopped" if sig == signal.SIGTERM else "killed"
    raise RuntimeError(f"keeper (pid {rec.pid}) still running after SIGKILL")


# -- the process ---------------------------------------------------------------------------------------


class Keeper:
    def __init__(self, name: str) -> None:
        from disaggctl.topology.spec import Plan

        self.name = name
        self.plan = Plan.model_validate_json(state.keeper_plan_path(name).read_text())
        self.settings = self.plan.keeper
        self.backends = Backends()
        self.history: dict[str, restart.History] = {}
        self.why: dict[int, str] = {}  # pid -> why the keeper itself stopped it
        self.stopping = threading.Event()
        self.pid = os.getpid()

    # -- loop

    def run(self) -> int:
        # `up` starts us and then records us in the state, holding the lock: once we get the lock, the
        # state says whether we are its keeper.
        with state.locked(self.name, timeout_s=120):
            pass
        log.info(
            "keeper of %s: %s",
            self.name,
            ", ".join(f"{p.name} restart: {p.restart}" for p in self.plan.processes),
        )
        while not self.stopping.is_set():
            try:
                st = state.load(self.name)
            except state.StateError as e:
                log.warning("%s", e)
                st = None
            if st is None or st.keeper is None or st.keeper.pid != self.pid:
                log.info("no longer the keeper of %s: exiting", self.name)
                return 0
            for rec in st.processes:
                if self.stopping.is_set():
                    break
                try:
                    self.check(st, rec)
                except Exception:
                    log.exception("%s: could not check or restart it", rec.name)
            self.stopping.wait(POLL_S)
        log.info("stopped")
        return 0

    def check(self, st: DeploymentState, rec: ProcRecord) -> None:
        try:
            spec = self.plan.process(rec.name)
        except KeyError:
            return
        backend = self.backends.get(st.host(rec.host))
        try:
            alive = backend.alive(rec)
        except Exception as e:  # a host we cannot reach now: nothing to conclude
            log.warning("%s: cannot check it: %s", rec.name, e)
            return
        now = time.time()
        if alive:
            if rec.keeper_state == restart.STARTING:
                self.check_started(rec, backend, now)
            return
        if rec.keeper_state in (restart.EXITED, restart.CRASH_LOOP):
            return
        if rec.keeper_state == restart.BACKOFF:
            if now >= (rec.next_restart_at or 0):
                self.restart(rec, spec)
            return
        code = backend.exit_code(rec)
        decision = self.history.setdefault(rec.name, restart.History(self.settings)).decide(
            spec.restart, code, now
        )
        try:
            tail = backend.read_log(rec, LOG_TAIL)
        except Exception as e:
            tail = [f"(cannot read the log: {e})"]
        how = self.why.pop(rec.pid, None) or restart.describe_exit(code)
        self.update(
            rec,
            keeper_state=decision.state,
            last_exit=how,
            exited_at=now,
            next_restart_at=now + decision.delay_s if decision.restart else None,
            log_tail=tail,
        )
        log.warning("%s (pid %d) %s", rec.name, rec.pid, decision.reason)

    def check_started(self, rec: ProcRecord, backend: Backend, now: float) -> None:
        h = health.probe(rec.url, rec.health_path)
        if h.ok:
            self.update(rec, keeper_state="")
            log.info("%s (pid %d) healthy after restart %d", rec.name, rec.pid, rec.restarts)
            return
        limit = self.settings.health_timeout_s
        if now - rec.started_at > limit:
            self.why[rec.pid] = f"not healthy within {limit:g} s ({h.detail}): stopped by the keeper"
            log.warning("%s (pid %d) %s", rec.name, rec.pid, self.why[rec.pid])
            backend.stop(rec, LEFTOVER_GRACE_S)

    # -- changes to the state, each under the lock

    def update(self, rec: ProcRecord, **fields: Any) -> bool:
        """Set `fields` on the record of `rec`'s process if it is still that instance."""
        try:
            with state.locked(self.name, timeout_s=LOCK_WAIT_S):
                st = self.current()
                if st is None:
                    return False
                for i, p in enumerate(st.processes):
                    if p.name == rec.name and p.pid == rec.pid:
                        st.processes[i] = p.model_copy(update=fields)
                        state.save(st)
                        return True
                return False
        except state.StateError:
            return False

    def current(self) -> DeploymentState | None:
        """The state, if it still names this process its keeper (read under the lock)."""
        st = state.load(self.name)
        if st is None or st.keeper is None or st.keeper.pid != self.pid:
            self.stopping.set()
            return None
        return st

    def restart(self, rec: ProcRecord, spec: Any) -> None:
        history = self.history.setdefault(rec.name, restart.History(self.settings))
        try:
            with state.locked(self.name, timeout_s=LOCK_WAIT_S):
                st = self.current()
                if st is None:
                    return
                i, cur = next(((i, p) for i, p in enumerate(st.processes) if p.name == rec.name), (0, None))
                if cur is None or cur.pid != rec.pid or cur.keeper_state != restart.BACKOFF:
                    return  # changed meanwhile
                spec_hash = self.plan.spec_hash(spec.name)
                if cur.spec_hash != spec_hash:
                    log.error("%s runs another spec than the keeper's plan: not restarting it", rec.name)
                    return
                host = st.host(cur.host)
                backend = self.backends.get(host)
                backend.stop(cur, LEFTOVER_GRACE_S)
                secret = state.secret_path(self.name)
                now = time.time()
                try:
                    if not secret.is_file():
                        raise RuntimeError(f"the deployment's secret file {secret} is gone")
                    started = backend.start(spec, backend.run_dir(self.name), secret_file=str(secret))
                except Exception as e:
                    history.restarted(now)
                    decision = history.decide(spec.restart, None, now)
                    st.processes[i] = cur.model_copy(
                        update={
                            "keeper_state": decision.state,
                            "last_exit": f"could not start it again: {e}",
                            "next_restart_at": now + decision.delay_s if decision.restart else None,
                        }
                    )
                    state.save(st)
                    log.error("%s: could not start it again: %s; %s", rec.name, e, decision.reason)
                    return
                new = record(spec, started, spec_hash)
                # what status shows of the instance that ended, until this one ends in turn
                new.restarts = cur.restarts + 1
                new.keeper_state = restart.STARTING
                new.last_exit, new.exited_at, new.log_tail = cur.last_exit, cur.exited_at, cur.log_tail
                st.processes[i] = new
                state.save(st)
        except state.StateError:
            return  # `up` or `down` holds the lock: next round
        history.restarted(now)
        log.info("%s restarted (restart %d): pid %d", rec.name, new.restarts, new.pid)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m disaggctl.launch.keeper DEPLOYMENT", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s keeper: %(message)s", stream=sys.stderr
    )
    keeper = Keeper(state.check_name(argv[0]))
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: keeper.stopping.set())
    with contextlib.suppress(KeyboardInterrupt):
        return keeper.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
