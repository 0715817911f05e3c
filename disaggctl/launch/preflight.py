"""Pre-flight: check every host of a plan, concurrently, before anything starts anywhere.

Per host: reachable (SSH connect for remote hosts), `<python> -m disaggctl --version` answers with this
version (hosts that run only SGLang processes skip it), the Python modules the host's SGLang processes
run import there (`sglang`, `mooncake.engine` for those that transfer, `sglang_router.launch_router`, a
pinned release's mini_lb) and SGLang is not older than the release the commands are rendered for, the
GPUs the topology uses exist (when `nvidia-smi` is there), the NICs it names exist (when `ibv_devices`
is there; protocol rdma also needs `ibv_devices` to list one), every port the plan gives the host can be
bound (with SGLang's extra listeners: a language-only server's encoder bootstrap port, the router's
metrics port), and local model paths exist (a hub id `org/name` that is not a directory here is left to
the server to fetch). Local hosts run the same checks through `sh -c` instead of SSH.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from disaggctl import __version__
from disaggctl.launch.backend import backend_class

Runner = Callable[[str, float], tuple[int, str, str]]

# `org/name`: what a server may fetch from the Hugging Face hub (disaggctl/runtime/builtin.py has the
# same rule: the runtime cannot import the launcher)
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
# What to install for a module a host lacks, and SGLang's default listeners disaggctl does not place
INSTALL = {
    "sglang": "pip install sglang",
    "mooncake": "pip install mooncake-transfer-engine (the CUDA build; it needs libibverbs1 and libnuma1)",
    "sglang_router": "pip install sglang-router",
    # moe_a2a_backend: mooncake on the embedded runtime
    "mooncake.ep": "moe_a2a_backend: mooncake needs Mooncake's EP buffer and process group, which the CUDA "
    "build of mooncake-transfer-engine ships and the CPU wheel does not; leave moe_a2a_backend unset",
}
INSTALL["mooncake.pg"] = INSTALL["mooncake.ep"]
ENCODER_BOOTSTRAP_PORT = 8997
ROUTER_METRICS_PORT = 29000


@dataclass(frozen=True)
class Problem:
    host: str
    check: str  # reachable | disaggctl | modules | gpus | nics | ports | paths | spec | probe
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
for path, who, hub in req["paths"]:
    if not os.path.exists(os.path.expanduser(path)) and not hub:
        problem("paths", "%s: model path %s does not exist" % (who, path))
print(json.dumps(out))
"""

# Runs on the host with its own interpreter and its site-packages (the modules live there); imports each
# module and prints {module: {"version": ...} | {"error": ...}}.
MODULES_SCRIPT = r"""
import importlib, json, sys
out = {}
for name in json.loads(sys.argv[1]):
    try:
        mod = importlib.import_module(name)
    except BaseException as e:  # a missing shared library or a CUDA error count as much as a missing module
        out[name] = {"error": ("%s: %s" % (type(e).__name__, e)).strip()[:400]}
        continue
    top = name.split(".")[0]
    version = getattr(sys.modules.get(top), "__version__", None)
    if version is None:
        try:
            from importlib import metadata
            dists = metadata.packages_distributions().get(top) or []
            version = metadata.version(dists[0]) if dists else None
        except Exception:
            version = None
    out[name] = {"version": version}
print(json.dumps(out))
"""


def _module(argv: list[str]) -> str | None:
    return argv[2] if len(argv) > 2 and argv[1] == "-m" else None


def _flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv[:-1] else None


def _sglang_modules(p: Any) -> list[str]:
    """What the process imports to run: SGLang (and Mooncake when it transfers), or the proxy's module."""
    module = _module([str(a) for a in p.argv]) or ""
    if module == "sglang.launch_server":
        # the plan gives Mooncake's settings exactly to the processes that transfer through it
        return ["sglang", *(["mooncake.engine"] if any(k.startswith("MC_") for k in p.env or {}) else [])]
    if module.startswith(("sglang.", "sglang_router.")):
        return [module]
    return []


def _version_key(version: str) -> tuple[int, ...]:
    parts = []
    for part in version.split("."):
        digits = re.match(r"\d+", part.removeprefix("post"))
        parts.append(int(digits.group()) if digits else 0)
    return tuple(parts)


def _needs(host: Any, processes: list) -> dict:
    ports, paths, gpus, nics, modules = [], [], set(), [], []
    disaggctl = not processes
    rdma = False
    for p in processes:
        argv = [str(a) for a in p.argv]
        ports.append([p.bind, int(p.port), p.name])
        if p.bootstrap_port:
            ports.append([p.bind, int(p.bootstrap_port), f"{p.name} bootstrap"])
        if "--language-only" in argv:
            port = int(_flag(argv, "--encoder-bootstrap-port") or ENCODER_BOOTSTRAP_PORT)
            ports.append([p.bind, port, f"{p.name} encoder bootstrap"])
        if _module(argv) == "sglang_router.launch_router":
            port = int(_flag(argv, "--prometheus-port") or ROUTER_METRICS_PORT)
            ports.append([_flag(argv, "--prometheus-host") or "0.0.0.0", port, f"{p.name} metrics"])
        gpus.update(int(g) for g in (p.gpus or []))
        nics.extend(n for n in (p.nics or []) if n not in nics)
        for flag in ("--model", "--model-path"):
            path = _flag(argv, flag)
            if path and not path.startswith("builtin:"):
                paths.append([path, p.name, bool(HUB_ID.match(path))])
        wanted = _sglang_modules(p)
        disaggctl = disaggctl or not wanted
        if _module(argv) == "disaggctl" and _flag(argv, "--moe-a2a-backend") == "mooncake":
            wanted = [*wanted, "mooncake.ep", "mooncake.pg"]
        modules.extend(m for m in wanted if m not in modules)
        rdma = rdma or (p.env or {}).get("MC_FORCE_HCA") == "1"
    nics.extend(n for n in host.nics if n not in nics)
    return {
        "ports": ports, "paths": paths, "gpus": gpus, "nics": nics, "modules": modules,
        "disaggctl": disaggctl, "rdma": rdma,
    }  # fmt: skip


def _check_modules(
    name: str, python: str, modules: list[str], sglang_version: str | None, run: Runner
) -> list[Problem]:
    """Every module imports with the host's interpreter, and SGLang is at least the rendered release."""
    rc, out, err = run(shlex.join([python, "-c", MODULES_SCRIPT, json.dumps(modules)]), 300)
    try:
        found = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        text = (err or out).strip().splitlines()
        detail = text[-1] if text else f"exit {rc}"
        if rc == 127 or "No such file" in detail or "not found" in detail:
            detail = f"interpreter {python} not found"
        return [Problem(name, "modules", f"cannot check the Python modules with {python}: {detail}")]
    problems = []
    for module in modules:
        result = found.get(module, {})
        if "error" in result:
            top = module.split(".")[0]
            hint = INSTALL.get(module, INSTALL.get(top, ""))
            problems.append(
                Problem(
                    name,
                    "modules",
                    f"{python} cannot import {module}: {result['error']}" + (f" ({hint})" if hint else ""),
                )
            )
        elif module == "sglang" and sglang_version and result.get("version"):
            have = str(result["version"])
            if _version_key(have) < _version_key(sglang_version):
                problems.append(
                    Problem(
                        name,
                        "modules",
                        f"{python} has SGLang {have}, older than {sglang_version}, the release the commands "
                        f"are rendered for: upgrade it, or set sglang.version: {have} in the topology",
                    )
                )
    return problems


def check_host(host: Any, processes: list, run: Runner, sglang_version: str | None = None) -> list[Problem]:
    """Every check for one host, through `run(command, timeout) -> (rc, stdout, stderr)`.
    `sglang_version`: the SGLang release the plan's commands are rendered for (engine sglang)."""
    name = host.name
    python = host.python or "python3"
    problems: list[Problem] = []
    needs = _needs(host, processes)

    if needs["disaggctl"]:
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
    if needs["modules"]:
        found = _check_modules(name, python, needs["modules"], sglang_version, run)
        if any("cannot check the Python modules" in p.message for p in found):
            return [*problems, *found]
        problems += found

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

    declared = int(host.gpus)
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
    if needs["rdma"] and not found["nics"]:
        seen = (
            "ibv_devices lists no RDMA device"
            if found["nics"] is not None
            else "ibv_devices is not installed"
        )
        problems.append(
            Problem(
                name,
                "nics",
                f"transfer.protocol is rdma but {seen} here (install ibverbs-utils to let pre-flight see "
                "the devices, or use protocol auto, which falls back to TCP)",
            )
        )
    return problems


def _check(
    host: Any, processes: list, connect_timeout_s: float, sglang_version: str | None = None
) -> list[Problem]:
    try:
        cls = backend_class(host.backend)
    except ValueError as e:
        return [Problem(host.name, "spec", str(e))]
    return cls.preflight(host, processes, sglang_version, connect_timeout_s)


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
    version = plan.sglang_version
    with ThreadPoolExecutor(max_workers=min(32, len(hosts))) as pool:
        futures = [
            pool.submit(_check, h, [p for p in procs if p.host == h.name], connect_timeout_s, version)
            for h in hosts
        ]
        results = []
        for h, f in zip(hosts, futures, strict=True):
            try:
                results.extend(f.result())
            except Exception as e:  # a check must never take the others down with it
                results.append(Problem(h.name, "probe", f"pre-flight check crashed: {e}"))
    return results
