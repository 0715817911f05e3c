"""Every file in topologies/ plans, and its plan follows the topology rules field by field.

Expectations are derived here from the YAML itself and the documented rules (docs/topology.md), not
pasted from the planner's output.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from disaggctl.topology.checks import check_launchable
from disaggctl.topology.load import load_topology
from disaggctl.topology.plan import build_plan
from disaggctl.topology.sglang import render_commands

TOPOLOGIES = Path(__file__).resolve().parent.parent / "topologies"
FILES = sorted(TOPOLOGIES.glob("*.yaml"))
ROLES = ("encoder", "prefill", "decode", "colocated")


def test_the_examples_are_there():
    names = {f.name for f in FILES}
    assert {
        "local-1p1d.yaml", "local-2p2d.yaml", "local-colocated.yaml", "two-host-2p1d.yaml", "epd.yaml", "ep.yaml",
        "local-1p1d-tp2.yaml", "local-ep.yaml",
    } <= names  # fmt: skip


def gpu_share(g: int, host_gpus: int, nics: list[str]) -> list[str]:
    # the topology rule, spelled out here: GPU i gets nics[i * n // gpus], or its whole share of them
    # when the host lists more NICs than GPUs
    start = g * len(nics) // host_gpus
    return nics[start : max(start + 1, (g + 1) * len(nics) // host_gpus)]


def flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def flag_list(argv: list[str], name: str) -> list[str]:
    if name not in argv:
        return []
    out = []
    for tok in argv[argv.index(name) + 1 :]:
        if tok.startswith("--"):
            break
        out.append(tok)
    return out


@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
def test_example_plan_follows_the_rules(path):
    raw = yaml.safe_load(path.read_text())
    plan = build_plan(load_topology(path), str(path))
    engine = raw.get("engine", "embedded")
    hosts = {h["name"]: h for h in raw["hosts"]}
    transfer = raw.get("transfer", {})
    timeout = str(math.ceil(transfer.get("timeout_s", 30)))
    proxy_cfg = raw.get("proxy", {})

    # one process per replica of each role, in start order, then the proxy
    expected_names = [f"{r}-{i}" for r in ROLES if r in raw for i in range(raw[r].get("replicas", 1))]
    assert [p.name for p in plan.processes] == [*expected_names, "proxy"]

    used_gpus: dict[str, set[int]] = {}
    used_ports: dict[str, set[int]] = {}
    for p in plan.processes:
        ports = used_ports.setdefault(p.host, set())
        for port in (p.port, p.bootstrap_port):
            if port is not None:
                assert port not in ports, f"{p.name}: port {port} reused on {p.host}"
                ports.add(port)
        if p.role == "proxy":
            continue
        role = raw[p.role]
        host = hosts[p.host]
        assert p.host in role.get("hosts", list(hosts)), p.name
        n = role.get("gpus_per_replica", role.get("tp", 1))
        assert (p.tp, p.dp, p.ep) == (role.get("tp", 1), role.get("dp", 1), role.get("ep", 1))
        if host.get("gpus", 0):
            assert p.gpus == list(range(p.gpus[0], p.gpus[0] + n)) and p.base_gpu_id == p.gpus[0]
            assert p.gpus[-1] < host["gpus"]
            assert not used_gpus.setdefault(p.host, set()) & set(p.gpus), f"{p.name} overlaps"
            used_gpus[p.host].update(p.gpus)
            nics = role.get("nics", host.get("nics", []))
            want = []
            for g in p.gpus:
                want += [n for n in gpu_share(g, host["gpus"], nics) if n not in want]
            assert p.nics == want
        else:
            assert p.gpus == [] and p.base_gpu_id is None
        assert p.address == host["address"]
        assert p.bind == role.get("bind", host["address"])
        assert (p.bootstrap_port is not None) == (p.role == "prefill")

        env = p.env
        assert env["PYTHONUNBUFFERED"] == "1"
        protocol = transfer.get("protocol", "auto")
        transfers = p.role != "colocated" or "encoder" in raw
        if engine == "embedded":
            # the runtime owns the transport: it sets MC_* from --transfer-protocol / --transfer-timeout
            assert not [k for k in env if k.startswith("MC_") and k not in raw[p.role].get("env", {})]
            if protocol == "auto":
                protocol = "rdma" if p.nics else "tcp"
        elif transfers:
            forced = {"tcp": "MC_FORCE_TCP", "rdma": "MC_FORCE_HCA"}
            for proto, name in forced.items():
                assert (name in env) == (protocol == proto)
            assert ("SGLANG_MOONCAKE_CUSTOM_MEM_POOL" in env) == (protocol == "nvlink")
            assert env["MC_TRANSFER_TIMEOUT"] == env["MC_TCP_PROGRESS_TIMEOUT_SEC"] == timeout
            assert env["MC_LOG_LEVEL"] == "WARNING"
            sglang_timeout = env.get("SGLANG_DISAGGREGATION_WAITING_TIMEOUT")
            assert sglang_timeout == (timeout if "timeout_s" in transfer else None)
        else:
            assert env == {"PYTHONUNBUFFERED": "1", **raw[p.role].get("env", {})}
        if engine == "embedded":
            assert p.argv[1:5] == ["-m", "disaggctl", "serve", p.role]
            assert flag(p.argv, "--host") == p.bind and flag(p.argv, "--port") == str(p.port)
            assert flag(p.argv, "--model") == raw["model"]["path"]
            assert flag(p.argv, "--device") == ("cuda" if p.gpus else "cpu")
            assert flag(p.argv, "--tp-size") == (str(p.tp) if p.tp > 1 else None)
            for knob, opt in (
                ("page_size", "--page-size"),
                ("max_batch", "--max-batch"),
                ("chunk_size", "--chunk-size"),
            ):
                assert flag(p.argv, opt) == (str(role[knob]) if knob in role else None)
            if p.gpus:
                assert env["CUDA_VISIBLE_DEVICES"] == ",".join(map(str, p.gpus))
            if p.role == "prefill":
                assert flag(p.argv, "--bootstrap-port") == str(p.bootstrap_port)
                assert flag(p.argv, "--advertise-host") == p.address
            if p.role in ("prefill", "decode"):
                assert flag(p.argv, "--transfer-protocol") == protocol
                assert flag(p.argv, "--ib-device") == (",".join(p.nics) or None)
                assert flag(p.argv, "--transfer-timeout") == timeout
        else:
            assert p.argv[1:3] == ["-m", "sglang.launch_server"] and "CUDA_VISIBLE_DEVICES" not in env
            assert flag(p.argv, "--model-path") == raw["model"]["path"]
            assert flag(p.argv, "--port") == str(p.port)
            assert flag(p.argv, "--tp-size") == (str(p.tp) if p.tp > 1 else None)
            assert flag(p.argv, "--attn-dp-size") == (str(p.dp) if p.dp > 1 else None)
            assert "--dp-size" not in p.argv  # SGLang's replicas: disaggctl's dp is attention DP
            assert flag(p.argv, "--base-gpu-id") == (str(p.gpus[0]) if p.gpus and p.gpus[0] else None)
            if p.role in ("prefill", "decode"):
                assert flag(p.argv, "--disaggregation-mode") == p.role
            if transfers:
                nics = role.get("nics", host.get("nics", []))
                per_gpu = {str(g): ",".join(gpu_share(g, host.get("gpus", 0), nics)) for g in p.gpus}
                ib = flag(p.argv, "--disaggregation-ib-device")
                if not p.nics:
                    assert ib is None
                elif len(set(per_gpu.values())) > 1:
                    assert json.loads(ib) == per_gpu
                else:
                    assert ib == ",".join(p.nics)
            if p.role == "prefill":
                boot = flag(p.argv, "--disaggregation-bootstrap-port")
                assert boot == (None if p.bootstrap_port == 8998 else str(p.bootstrap_port))
            if p.ep > 1:
                assert flag(p.argv, "--moe-a2a-backend") == "mooncake"
                assert flag(p.argv, "--mooncake-ib-device") == (",".join(p.nics) or None)
            if p.role == "encoder":
                assert "--encoder-only" in p.argv
            if p.role == "prefill" and "encoder" in raw:
                encoders = [e.url for e in plan.processes if e.role == "encoder"]
                assert "--language-only" in p.argv and flag_list(p.argv, "--encoder-urls") == encoders

    proxy = plan.process("proxy")
    assert proxy.host == proxy_cfg.get("host", raw["hosts"][0]["name"])
    assert proxy.port == proxy_cfg.get("port", 8000)
    assert proxy.bind == proxy_cfg.get("bind", hosts[proxy.host]["address"])
    prefills = [p for p in plan.processes if p.role == "prefill"]
    decodes = [p for p in plan.processes if p.role == "decode"]
    use = proxy_cfg.get("use", "auto")
    if use == "auto" and engine == "sglang" and proxy_cfg.get("policy") != "least_load":
        use = "router"
    if use == "router":
        assert proxy.argv[1:4] == ["-m", "sglang_router.launch_router", "--pd-disaggregation"]
        pairs = [(proxy.argv[i + 1], proxy.argv[i + 2]) for i, t in enumerate(proxy.argv) if t == "--prefill"]
        assert pairs == [(p.url, str(p.bootstrap_port)) for p in prefills]
        assert [proxy.argv[i + 1] for i, t in enumerate(proxy.argv) if t == "--decode"] == [
            d.url for d in decodes
        ]
        assert flag(proxy.argv, "--policy") == proxy_cfg.get("policy", "round_robin")
        assert (flag(proxy.argv, "--host"), flag(proxy.argv, "--port")) == (proxy.bind, str(proxy.port))
    else:
        assert proxy.argv[1:5] == ["-m", "disaggctl", "serve", "proxy"]
        assert flag(proxy.argv, "--policy") == proxy_cfg.get("policy", "round_robin")
        pairs = [(proxy.argv[i + 1], proxy.argv[i + 3]) for i, t in enumerate(proxy.argv) if t == "--prefill"]
        assert pairs == [(p.url, str(p.bootstrap_port)) for p in prefills]
        assert [proxy.argv[i + 1] for i, t in enumerate(proxy.argv) if t == "--decode"] == [
            d.url for d in decodes
        ]
        workers = [p.url for p in plan.processes if p.role == "colocated"]
        assert [proxy.argv[i + 1] for i, t in enumerate(proxy.argv) if t == "--worker"] == workers

    if engine == "sglang":
        commands = render_commands(plan)
        assert sum(len(v) for v in commands.values()) == len(plan.processes)


def test_local_examples_run_here():
    # the local examples are the ones `disaggctl up` can start on this machine: CPU, loopback, builtin model
    local = ("local-1p1d", "local-2p2d", "local-colocated", "local-1p1d-tp2", "local-ep", "local-epd")
    for name in (*local, "local-colocated-llava"):
        plan = build_plan(load_topology(TOPOLOGIES / f"{name}.yaml"), name)
        assert plan.engine == "embedded"
        assert all(h.local and h.gpus == 0 for h in plan.hosts)
        assert all(p.bind == "127.0.0.1" for p in plan.processes)
        assert plan.process("proxy").port == 8000
    assert build_plan(load_topology(TOPOLOGIES / "local-colocated.yaml"), "x").kind == "colocated"
    assert build_plan(load_topology(TOPOLOGIES / "epd.yaml"), "x").kind == "epd"
    epd = build_plan(load_topology(TOPOLOGIES / "local-epd.yaml"), "x")  # up: tests/test_epd_e2e.py
    assert epd.kind == "epd"
    assert [p.name for p in epd.processes] == ["encoder-0", "prefill-0", "decode-0", "proxy"]
    check_launchable(load_topology(TOPOLOGIES / "local-epd.yaml"), "x")
    assert build_plan(load_topology(TOPOLOGIES / "ep.yaml"), "x").kind == "ep"
    tp2 = build_plan(load_topology(TOPOLOGIES / "local-1p1d-tp2.yaml"), "x")
    assert [(p.name, p.tp) for p in tp2.processes] == [("prefill-0", 2), ("decode-0", 2), ("proxy", 1)]
    check_launchable(load_topology(TOPOLOGIES / "local-1p1d-tp2.yaml"), "x")
    ep = build_plan(load_topology(TOPOLOGIES / "local-ep.yaml"), "x")
    assert ep.kind == "ep" and [(p.name, p.tp, p.ep) for p in ep.processes][:2] == [
        ("prefill-0", 2, 2),
        ("decode-0", 2, 2),
    ]
    check_launchable(load_topology(TOPOLOGIES / "local-ep.yaml"), "x")
