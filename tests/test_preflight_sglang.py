"""Pre-flight for engine: sglang on a local host whose interpreter is a stand-in: what it can import (a
fake sglang / mooncake / sglang_router on its path, or nothing) decides what pre-flight reports. The
checks run through the same local runner `up` uses; SSH hosts run the same commands remotely."""

from __future__ import annotations

import shutil
import socket
import sys
from pathlib import Path

import pytest

from disaggctl.launch.preflight import preflight
from disaggctl.topology.load import load_topology
from disaggctl.topology.plan import build_plan
from disaggctl.topology.sglang_args import PINNED_SGLANG


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_python(tmp_path: Path, modules: dict[str, str], disaggctl: bool = True) -> str:
    """An interpreter that sees `modules` (dotted name -> source) and, unless `disaggctl`, no disaggctl."""
    site = tmp_path / "site"
    for name, source in modules.items():
        parts = name.split(".")
        d = site.joinpath(*parts[:-1])
        d.mkdir(parents=True, exist_ok=True)
        for i in range(1, len(parts)):
            init = site.joinpath(*parts[:i], "__init__.py")
            if not init.exists():
                init.write_text("")
        leaf = site.joinpath(*parts)
        (leaf / "__init__.py" if leaf.is_dir() else leaf.with_suffix(".py")).write_text(source)
    refuse = (
        ""
        if disaggctl
        else ('case "$*" in "-m disaggctl --version") echo "No module named disaggctl" >&2; exit 1;; esac\n')
    )
    wrapper = tmp_path / "python"
    wrapper.write_text(f'#!/bin/sh\n{refuse}PYTHONPATH={site} exec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


def sglang_plan(tmp_path: Path, python: str, extra: str = ""):
    ports = [free_port() for _ in range(4)]
    text = f"""
name: pf
engine: sglang
model: {{path: Qwen/Qwen2.5-0.5B-Instruct}}
hosts: [{{name: box, address: 127.0.0.1, python: {python}}}]
prefill: {{port: {ports[0]}, bootstrap_port: {ports[1]}}}
decode: {{port: {ports[2]}}}
proxy: {{port: {ports[3]}}}
{extra}"""
    (tmp_path / "t.yaml").write_text(text)
    return build_plan(load_topology(tmp_path / "t.yaml"), str(tmp_path / "t.yaml"))


SGLANG = {"sglang": f'__version__ = "{PINNED_SGLANG}"\n'}
MOONCAKE = {"mooncake.engine": "class TransferEngine: pass\n"}
ROUTER = {"sglang_router.launch_router": ""}


def test_missing_sglang_is_named_with_the_host(tmp_path):
    python = fake_python(tmp_path, {})
    plan = sglang_plan(tmp_path, python)
    problems = preflight(plan.hosts, plan)
    text = [str(p) for p in problems]
    assert {p.check for p in problems} == {"modules"}, text
    assert any(
        t.startswith("host box:")
        and "cannot import sglang: ModuleNotFoundError: No module named 'sglang'" in t
        and "pip install sglang" in t
        for t in text
    ), text
    assert any("cannot import sglang_router.launch_router" in t for t in text), text


def test_a_host_with_everything_passes_without_disaggctl(tmp_path):
    # a host that runs only SGLang processes (workers and the router) needs no disaggctl
    python = fake_python(tmp_path, {**SGLANG, **MOONCAKE, **ROUTER}, disaggctl=False)
    plan = sglang_plan(tmp_path, python)
    assert preflight(plan.hosts, plan) == []


def test_mooncake_that_fails_to_load_is_reported_with_its_error(tmp_path):
    broken = {"mooncake.engine": "raise ImportError('libibverbs.so.1: cannot open shared object file')\n"}
    python = fake_python(tmp_path, {**SGLANG, **broken, **ROUTER})
    plan = sglang_plan(tmp_path, python)
    (problem,) = preflight(plan.hosts, plan)
    assert problem.host == "box" and problem.check == "modules"
    assert "cannot import mooncake.engine: ImportError: libibverbs.so.1" in problem.message


def test_an_older_sglang_than_the_rendered_release(tmp_path):
    python = fake_python(tmp_path, {"sglang": '__version__ = "0.5.21"\n', **MOONCAKE, **ROUTER})
    plan = sglang_plan(tmp_path, python)
    (problem,) = preflight(plan.hosts, plan)
    assert f"has SGLang 0.5.21, older than {PINNED_SGLANG}" in problem.message
    assert "set sglang.version: 0.5.21" in problem.message
    pinned = sglang_plan(tmp_path, python, "sglang: {version: 0.5.21}\n")
    assert preflight(pinned.hosts, pinned) == []


def test_a_missing_interpreter_is_named(tmp_path):
    plan = sglang_plan(tmp_path, str(tmp_path / "nope" / "python3"))
    (problem,) = preflight(plan.hosts, plan)
    assert problem.check == "modules" and "interpreter" in problem.message and "not found" in problem.message


@pytest.mark.skipif(shutil.which("ibv_devices") is not None, reason="this machine lists RDMA devices")
def test_protocol_rdma_needs_rdma_devices(tmp_path):
    python = fake_python(tmp_path, {**SGLANG, **MOONCAKE, **ROUTER})
    plan = sglang_plan(tmp_path, python, "transfer: {protocol: rdma}\n")
    problems = preflight(plan.hosts, plan)
    assert [(p.host, p.check) for p in problems] == [("box", "nics")]
    assert "transfer.protocol is rdma but ibv_devices is not installed" in problems[0].message
    auto = sglang_plan(tmp_path, python)
    assert preflight(auto.hosts, auto) == []


def test_busy_ports_and_sglangs_own_listeners(tmp_path):
    python = fake_python(tmp_path, {**SGLANG, **MOONCAKE, **ROUTER})
    plan = sglang_plan(tmp_path, python)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", plan.process("prefill-0").bootstrap_port))
        busy.listen()
        problems = preflight(plan.hosts, plan)
    assert [p.check for p in problems] == ["ports"]
    assert "(prefill-0 bootstrap) is already in use" in problems[0].message
    # the router's metrics listener is checked where the plan puts it, the proxy's bind address
    argv = plan.process("proxy").argv
    assert argv[argv.index("--prometheus-host") + 1] == "127.0.0.1"


def test_model_paths_hub_ids_are_left_to_the_server(tmp_path):
    python = fake_python(tmp_path, {**SGLANG, **MOONCAKE, **ROUTER})
    plan = sglang_plan(tmp_path, python)
    assert preflight(plan.hosts, plan) == []  # Qwen/Qwen2.5-0.5B-Instruct: fetched by SGLang
    text = (tmp_path / "t.yaml").read_text().replace("Qwen/Qwen2.5-0.5B-Instruct", str(tmp_path / "no-model"))
    (tmp_path / "t.yaml").write_text(text)
    local = build_plan(load_topology(tmp_path / "t.yaml"), "t")
    problems = preflight(local.hosts, local)
    assert [p.check for p in problems] == ["paths", "paths"]
    assert "prefill-0: model path" in problems[0].message and "does not exist" in problems[0].message
