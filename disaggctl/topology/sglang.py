"""engine: sglang — the plan's processes as `python -m sglang.launch_server ...` command lines.

Flag spelling lives in disaggctl/templates/sglang.yaml; this module only decides which settings a
process has: its flags for the SGLang release the topology renders for (`sglang.version`, else
PINNED_SGLANG), the Mooncake / SGLang environment of its transfers, and the proxy in front
(sglang_router's PD router, or SGLang's mini_lb for releases that had one). `command_issues` checks
every rendered command against the release's snapshotted options. `render_commands` turns a plan
into copy-pastable shell lines per host.
"""

from __future__ import annotations

import json
import math
import shlex
from functools import lru_cache
from importlib import resources
from typing import TYPE_CHECKING, Any

import yaml

from disaggctl.mooncake_env import mooncake_env
from disaggctl.topology.nics import gpu_nics
from disaggctl.topology.sglang_args import PINNED_SGLANG, check_command, version_key

if TYPE_CHECKING:
    from disaggctl.topology.schema import Role, Topology
    from disaggctl.topology.spec import Plan, ProcessSpec

# What SGLang's transfers wait for when the topology does not say: its own defaults (300 s) also
# cover time a request spends queued on the other side, which a 30 s hand-off bound would cut short.
SGLANG_TIMEOUTS = ("SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT", "SGLANG_DISAGGREGATION_WAITING_TIMEOUT")


@lru_cache(maxsize=1)
def template() -> dict[str, Any]:
    text = resources.files("disaggctl").joinpath("templates", "sglang.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def render_version(topology: Topology) -> str:
    return topology.sglang.version or PINNED_SGLANG


def _at_least(version: str, boundary: str) -> bool:
    return version_key(version) >= version_key(str(boundary))


def _emit(spec: dict[str, Any], value: Any, context: dict[str, Any] | None = None) -> list[str]:
    """[flag, value] unless the value is unset or equals SGLang's default for it."""
    if value is None:
        return []
    if "default" in spec and str(value) == str(spec["default"]):
        return []
    if "default_from" in spec and context is not None and str(value) == str(context[spec["default_from"]]):
        return []
    return [spec["flag"], str(value)]


# -- which processes move data, and how ----------------------------------------------------------------


def _language_only(p: ProcessSpec, procs: list[ProcessSpec]) -> bool:
    return p.role in ("prefill", "colocated") and any(q.role == "encoder" for q in procs)


def transfers(p: ProcessSpec, procs: list[ProcessSpec]) -> bool:
    """Whether the process sends or receives through Mooncake: KV (prefill, decode) or embeddings
    (encoders and the language-only servers they feed)."""
    return p.role in ("encoder", "prefill", "decode") or _language_only(p, procs)


def ib_device(p: ProcessSpec, topology: Topology, role: Role) -> str | None:
    """--disaggregation-ib-device: the process's NICs comma-joined when every GPU of it uses the same
    ones, else SGLang's per-GPU JSON map (keys: the host's GPU indices, which are what SGLang numbers
    GPUs by since it runs without CUDA_VISIBLE_DEVICES)."""
    if not p.nics:
        return None
    host = next(h for h in topology.hosts if h.name == p.host)
    nics = list(host.nics if role.nics is None else role.nics)
    per_gpu = {g: ",".join(gpu_nics(g, host.gpus, nics)) for g in p.gpus}
    version = render_version(topology)
    if len(set(per_gpu.values())) <= 1 or not _at_least(
        version, template()["launch_server"]["per_gpu_nics_since"]
    ):
        return ",".join(p.nics)
    return json.dumps({str(g): v for g, v in per_gpu.items()}, separators=(",", ":"))


def transfer_env(p: ProcessSpec, topology: Topology, procs: list[ProcessSpec]) -> dict[str, str]:
    """Mooncake's and SGLang's transfer settings for a process that transfers, else {}.

    `auto` sets nothing about the transport, so Mooncake picks it itself (RDMA when it finds an HCA
    after the --disaggregation-ib-device filter, else TCP); `tcp` forces TCP; `rdma` forces RDMA, so a
    host without a usable HCA fails at start instead of quietly running over TCP; `nvlink` selects
    SGLang's NVLink memory pool, intra-node when every transferring process shares one host, else
    multi-node NVLink (NVL72-class)."""
    if not transfers(p, procs):
        return {}
    t = topology.transfer
    transport = t.protocol
    pool = None
    if t.protocol == "nvlink":
        one_host = len({q.host for q in procs if transfers(q, procs)}) == 1
        transport, pool = ("nvlink", "INTRA_NODE_NVLINK") if one_host else ("mnnvl", "NVLINK")
    # None means "leave unset": the server inherits its environment, we only add to it
    env = {k: v for k, v in mooncake_env(transport, t.timeout_s).items() if v is not None}
    if pool:
        env["SGLANG_MOONCAKE_CUSTOM_MEM_POOL"] = pool
    if "timeout_s" in t.model_fields_set:
        env.update(dict.fromkeys(SGLANG_TIMEOUTS, str(math.ceil(t.timeout_s))))
    return env


# -- launch_server -----------------------------------------------------------------------------------


def _attn_dp(dp: int, version: str) -> list[str]:
    spec = template()["launch_server"]["attn_dp"]
    if _at_least(version, spec["since"]):
        return _emit(spec["flag"], dp)
    if dp == 1:
        return []
    return [str(dp) if tok == "N" else tok for tok in spec["before"]]


def _encoder_bootstrap_port(p: ProcessSpec, procs: list[ProcessSpec]) -> int | None:
    """The j-th language-only server on a host listens for encoder registrations on the j-th free port
    down from SGLang's default, so that two of them can share a host."""
    spec = template()["launch_server"]["language"]["encoder_bootstrap_port"]
    mine = [q for q in procs if q.host == p.host and _language_only(q, procs)]
    taken = {port for q in procs if q.host == p.host for port in (q.port, q.bootstrap_port) if port}
    port = int(spec["default"])
    for q in mine:
        while port in taken:
            port -= 1
        if q.name == p.name:
            return port
        taken.add(port)
    return None


def worker_argv(
    p: ProcessSpec, role: Role, topology: Topology, python: str, procs: list[ProcessSpec]
) -> list[str]:
    """launch_server argv of one encoder / prefill / decode / colocated process."""
    t = template()["launch_server"]
    f = t["flags"]
    m = topology.model
    version = render_version(topology)
    argv = [python, "-m", t["module"]]
    argv += _emit(f["model_path"], m.path)
    if p.role in ("prefill", "decode"):
        argv += _emit(f["mode"], p.role)
    argv += _emit(f["host"], p.bind) + _emit(f["port"], p.port)
    argv += _emit(f["tp"], p.tp) + _attn_dp(p.dp, version)
    argv += _emit(f["base_gpu_id"], p.base_gpu_id)
    if p.role == "prefill":
        argv += _emit(f["bootstrap_port"], p.bootstrap_port)
    if transfers(p, procs):
        argv += _emit(f["ib_device"], ib_device(p, topology, role))
    argv += _emit(f["dtype"], m.dtype) + _emit(f["served_name"], m.served_name)
    argv += _emit(f["context_length"], m.max_model_len)
    argv += _emit(f["page_size"], role.page_size)
    if role.max_pages is not None and role.page_size is not None:
        argv += _emit(f["max_total_tokens"], role.max_pages * role.page_size)
    argv += _emit(f["max_running_requests"], role.max_batch)
    argv += _emit(f["chunked_prefill_size"], role.chunk_size)
    if role.cuda_graph is False:
        argv.append(f["disable_cuda_graph"]["flag"])
    if role.overlap_schedule is False:
        argv.append(f["disable_overlap_schedule"]["flag"])
    if p.ep > 1:
        ep = t["ep"]
        if role.moe_a2a_backend != "none":  # unset: Mooncake's EP backend, as in the guide
            argv += list(ep["switches"])
        argv += _emit(ep["ep_size"], p.ep, {"tp": p.tp})
        argv += _emit(ep["ib_device"], ",".join(p.nics) or None)
    if p.role == "encoder":
        argv += list(t["encoder"]["switches"])
    elif _language_only(p, procs):
        lang = t["language"]
        encoders = [q.url for q in procs if q.role == "encoder"]
        argv += list(lang["switches"]) + [lang["encoder_urls"]["flag"], *encoders]
        argv += _emit(lang["encoder_bootstrap_port"], _encoder_bootstrap_port(p, procs))
    return argv + list(role.extra_args)


# -- the proxy ----------------------------------------------------------------------------------------


def proxy_kind(topology: Topology) -> str:
    """builtin | router | mini_lb, with `auto` resolved: the router, or the mini_lb that came with a
    pinned release that had one (the router would be one more package to install); the builtin proxy
    for the embedded engine, and for a policy the router does not have."""
    use = topology.proxy.use
    if use != "auto":
        return use
    if topology.engine != "sglang" or topology.proxy.policy not in template()["router"]["policies"]:
        return "builtin"
    pinned = topology.sglang.version
    if pinned and topology.prefill and not _at_least(pinned, template()["mini_lb"]["removed_in"]):
        return "mini_lb"
    return "router"


def router_argv(python: str, bind: str, port: int, policy: str, workers: list[ProcessSpec]) -> list[str]:
    t = template()["router"]
    f = t["flags"]
    prefills = [w for w in workers if w.role == "prefill"]
    argv = [python, "-m", t["module"]]
    if prefills:
        argv += list(t["pd_switches"])
        for p in prefills:
            # always written: without it the router sends no port and each decode assumes its own default
            argv += [f["prefill"]["flag"], p.url, str(p.bootstrap_port)]
        for d in (w for w in workers if w.role == "decode"):
            argv += [f["decode"]["flag"], d.url]
    else:
        argv += [f["workers"]["flag"], *(w.url for w in workers if w.role == "colocated")]
    argv += [f["policy"]["flag"], t["policies"][policy]]
    return argv + [f["host"]["flag"], bind, f["port"]["flag"], str(port)] + _emit(f["metrics_host"], bind)


def mini_lb_argv(python: str, bind: str, port: int, workers: list[ProcessSpec], version: str) -> list[str]:
    """SGLang's mini load balancer, in the list form of `version`'s: comma-joined for the original one
    (the form of Mooncake's first guide), space-separated from lists_since."""
    t = template()["mini_lb"]
    f = t["flags"]
    prefills = [w for w in workers if w.role == "prefill"]
    decodes = [w for w in workers if w.role == "decode"]
    boot = [str(p.bootstrap_port) for p in prefills]
    spaced = _at_least(version, t["lists_since"])

    def values(items: list[str]) -> list[str]:
        return items if spaced else [",".join(items)]

    argv = [python, "-m", t["module"]]
    argv += [f["prefill"]["flag"], *values([p.url for p in prefills])]
    argv += [f["decode"]["flag"], *values([d.url for d in decodes])]
    if any(b != str(f["bootstrap_ports"]["default"]) for b in boot):
        argv += [f["bootstrap_ports"]["flag"], *values(boot)]
    return argv + [f["host"]["flag"], bind, f["port"]["flag"], str(port)]


def proxy_argv(topology: Topology, python: str, bind: str, workers: list[ProcessSpec]) -> list[str] | None:
    """The SGLang-side proxy's argv, or None when the topology uses disaggctl's builtin proxy."""
    kind = proxy_kind(topology)
    port = topology.proxy.port
    if kind == "router":
        return router_argv(python, bind, port, topology.proxy.policy, workers)
    if kind == "mini_lb":
        return mini_lb_argv(python, bind, port, workers, render_version(topology))
    return None


# -- checks -------------------------------------------------------------------------------------------


def topology_issues(topology: Topology) -> list[tuple[tuple, str]]:
    """(field path, message) for SGLang settings the topology cannot have."""
    issues: list[tuple[tuple, str]] = []
    use = topology.proxy.use
    kind = proxy_kind(topology)
    if use in ("router", "mini_lb") and topology.engine != "sglang":
        name = "mini_lb is SGLang's proxy" if use == "mini_lb" else "router is sglang_router's proxy"
        issues.append((("proxy", "use"), f"{name}: it needs engine: sglang"))
        return issues
    if topology.engine != "sglang":
        return issues
    if kind == "mini_lb":
        removed = template()["mini_lb"]["removed_in"]
        pinned = topology.sglang.version
        if not topology.prefill:
            issues.append(
                (("proxy", "use"), "mini_lb only routes prefill/decode pairs; use router for colocated")
            )
        elif not pinned:
            issues.append(
                (
                    ("proxy", "use"),
                    f"mini_lb needs sglang.version: SGLang {removed} removed it and its flags changed at "
                    f"{template()['mini_lb']['lists_since']}, so the release decides its command line; "
                    "set the one you run, or use router",
                )
            )
        elif _at_least(pinned, removed):
            issues.append(
                (
                    ("proxy", "use"),
                    f"SGLang {pinned} has no mini_lb (SGLang {removed} moved it to sglang_router): use router",
                )
            )
    if kind == "router" and topology.proxy.policy not in template()["router"]["policies"]:
        choices = ", ".join(template()["router"]["policies"])
        issues.append(
            (
                ("proxy", "policy"),
                f"sglang_router has no {topology.proxy.policy} policy: use {choices} "
                "(power_of_two also follows load), or proxy.use: builtin",
            )
        )
    for role_name, role in topology.roles():
        if role.max_pages is not None and role.page_size is None:
            issues.append(
                (
                    (role_name, "max_pages"),
                    "needs page_size with engine: sglang (it becomes --max-total-tokens = max_pages x "
                    "page_size, and SGLang's own page size depends on its attention backend)",
                )
            )
    return issues


def command_issues(topology: Topology, procs: list[ProcessSpec]) -> list[tuple[tuple, str]]:
    """(field path, message) for rendered commands that the release they are rendered for would not
    parse, checked against its snapshotted options (a release without a snapshot is not checked).
    What the topology's extra_args add is reported at extra_args, the rest at the role: a feature the
    topology uses that the release lacks."""
    version = render_version(topology)
    roles = dict(topology.roles())
    issues: list[tuple[tuple, str]] = []
    seen: set[tuple] = set()
    for p in procs:
        found = check_command(p.argv, version)
        if not found or not found[1]:
            continue
        label, problems = found
        extra = list(roles[p.role].extra_args) if p.role in roles else []
        base = check_command(p.argv[: len(p.argv) - len(extra)], version) if extra else found
        rendered = [x for x in problems if base and x in base[1]]
        added = [x for x in problems if x not in rendered]
        where = ("proxy", "use") if p.role == "proxy" else (p.role,)
        for path, items, text, hint in (
            (
                where,
                rendered,
                f"{p.name}'s command uses what {label} does not have",
                "the topology asks for a feature of another release; set sglang.version to the one you run",
            ),
            (
                (p.role, "extra_args"),
                added,
                f"{label} would refuse these arguments",
                "a typo, or options of another release: set sglang.version to the one you run",
            ),
        ):
            key = (path, tuple(items))
            if items and key not in seen:
                seen.add(key)
                issues.append((path, f"{text}: {'; '.join(items)} ({hint})"))
    return issues


# -- output -------------------------------------------------------------------------------------------


def command_line(p: ProcessSpec) -> str:
    env = " ".join(f"{shlex.quote(k)}={shlex.quote(v)}" for k, v in p.env.items())
    cmd = " ".join(shlex.quote(str(a)) for a in p.argv)
    return f"{env} {cmd}" if env else cmd


def render_commands(plan: Plan) -> dict[str, list[str]]:
    """Host name -> the shell lines that start its processes, in start order (one per process)."""
    out: dict[str, list[str]] = {}
    for p in plan.processes:
        out.setdefault(p.host, []).append(command_line(p))
    return out
