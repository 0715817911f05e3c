"""Topology -> Plan: every process with its host, GPUs, NICs, ports, command line and environment.

Pure apart from reading the model's config.json (multimodal detection, and the head counts that tensor
parallelism must divide) and this machine's addresses (which hosts are local). The rules are documented
in docs/topology.md; every rejection is a TopologyError naming the field and its line.

`build_plan` checks the file (topology/checks.py), places the replicas on GPUs, gives them ports, and
writes their command lines: topology/embedded_argv.py for the embedded runtime and the built-in proxy,
topology/sglang.py for engine: sglang. The plan's data is topology/spec.py.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
from typing import Literal

from pydantic import BaseModel

from disaggctl.topology import sglang
from disaggctl.topology.checks import Rejections, check_hosts, check_roles, check_tp_shards
from disaggctl.topology.embedded_argv import builtin_proxy_argv, embedded_argv
from disaggctl.topology.nics import nics_for
from disaggctl.topology.schema import ROLES, Host, Topology
from disaggctl.topology.spec import HostSpec, Plan, ProcessSpec

DEFAULT_HTTP_PORT = 30000
DEFAULT_BOOTSTRAP_PORT = 8998
MAX_PORT = 65535


# -- helpers -----------------------------------------------------------------------------------------


def _is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _local_addresses() -> set[str]:
    names = {"localhost", socket.gethostname(), socket.getfqdn()}
    try:
        import psutil

        for addrs in psutil.net_if_addrs().values():
            names.update(
                a.address.split("%")[0] for a in addrs if a.family in (socket.AF_INET, socket.AF_INET6)
            )
    except Exception:  # psutil missing or the OS refuses: fall back to loopback and our own names
        pass
    return names


def default_bind(address: str) -> str:
    """Listen on the address peers use to reach the host (127.0.0.1 for a loopback host), never on
    every interface unless the topology says `bind: 0.0.0.0`."""
    return "127.0.0.1" if address == "localhost" else address


def _host_spec(h: Host, local_names: set[str]) -> HostSpec:
    local = _is_loopback(h.address) or h.address in local_names
    python = h.python or (sys.executable if local else "python3")
    return HostSpec(
        name=h.name, address=h.address, gpus=h.gpus, nics=list(h.nics), local=local, ssh=h.ssh,
        backend=h.backend or ("local" if local else "ssh"), python=python, run_dir=h.run_dir,
    )  # fmt: skip


# -- placement -----------------------------------------------------------------------------------------


class _Slot(BaseModel):
    role: str
    replica: int
    host: str
    index_on_host: int  # j-th replica of this role on this host
    gpus: list[int]


def _free_block(used: set[int], total: int, n: int) -> list[int] | None:
    for start in range(0, total - n + 1):
        block = list(range(start, start + n))
        if not used.intersection(block):
            return block
    return None


def _place(topology: Topology, rej: Rejections) -> list[_Slot]:
    hosts = {h.name: h for h in topology.hosts}
    used: dict[str, dict[int, str]] = {h.name: {} for h in topology.hosts}  # GPU -> process name
    slots: list[_Slot] = []
    for role_name, role in topology.roles():
        order = [hosts[n] for n in (role.hosts or [h.name for h in topology.hosts])]
        n = role.gpus_per_replica or role.tp
        gpu_hosts = [h for h in order if h.gpus > 0]
        if gpu_hosts and all(h.gpus < n for h in gpu_hosts) and not any(h.gpus == 0 for h in order):
            h = max(gpu_hosts, key=lambda x: x.gpus)
            rej.add(
                (role_name, "tp" if role.gpus_per_replica is None else "gpus_per_replica"),
                f"a replica needs {n} GPUs but host {h.name} has only {h.gpus}",
            )
            continue
        per_host: dict[str, int] = {}
        ptr = 0
        for r in range(role.replicas):
            chosen: tuple[Host, list[int]] | None = None
            overlap = False
            for k in range(ptr, len(order)):
                h = order[k]
                j = per_host.get(h.name, 0)
                if role.max_per_host is not None and j >= role.max_per_host:
                    continue
                if h.gpus == 0:
                    chosen, ptr = (h, []), k
                    break
                taken = set(used[h.name])
                if role.base_gpu_id is not None:
                    block = list(range(role.base_gpu_id + j * n, role.base_gpu_id + (j + 1) * n))
                    if block[-1] >= h.gpus:
                        continue
                    clash = sorted(taken.intersection(block))
                    if clash:
                        owner = used[h.name][clash[0]]
                        rej.add(
                            (role_name, "base_gpu_id"),
                            f"{role_name}-{r} on {h.name} would use GPUs {_span(block)}, overlapping "
                            f"GPU {clash[0]} of {owner}",
                        )
                        overlap = True
                        break
                else:
                    block = _free_block(taken, h.gpus, n)
                    if block is None:
                        continue
                chosen, ptr = (h, block), k
                break
            if overlap:
                break
            if chosen is None:
                free = ", ".join(f"{h.name}: {h.gpus - len(used[h.name])} of {h.gpus}" for h in gpu_hosts)
                rej.add(
                    (role_name, "replicas"),
                    f"replica {r} of {role_name} does not fit: it needs {n} consecutive free GPUs "
                    f"(free GPUs: {free or 'none'}"
                    + (f"; max_per_host: {role.max_per_host}" if role.max_per_host else "")
                    + ")",
                )
                break
            h, block = chosen
            for g in block:
                used[h.name][g] = f"{role_name}-{r}"
            slots.append(
                _Slot(
                    role=role_name, replica=r, host=h.name, index_on_host=per_host.get(h.name, 0), gpus=block
                )
            )
            per_host[h.name] = per_host.get(h.name, 0) + 1
    return slots


def _span(gpus: list[int]) -> str:
    return f"{gpus[0]}-{gpus[-1]}" if len(gpus) > 1 else str(gpus[0])


# -- ports ---------------------------------------------------------------------------------------------


class _Ports:
    def __init__(self, rej: Rejections) -> None:
        self.used: dict[str, dict[int, str]] = {}
        self.rej = rej

    def claim(self, host: str, port: int, who: str, path: tuple) -> bool:
        taken = self.used.setdefault(host, {})
        if port > MAX_PORT:
            self.rej.add(path, f"{who} would get port {port}, above {MAX_PORT}")
            return False
        if port in taken:
            self.rej.add(path, f"port {port} on host {host} is used twice: {taken[port]} and {who}")
            return False
        taken[port] = who
        return True

    def next_free(self, host: str, start: int, step: int, who: str) -> int:
        taken = self.used.setdefault(host, {})
        port = start
        while port in taken:
            port += step
        taken[port] = who
        return port


def _kind(topology: Topology) -> Literal["xpyd", "epd", "ep", "colocated"]:
    if topology.encoder:
        return "epd"
    if any(role.ep > 1 for _, role in topology.roles()):
        return "ep"
    if topology.colocated:
        return "colocated"
    return "xpyd"


# -- the plan ------------------------------------------------------------------------------------------


def build_plan(topology: Topology, source_path: str = "<topology>") -> Plan:
    """Expand a validated topology into processes (start order: encoders, prefills, decodes, colocated,
    proxy). Raises TopologyError listing every rule the file breaks."""
    source = str(source_path)
    rej = Rejections()
    check_hosts(topology, rej)
    check_roles(topology, rej)
    rej.raise_if_any(topology, source)
    slots = _place(topology, rej)
    rej.raise_if_any(topology, source)
    check_tp_shards(topology, rej)
    rej.raise_if_any(topology, source)

    local_names = _local_addresses()
    host_specs = {h.name: _host_spec(h, local_names) for h in topology.hosts}
    proxy_host = topology.proxy.host or topology.hosts[0].name
    http, boot = _assign_ports(topology, slots, proxy_host, rej, source)
    procs = _worker_processes(topology, slots, proxy_host, http, boot, rej)
    rej.raise_if_any(topology, source)
    _write_commands(topology, procs, host_specs)
    procs.append(_proxy_process(topology, proxy_host, host_specs[proxy_host].python, procs))
    order = {r: i for i, r in enumerate((*ROLES, "proxy"))}
    procs.sort(key=lambda p: (order[p.role], p.replica))
    if topology.engine == "sglang":
        for path, message in sglang.command_issues(topology, procs):
            rej.add(path, message)
        rej.raise_if_any(topology, source)
    return Plan(
        name=topology.name,
        engine=topology.engine,
        kind=_kind(topology),
        source=source,
        hosts=[host_specs[h.name] for h in topology.hosts],
        processes=procs,
        keeper=topology.keeper,
        sglang_version=sglang.render_version(topology) if topology.engine == "sglang" else None,
    )


def _names(slots: list[_Slot]) -> list[str]:
    return [f"{s.role}-{s.replica}" for s in slots]


def _assign_ports(
    topology: Topology, slots: list[_Slot], proxy_host: str, rej: Rejections, source: str
) -> tuple[dict[str, int], dict[str, int]]:
    """(HTTP port, bootstrap port of a prefill) of every replica: the topology's explicit ports first
    (they may not move), then the next free ones from the defaults."""
    roles = dict(topology.roles())
    ports = _Ports(rej)
    ports.claim(proxy_host, topology.proxy.port, "proxy", ("proxy", "port"))
    http: dict[str, int] = {}
    boot: dict[str, int] = {}
    names = _names(slots)
    for s, name in zip(slots, names, strict=True):
        role = roles[s.role]
        if role.port is not None and ports.claim(
            s.host, role.port + s.index_on_host * role.port_step, name, (s.role, "port")
        ):
            http[name] = role.port + s.index_on_host * role.port_step
        if s.role == "prefill" and role.bootstrap_port is not None:
            b = role.bootstrap_port + s.index_on_host
            if ports.claim(s.host, b, f"{name} bootstrap", (s.role, "bootstrap_port")):
                boot[name] = b
    rej.raise_if_any(topology, source)
    for s, name in zip(slots, names, strict=True):
        role = roles[s.role]
        if role.port is None:
            http[name] = ports.next_free(s.host, DEFAULT_HTTP_PORT, role.port_step, name)
        if s.role == "prefill" and role.bootstrap_port is None:
            boot[name] = ports.next_free(s.host, DEFAULT_BOOTSTRAP_PORT, 1, f"{name} bootstrap")
    for host, taken in ports.used.items():
        over = [p for p in taken if p > MAX_PORT]
        if over:
            rej.add((), f"host {host} ran out of ports (next would be {min(over)})")
    rej.raise_if_any(topology, source)
    return http, boot


def _worker_processes(
    topology: Topology,
    slots: list[_Slot],
    proxy_host: str,
    http: dict[str, int],
    boot: dict[str, int],
    rej: Rejections,
) -> list[ProcessSpec]:
    """A process per placed replica, with its address, bind, GPUs, NICs and ports (no command yet)."""
    hosts = {h.name: h for h in topology.hosts}
    roles = dict(topology.roles())
    involved = {s.host for s in slots} | {proxy_host}
    # a loopback listener is unreachable from other machines; several hosts that are all loopback
    # (say, SSH to this machine on another port) are one machine, where loopback works
    several_machines = len(involved) > 1 and not all(_is_loopback(hosts[n].address) for n in involved)
    procs: list[ProcessSpec] = []
    for s, name in zip(slots, _names(slots), strict=True):
        role = roles[s.role]
        h = hosts[s.host]
        bind = role.bind or default_bind(h.address)
        if several_machines and _is_loopback(bind):
            rej.add(
                (s.role, "bind") if role.bind else ("hosts", topology.hosts.index(h), "address"),
                f"{name} would listen on loopback ({bind}) but the topology spans several hosts, so peers "
                "could not reach it: give the host a routable address (or bind: 0.0.0.0)",
            )
            continue
        procs.append(
            ProcessSpec(
                name=name,
                role=s.role,
                replica=s.replica,
                host=h.name,
                address=h.address,
                bind=bind,
                gpus=s.gpus,
                base_gpu_id=s.gpus[0] if s.gpus else None,
                nics=nics_for(s.gpus, h, role.nics),
                tp=role.tp,
                dp=role.dp,
                ep=role.ep,
                port=http[name],
                bootstrap_port=boot.get(name),
                argv=[],
                env={},
                restart=role.restart,
            )  # fmt: skip
        )
    return procs


def _write_commands(topology: Topology, procs: list[ProcessSpec], host_specs: dict[str, HostSpec]) -> None:
    """Every worker's command line and environment, by the engine that serves it."""
    roles = dict(topology.roles())
    for p in procs:
        role = roles[p.role]
        python = host_specs[p.host].python
        env = {"PYTHONUNBUFFERED": "1"}
        # the embedded runtime sets Mooncake's MC_* variables itself, from --transfer-protocol and
        # --transfer-timeout; SGLang reads them (and its own) from the environment
        if topology.engine == "embedded":
            proto = topology.transfer.protocol
            protocol = proto if proto != "auto" else ("rdma" if p.nics else "tcp")
            p.argv = embedded_argv(p, role, topology, python, protocol, procs)
            if p.gpus:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, p.gpus))
        else:
            p.argv = sglang.worker_argv(p, role, topology, python, procs)
            env.update(sglang.transfer_env(p, topology, procs))
        env.update(role.env)
        p.env = env


def _proxy_process(topology: Topology, proxy_host: str, python: str, procs: list[ProcessSpec]) -> ProcessSpec:
    """The proxy in front of the workers: SGLang's router or mini_lb for engine: sglang when the
    topology asks for one, else the built-in proxy."""
    ph = next(h for h in topology.hosts if h.name == proxy_host)
    pbind = topology.proxy.bind or default_bind(ph.address)
    workers = [p for p in procs if p.role in ("prefill", "decode", "colocated")]
    pargv = sglang.proxy_argv(topology, python, pbind, workers) if topology.engine == "sglang" else None
    if pargv is None:
        pargv = builtin_proxy_argv(python, pbind, topology.proxy.port, topology.proxy, workers)
        pargv += [a for p in procs if p.role == "encoder" for a in ("--encoder", p.url)]
    return ProcessSpec(
        name="proxy",
        role="proxy",
        replica=0,
        host=proxy_host,
        address=ph.address,
        bind=pbind,
        gpus=[],
        base_gpu_id=None,
        nics=[],
        tp=1,
        dp=1,
        ep=1,
        port=topology.proxy.port,
        bootstrap_port=None,
        argv=pargv,
        env={"PYTHONUNBUFFERED": "1"},
        restart=topology.proxy.restart,
    )  # fmt: skip
