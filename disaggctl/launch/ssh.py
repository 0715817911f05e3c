"""Launch backend for hosts reached over SSH (paramiko).

One connection per host, reused by every command of one CLI invocation (`connection()` keeps them;
`close_all()` runs at exit). Remote processes are started detached from the SSH session: own session
and process group (`setsid`), stdin from /dev/null, stdout+stderr to a log file, a pid file written by
the group leader itself. A process is identified by (pid, start ticks from /proc/PID/stat, boot_id), so
a reused pid or a rebooted host is never mistaken for ours and never signalled.

Every token that reaches a remote shell is `shlex.quote`d. Nothing secret is ever part of a remote
command line (which `ps` shows every user of the host): a process's environment is written, through the
channel's stdin, to a 0600 `NAME.env` file in the run directory that the launch script sources, and the
deployment secret is copied the same way to a 0600 `secret` file there (not through the SSH protocol's
environment either: sshd drops variables that `AcceptEnv` does not list). Remote files are made under
`umask 077`. paramiko is imported inside functions: `disaggctl status` must start fast.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import re
import shlex
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from disaggctl.launch.backend import Started
from disaggctl.launch.preflight import Problem, check_host
from disaggctl.trust import ENV_FILE

if TYPE_CHECKING:
    import paramiko

    from disaggctl.launch.state import ProcRecord

REMOTE_SECRET = "secret"

CONNECT_TIMEOUT_S = 10.0
COMMAND_TIMEOUT_S = 30.0
PID_FILE_WAIT_S = 5.0

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class SshError(RuntimeError):
    """An SSH failure; the message names the host. `reason` is one of: unreachable, host-key-unknown,
    host-key-changed, auth, timeout, command, start."""

    def __init__(self, host: str, message: str, reason: str = "command"):
        super().__init__(f"host {host}: {message}")
        self.host = host
        self.reason = reason


@dataclass(frozen=True)
class SshTarget:
    """Everything needed to open one SSH connection; hashable, so it keys the connection cache."""

    host: str  # the topology's host name, used in messages
    address: str
    port: int = 22
    user: str | None = None
    key: str | None = None
    known_hosts: str | None = None
    jump: str | None = None  # [user@]address[:port], same key and known_hosts
    keepalive_s: float = 15.0
    accept_new_host_keys: bool = False
    connect_timeout_s: float = CONNECT_TIMEOUT_S

    @classmethod
    def from_host(cls, host: Any, connect_timeout_s: float = CONNECT_TIMEOUT_S) -> SshTarget:
        """From a HostSpec (its `ssh` settings may be absent, a model or a plain dict)."""
        ssh = host.ssh

        def setting(field: str, default: Any) -> Any:
            value = ssh.get(field) if isinstance(ssh, dict) else getattr(ssh, field, None)
            return default if value is None else value

        return cls(
            host=host.name,
            address=host.address,
            port=int(setting("port", 22)),
            user=setting("user", None),
            key=setting("key", None),
            known_hosts=setting("known_hosts", None),
            jump=setting("jump", None),
            keepalive_s=float(setting("keepalive_s", 15.0)),
            accept_new_host_keys=bool(setting("insecure_accept_new_host_keys", False)),
            connect_timeout_s=connect_timeout_s,
        )

    def with_ssh_config(self) -> SshTarget:
        """Fill what the topology left unset from ~/.ssh/config (HostName, User, Port, IdentityFile, ProxyJump)."""
        import paramiko

        path = os.path.expanduser("~/.ssh/config")
        if not os.path.isfile(path):
            return self
        cfg = paramiko.SSHConfig.from_path(path).lookup(self.address)
        files = cfg.get("identityfile") or []
        return SshTarget(
            host=self.host,
            address=cfg.get("hostname", self.address),
            port=self.port if self.port != 22 else int(cfg.get("port", 22)),
            user=self.user or cfg.get("user"),
            key=self.key or (files[0] if files and os.path.isfile(os.path.expanduser(files[0])) else None),
            known_hosts=self.known_hosts,
            jump=self.jump or cfg.get("proxyjump"),
            keepalive_s=self.keepalive_s,
            accept_new_host_keys=self.accept_new_host_keys,
            connect_timeout_s=self.connect_timeout_s,
        )


def parse_jump(jump: str, default_user: str | None) -> tuple[str | None, str, int]:
    """`[user@]address[:port]` (IPv6 as `[addr]:port`) -> (user, address, port)."""
    user, _, hostport = jump.rpartition("@")
    m = re.fullmatch(r"\[(?P<v6>[^\]]+)\](?::(?P<p6>\d+))?|(?P<h>[^:\[\]]+)(?::(?P<p>\d+))?", hostport)
    if not m:
        raise ValueError(f"jump host {jump!r} is not [user@]address[:port]")
    address = m.group("v6") or m.group("h")
    port = int(m.group("p6") or m.group("p") or 22)
    return (user or default_user), address, port


@dataclass
class CommandResult:
    rc: int
    stdout: str
    stderr: str


def _make_accept_new_policy(known: paramiko.HostKeys, save_to: str):
    """OpenSSH `accept-new`: add a key for a host we know nothing about; a host we already know under
    any key type never gets a new key this way (a changed key is refused by paramiko itself)."""
    import paramiko

    class AcceptNew(paramiko.MissingHostKeyPolicy):
        lock = threading.Lock()

        def missing_host_key(self, client, hostname, key):
            if known.lookup(hostname):
                raise paramiko.SSHException(
                    f"known_hosts has a different key type for {hostname}; refusing to add a new key"
                )
            client.get_host_keys().add(hostname, key.get_name(), key)
            with self.lock:
                os.makedirs(os.path.dirname(save_to) or ".", exist_ok=True)
                with open(save_to, "a") as f:
                    f.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")

    return AcceptNew()


class SshConnection:
    """One paramiko client (plus an optional jump client) to one host; thread-safe to share."""

    def __init__(self, target: SshTarget):
        self.target = target
        self._client: paramiko.SSHClient | None = None
        self._jump: paramiko.SSHClient | None = None
        self._lock = threading.Lock()

    # -- connecting ---------------------------------------------------------------------------------

    def _new_client(self) -> tuple[paramiko.SSHClient, paramiko.HostKeys]:
        import paramiko

        t = self.target
        client = paramiko.SSHClient()
        known = paramiko.HostKeys()
        system = os.path.expanduser("~/.ssh/known_hosts")
        if os.path.isfile(system):
            client.load_system_host_keys(system)
            known.load(system)
        if t.known_hosts:
            path = os.path.expanduser(t.known_hosts)
            if not os.path.isfile(path):
                raise SshError(t.host, f"known_hosts file {path} does not exist", "host-key-unknown")
            client.load_host_keys(path)
            known.load(path)
        if t.accept_new_host_keys:
            save_to = os.path.expanduser(t.known_hosts or system)
            client.set_missing_host_key_policy(_make_accept_new_policy(known, save_to))
        else:
            client.set_missing_host_key_policy(paramiko.RejectPolicy())
        return client, known

    def _connect_one(self, client, address: str, port: int, user: str | None, sock=None) -> None:
        t = self.target
        key = os.path.expanduser(t.key) if t.key else None
        client.connect(
            address,
            port=port,
            username=user,
            key_filename=key,
            look_for_keys=key is None,
            allow_agent=True,
            timeout=t.connect_timeout_s,
            banner_timeout=t.connect_timeout_s,
            auth_timeout=t.connect_timeout_s,
            channel_timeout=t.connect_timeout_s,
            sock=sock,
        )

    def connect(self) -> None:
        import paramiko

        t = self.target
        where = f"{t.address}:{t.port}"
        try:
            sock = None
            if t.jump:
                juser, jaddr, jport = parse_jump(t.jump, t.user)
                where = f"{t.address}:{t.port} via jump host {jaddr}:{jport}"
                self._jump, _ = self._new_client()
                self._connect_one(self._jump, jaddr, jport, juser)
                sock = self._jump.get_transport().open_channel(
                    "direct-tcpip", (t.address, t.port), ("127.0.0.1", 0), timeout=t.connect_timeout_s
                )
            client, _ = self._new_client()
            self._connect_one(client, t.address, t.port, t.user, sock=sock)
            client.get_transport().set_keepalive(max(1, int(t.keepalive_s)))
        except SshError:
            self._close_quietly()
            raise
        except paramiko.BadHostKeyException as e:
            self._close_quietly()
            raise SshError(
                t.host,
                f"the host key of {e.hostname} does not match known_hosts (expected "
                f"{e.expected_key.get_name()} {e.expected_key.fingerprint}, got {e.key.get_name()} "
                f"{e.key.fingerprint}); refusing to connect. If the host was reinstalled, remove the old key "
                f"with `ssh-keygen -R {e.hostname}` and add the new one after checking it",
                "host-key-changed",
            ) from e
        except paramiko.AuthenticationException as e:
            self._close_quietly()
            raise SshError(
                t.host, f"authentication as {t.user or 'the current user'} at {where} failed: {e}", "auth"
            ) from e
        except TimeoutError as e:
            self._close_quietly()
            raise SshError(
                t.host,
                f"cannot connect to {where}: no answer within {t.connect_timeout_s:g} s",
                "unreachable",
            ) from e
        except paramiko.SSHException as e:
            self._close_quietly()
            if "known_hosts" in str(e) or "not found in" in str(e):
                raise SshError(
                    t.host,
                    f"{where} is not in known_hosts ({e}); add its key (ssh-keyscan, after checking the fingerprint) "
                    "or set ssh.insecure_accept_new_host_keys: true",
                    "host-key-unknown",
                ) from e
            raise SshError(t.host, f"SSH to {where} failed: {e}", "unreachable") from e
        except OSError as e:
            self._close_quietly()
            # paramiko's NoValidConnectionsError hides the per-address errno ("No route to host", ...)
            inner = list(getattr(e, "errors", {}).values())
            why = "; ".join(x.strerror or str(x) for x in inner) if inner else (e.strerror or str(e))
            raise SshError(t.host, f"cannot connect to {where}: {why}", "unreachable") from e
        self._client = client

    def _close_quietly(self) -> None:
        for c in (self._client, self._jump):
            if c is not None:
                c.close()
        self._client = self._jump = None

    def close(self) -> None:
        with self._lock:
            self._close_quietly()

    def transport(self) -> paramiko.Transport:
        with self._lock:
            tr = self._client.get_transport() if self._client is not None else None
            if tr is None or not tr.is_active():
                self._close_quietly()
                self.connect()
                tr = self._client.get_transport()
            return tr

    # -- commands -----------------------------------------------------------------------------------

    def open_session(self):
        try:
            return self.transport().open_session(timeout=self.target.connect_timeout_s)
        except SshError:
            raise
        except Exception as e:  # paramiko raises SSHException or EOFError when the link dropped
            raise SshError(self.target.host, f"cannot open an SSH channel: {e}", "unreachable") from e

    def run(self, command: str, timeout: float = COMMAND_TIMEOUT_S, stdin: bytes = b"") -> CommandResult:
        """Run one shell command with `stdin` as its standard input (then EOF); waits at most `timeout`
        seconds for it to finish. stdin is how data that must not show in `ps` reaches the host."""
        chan = self.open_session()
        out: list[bytes] = []
        err: list[bytes] = []
        deadline = time.monotonic() + timeout
        try:
            chan.exec_command(command)
            # A command that exited early closed its side: what it did not read is moot, its exit
            # status tells what happened.
            with contextlib.suppress(OSError, EOFError):
                if stdin:
                    chan.sendall(stdin)
                chan.shutdown_write()
            while True:
                got = False
                while chan.recv_ready():
                    out.append(chan.recv(65536))
                    got = True
                while chan.recv_stderr_ready():
                    err.append(chan.recv_stderr(65536))
                    got = True
                # Done only at EOF *and* exit status: sshd may send exit-status before it has drained the
                # command's output pipe (RFC 4254 orders neither), so exit status alone can cut stdout short.
                if (
                    chan.eof_received
                    and chan.exit_status_ready()
                    and not chan.recv_ready()
                    and not chan.recv_stderr_ready()
                ):
                    break
                if time.monotonic() > deadline:
                    raise SshError(
                        self.target.host,
                        f"command did not finish within {timeout:g} s: {command[:200]}",
                        "timeout",
                    )
                if not got:
                    chan.status_event.wait(0.01)
            rc = chan.recv_exit_status()
        except SshError:
            raise
        except Exception as e:
            raise SshError(self.target.host, f"SSH command failed: {e}", "unreachable") from e
        finally:
            chan.close()
        return CommandResult(
            rc, b"".join(out).decode(errors="replace"), b"".join(err).decode(errors="replace")
        )


_pool: dict[SshTarget, SshConnection] = {}
_pool_lock = threading.Lock()


def connection(target: SshTarget) -> SshConnection:
    """The shared, connected connection to `target` (connects on first use, reconnects if dropped)."""
    with _pool_lock:
        conn = _pool.get(target)
        if conn is None:
            conn = _pool[target] = SshConnection(target)
    conn.transport()
    return conn


def close_all() -> None:
    with _pool_lock:
        conns = list(_pool.values())
        _pool.clear()
    for c in conns:
        c.close()


atexit.register(close_all)


def spec_problem(spec: Any) -> str | None:
    """Why `spec` cannot be launched safely (names become file names and `env` assignments), or None."""
    if not _NAME.match(spec.name):
        return f"process name {spec.name!r} is not a plain file name"
    if not spec.argv:
        return f"process {spec.name} has an empty command line"
    for k in spec.env or {}:
        if not _ENV_KEY.match(k):
            return f"process {spec.name}: environment variable name {k!r} is not valid"
    return None


def env_file(env: dict[str, str]) -> bytes:
    """A process's environment as a file the launch script sources under `set -a`: one `NAME=value`
    per line, the value quoted so that the shell reads it back verbatim (names are checked by
    spec_problem)."""
    return "".join(f"{k}={shlex.quote(str(v))}\n" for k, v in env.items()).encode()


def receive_stdin(final: str, nbytes: int) -> str:
    """Shell lines that store the command's stdin as the file `final` (in the current directory),
    all or nothing: a cut connection leaves a short temp file, never a short `final`."""
    q = shlex.quote
    tmp = q(f".{final}.tmp")
    return (
        f"cat > {tmp} && [ $(($(wc -c < {tmp}))) -eq {int(nbytes)} ] && mv -f {tmp} {q(final)} "
        f"|| {{ rm -f {tmp}; echo 'could not write {final} in the run directory' >&2; exit 96; }}"
    )


def secret_command(run_dir: str, nbytes: int) -> str:
    """The remote script that stores its stdin (`nbytes` of secret) as `run_dir`/secret, 0600, and
    prints the run directory's absolute path."""
    return "\n".join(
        [
            "umask 077",
            f"mkdir -p {shell_path(run_dir)} || exit 97",
            f"cd {shell_path(run_dir)} || exit 97",
            receive_stdin(REMOTE_SECRET, nbytes),
            "pwd -P",
        ]
    )


def shell_path(path: str) -> str:
    """Quote a path for the remote shell, keeping a leading `~/` meaning the remote home."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


def parse_stat(text: str) -> tuple[str, int, int, int] | None:
    """/proc/PID/stat -> (state, ppid, pgrp, start ticks); the command name may contain spaces and ')'."""
    if ")" not in text:
        return None
    fields = text.rsplit(")", 1)[1].split()
    if len(fields) < 20:
        return None
    return fields[0], int(fields[1]), int(fields[2]), int(fields[19])


def _ticks(value: float | str) -> int:
    return int(float(value))


# Runs on the host with its own interpreter (-I -S: stdlib only). Stops a process group: verifies the
# leader is ours (boot_id + start ticks), snapshots descendants that left the group (their own setsid),
# TERM, polls up to the grace, KILL. Zombies count as gone: a detached leader is reaped by init, lazily.
STOP_SCRIPT = r"""
import os, signal, sys, time
pid, ticks, boot, grace = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
def stat(p):
    try:
        s = open("/proc/%d/stat" % p).read()
    except OSError:
        return None
    f = s.rsplit(")", 1)[1].split()
    return f[0], int(f[1]), int(f[2]), int(f[19])
def table():
    t = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = stat(int(d))
            if st:
                t[int(d)] = st
    return t
if open("/proc/sys/kernel/random/boot_id").read().strip() != boot:
    print("gone"); sys.exit(0)
t = table()
lead = t.get(pid)
if lead is not None and lead[3] != ticks:
    print("gone"); sys.exit(0)
escaped = {}
if lead is not None:
    kids, frontier = {}, [pid]
    while frontier:
        p = frontier.pop()
        for q, st in t.items():
            if st[1] == p and q not in kids:
                kids[q] = st[3]; frontier.append(q)
    escaped = {q: s for q, s in kids.items() if t[q][2] != pid}
def live():
    t = table()
    return [p for p, st in t.items() if st[0] not in "ZX" and (st[2] == pid or escaped.get(p) == st[3])]
def signal_all(sig):
    try:
        os.killpg(pid, sig)
    except OSError:
        pass
    for q in escaped:
        try:
            os.kill(q, sig)
        except OSError:
            pass
if not live():
    print("gone"); sys.exit(0)
signal_all(signal.SIGTERM)
end = time.monotonic() + grace
while live() and time.monotonic() < end:
    time.sleep(0.1)
if not live():
    print("stopped"); sys.exit(0)
signal_all(signal.SIGKILL)
end = time.monotonic() + 10
while live() and time.monotonic() < end:
    time.sleep(0.1)
left = live()
if left:
    print("still running after SIGKILL: " + " ".join(map(str, left))); sys.exit(1)
print("killed")
"""


class SshBackend:
    """The launch backend (launch/backend.py) for one remote host."""

    kind = "ssh"

    @classmethod
    def preflight(
        cls, host: Any, processes: list, sglang_version: str | None, connect_timeout_s: float
    ) -> list[Problem]:
        """Reachable (a connection is made), then the host's checks through that connection."""
        refused = [Problem(host.name, "spec", msg) for msg in map(spec_problem, processes) if msg]
        if refused:
            return refused
        try:
            conn = cls(host, connect_timeout_s=connect_timeout_s).conn
        except SshError as e:
            return [Problem(host.name, "reachable", str(e).removeprefix(f"host {host.name}: "))]

        def run(command: str, timeout: float) -> tuple[int, str, str]:
            try:
                r = conn.run(command, timeout)
            except SshError as e:
                return 255, "", str(e)
            return r.rc, r.stdout, r.stderr

        return check_host(host, processes, run, sglang_version)

    def __init__(self, host: Any, connect_timeout_s: float = CONNECT_TIMEOUT_S):
        self.host = host
        self.target = SshTarget.from_host(host, connect_timeout_s).with_ssh_config()
        self.python = host.python or "python3"
        # (run_dir, digest of the secret) -> its path on the host: copied once per host and command
        self._secrets: dict[tuple[str, str], str] = {}
        self._secrets_lock = threading.Lock()

    @property
    def conn(self) -> SshConnection:
        return connection(self.target)

    def run(self, command: str, timeout: float = COMMAND_TIMEOUT_S, stdin: bytes = b"") -> CommandResult:
        return self.conn.run(command, timeout, stdin)

    def _fail(self, message: str, reason: str = "command") -> SshError:
        return SshError(self.target.host, message, reason)

    def run_dir(self, deployment: str) -> str:
        return self.host.run_dir or f"~/.disaggctl/run/{deployment}"

    # -- start --------------------------------------------------------------------------------------

    def put_secret(self, run_dir: str, data: bytes) -> str:
        """Copy the deployment secret to `run_dir`/secret on the host (0600, through stdin: never on a
        command line). -> the file's absolute path there."""
        res = self.run(secret_command(run_dir, len(data)), stdin=data)
        directory = res.stdout.strip().splitlines()[-1:] if res.rc == 0 else []
        if not directory:
            raise self._fail(
                f"copying the deployment secret to {run_dir} failed (exit {res.rc}): {res.stderr.strip()}",
                "start",
            )
        return f"{directory[0]}/{REMOTE_SECRET}"

    def _secret_on_host(self, run_dir: str, secret_file: str) -> str:
        with open(secret_file, "rb") as f:
            data = f.read()
        key = (run_dir, hashlib.sha256(data).hexdigest())
        with self._secrets_lock:
            if key not in self._secrets:
                self._secrets[key] = self.put_secret(run_dir, data)
            return self._secrets[key]

    def start_command(self, spec: Any, run_dir: str, env_bytes: int | None = None) -> str:
        """The remote shell script that launches `spec` detached and prints pid, boot_id, dir, stat. It
        reads the process's environment file (`env_file`, `env_bytes` long) from stdin: the script, which
        `ps` shows, holds no environment value."""
        problem = spec_problem(spec)
        if problem:
            raise self._fail(problem, "start")
        name = spec.name
        if env_bytes is None:
            env_bytes = len(env_file(dict(spec.env or {})))
        q = shlex.quote
        command = shlex.join([str(a) for a in spec.argv])
        # the leader writes its own pid, exports its environment, then becomes the server
        inner = 'echo $$ > "$0.pid"; set -a; . "./$0.env"; set +a; exec "$@"'
        polls = int(PID_FILE_WAIT_S / 0.05)
        # `cd` is its own statement: `a && cd && setsid ... &` would background a subshell that holds the
        # channel open, and exec_command would never return.
        return "\n".join(
            [
                "umask 077",
                f"mkdir -p {shell_path(run_dir)} || exit 97",
                f"cd {shell_path(run_dir)} || exit 97",
                f"rm -f {q(name + '.pid')}",
                receive_stdin(name + ".env", env_bytes),
                f"if [ -f {q(name + '.log')} ]; then mv -f {q(name + '.log')} {q(name + '.log.1')}; fi",
                f"setsid sh -c {q(inner)} {q(name)} {command} > {q(name + '.log')} 2>&1 < /dev/null &",
                "i=0",
                f"while [ ! -s {q(name + '.pid')} ] && [ $i -lt {polls} ]; do sleep 0.05; i=$((i+1)); done",
                f"[ -s {q(name + '.pid')} ] || {{ echo 'no pid file after {PID_FILE_WAIT_S:g} s' >&2; exit 98; }}",
                f"p=$(cat {q(name + '.pid')})",
                'echo "$p"; cat /proc/sys/kernel/random/boot_id; pwd -P',
                'cat "/proc/$p/stat" 2>/dev/null || echo',
            ]
        )

    def start(self, spec: Any, run_dir: str, secret_file: str | None = None) -> Started:
        """Start `spec` on the host; with `secret_file` (the local 0600 copy of the deployment secret),
        the host gets its own 0600 copy first and the process its path in DISAGGCTL_SECRET_FILE."""
        problem = spec_problem(spec)
        if problem:
            raise self._fail(problem, "start")
        env = {k: str(v) for k, v in (spec.env or {}).items()}
        if secret_file is not None:
            env[ENV_FILE] = self._secret_on_host(run_dir, secret_file)
        data = env_file(env)
        res = self.run(self.start_command(spec, run_dir, len(data)), stdin=data)
        if res.rc != 0:
            raise self._fail(
                f"starting {spec.name} in {run_dir} failed (exit {res.rc}): {res.stderr.strip()}", "start"
            )
        lines = res.stdout.splitlines()
        if len(lines) < 4 or not lines[0].strip().isdigit():
            raise self._fail(f"starting {spec.name}: unexpected answer {res.stdout!r}", "start")
        pid, boot_id, directory = int(lines[0]), lines[1].strip(), lines[2].strip()
        log_path = f"{directory}/{spec.name}.log"
        st = parse_stat(lines[3])
        if st is None or st[0] in "ZX":
            tail = self._tail(log_path, 20)
            raise self._fail(f"{spec.name} exited right after start; last log lines:\n{tail}", "start")
        return Started(pid=pid, start_time=str(st[3]), boot_id=boot_id, log_path=log_path)

    # -- alive / stop -------------------------------------------------------------------------------

    def probe(self, rec: ProcRecord) -> tuple[str, str]:
        """(boot_id, /proc/PID/stat or "") on the host, in one round trip."""
        res = self.run(
            f"cat /proc/sys/kernel/random/boot_id; cat /proc/{int(rec.pid)}/stat 2>/dev/null; true"
        )
        lines = res.stdout.splitlines()
        if not lines:
            raise self._fail(f"cannot read /proc on the host: {res.stderr.strip()}")
        return lines[0].strip(), "\n".join(lines[1:])

    def alive(self, rec: ProcRecord) -> bool:
        """Same boot, same pid with the same start ticks, and not a zombie. Raises SshError when the host
        cannot be asked (the caller reports "unknown", not "dead")."""
        boot, stat_text = self.probe(rec)
        st = parse_stat(stat_text)
        return (
            st is not None and boot == rec.boot_id and st[3] == _ticks(rec.start_time) and st[0] not in "ZX"
        )

    def exit_code(self, rec: ProcRecord) -> int | None:
        """Unknown: the remote process is not our child."""
        return None

    def stop(self, rec: ProcRecord, grace_s: float) -> str:
        """TERM the process group, wait up to `grace_s`, then KILL. -> "stopped" | "killed" | "gone"."""
        args = [str(int(rec.pid)), str(_ticks(rec.start_time)), rec.boot_id or "-", f"{float(grace_s):g}"]
        cmd = shlex.join([self.python, "-I", "-S", "-c", STOP_SCRIPT, *args])
        res = self.run(cmd, timeout=grace_s + 20)
        outcome = res.stdout.strip()
        if res.rc != 0 or outcome not in ("stopped", "killed", "gone"):
            raise self._fail(
                f"stopping {rec.name} (pid {rec.pid}) failed: {(outcome + ' ' + res.stderr).strip()}"
            )
        return outcome

    def remove_private_files(self, recs: list[ProcRecord]) -> None:
        """Remove the secret and the environment files that `start` left beside these processes' logs
        (once they are stopped: a running process may still read its secret)."""
        paths: set[str] = set()
        for rec in recs:
            directory = os.path.dirname(rec.log_path)
            paths.update({f"{directory}/{REMOTE_SECRET}", f"{directory}/{rec.name}.env"})
        with self._secrets_lock:
            paths.update(self._secrets.values())
            self._secrets.clear()
        if paths:
            res = self.run("rm -f -- " + " ".join(shlex.quote(p) for p in sorted(paths)))
            if res.rc != 0:
                raise self._fail(f"removing {', '.join(sorted(paths))} failed: {res.stderr.strip()}")

    # -- logs ---------------------------------------------------------------------------------------

    def _tail(self, path: str, n: int | None) -> str:
        q = shlex.quote(path)
        cmd = f"[ -f {q} ] || exit 0; " + (f"tail -n {int(n)} {q}" if n is not None else f"cat {q}")
        res = self.run(cmd, timeout=COMMAND_TIMEOUT_S)
        if res.rc != 0:
            raise self._fail(f"reading {path} failed: {res.stderr.strip()}")
        return res.stdout

    def read_log(self, rec: ProcRecord, tail: int | None = None) -> list[str]:
        """The process's log lines (the last `tail` ones if given); [] when there is no log yet."""
        return self._tail(rec.log_path, tail).splitlines()

    def follow_log(
        self, rec: ProcRecord, tail: int = 0, stop: threading.Event | None = None
    ) -> Iterator[str]:
        """New log lines as they are written (`tail -F`: survives rotation), after the last `tail`
        existing ones. Ends when `stop` is set (checked twice a second), when the generator is closed,
        or when the connection drops; the remote `tail` is killed on the way out."""
        chan = self.conn.open_session()
        q = shlex.quote(rec.log_path)
        chan.exec_command(f"echo $$; exec tail -n {int(tail)} -F {q} 2>/dev/null")
        chan.settimeout(0.5)
        buf = b""
        remote_pid: int | None = None
        try:
            while stop is None or not stop.is_set():
                try:
                    data = chan.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    break
                buf += data
                *lines, buf = buf.split(b"\n")
                for raw in lines:
                    line = raw.decode(errors="replace")
                    if remote_pid is None:
                        remote_pid = int(line) if line.strip().isdigit() else -1
                        continue
                    yield line
        finally:
            chan.close()
            if remote_pid and remote_pid > 0:
                try:
                    # only if that pid is still our tail: it may have ended and the pid been reused
                    p = int(remote_pid)
                    self.run(f'[ "$(cat /proc/{p}/comm 2>/dev/null)" = tail ] && kill {p}; true', timeout=5)
                except SshError:
                    pass  # the host went away; its sshd ends the tail with the session
