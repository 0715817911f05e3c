"""Topology -> Plan: every process with its host, GPUs, NICs, ports, command line and environment.

Pure apart from reading the model's config.json (multimodal detection, and the head counts that tensor
parallelism must divide) and this machine's addresses (which hosts are local). The rules are documented
in docs/topology.md; every rejection is a TopologyError naming the field and its line.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import math
import socket
import sys
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, computed_field

from disaggctl.topology.load import Issue, TopologyError
from disaggctl.topology.nics import nics_for
from disaggctl.topology.schema import ROLES, Host, Keeper, Proxy, RestartPolicy, Role, SshSettings, Topology

DEFAULT_HTTP_PORT = 30000
DEFAULT_BOOTSTRAP_PORT = 8998
MAX_PORT = 65535


class HostSpec(BaseModel):
    name: str
    address: str
    gpus: int
    nics: list[str]
    local: bool
    ssh: SshSettings | None = None
    python: str
    run_dir: str | None = None


class ProcessSpec(BaseModel):
    name: str
    role: Literal["encoder", "prefill", "decode", "colocated", "proxy"]
    replica: int
    host: str
    address: str
    bind: str
    gpus: list[int]
    base_gpu_id: int | None
    nics: list[str]
    tp: int
    dp: int
    ep: int
    port: int
    bootstrap_port: int | None
    argv: list[str]
    env: dict[str, str]
    health_path: str = "/health"
    # not in the spec hash: a new policy takes effect without restarting the process
    restart: RestartPolicy = "on-failure"

    @computed_field
    @property
    def url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.port}"


class Plan(BaseModel):
    name: str
    engine: Literal["embedded", "sglang"]
    kind: Literal["xpyd", "epd", "ep", "colocated"]
    source: str
    hosts: list[HostSpec]
    processes: list[ProcessSpec]
    keeper: Keeper = Keeper()
    # engine sglang: the SGLang release the commands are rendered for (pre-flight compares the hosts')
    sglang_version: str | None = None

    def process(self, name: str) -> ProcessSpec:
        for p in self.processes:
            if p.name == name:
                return p
        raise KeyError(f"no process {name!r} in plan {self.name}")

    def host(self, name: str) -> HostSpec:
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(f"no host {name!r} in plan {self.name}")

    def spec_hash(self, name: str) -> str:
        """What `up` compares to decide whether a running process still matches the plan."""
        p = self.process(name)
        h = self.host(p.host)
        doc = {
            "argv": p.argv,
            "env": p.env,
            "host": [h.name, h.address, h.python],
            "bind": p.bind,
            "port": p.port,
            "bootstrap_port": p.bootstrap_port,
            "gpus": p.gpus,
            "nics": p.nics,
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


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


def _model_config(topology: Topology) -> dict | None:
    """The model's config.json when `model.path` is a directory on this machine, else None."""
    config = Path(topology.model.path).expanduser() / "config.json"
    try:
        raw = json.loads(config.read_text())
    except (OSError, ValueError):
        return None
    return raw if isinstance(raw, dict) else None


# built-in models with a vision tower (disaggctl/runtime/builtin.py makes them)
BUILTIN_MULTIMODAL = ("builtin:tiny-llava",)


def _multimodal(topology: Topology) -> bool:
    if topology.model.multimodal != "auto":
        return bool(topology.model.multimodal)
    if topology.model.path in BUILTIN_MULTIMODAL:
        return True
    return "vision_config" in (_model_config(topology) or {})


# The shapes tensor parallelism splits, for the built-in models. The runtime generates their configs
# (disaggctl/runtime/builtin.py: TINY_CONFIG, and SmolLM2-135M's GGUF header for smollm2), which the
# control plane may not import; tests/test_plan.py fails when this table and builtin.py disagree.
BUILTIN_SHAPES: dict[str, dict[str, int]] = {
    "builtin:tiny": {"num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 192},
    "builtin:smollm2": {"num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1536},
    "builtin:tiny-llava": {"num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128},
}

# What each rank of a tensor-parallel server holds a 1/tp share of, the KV heads first: they are the
# fewest, so the first to refuse a tp.
_SHARDED = (
    ("num_key_value_heads", "each rank must hold whole KV heads"),
    ("num_attention_heads", "each rank must hold whole query heads"),
    ("intermediate_size", "each rank holds an equal slice of the MLP"),
)


def model_shape(topology: Topology) -> dict[str, int] | None:
    """Head counts and intermediate size of the model as the embedded runtime reads them, or None when
    this machine cannot know them (a path that is not a local directory, an unreadable config.json);
    the runtime then checks them itself when it loads the model."""
    path = topology.model.path
    if path in BUILTIN_SHAPES:
        return dict(BUILTIN_SHAPES[path])
    raw = _model_config(topology)
    if raw is None:
        return None
    try:
        heads = int(raw["num_attention_heads"])
        # the runtime's rule (and transformers'): no KV head count means one KV head per query head
        kv = int(raw.get("num_key_value_heads") or heads)
        inter = int(raw["intermediate_size"])
    except (KeyError, TypeError, ValueError):
        return None
    if min(heads, kv, inter) <= 0:
        return None
    return {"num_attention_heads": heads, "num_key_value_heads": kv, "intermediate_size": inter}


def moe_shape(topology: Topology) -> tuple[int, int] | None:
    """(experts, intermediate size of one expert) of the model, (0, 0) for a dense one, None when this
    machine cannot tell (the runtime checks at load). Built-in models are dense."""
    if topology.model.path in BUILTIN_SHAPES:
        return 0, 0
    raw = _model_config(topology)
    if raw is None:
        return None
    try:
        # transformers 5 writes num_local_experts where Hub checkpoints say num_experts
        experts = int(raw.get("num_local_experts") or raw.get("num_experts") or 0)
        inter = int(raw.get("moe_intermediate_size") or 0)
    except (TypeError, ValueError):
        return None
    return experts, inter


def _check_experts(topology: Topology, rej: _Rejections) -> None:
    """Expert parallelism on the embedded runtime spreads whole experts over a server's tp ranks (ep = tp;
    SGLang's default too), or, at ep 1, splits every expert like the dense MLP: say now what cannot split."""
    if topology.engine != "embedded":
        return
    shape = moe_shape(topology)
    for role_name, role in topology.roles():
        if role.ep > 1 and role.ep != role.tp:
            rej.add(
                (role_name, "ep"),
                f"{role.ep} with tp {role.tp}: the embedded runtime spreads the experts over the server's "
                f"tp ranks, so ep is 1 or equal to tp ({role.tp})",
            )
            continue
        if shape is None:
            continue
        experts, inter = shape
        if role.ep > 1 and not experts:
            rej.add(
                (role_name, "ep"), f"{topology.model.path} is not a mixture-of-experts model; leave ep at 1"
            )
        elif role.ep > 1 and experts % role.ep:
            rej.add((role_name, "ep"), f"{role.ep} does not divide the model's {experts} experts")
        elif experts and role.ep == 1 and role.tp > 1 and inter % role.tp:
            rej.add(
                (role_name, "tp"),
                f"{role.tp} does not divide moe_intermediate_size {inter} (at ep 1 every expert is split over "
                f"the ranks); set ep: {role.tp} to spread whole experts instead",
            )


def _alternatives(values: list[int]) -> str:
    return " or ".join(map(str, values)) if len(values) <= 2 else ", ".join(map(str, values))


def _check_tp_shards(topology: Topology, rej: _Rejections) -> None:
    """The embedded runtime gives each of a server's tp ranks 1/tp of the query heads, the KV heads and
    the MLP, and refuses a model where one does not divide; say so now, with the line, rather than
    from a server's log after `up` has started half the deployment. (SGLang replicates KV heads when
    tp exceeds them, so it has rules of its own.)"""
    if topology.engine != "embedded":
        return
    shape = model_shape(topology)
    if shape is None:
        return
    common = math.gcd(*shape.values())
    valid = [n for n in range(1, common + 1) if common % n == 0]
    for role_name, role in topology.roles():
        for key, why in _SHARDED:
            if shape[key] % role.tp:
                rej.add(
                    (role_name, "tp"),
                    f"{role.tp} does not divide {key} {shape[key]} of {topology.model.path} ({why}); "
                    f"use a tp that divides {shape['num_attention_heads']} attention heads, "
                    f"{shape['num_key_value_heads']} KV heads and intermediate_size "
                    f"{shape['intermediate_size']}: {_alternatives(valid)}",
                )
                break


class _Rejections:
    def __init__(self) -> None:
        self.issues: list[Issue] = []

    def add(self, path: tuple, message: str) -> None:
        self.issues.append(Issue(path, message))

    def raise_if_any(self, topology: Topology, source: str) -> None:
        if self.issues:
            raise TopologyError(source, self.issues, topology._lines)


def check_launchable(topology: Topology, source: str) -> None:
    """TopologyError for what a plan can describe but `up` cannot run yet: the embedded runtime has no
    encoder role and serves dp/ep 1 only (SGLang servers do all of these). `plan` stays permissive so
    that such layouts can be drawn and rendered for SGLang."""
    if topology.engine != "embedded":
        return
    hosts = {h.name: h for h in topology.hosts}
    rej = _Rejections()
    for role_name, role in topology.roles():
        if role_name == "encoder" and not topology.prefill:
            rej.add((role_name,), "the embedded runtime runs encoders in front of prefill + decode (EPD) only")
        if role_name == "encoder" and role.tp > 1:
            rej.add((role_name, "tp"), "an embedded encoder runs on one device (tp: 1)")
        # rank r of a server runs on the r-th GPU of its CUDA_VISIBLE_DEVICES: fewer GPUs than ranks
        # would leave the last ranks without a device
        on_gpus = any(hosts[n].gpus > 0 for n in (role.hosts or list(hosts)) if n in hosts)
        if on_gpus and role.gpus_per_replica is not None and role.gpus_per_replica < role.tp:
            rej.add(
                (role_name, "gpus_per_replica"),
                f"{role.gpus_per_replica} for tp {role.tp}: each rank of the embedded runtime needs a GPU "
                f"of its own; set gpus_per_replica to at least {role.tp} (or leave it out)",
            )
        if role.dp > 1:
            rej.add(
                (role_name, "dp"),
                "the embedded runtime has no attention data parallelism (SGLang's --attn-dp-size); use "
                f"engine: sglang for dp: {role.dp}, or more replicas",
            )
    _check_experts(topology, rej)
    rej.raise_if_any(topology, source)


# -- checks that need the whole file -------------------------------------------------------------------


def _check_roles(topology: Topology, rej: _Rejections) -> None:
    t = topology
    if bool(t.prefill) != bool(t.decode):
        have, missing = ("prefill", "decode") if t.prefill else ("decode", "prefill")
        rej.add((have,), f"{have} needs a {missing} role too (or use colocated alone)")
    if t.colocated and (t.prefill or t.decode):
        rej.add(("colocated",), "colocated cannot be mixed with prefill/decode in one topology")
    if t.encoder:
        if not (t.prefill or t.colocated):
            rej.add(("encoder",), "encoder needs prefill + decode (EPD) or a colocated language model")
        if not _multimodal(t):
            rej.add(
                ("encoder",),
                f"an encoder needs a multimodal model: {t.model.path!r} is not one "
                "(a local model is multimodal when its config.json has vision_config; "
                "otherwise set model.multimodal: true)",
            )
    from disaggctl.topology.sglang import topology_issues

    for path, message in topology_issues(t):
        rej.add(path, message)
    names = [h.name for h in t.hosts]
    if t.proxy.host is not None and t.proxy.host not in names:
        rej.add(("proxy", "host"), f"unknown host {t.proxy.host!r} (hosts: {', '.join(names)})")

    for role_name, role in t.roles():
        where = (role_name,)
        for i, h in enumerate(role.hosts or []):
            if h not in names:
                rej.add((*where, "hosts", i), f"unknown host {h!r} (hosts: {', '.join(names)})")
        if role.hosts is not None and not role.hosts:
            rej.add((*where, "hosts"), "an empty host list places nothing")
        n = role.gpus_per_replica or role.tp
        if n % role.ep:
            rej.add((*where, "ep"), f"EP size {role.ep} does not divide the {n} GPUs of a replica")
        if n % role.dp:
            rej.add((*where, "dp"), f"DP size {role.dp} does not divide the {n} GPUs of a replica")
        if t.engine == "sglang" and role.ep > 1 and role.ep != role.tp:
            rej.add(
                (*where, "ep"),
                f"SGLang's Mooncake MoE backend sets the EP size to tp ({role.tp}); ep: {role.ep} cannot be honoured",
            )
        if role.bootstrap_port is not None and role_name != "prefill":
            rej.add((*where, "bootstrap_port"), "only prefill has a bootstrap port")
        for j, nic in enumerate(role.nics or []):
            if not nic or "," in nic or any(c.isspace() for c in nic):
                rej.add((*where, "nics", j), f"NIC name {nic!r} must be one device name")


def _check_hosts(topology: Topology, rej: _Rejections) -> None:
    seen: dict[str, int] = {}
    for i, h in enumerate(topology.hosts):
        if h.name in seen:
            rej.add(("hosts", i, "name"), f"duplicate host name {h.name!r} (also hosts[{seen[h.name]}])")
        seen.setdefault(h.name, i)


def _host_spec(h: Host, local_names: set[str]) -> HostSpec:
    local = _is_loopback(h.address) or h.address in local_names
    python = h.python or (sys.executable if local else "python3")
    return HostSpec(
        name=h.name, address=h.address, gpus=h.gpus, nics=list(h.nics), local=local, ssh=h.ssh,
        python=python, run_dir=h.run_dir,
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


def _place(topology: Topology, rej: _Rejections) -> list[_Slot]:
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
    def __init__(self, rej: _Rejections) -> None:
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


# -- command lines -------------------------------------------------------------------------------------


def _timeout_text(timeout_s: float) -> str:
    return str(int(timeout_s)) if float(timeout_s).is_integer() else str(timeout_s)


def _hostport(address: str, port: int | None) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _peer_args(p: ProcessSpec, procs: list[ProcessSpec]) -> list[str]:
    """The peers a PD worker may deal with, bound by the plan: a decode sends KV registrations only to
    these prefill bootstrap endpoints, a prefill writes KV only to these decodes. A bootstrap address
    that arrives in a request is then checked, not trusted."""
    argv: list[str] = []
    if p.role == "decode":
        for q in procs:
            if q.role == "prefill":
                argv += ["--prefill-bootstrap", _hostport(q.address, q.bootstrap_port)]
    elif p.role == "prefill":
        for q in procs:
            if q.role == "decode":
                argv += ["--decode-peer", f"{q.name}={q.url}"]
    # EPD: a prefill takes embeddings from these encoders only; an encoder writes into these prefills only
    peer_of = {"prefill": ("encoder", "--encoder-peer"), "encoder": ("prefill", "--prefill-peer")}
    if p.role in peer_of:
        role, flag = peer_of[p.role]
        argv += [a for q in procs if q.role == role for a in (flag, f"{q.name}={q.url}")]
    return argv


def _embedded_argv(
    p: ProcessSpec, role: Role, topology: Topology, python: str, protocol: str, procs: list[ProcessSpec]
) -> list[str]:
    m = topology.model
    argv = [python, "-m", "disaggctl", "serve", p.role, "--host", p.bind, "--port", str(p.port)]
    argv += ["--model", m.path, "--dtype", m.dtype, "--device", "cuda" if p.gpus else "cpu"]
    if p.tp > 1:
        argv += ["--tp-size", str(p.tp)]
    if p.ep > 1:
        argv += ["--ep-size", str(p.ep)]
    kv_knobs = p.role != "encoder"  # an encoder has no KV pool and no context
    for flag, value in (
        ("--page-size", role.page_size),
        ("--max-pages", role.max_pages),
        ("--max-batch", role.max_batch),
        ("--chunk-size", role.chunk_size),
        ("--max-model-len", m.max_model_len),
        ("--served-model-name", m.served_name),
    ):
        if value is not None and (kv_knobs or flag == "--max-batch"):
            argv += [flag, str(value)]
    if role.cuda_graph is False:
        argv.append("--no-cuda-graph")
    if p.role == "prefill":
        argv += ["--bootstrap-port", str(p.bootstrap_port)]
    if p.role in ("prefill", "decode", "encoder"):
        # Mooncake names each side by this address: the peer must reach it even when binding 0.0.0.0.
        argv += ["--advertise-host", p.address]
        argv += ["--transfer-protocol", protocol]
        if p.nics:
            argv += ["--ib-device", ",".join(p.nics)]
        argv += ["--transfer-timeout", _timeout_text(topology.transfer.timeout_s)]
        argv += _peer_args(p, procs)
    return argv + list(role.extra_args)


def _builtin_proxy_argv(
    python: str, bind: str, port: int, proxy: Proxy, workers: list[ProcessSpec]
) -> list[str]:
    argv = [
        python,
        "-m",
        "disaggctl",
        "serve",
        "proxy",
        "--host",
        bind,
        "--port",
        str(port),
        "--policy",
        proxy.policy,
        "--read-timeout",
        _timeout_text(proxy.read_timeout_s),
        "--request-timeout",
        _timeout_text(proxy.request_timeout_s),
        "--retries",
        str(proxy.retries),
        "--breaker-failures",
        str(proxy.breaker_failures),
        "--breaker-cooldown",
        _timeout_text(proxy.breaker_cooldown_s),
    ]
    for w in workers:
        if w.role == "prefill":
            argv += ["--prefill", w.url, "--bootstrap-port", str(w.bootstrap_port)]
    for w in workers:
        if w.role == "decode":
            argv += ["--decode", w.url]
    for w in workers:
        if w.role == "colocated":
            argv += ["--worker", w.url]
    return argv


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
    rej = _Rejections()
    _check_hosts(topology, rej)
    _check_roles(topology, rej)
    rej.raise_if_any(topology, source)

    local_names = _local_addresses()
    host_specs = {h.name: _host_spec(h, local_names) for h in topology.hosts}
    hosts = {h.name: h for h in topology.hosts}
    roles = dict(topology.roles())

    slots = _place(topology, rej)
    rej.raise_if_any(topology, source)
    _check_tp_shards(topology, rej)
    rej.raise_if_any(topology, source)

    proxy_host = topology.proxy.host or topology.hosts[0].name
    ports = _Ports(rej)
    ports.claim(proxy_host, topology.proxy.port, "proxy", ("proxy", "port"))
    http: dict[str, int] = {}
    boot: dict[str, int] = {}
    names = [f"{s.role}-{s.replica}" for s in slots]
    for s, name in zip(slots, names, strict=True):  # explicit ports first: they may not move
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

    involved = {s.host for s in slots} | {proxy_host}
    # a loopback listener is unreachable from other machines; several hosts that are all loopback
    # (say, SSH to this machine on another port) are one machine, where loopback works
    several_machines = len(involved) > 1 and not all(_is_loopback(hosts[n].address) for n in involved)
    procs: list[ProcessSpec] = []
    for s, name in zip(slots, names, strict=True):
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
    rej.raise_if_any(topology, source)

    protocol_of = {}
    for p in procs:
        proto = topology.transfer.protocol
        protocol_of[p.name] = proto if proto != "auto" else ("rdma" if p.nics else "tcp")

    if topology.engine == "sglang":
        from disaggctl.topology import sglang

    for p in procs:
        role = roles[p.role]
        python = host_specs[p.host].python
        env = {"PYTHONUNBUFFERED": "1"}
        # the embedded runtime sets Mooncake's MC_* variables itself, from --transfer-protocol and
        # --transfer-timeout; SGLang reads them (and its own) from the environment
        if topology.engine == "embedded":
            p.argv = _embedded_argv(p, role, topology, python, protocol_of[p.name], procs)
            if p.gpus:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, p.gpus))
        else:
            p.argv = sglang.worker_argv(p, role, topology, python, procs)
            env.update(sglang.transfer_env(p, topology, procs))
        env.update(role.env)
        p.env = env

    ph = hosts[proxy_host]
    pbind = topology.proxy.bind or default_bind(ph.address)
    workers = [p for p in procs if p.role in ("prefill", "decode", "colocated")]
    python = host_specs[proxy_host].python
    pargv = sglang.proxy_argv(topology, python, pbind, workers) if topology.engine == "sglang" else None
    if pargv is None:
        pargv = _builtin_proxy_argv(python, pbind, topology.proxy.port, topology.proxy, workers)
        pargv += [a for p in procs if p.role == "encoder" for a in ("--encoder", p.url)]
    procs.append(
        ProcessSpec(
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
    )
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
