"""The commands plan / up / status / logs / down: parse, call the launcher (disaggctl/launch/), render.

Exit codes: 0 ok, 1 runtime failure (or no deployment), 2 usage or topology error, 3 `status` found a
process not running or not healthy, 130 interrupted. Data goes to stdout, progress and errors to stderr.
"""

from __future__ import annotations

import json
import shlex
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import typer

SCHEMA_VERSION = 1
EXIT_RUNTIME, EXIT_USAGE, EXIT_UNHEALTHY = 1, 2, 3


def _err(message: str) -> None:
    typer.echo(message, err=True)


def _fail(message: str, code: int = EXIT_RUNTIME) -> typer.Exit:
    _err(f"error: {message}")
    return typer.Exit(code)


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def _stdout_console():
    from rich.console import Console

    console = Console(highlight=False)
    if not console.is_terminal:
        console.width = 200  # a pipe or a file: keep rows whole instead of folding to 80 columns
    return console


def _load_plan(path: Path, engine: str | None = None, launch: bool = False) -> Any:
    """Topology file -> Plan; topology errors are printed as `file:line: field: message`, exit 2."""
    if not path.is_file():
        raise _fail(f"{path}: no such topology file", EXIT_USAGE)
    from disaggctl.topology.checks import check_launchable
    from disaggctl.topology.load import TopologyError, load_topology
    from disaggctl.topology.plan import build_plan

    try:
        topo = load_topology(path)
        if engine is not None:
            topo = topo.model_copy(update={"engine": engine})
        plan = build_plan(topo, str(path))
        if launch:
            check_launchable(topo, str(path))
        return plan
    except TopologyError as e:
        for line in str(e).splitlines():
            _err(line)
        raise typer.Exit(EXIT_USAGE) from None


def redacted(plan: Any) -> Any:
    """A copy of `plan` whose processes' secret-looking environment values read `<redacted>`."""
    from disaggctl.trust import redact_env

    procs = [proc.model_copy(update={"env": redact_env(proc.env or {})}) for proc in plan.processes]
    return plan.model_copy(update={"processes": procs})


def _gpus(gpus: list[int]) -> str:
    return ",".join(map(str, gpus)) or "-"


def _ranks(gpus: list[int], tp: int) -> str:
    """A server's GPUs, and its tensor-parallel ranks when it has several (rank r: the r-th GPU)."""
    if tp == 1:
        return _gpus(gpus)
    return f"{_gpus(gpus) if gpus else 'CPU'} (tp {tp})"


# -- plan ---------------------------------------------------------------------------------------------


def plan(
    file: Annotated[Path, typer.Argument(help="Topology YAML file.")],
    json_out: Annotated[bool, typer.Option("--json", help="One JSON document on stdout.")] = False,
    engine: Annotated[
        str | None,
        typer.Option("--engine", help="embedded|sglang: override the topology's engine."),
    ] = None,
) -> None:
    if engine is not None and engine not in ("embedded", "sglang"):
        raise _fail(f"--engine must be embedded or sglang, got {engine!r}", EXIT_USAGE)
    p = _load_plan(file, engine)
    hashes = {proc.name: p.spec_hash(proc.name) for proc in p.processes}
    # The plan keeps the real values (up needs them); what is printed hides secret-looking ones, since
    # plans get pasted into tickets and CI logs.
    p = redacted(p)
    commands = None
    if p.engine == "sglang":
        from disaggctl.topology.sglang import render_commands

        commands = render_commands(p)
    if json_out:
        doc = {"schema_version": SCHEMA_VERSION, "plan": p.model_dump(mode="json"), "spec_hashes": hashes}
        if commands is not None:
            doc["commands"] = commands
        typer.echo(json.dumps(doc, indent=2))
        return
    from rich.table import Table

    table = Table(title=f"{p.name}: {p.kind}, engine {p.engine}, {len(p.processes)} processes")
    for col in ("name", "role", "host", "GPUs", "NIC", "port", "bootstrap", "command"):
        table.add_column(col, overflow="fold")
    for proc in p.processes:
        env = " ".join(
            f"{k}={shlex.quote(str(v))}" for k, v in (proc.env or {}).items() if k != "PYTHONUNBUFFERED"
        )
        cmd = shlex.join(str(a) for a in proc.argv)
        table.add_row(
            proc.name,
            proc.role,
            f"{proc.host} ({proc.address})",
            _gpus(proc.gpus),
            ",".join(proc.nics) or "-",
            str(proc.port),
            str(proc.bootstrap_port or "-"),
            f"{env} {cmd}".strip(),
        )
    out = _stdout_console()
    out.print(table)
    if commands is not None:
        for host, lines in commands.items():
            out.print(f"\n# on {host}", markup=False)
            for line in lines:
                out.print(line, markup=False, soft_wrap=True)


# -- up -----------------------------------------------------------------------------------------------


class _Progress:
    """Per-process state on stderr: a live table on a terminal, one line per change otherwise."""

    def __init__(self, names: list[str]):
        self.console = _stderr_console()
        self.rows = dict.fromkeys(names, "pending")
        self.since = time.monotonic()
        self.live = None
        self.lock = threading.Lock()
        if self.console.is_terminal:
            from rich.live import Live

            self.live = Live(self._table(), console=self.console, refresh_per_second=4, transient=False)

    def _table(self):
        from rich.table import Table

        t = Table(title=f"disaggctl up ({time.monotonic() - self.since:.0f} s)", title_justify="left")
        t.add_column("process")
        t.add_column("state")
        for name, what in self.rows.items():
            style = (
                "green" if what.startswith("healthy") else "red" if "exit" in what or "fail" in what else ""
            )
            t.add_row(name, f"[{style}]{what}[/]" if style else what)
        return t

    def __call__(self, name: str, what: str) -> None:
        with self.lock:
            if name == "-" or name not in self.rows:
                self.console.print(f"{name if name != '-' else 'disaggctl'}: {what}", markup=False)
                return
            changed = self.rows.get(name) != what
            self.rows[name] = what
            if self.live is not None:
                self.live.update(self._table())
            elif changed:
                self.console.print(f"{name}: {what}", markup=False)

    def __enter__(self):
        if self.live is not None:
            self.live.start()
        return self

    def __exit__(self, *exc):
        if self.live is not None:
            self.live.update(self._table())
            self.live.stop()


def _curl(url: str) -> str:
    body = json.dumps(
        {"text": "The capital of France is", "sampling_params": {"max_new_tokens": 16, "temperature": 0}}
    )
    return (
        f"curl -s {shlex.quote(url + '/generate')} -H 'Content-Type: application/json' -d {shlex.quote(body)}"
    )


def _raise_on_sigterm(signum, frame):
    raise KeyboardInterrupt


def up(
    file: Annotated[Path, typer.Argument(help="Topology YAML file.")],
    timeout: Annotated[
        float, typer.Option("--timeout", help="Seconds each process may take to become healthy.")
    ] = 600.0,
    force_recreate: Annotated[
        bool, typer.Option("--force-recreate", help="Restart processes whose spec changed.")
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON document on stdout.")] = False,
    detach: Annotated[
        bool,
        typer.Option(
            "--detach",
            "-d",
            help="Accepted for docker compose habits: `up` always returns once every process is "
            "healthy, and leaves the keeper running in the background.",
        ),
    ] = False,
) -> None:
    if timeout <= 0:
        raise _fail("--timeout must be positive", EXIT_USAGE)
    p = _load_plan(file, launch=True)
    from disaggctl.launch import state, supervisor

    # `kill` of `up` must stop what it started, as Ctrl-C does
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        with _Progress([proc.name for proc in p.processes]) as progress:
            result = supervisor.up(p, timeout_s=timeout, force_recreate=force_recreate, report=progress)
    except supervisor.LaunchError as e:
        for line in e.log_tail:
            _err(f"  {e.process} | {line}" if e.process else f"  {line}")
        raise _fail(str(e)) from None
    except state.StateError as e:
        raise _fail(str(e)) from None
    except KeyboardInterrupt:
        _err("interrupted: stopped what this up had started")
        raise typer.Exit(130) from None
    if json_out:
        doc = {"schema_version": SCHEMA_VERSION, "name": p.name, **result.__dict__}
        typer.echo(json.dumps(doc, indent=2))
        return
    if result.stale:
        _err(f"restarted {len(result.stale)} process(es) found dead: {', '.join(result.stale)}")
    if not result.started:
        typer.echo(f"{p.name}: already running ({len(result.kept)} processes, spec unchanged)")
    else:
        kept = f", {len(result.kept)} already running" if result.kept else ""
        typer.echo(f"{p.name}: started {len(result.started)} process(es) in {result.seconds:.1f} s{kept}")
    if result.proxy_url:
        typer.echo(f"proxy: {result.proxy_url}")
        typer.echo(f"try:   {_curl(result.proxy_url)}")


# -- status -------------------------------------------------------------------------------------------


def _uptime(seconds: float) -> str:
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _resolve(name: str | None) -> str:
    from disaggctl.launch import state

    try:
        return state.resolve_name(name)
    except state.AmbiguousDeployment as e:
        raise _fail(str(e), EXIT_USAGE) from None
    except state.StateError as e:
        raise _fail(str(e)) from None


def _load_deployment(name: str | None) -> Any:
    """The state of the named (or only) deployment; a one-line failure when there is none or it is unreadable."""
    from disaggctl.launch import state

    dep = _resolve(name)
    try:
        st = state.load(dep)
    except state.StateError as e:
        raise _fail(str(e)) from None
    if st is None:
        raise _fail(f"no deployment named {dep!r}")
    return st


def _policies(name: str) -> dict[str, str]:
    """Each process's restart policy, from the plan the keeper restarts from ({} without a keeper)."""
    from disaggctl.launch import state

    try:
        doc = json.loads(state.keeper_plan_path(name).read_text())
        return {p["name"]: p.get("restart", "on-failure") for p in doc["processes"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _keeper_view(rec: Any, alive: bool | None, now: float) -> tuple[str, str]:
    """(state, one phrase) of what the keeper does about a process: `status` shows both."""
    what = rec.keeper_state
    restarts = f"restart {rec.restarts}" if rec.restarts else ""
    if what == "backoff":
        wait = max(0.0, (rec.next_restart_at or now) - now)
        return what, f"{rec.last_exit}; restarting in {wait:.0f} s"
    if what == "crash-loop":
        return what, f"crash-loop after {rec.restarts} restart(s): {rec.last_exit}"
    if what == "exited":
        return what, f"{rec.last_exit} (not restarted)"
    if what == "starting":
        return what, f"starting ({restarts})" if restarts else "starting"
    return ("running" if alive else "dead" if alive is False else "unknown"), ""


def _quarantined(pages: int | None) -> str:
    """Pages held back after failed hand-offs: a few are normal after a peer failed; they return to the
    pool when the quarantine ends."""
    if pages is None:
        return "-"
    return f"[yellow]{pages}[/]" if pages else "0"


def status(
    name: Annotated[str | None, typer.Argument(help="Deployment name (default: the only one).")] = None,
    name_opt: Annotated[str | None, typer.Option("--name", help="Deployment name.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON document on stdout.")] = False,
) -> None:
    from disaggctl.launch import supervisor

    st = _load_deployment(name or name_opt)
    rows = supervisor.status(st)
    keeper = supervisor.keeper_status(st)
    policies = _policies(st.name)
    now = time.time()
    healthy = bool(rows) and all(r.healthy for r in rows) and (keeper is None or keeper.healthy)
    if json_out:
        procs = []
        for r in rows:
            rec = r.rec
            kstate, kdetail = _keeper_view(rec, r.alive, now)
            procs.append(
                {
                    "name": rec.name,
                    "role": rec.role,
                    "host": rec.host,
                    "gpus": rec.gpus,
                    "tp": rec.tp,
                    "nics": rec.nics,
                    "port": rec.port,
                    "bootstrap_port": rec.bootstrap_port,
                    "url": rec.url,
                    "pid": rec.pid,
                    "alive": r.alive,
                    "healthy": r.healthy,
                    "health": r.health.detail if r.health else ("dead" if r.alive is False else "unknown"),
                    "http_status": r.health.status if r.health else None,
                    "kv_pages_quarantined": r.pages_quarantined,
                    "uptime_s": round(now - rec.started_at, 1) if r.alive else None,
                    "log_path": rec.log_path,
                    "error": r.error or None,
                    "restart": policies.get(rec.name),
                    "restarts": rec.restarts,
                    "state": kstate,
                    "state_detail": kdetail or None,
                    "last_exit": rec.last_exit,
                    "next_restart_in_s": (
                        round(max(0.0, rec.next_restart_at - now), 1)
                        if kstate == "backoff" and rec.next_restart_at
                        else None
                    ),
                    "last_log_lines": rec.log_tail if rec.keeper_state else [],
                }
            )
        doc = {"schema_version": SCHEMA_VERSION, "name": st.name, "source": st.source, "healthy": healthy}
        doc["processes"] = procs
        doc["keeper"] = (
            {
                "pid": keeper.rec.pid,
                "alive": keeper.alive,
                "uptime_s": round(now - keeper.rec.started_at, 1) if keeper.alive else None,
                "log_path": keeper.rec.log_path,
            }
            if keeper is not None
            else None
        )
        typer.echo(json.dumps(doc, indent=2))
    else:
        from rich.markup import escape
        from rich.table import Table

        table = Table(
            title=f"{st.name} ({st.kind or 'deployment'}, engine {st.engine})", title_justify="left"
        )
        cols = (
            "process",
            "role",
            "host",
            "GPUs",
            "NIC",
            "ports",
            "pid",
            "alive",
            "health",
            "KV quarantined",
            "restarts",
            "uptime",
        )
        for col in cols:
            table.add_column(col)
        for r in rows:
            rec = r.rec
            ports = str(rec.port or "-") + (f" (+{rec.bootstrap_port})" if rec.bootstrap_port else "")
            alive = {True: "[green]yes[/]", False: "[red]no[/]", None: "[yellow]?[/]"}[r.alive]
            kstate, kdetail = _keeper_view(rec, r.alive, now)
            if kdetail:
                colour = "yellow" if kstate in ("backoff", "starting") else "red"
                hl = f"[{colour}]{escape(kdetail)}[/]"
            elif r.health is not None:
                hl = f"[green]{r.health.detail}[/]" if r.health.ok else f"[red]{r.health.detail}[/]"
            else:
                hl = f"[yellow]unknown: {r.error}[/]" if r.alive is None else "[red]-[/]"
            policy = policies.get(rec.name)
            table.add_row(
                rec.name,
                rec.role,
                rec.host,
                _ranks(rec.gpus, rec.tp),
                ",".join(rec.nics) or "-",
                ports,
                str(rec.pid),
                alive,
                hl,
                _quarantined(r.pages_quarantined),
                f"{rec.restarts}" + (f" ({policy})" if policy else ""),
                _uptime(now - rec.started_at) if r.alive else "-",
            )
        if keeper is not None:
            k = keeper.rec
            table.add_row(
                k.name,
                "keeper",
                k.host,
                "-",
                "-",
                "-",
                str(k.pid),
                "[green]yes[/]" if keeper.alive else "[red]no[/]",
                f"[green]{keeper.health.detail}[/]" if keeper.alive else f"[red]{keeper.health.detail}[/]",
                "-",
                "-",
                _uptime(now - k.started_at) if keeper.alive else "-",
            )
        out = _stdout_console()
        out.print(table)
        for r in rows:
            rec = r.rec
            if rec.keeper_state not in ("crash-loop", "exited"):
                continue
            if not rec.log_tail:
                out.print(f"\n{rec.name}: {rec.last_exit}; its log was empty", markup=False)
                continue
            out.print(f"\n{rec.name}: {rec.last_exit}; its last log lines:", markup=False)
            for line in rec.log_tail:
                out.print(f"  {rec.name} | {line}", markup=False, soft_wrap=True)
        proxy = st.proxy()
        if proxy is not None:
            typer.echo(f"proxy: {proxy.url}")
        waiting = [r.rec.name for r in rows if r.alive is False and r.rec.keeper_state == "backoff"]
        dead = [r.rec.name for r in rows if r.alive is False and r.rec.name not in waiting]
        if waiting:
            _err(f"restarting: {', '.join(waiting)} (the keeper starts them again after their back-off)")
        if dead:
            _err(f"not running: {', '.join(dead)} (stale; `disaggctl down` cleans up, `up` restarts them)")
        if keeper is not None and not keeper.alive:
            _err("the keeper is not running: processes that die stay dead until `disaggctl up`")
    if not healthy:
        raise typer.Exit(EXIT_UNHEALTHY)


# -- logs ---------------------------------------------------------------------------------------------


def logs(
    target: Annotated[str | None, typer.Argument(help="A process (prefill-0) or a role (decode).")] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new lines.")] = False,
    lines: Annotated[
        int | None, typer.Option("--tail", "-n", help="Only the last N lines of each log.")
    ] = None,
    no_color: Annotated[bool, typer.Option("--no-color", help="No colours.")] = False,
    name: Annotated[
        str | None, typer.Option("--name", help="Deployment name (default: the only one).")
    ] = None,
) -> None:
    from disaggctl.launch import logview, supervisor
    from disaggctl.launch.local import LocalBackend

    if lines is not None and lines < 0:
        raise _fail("--tail must be 0 or more", EXIT_USAGE)
    st = _load_deployment(name)
    # the keeper's log only when asked for: it is about the deployment, not one of its servers
    keeper = [st.keeper] if st.keeper is not None and target in ("keeper",) else []
    try:
        chosen = keeper or logview.select(st.processes, target)
    except ValueError as e:
        raise _fail(str(e), EXIT_USAGE) from None
    prefix = logview.Prefixer([r.name for r in chosen], logview.want_colour(no_color, sys.stdout))
    backends = supervisor.Backends()
    # the keeper runs where `up` ran: on this machine
    sources = [(r, LocalBackend() if r in keeper else backends.get(st.host(r.host))) for r in chosen]
    out = sys.stdout
    try:
        if not follow:
            for rec, backend in sources:
                try:
                    got = backend.read_log(rec, lines)
                except Exception as e:
                    _err(f"error: {rec.name}: cannot read the log: {e}")
                    continue
                for line in got:
                    out.write(prefix(rec.name, line) + "\n")
            out.flush()
            return
        stop = threading.Event()
        signal.signal(signal.SIGTERM, _raise_on_sigterm)
        try:
            for proc_name, line in logview.follow_all(sources, lines if lines is not None else 10, stop):
                out.write(prefix(proc_name, line) + "\n")
                out.flush()
        finally:
            stop.set()
    except KeyboardInterrupt:
        raise typer.Exit(0) from None
    except BrokenPipeError:
        raise typer.Exit(0) from None


# -- down ---------------------------------------------------------------------------------------------


def down(
    timeout: Annotated[
        float, typer.Option("--timeout", "-t", help="Seconds between SIGTERM and SIGKILL, per process.")
    ] = 20.0,
    name: Annotated[
        str | None, typer.Option("--name", help="Deployment name (default: the only one).")
    ] = None,
) -> None:
    from disaggctl.launch import state, supervisor

    if timeout < 0:
        raise _fail("--timeout must be 0 or more", EXIT_USAGE)
    try:
        dep = state.resolve_name(name)
    except state.NoDeployment as e:
        _err(f"{e}; nothing to stop")
        return
    except state.StateError as e:
        code = EXIT_USAGE if isinstance(e, state.AmbiguousDeployment) else EXIT_RUNTIME
        raise _fail(str(e), code) from None
    console = _stderr_console()

    def report(proc: str, what: str) -> None:
        if what != "stopping":
            console.print(f"{proc}: {what}", markup=False)

    try:
        outcomes = supervisor.down(dep, grace_s=timeout, report=report)
    except (supervisor.LaunchError, state.StateError) as e:
        raise _fail(str(e)) from None
    if outcomes and all(o == "gone" for _, o in outcomes):
        typer.echo(f"{dep}: stale state (no process was running); cleaned up")
    else:
        running = sum(o != "gone" for _, o in outcomes)
        typer.echo(f"{dep}: stopped {running} process(es)")
