"""engine: sglang — the plan's processes as `python -m sglang.launch_server ...` command lines.

Flag spelling lives in disaggctl/templates/sglang.yaml; this module only decides which settings a
process has. `render_commands` turns a plan into copy-pastable shell lines per host.
"""

from __future__ import annotations

import shlex
from functools import lru_cache
from importlib import resources
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from disaggctl.topology.plan import Plan, ProcessSpec
    from disaggctl.topology.schema import Role, Topology


@lru_cache(maxsize=1)
def template() -> dict[str, Any]:
    text = resources.files("disaggctl").joinpath("templates", "sglang.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def _emit(spec: dict[str, Any], value: Any, context: dict[str, Any] | None = None) -> list[str]:
    """[flag, value] unless the value is unset or equals SGLang's default for it."""
    if value is None:
        return []
    if "default" in spec and str(value) == str(spec["default"]):
        return []
    if "default_from" in spec and context is not None and str(value) == str(context[spec["default_from"]]):
        return []
    return [spec["flag"], str(value)]


def worker_argv(
    p: ProcessSpec, role: Role, topology: Topology, python: str, encoders: list[ProcessSpec]
) -> list[str]:
    """launch_server argv of one encoder / prefill / decode / colocated process."""
    t = template()["launch_server"]
    f = t["flags"]
    m = topology.model
    argv = [python, "-m", t["module"]]
    argv += _emit(f["model_path"], m.path)
    if p.role in ("prefill", "decode"):
        argv += _emit(f["mode"], p.role)
    argv += _emit(f["host"], p.bind) + _emit(f["port"], p.port)
    argv += _emit(f["tp"], p.tp) + _emit(f["dp"], p.dp)
    argv += _emit(f["base_gpu_id"], p.base_gpu_id)
    if p.role == "prefill":
        argv += _emit(f["bootstrap_port"], p.bootstrap_port)
    nics = ",".join(p.nics) or None
    if p.role in ("prefill", "decode"):
        argv += _emit(f["ib_device"], nics)
    argv += _emit(f["dtype"], m.dtype) + _emit(f["served_name"], m.served_name)
    argv += _emit(f["context_length"], m.max_model_len)
    argv += _emit(f["page_size"], role.page_size)
    if role.max_pages is not None:
        argv += _emit(f["max_total_tokens"], role.max_pages * (role.page_size or 1))
    argv += _emit(f["max_running_requests"], role.max_batch)
    argv += _emit(f["chunked_prefill_size"], role.chunk_size)
    if p.ep > 1:
        ep = t["ep"]
        argv += list(ep["switches"]) + _emit(ep["ep_size"], p.ep, {"tp": p.tp}) + _emit(ep["ib_device"], nics)
    if p.role == "encoder":
        argv += list(t["encoder"]["switches"])
    elif encoders and p.role in ("prefill", "colocated"):
        lang = t["language"]
        argv += list(lang["switches"]) + [lang["encoder_urls"]["flag"], *(e.url for e in encoders)]
    return argv + list(role.extra_args)


def mini_lb_argv(python: str, bind: str, port: int, workers: list[ProcessSpec]) -> list[str]:
    """SGLang's mini load balancer in front of the prefills and decodes."""
    t = template()["mini_lb"]
    f = t["flags"]
    prefills = [w for w in workers if w.role == "prefill"]
    decodes = [w for w in workers if w.role == "decode"]
    argv = [python, "-m", t["module"]]
    if t["layout"] == "pairs":
        for p in prefills:
            argv += [f["prefill"]["flag"], p.url, str(p.bootstrap_port)]
        for d in decodes:
            argv += [f["decode"]["flag"], d.url]
    else:
        argv += [f["prefill"]["flag"], *(p.url for p in prefills)]
        argv += [f["decode"]["flag"], *(d.url for d in decodes)]
        boot = [str(p.bootstrap_port) for p in prefills]
        if any(b != str(f["bootstrap_ports"]["default"]) for b in boot):
            argv += [f["bootstrap_ports"]["flag"], *boot]
    return argv + _emit(f["host"], bind) + _emit(f["port"], port)


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
