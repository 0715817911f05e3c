"""Turn a Plan into running processes and back: ordered start with health waits, status, ordered stop.

Start order is by level (encoders, prefills, decodes, colocated, proxy); the processes of one level
start together and the next level starts once all of them answer `GET /health` with 200. The state
file is rewritten after every start, so whatever happens a later `down` finds what is running.
Each host's processes are reached through the launch backend its plan names (launch/backend.py:
local or ssh); the supervisor makes every process's record from what the backend's start returns.

Every process gets the deployment secret as a 0600 file named by DISAGGCTL_SECRET_FILE (disaggctl.trust).
`up` makes it when nothing of the deployment runs, and reuses it while something does, so that kept and
restarted processes share it; `down` removes it (and the hosts' copies) once everything is stopped. The
secret is never part of the plan: not in a command line, a process's `env` or a spec hash.

`up` ends by leaving a keeper (launch/keeper.py) that restarts what dies, by each process's `restart`
policy; `up` and `down` stop it first, under the deployment's lock, so that it never restarts what they
stop or start.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from disaggctl.launch import health, keeper, state
from disaggctl.launch.backend import Backend, Backends, record
from disaggctl.launch.local import LocalBackend
from disaggctl.launch.state import DeploymentState, HostRecord, ProcRecord
from disaggctl.trust import AuthError, DeploymentKey

LEVELS = ("encoder", "prefill", "decode", "colocated", "proxy")
DEFAULT_TIMEOUT_S = 600.0
DEFAULT_GRACE_S = 20.0
POLL_S = 0.5
LOG_TAIL = 20
# the embedded runtime's gauge of KV pages held back after a failed hand-off (runtime/server.py, metrics)
QUARANTINED_METRIC = "disaggctl_kv_pages_quarantined"

Report = Callable[[str, str], None]  # (process name, what is happening to it)


def _quiet(name: str, what: str) -> None:
    pass


class LaunchError(RuntimeError):
    """A failure of up/down; `str()` is the one-line reason, `log_tail` the failed process's last lines."""

    def __init__(self, message: str, log_tail: list[str] | None = None, process: str | None = None):
        super().__init__(message)
        self.log_tail = log_tail or []
        self.process = process


class DriftError(LaunchError):
    """The running deployment was started from a different spec."""


@dataclass
class UpResult:
    started: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    recreated: list[str] = field(default_factory=list)
    proxy_url: str | None = None
    seconds: float = 0.0


@dataclass
class ProcStatus:
    rec: ProcRecord
    alive: bool | None  # None: the host could not be asked
    health: health.Health | None
    error: str = ""
    # KV pages a prefill/decode holds back after failed hand-offs, from its /metrics; None where the
    # worker does not expose them (SGLang, other roles) or is not healthy
    pages_quarantined: int | None = None

    @property
    def healthy(self) -> bool:
        return bool(self.alive and self.health and self.health.ok)


def level_of(role: str) -> int:
    return LEVELS.index(role) if role in LEVELS else len(LEVELS)


def levels(items: list, role: Callable[[Any], str] = lambda p: p.role) -> list[list]:
    """`items` grouped by start level, in start order (the order inside a level is kept)."""
    groups: dict[int, list] = {}
    for it in items:
        groups.setdefault(level_of(role(it)), []).append(it)
    return [groups[k] for k in sorted(groups)]


def host_record(h: Any) -> HostRecord:
    """A plan's HostSpec, as the state keeps it."""
    return HostRecord(
        name=h.name,
        address=h.address,
        local=h.local,
        backend=h.backend,
        python=h.python,
        run_dir=h.run_dir,
        ssh=h.ssh.model_dump(mode="json") if h.ssh is not None else None,
    )


def _describe(e: BaseException) -> str:
    return str(e) or type(e).__name__


# -- up -----------------------------------------------------------------------------------------------


def up(
    plan: Any,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    force_recreate: bool = False,
    report: Report = _quiet,
    check_hosts: bool = True,
    grace_s: float = DEFAULT_GRACE_S,
) -> UpResult:
    """Bring the deployment to the plan. Starts what is missing, leaves alone what runs with the same spec
    hash, refuses (DriftError) what runs with another spec unless `force_recreate`. On failure, stops
    what this call started and raises LaunchError. Whatever runs at the end is left to a new keeper
    (launch/keeper.py) that restarts processes by their `restart` policy."""
    t0 = time.monotonic()
    result = UpResult()
    backends = Backends()
    hosts = {h.name: host_record(h) for h in plan.hosts}
    specs = {p.name: p for p in plan.processes}
    hashes = {p.name: plan.spec_hash(p.name) for p in plan.processes}
    with state.locked(plan.name):
        st = state.load(plan.name)
        keep: list[ProcRecord] = []
        changed: list[ProcRecord] = []
        stale: list[ProcRecord] = []
        if st is not None:
            for rec, alive, err in _probe_alive(st, backends):
                if err:
                    raise LaunchError(f"cannot check {rec.name} on host {rec.host}: {err}", process=rec.name)
                if not alive:
                    stale.append(rec)
                    report(rec.name, "not running (stale record)")
                elif rec.name not in specs or rec.spec_hash != hashes[rec.name]:
                    changed.append(rec)
                else:
                    keep.append(rec)
            if changed and not force_recreate:
                names = ", ".join(r.name for r in changed)
                raise DriftError(
                    f"deployment {plan.name} is running with a different spec for {names}; "
                    "run `disaggctl down` first, or `up --force-recreate`"
                )
        try:
            if st is not None:
                # From here on `up` changes the deployment: the old keeper must not restart what `up`
                # stops or starts; a new one, with this plan, takes over at the end.
                _stop_keeper(st, grace_s, report)
                # A dead leader may leave live members of its process group (holding ports): stop them too.
                _stop_all(st, stale + changed, backends, grace_s, report)
                result.stale = [r.name for r in stale]
                result.recreated = [r.name for r in changed]
            st = DeploymentState(
                name=plan.name,
                source=plan.source,
                engine=plan.engine,
                kind=plan.kind,
                created_at=st.created_at if st is not None and keep else time.time(),
                hosts=list(hosts.values()),
                processes=keep,
            )
            result.kept = [r.name for r in keep]
            to_start = [p for p in plan.processes if p.name not in set(result.kept)]
            if not to_start:
                state.save(st)
            else:
                _start(
                    plan,
                    st,
                    to_start,
                    result,
                    backends,
                    hosts,
                    hashes,
                    timeout_s,
                    report,
                    check_hosts,
                    grace_s,
                )
        finally:
            _hand_to_keeper(plan, report)
        result.proxy_url = _proxy_url(st)
        result.seconds = time.monotonic() - t0
        return result


def _start(
    plan: Any,
    st: DeploymentState,
    to_start: list,
    result: UpResult,
    backends: Backends,
    hosts: dict[str, HostRecord],
    hashes: dict[str, str],
    timeout_s: float,
    report: Report,
    check_hosts: bool,
    grace_s: float,
) -> None:
    if check_hosts:
        _preflight(plan, to_start)
    if st.processes:
        state.save(st)
    else:
        state.remove(plan.name)  # nothing runs yet: the first start writes the state
    secret = _deployment_secret(plan.name, reuse=bool(st.processes))
    started: list[ProcRecord] = []
    try:
        for level in levels(to_start):
            recs = _start_level(st, level, hosts, hashes, backends, started, report, secret)
            _wait_healthy(recs, backends, hosts, timeout_s, report)
    except BaseException as e:
        if started:
            report("-", f"stopping what this up started ({len(started)} process(es))")
            try:
                _stop_all(st, started, backends, grace_s, report)
            except LaunchError as stop_error:
                if isinstance(e, LaunchError):
                    raise LaunchError(f"{e}; and then {stop_error}", e.log_tail, e.process) from e
                raise
        if not st.processes:
            state.remove(plan.name)
            _forget_secret(st, started, backends, report)
        raise
    result.started = [r.name for r in started]


def _stop_keeper(st: DeploymentState, grace_s: float, report: Report) -> str:
    """Stop the deployment's keeper (the caller holds the lock) and forget it in the state.
    -> "stopped" | "killed" | "gone"."""
    if st.keeper is None:
        return "gone"
    outcome = keeper.stop(st.keeper, grace_s)
    report("keeper", outcome)
    st.keeper = None
    state.save(st)
    return outcome


def _hand_to_keeper(plan: Any, report: Report) -> None:
    """Start a keeper for what runs now (the caller holds the lock), unless nothing does or no process
    of the plan is to be restarted."""
    st = state.load(plan.name)
    if st is None or not st.processes:
        return
    if not any(p.restart != "no" for p in plan.processes):
        return
    try:
        st.keeper = keeper.start(plan)
    except OSError as e:
        report("-", f"could not start the keeper: {_describe(e)}; processes that die stay dead")
        return
    state.save(st)
    report("keeper", f"started, pid {st.keeper.pid}")


def _deployment_secret(name: str, reuse: bool) -> str:
    """The path of the deployment's secret file: a new secret when nothing of the deployment runs (a
    fresh start never inherits an old key), the existing one while some process does."""
    path = state.secret_path(name)
    state.ensure_deployment_dir(name)
    if not reuse:
        return str(DeploymentKey.generate().write(path))
    if not path.exists():
        raise LaunchError(
            f"deployment {name} is running without its secret file {path} (started by an older "
            "disaggctl, or the file was removed): run `disaggctl down`, then `up` again"
        )
    try:
        DeploymentKey.read(path)  # refuses a file that others can read, or that holds no key
    except AuthError as e:
        raise LaunchError(str(e)) from e
    return str(path)


def _forget_secret(st: DeploymentState, recs: list[ProcRecord], backends: Backends, report: Report) -> None:
    """Remove the secret and its copies on remote hosts. Best effort: a copy that cannot be removed is
    reported, and the processes are stopped already, which is what matters."""
    state.remove_secret(st.name)
    by_host: dict[str, list[ProcRecord]] = {}
    for rec in recs:
        by_host.setdefault(rec.host, []).append(rec)
    for host in st.hosts:
        # a host this command never reached holds no copy from it, and may be the unreachable one
        if not (host.name in by_host or backends.reached(host.name)):
            continue
        backend = backends.get(host)
        try:
            backend.remove_private_files(by_host.get(host.name, []))
        except Exception as e:
            report("-", f"host {host.name}: could not remove the secret's copy: {_describe(e)}")


def _proxy_url(st: DeploymentState) -> str | None:
    proxy = st.proxy()
    return proxy.url if proxy is not None else None


def _preflight(plan: Any, to_start: list) -> None:
    from disaggctl.launch.preflight import preflight

    names = {p.host for p in to_start}
    problems = preflight([h for h in plan.hosts if h.name in names], plan, processes=to_start)
    if problems:
        lines = [str(p) for p in problems]
        more = f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""
        raise LaunchError(f"pre-flight: {lines[0]}{more}", log_tail=lines)


def _start_level(
    st: DeploymentState,
    level: list,
    hosts: dict[str, HostRecord],
    hashes: dict[str, str],
    backends: Backends,
    started: list[ProcRecord],
    report: Report,
    secret_file: str,
) -> list[ProcRecord]:
    lock = threading.Lock()

    def start_one(spec: Any) -> ProcRecord:
        host = hosts[spec.host]
        report(spec.name, "starting")
        try:
            backend = backends.get(host)
            instance = backend.start(spec, backend.run_dir(st.name), secret_file=secret_file)
        except Exception as e:
            raise LaunchError(f"{spec.name}: {_describe(e)}", process=spec.name) from e
        rec = record(spec, instance, hashes[spec.name])
        with lock:
            st.processes.append(rec)
            started.append(rec)
            state.save(st)
        report(spec.name, f"started, pid {rec.pid}")
        return rec

    with ThreadPoolExecutor(max_workers=min(16, len(level))) as pool:
        futures = [pool.submit(start_one, spec) for spec in level]
        errors = [f.exception() for f in futures]
    failed = [e for e in errors if e is not None]
    if failed:
        raise failed[0]
    return [f.result() for f in futures]


def _wait_healthy(
    recs: list[ProcRecord], backends: Backends, hosts: dict[str, HostRecord], timeout_s: float, report: Report
) -> None:
    pending = {r.name: r for r in recs}
    while pending:
        for name, rec in list(pending.items()):
            h = health.probe(rec.url, rec.health_path)
            waited = time.time() - rec.started_at
            if h.ok:
                report(name, f"healthy ({waited:.1f} s)")
                del pending[name]
                continue
            backend = backends.get(hosts[rec.host])
            try:
                alive = backend.alive(rec)
            except Exception as e:
                raise LaunchError(f"{name}: cannot check the process: {_describe(e)}", process=name) from e
            if not alive:
                code = backend.exit_code(rec)
                how = f" with status {code}" if code is not None else ""
                report(name, "exited")
                raise LaunchError(
                    f"{name} exited{how} before it became healthy (log: {rec.log_path})",
                    _tail(backend, rec),
                    name,
                )
            if waited > timeout_s:
                report(name, "timed out")
                raise LaunchError(
                    f"{name} not healthy after {timeout_s:g} s (last probe: {h.detail}; log: {rec.log_path})",
                    _tail(backend, rec),
                    name,
                )
            report(name, f"waiting for health: {h.detail}")
        if pending:
            time.sleep(POLL_S)


def _tail(backend: Backend, rec: ProcRecord) -> list[str]:
    try:
        return backend.read_log(rec, LOG_TAIL)
    except Exception as e:
        return [f"(cannot read the log: {_describe(e)})"]


# -- down ---------------------------------------------------------------------------------------------


def _stop_all(
    st: DeploymentState,
    recs: list[ProcRecord],
    backends: Backends,
    grace_s: float,
    report: Report,
) -> list[tuple[str, str]]:
    """Stop `recs` level by level in reverse start order (proxy first), each level in parallel. Stopped
    records leave the state (saved after each level); raises LaunchError if some could not be stopped."""
    outcomes: list[tuple[str, str]] = []
    failures: list[str] = []

    def stop_one(rec: ProcRecord) -> str:
        report(rec.name, "stopping")
        return backends.get(st.host(rec.host)).stop(rec, grace_s)

    for level in reversed(levels(recs)):
        with ThreadPoolExecutor(max_workers=min(16, len(level))) as pool:
            futures = [(rec, pool.submit(stop_one, rec)) for rec in level]
        for rec, fut in futures:
            err = fut.exception()
            if err is not None:
                failures.append(f"{rec.name}: {_describe(err)}")
                report(rec.name, f"stop failed: {_describe(err)}")
                continue
            outcome = fut.result()
            outcomes.append((rec.name, outcome))
            report(rec.name, outcome)
            st.processes = [p for p in st.processes if p.name != rec.name]
        if st.processes:
            state.save(st)
    if failures:
        raise LaunchError(f"could not stop {len(failures)} process(es): {'; '.join(failures)}")
    return outcomes


def down(name: str, *, grace_s: float = DEFAULT_GRACE_S, report: Report = _quiet) -> list[tuple[str, str]]:
    """Stop every process of the deployment and forget it. -> [(process, "stopped"|"killed"|"gone")]."""
    with state.locked(name):
        st = state.load(name)
        if st is None:
            raise state.NoDeployment(f"no deployment named {name!r}")
        backends = Backends()
        recs = list(st.processes)
        outcomes: list[tuple[str, str]] = []
        if st.keeper is not None:
            # first, or it would restart what is being stopped
            outcomes.append(("keeper", _stop_keeper(st, grace_s, report)))
        try:
            outcomes += _stop_all(st, recs, backends, grace_s, report)
        finally:
            if not st.processes:
                state.remove(name)
                state.remove_keeper_plan(name)
                _forget_secret(st, recs, backends, report)
        return outcomes


# -- status -------------------------------------------------------------------------------------------


def _probe_alive(st: DeploymentState, backends: Backends) -> list[tuple[ProcRecord, bool | None, str]]:
    def one(rec: ProcRecord) -> tuple[ProcRecord, bool | None, str]:
        try:
            return rec, bool(backends.get(st.host(rec.host)).alive(rec)), ""
        except Exception as e:
            return rec, None, _describe(e)

    if not st.processes:
        return []
    with ThreadPoolExecutor(max_workers=min(16, len(st.processes))) as pool:
        return list(pool.map(one, st.processes))


def status(st: DeploymentState, timeout_s: float = health.DEFAULT_TIMEOUT_S) -> list[ProcStatus]:
    """Re-probe every process of the state: alive (identity-checked) and, if alive, its health."""
    backends = Backends()

    def one(item: tuple[ProcRecord, bool | None, str]) -> ProcStatus:
        rec, alive, err = item
        h = health.probe(rec.url, rec.health_path, timeout_s) if alive else None
        quarantined = None
        if h is not None and h.ok and rec.role in ("prefill", "decode"):
            value = health.metric(rec.url, QUARANTINED_METRIC, timeout_s)
            quarantined = int(value) if value is not None else None
        return ProcStatus(rec, alive, h, err, quarantined)

    alive = _probe_alive(st, backends)
    if not alive:
        return []
    with ThreadPoolExecutor(max_workers=min(16, len(alive))) as pool:
        return list(pool.map(one, alive))


def keeper_status(st: DeploymentState) -> ProcStatus | None:
    """The keeper's row: it serves nothing, so being alive is its health."""
    if st.keeper is None:
        return None
    alive = LocalBackend().alive(st.keeper)
    detail = "keeping the deployment" if alive else "not running: processes that die stay dead"
    return ProcStatus(st.keeper, alive, health.Health(alive, None, detail))
