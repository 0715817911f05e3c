"""Pre-flight: check every host of a plan, concurrently, before anything starts anywhere.

Per host: reachable (SSH connect for remote hosts), `<python> -m disaggctl --version` answers with this
version, the GPUs the topology uses exist (when `nvidia-smi` is there), the NICs it names exist (when
`ibv_devices` is there), every port the plan gives the host can be bound, and local model paths exist.
Local hosts run the same checks through `sh -c` instead of SSH.
"""

from __future__ import annotations

import json
import shlex
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from disaggctl import __version__

Runner = Callable[[str, float], tuple[int, str, str]]


@dataclass(frozen=True)
class Problem:
    host: str
    check: str  # reachable | disaggctl | gpus | nics | ports | paths | spec | probe
    message: str

    def __str__(self) -> str:
        return f"host {self.host}: {self.message}"


# Runs on the host with its own interpreter (-I -S: stdlib only); prints one JSON document.
PROBE_SCRIPT = r"""
import errno, json, os, shutil, socket, subprocess, sys
req = json.loads(sys.argv[1])
out = {"problems": [], "gpus": None, "nics": None}
def problem(check, msg):
    out["problems"].append([check, msg])
for bind, port, who in req["ports"]:
    fam = socket.AF_INET6 if ":" in bind else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((bind, port))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            problem("ports", "port %d (%s) is already in use on %s" % (port, who, bind))
        elif e.errno == errno.EADDRNOTAVAIL:
            problem("ports", "%s cannot bind %s: not an address of this host" % (who, bind))
        else:
            problem("ports", "%s cannot bind %s:%d: %s" % (who, bind, port, e.strerror))
    finally:
        s.close()
if shutil.which("nvidia-smi"):
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
        if r.returncode == 0:
            out["gpus"] = len([l for l in r.stdout.splitlines() if l.strip()])
        else:
            problem("gpus", "nvidia-smi failed: " + (r.stderr or r.stdout).strip()[:300])
    except subprocess.TimeoutExpired:
        problem("gpus", "nvidia-smi did not answer within 30 s")
if shutil.which("ibv_devices"):
    try:
        r = subprocess.run(["ibv_devices"], capture_output=True, text=True, timeout=30)
        names = []
        for line in r.stdout.splitlines():
            f = line.split()
            if f and f[0] != "device" and not f[0].startswith("-"):
                names.append(f[0])
        out["nics"] = names
    except subprocess.TimeoutExpired:
        problem("nics", "ibv_devices did not answer within 30 s")
for path, who in req["paths"]:
    if not os.path.exists(os.path.expanduser(path)):
        problem("paths", "%s: model path %s does not exist" % (who, path))
print(json.dumps(out))
"""


def _needs(host: Any, processes: list) -> dict:
    ports, paths, gpus, nics = [], [], set(), []
    for p in processes:
        ports.append([p.bind, int(p.port), p.name])
        if getattr(p, "bootstrap_port", None):
            ports.append([p.bind, int(p.bootstrap_port), f"{p.name} bootstrap"])
        gpus.update(int(g) for g in (p.gpus or []))
        nics.extend(n for n in (p.nics or []) if n not in nics)
        argv = [str(a) for a in p.argv]
        for i, a in enumerate(argv[:-1]):
            if a == "--model" and not argv[i + 1].startswith("builtin:"):
                paths.append([argv[i + 1], p.name])
    nics.extend(n for n in (getattr(host, "nics", None) or []) if n not in nics)
    return {"ports": ports, "paths": paths, "gpus": gpus, "nics": nics}


def check_host(host: Any, processes: list, run: Runner) -> list[Problem]:
    """Every check for one host, through `run(command, timeout) -> (rc, stdout, stderr)`."""
    name = host.name
    python = getattr(host, "python", None) or "python3"
    problems: list[Problem] = []

    rc, out, err = run(shlex.join([python, "-m", "disaggctl", "--version"]), 60)
    expected = f"disaggctl {__version__}"
    if rc != 0:
        text = (err or out).strip().splitlines()
        detail = text[-1] if text else f"exit {rc}"
        if rc == 127 or "No such file" in detail or "not found" in detail:
            detail = f"interpreter {python} not found"
        elif "No module named" in detail:
            detail = f"disaggctl is not installed for {python}"
        return [Problem(name, "disaggctl", f"`{python} -m disaggctl --version` failed: {detail}")]
    if out.strip() != expected:
        problems.append(
            Problem(
                name,
                "disaggctl",
                f"{python} has {out.strip() or 'no version'!r}, this machine has {expected!r}",
            )
        )

    needs = _needs(host, processes)
    req = json.dumps({"ports": needs["ports"], "paths": needs["paths"]})
    rc, out, err = run(shlex.join([python, "-I", "-S", "-c", PROBE_SCRIPT, req]), 90)
    try:
        found = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return [
            *problems,
            Problem(name, "probe", f"host probe failed (exit {rc}): {(err or out).strip()[:500]}"),
        ]
    problems += [Problem(name, check, msg) for check, msg in found["problems"]]

    declared = int(getattr(host, "gpus", 0) or 0)
    wanted = max([declared, *(g + 1 for g in needs["gpus"])])
    if found["gpus"] is not None and found["gpus"] < wanted:
        problems.append(
            Problem(
                name, "gpus", f"the topology uses {wanted} GPU(s) here but nvidia-smi lists {found['gpus']}"
            )
        )
    if found["nics"] is not None:
        missing = [n for n in needs["nics"] if n not in found["nics"]]
        if missing:
            have = ", ".join(found["nics"]) or "none"
            problems.append(
                Problem(name, "nics", f"NIC(s) {', '.join(missing)} not found (ibv_devices: {have})")
            )
    return problems


def _local_runner(command: str, timeout: float) -> tuple[int, str, str]:
    try:
        r = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return 124, "", f"timed out after {timeout:g} s"
    return r.returncode, r.stdout, r.stderr


def _check(host: Any, processes: list, connect_timeout_s: float) -> list[Problem]:
    if getattr(host, "local", False):
        return check_host(host, processes, _local_runner)
    from disaggctl.launch.ssh import SshBackend, SshError, spec_problem

    refused = [Problem(host.name, "spec", msg) for msg in map(spec_problem, processes) if msg]
    if refused:
        return refused

    try:
        backend = SshBackend(host, connect_timeout_s=connect_timeout_s)
        conn = backend.conn
    except SshError as e:
        return [Problem(host.name, "reachable", str(e).removeprefix(f"host {host.name}: "))]

    def run(command: str, timeout: float) -> tuple[int, str, str]:
        try:
            r = conn.run(command, timeout)
        except SshError as e:
            return 255, "", str(e)
        return r.rc, r.stdout, r.stderr

    return check_host(host, processes, run)


def preflight(
    hosts: list, plan: Any, processes: list | None = None, connect_timeout_s: float = 10.0
) -> list[Problem]:
    """Problems found on `hosts` (all at once, one thread per host), in host order; [] means go.

    `processes` narrows the port/GPU checks to the ones about to start (an idempotent `up` leaves
    running processes, which hold their ports, alone); default: every process of the plan.
    """
    procs = list(plan.processes if processes is None else processes)
    if not hosts:
        return []
    with ThreadPoolExecutor(max_workers=min(32, len(hosts))) as pool:
        futures = [
            pool.submit(_check, h, [p for p in procs if p.host == h.name], connect_timeout_s) for h in hosts
        ]
        results = []
        for h, f in zip(hosts, futures, strict=True):
            try:
                results.extend(f.result())
            except Exception as e:  # a check must never take the others down with it
                results.append(Problem(h.name, "probe", f"pre-flight check crashed: {e}"))
    return results
