"""Plan expansion: placement, NICs, ports, command lines, environment, and every rejection."""

from __future__ import annotations

import json
import sys

import pytest

from disaggctl.topology.checks import check_launchable
from disaggctl.topology.load import TopologyError, load_topology
from disaggctl.topology.plan import build_plan

HEAD = "name: t\nmodel: {path: builtin:tiny}\n"
GPU_HOST = "hosts:\n  - {name: n0, address: 127.0.0.1, gpus: 8, nics: [mlx5_0, mlx5_1, mlx5_2, mlx5_3]}\n"


def plan_of(tmp_path, text: str):
    path = tmp_path / "t.yaml"
    path.write_text(text)
    return build_plan(load_topology(path), str(path))


def rejected(tmp_path, text: str) -> list[str]:
    path = tmp_path / "t.yaml"
    path.write_text(text)
    with pytest.raises(TopologyError) as exc:
        build_plan(load_topology(path), str(path))
    return str(exc.value).splitlines()


def model_head(tmp_path, **config) -> str:
    """A topology head whose model is a local directory with this config.json (the plan reads it)."""
    d = tmp_path / "model"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps({"model_type": "llama", **config}))
    return f"name: t\nmodel: {{path: {json.dumps(str(d))}}}\n"


def line_no(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def expected_nics(gpus: list[int], nics: list[str], host_gpus: int) -> list[str]:
    # the topology rule, spelled out here: GPU i -> nics[i * len(nics) // gpus], distinct, in order
    out: list[str] = []
    for g in gpus:
        if nics[g * len(nics) // host_gpus] not in out:
            out.append(nics[g * len(nics) // host_gpus])
    return out


# -- placement -----------------------------------------------------------------------------------------


def test_replicas_pack_consecutive_gpu_blocks_with_their_nics(tmp_path):
    head = model_head(tmp_path, num_attention_heads=8, num_key_value_heads=4, intermediate_size=256)
    text = head + GPU_HOST + "prefill: {replicas: 2, tp: 2}\ndecode: {replicas: 1, tp: 4}\n"
    plan = plan_of(tmp_path, text)
    nics = ["mlx5_0", "mlx5_1", "mlx5_2", "mlx5_3"]
    offset = 0
    for name, tp in (("prefill-0", 2), ("prefill-1", 2), ("decode-0", 4)):
        p = plan.process(name)
        assert p.gpus == list(range(offset, offset + tp)) and p.base_gpu_id == offset
        assert p.nics == expected_nics(p.gpus, nics, 8)
        assert p.env["CUDA_VISIBLE_DEVICES"] == ",".join(str(g) for g in p.gpus)
        assert (p.tp, p.dp, p.ep) == (tp, 1, 1)
        offset += tp
    assert plan.process("decode-0").nics == ["mlx5_2", "mlx5_3"]


def test_role_nic_override_and_gpus_per_replica(tmp_path):
    text = HEAD + GPU_HOST + "colocated: {replicas: 2, tp: 1, gpus_per_replica: 2, nics: [ib0, ib1]}\n"
    plan = plan_of(tmp_path, text)
    for r, p in enumerate(p for p in plan.processes if p.role == "colocated"):
        assert p.gpus == [2 * r, 2 * r + 1]
        assert p.nics == expected_nics(p.gpus, ["ib0", "ib1"], 8)


def test_replicas_move_to_the_next_host_when_full_or_capped(tmp_path):
    hosts = "hosts:\n  - {name: a, address: 10.9.0.1, gpus: 4}\n  - {name: b, address: 10.9.0.2, gpus: 4}\n"
    plan = plan_of(tmp_path, HEAD + hosts + "colocated: {replicas: 3, tp: 2}\n")
    placed = [(p.host, p.gpus) for p in plan.processes if p.role == "colocated"]
    assert placed == [("a", [0, 1]), ("a", [2, 3]), ("b", [0, 1])]
    plan = plan_of(tmp_path, HEAD + hosts + "colocated: {replicas: 2, tp: 1, max_per_host: 1}\n")
    assert [(p.host, p.gpus) for p in plan.processes if p.role == "colocated"] == [("a", [0]), ("b", [0])]


def test_cpu_hosts_take_any_number_of_replicas(tmp_path):
    plan = plan_of(tmp_path, HEAD + "colocated: {replicas: 5}\n")
    workers = [p for p in plan.processes if p.role == "colocated"]
    assert len(workers) == 5
    for p in workers:
        assert p.gpus == [] and p.base_gpu_id is None and p.nics == []
        assert "CUDA_VISIBLE_DEVICES" not in p.env
        assert p.argv[p.argv.index("--device") + 1] == "cpu"


def test_base_gpu_id_pins_replicas(tmp_path):
    plan = plan_of(tmp_path, HEAD + GPU_HOST + "prefill: {tp: 2, base_gpu_id: 4}\ndecode: {tp: 2}\n")
    assert plan.process("prefill-0").gpus == [4, 5]
    assert plan.process("decode-0").gpus == [0, 1]  # first free block


# -- ports ---------------------------------------------------------------------------------------------


def test_ports_unique_per_host_one_bootstrap_port_per_prefill(tmp_path):
    text = HEAD + "proxy: {port: 30001}\nprefill: {replicas: 3}\ndecode: {replicas: 2}\n"
    plan = plan_of(tmp_path, text)
    ports = [p.port for p in plan.processes] + [p.bootstrap_port for p in plan.processes if p.bootstrap_port]
    assert len(ports) == len(set(ports))
    prefills = [p for p in plan.processes if p.role == "prefill"]
    assert [p.bootstrap_port for p in prefills] == [8998, 8999, 9000]
    assert [p.port for p in plan.processes if p.role != "proxy"] == [30000, 30002, 30003, 30004, 30005]
    assert all(p.bootstrap_port is None for p in plan.processes if p.role != "prefill")


def test_explicit_ports_with_step_per_host(tmp_path):
    hosts = "hosts:\n  - {name: a, address: 10.9.0.1}\n  - {name: b, address: 10.9.0.2}\n"
    text = (
        HEAD
        + hosts
        + "prefill: {replicas: 2, port: 31000, port_step: 100, max_per_host: 1, bootstrap_port: 9100}\n"
    )
    text += "decode: {replicas: 2, port: 31000, port_step: 100, hosts: [a]}\n"
    text = text.replace("decode: {replicas: 2, port: 31000", "decode: {replicas: 2, port: 31100")
    plan = plan_of(tmp_path, text)
    got = {p.name: (p.host, p.port, p.bootstrap_port) for p in plan.processes if p.role != "proxy"}
    assert got == {
        "prefill-0": ("a", 31000, 9100),
        "prefill-1": ("b", 31000, 9100),
        "decode-0": ("a", 31100, None),
        "decode-1": ("a", 31200, None),
    }


def test_port_clashes_are_rejected(tmp_path):
    text = HEAD + "proxy: {port: 30000}\nprefill: {port: 30000}\ndecode: {}\n"
    (line,) = rejected(tmp_path, text)
    assert (
        f":{line_no(text, 'prefill:')}: prefill.port: port 30000 on host local is used twice: proxy and prefill-0"
        in line
    )
    text = HEAD + "prefill: {replicas: 2, port: 30000}\ndecode: {port: 30001}\n"
    (line,) = rejected(tmp_path, text)
    assert "decode.port: port 30001 on host local is used twice: prefill-1 and decode-0" in line
    text = HEAD + "prefill: {port: 9000, bootstrap_port: 9000}\ndecode: {}\n"
    (line,) = rejected(tmp_path, text)
    assert "prefill.bootstrap_port: port 9000" in line


# -- command lines and environment -------------------------------------------------------------------


def test_embedded_argv_is_what_serve_parses(tmp_path):
    from disaggctl.runtime.server import build_parser

    text = (
        HEAD
        + GPU_HOST
        + (
            "transfer: {timeout_s: 12}\n"
            "prefill: {tp: 2, page_size: 32, max_pages: 100, max_batch: 4, chunk_size: 64, extra_args: [--log-level, DEBUG]}\n"
            "decode: {tp: 2, max_batch: 16}\n"
        )
    )
    plan = plan_of(tmp_path, text)
    pre, dec = plan.process("prefill-0"), plan.process("decode-0")
    assert pre.argv[:5] == [sys.executable, "-m", "disaggctl", "serve", "prefill"]
    a = build_parser("prefill").parse_args(pre.argv[5:])
    assert (a.host, a.port, a.model, a.bootstrap_port, a.advertise_host) == (
        "127.0.0.1",
        pre.port,
        "builtin:tiny",
        pre.bootstrap_port,
        "127.0.0.1",
    )
    assert (a.page_size, a.max_pages, a.max_batch, a.chunk_size, a.log_level) == (32, 100, 4, 64, "DEBUG")
    assert (a.transfer_protocol, a.ib_device, a.transfer_timeout, a.device) == (
        "rdma",
        "mlx5_0",
        12.0,
        "cuda",
    )
    d = build_parser("decode").parse_args(dec.argv[5:])
    assert (d.port, d.max_batch, d.transfer_protocol, d.ib_device) == (dec.port, 16, "rdma", "mlx5_1")
    assert (a.cuda_graph, d.cuda_graph) == (True, True)  # graphs are the engine's default


def test_cuda_graph_and_overlap_false_reach_both_engines(tmp_path):
    from disaggctl.runtime.roles import engine_config
    from disaggctl.runtime.server import build_parser

    text = HEAD + GPU_HOST + "prefill: {}\ndecode: {cuda_graph: false, overlap_schedule: false}\n"
    dec = plan_of(tmp_path, text).process("decode-0")
    args = build_parser("decode").parse_args(dec.argv[5:])
    assert args.cuda_graph is False and args.overlap_schedule is False
    assert engine_config("decode", args, "m").overlap_schedule is False
    pre = plan_of(tmp_path, text).process("prefill-0")
    assert not {"--no-cuda-graph", "--no-overlap-schedule"} & set(pre.argv)
    # unset: the engine decides (on CUDA at tp 1)
    assert engine_config("prefill", build_parser("prefill").parse_args(pre.argv[5:]), "m").overlap_schedule is None
    sgl = plan_of(tmp_path, text.replace("name: t\n", "name: t\nengine: sglang\n"))
    assert {"--disable-cuda-graph", "--disable-overlap-schedule"} <= set(sgl.process("decode-0").argv)
    assert not {"--disable-cuda-graph", "--disable-overlap-schedule"} & set(sgl.process("prefill-0").argv)


def test_builtin_proxy_argv(tmp_path):
    from disaggctl.proxy import server

    plan = plan_of(
        tmp_path, HEAD + "prefill: {replicas: 2}\ndecode: {replicas: 2}\nproxy: {policy: least_load}\n"
    )
    proxy = plan.processes[-1]
    assert proxy.name == "proxy" and proxy.argv[:5] == [sys.executable, "-m", "disaggctl", "serve", "proxy"]
    a = server.build_parser().parse_args(proxy.argv[5:])
    prefills = [p for p in plan.processes if p.role == "prefill"]
    assert a.prefill == [p.url for p in prefills]
    assert [int(b) for b in a.bootstrap_port] == [p.bootstrap_port for p in prefills]
    assert a.decode == [p.url for p in plan.processes if p.role == "decode"]
    assert (a.host, a.port, a.policy) == ("127.0.0.1", 8000, "least_load")
    assert (a.read_timeout, a.request_timeout) == (60.0, 600.0)  # the topology's defaults
    colo = plan_of(tmp_path, HEAD + "colocated: {replicas: 2}\n").processes[-1]
    b = server.build_parser().parse_args(colo.argv[5:])
    assert b.worker == ["http://127.0.0.1:30000", "http://127.0.0.1:30001"] and not b.prefill


def test_proxy_timeouts_come_from_the_topology(tmp_path):
    from disaggctl.proxy import server

    text = HEAD + "colocated: {}\nproxy: {read_timeout_s: 2.5, request_timeout_s: 30}\n"
    proxy = plan_of(tmp_path, text).process("proxy")
    argv = proxy.argv
    assert argv[argv.index("--read-timeout") + 1] == "2.5"
    assert argv[argv.index("--request-timeout") + 1] == "30"
    a = server.build_parser().parse_args(argv[5:])
    assert (a.read_timeout, a.request_timeout) == (2.5, 30.0)
    for field in ("read_timeout_s", "request_timeout_s"):
        for bad in ("0", "-1"):
            lines = rejected(tmp_path, HEAD + f"colocated: {{}}\nproxy: {{{field}: {bad}}}\n")
            assert any(f"proxy.{field}" in x and "greater than 0" in x for x in lines), lines


def test_pd_workers_are_bound_to_the_plans_peers(tmp_path):
    from disaggctl.runtime.server import build_parser

    plan = plan_of(tmp_path, HEAD + "prefill: {replicas: 2}\ndecode: {replicas: 2}\n")
    prefills = [p for p in plan.processes if p.role == "prefill"]
    decodes = [p for p in plan.processes if p.role == "decode"]
    bootstraps = [f"127.0.0.1:{p.bootstrap_port}" for p in prefills]
    assert bootstraps == ["127.0.0.1:8998", "127.0.0.1:8999"]
    peers = [f"decode-{i}={d.url}" for i, d in enumerate(decodes)]
    assert peers == ["decode-0=http://127.0.0.1:30002", "decode-1=http://127.0.0.1:30003"]
    for d in decodes:
        assert build_parser("decode").parse_args(d.argv[5:]).prefill_bootstrap == bootstraps
        assert "--decode-peer" not in d.argv
    for p in prefills:
        assert build_parser("prefill").parse_args(p.argv[5:]).decode_peer == peers
        assert "--prefill-bootstrap" not in p.argv
    for proc in plan.processes:
        if proc.role == "proxy":
            assert "--prefill-bootstrap" not in proc.argv and "--decode-peer" not in proc.argv


def test_peer_addresses_across_hosts_and_ipv6(tmp_path):
    hosts = "hosts: [{name: a, address: 'fd00::1'}, {name: b, address: 10.9.0.2}]\n"
    plan = plan_of(tmp_path, HEAD + hosts + "prefill: {hosts: [a]}\ndecode: {hosts: [b]}\n")
    dec, pre = plan.process("decode-0"), plan.process("prefill-0")
    assert dec.argv[dec.argv.index("--prefill-bootstrap") + 1] == "[fd00::1]:8998"
    assert pre.argv[pre.argv.index("--decode-peer") + 1] == "decode-0=http://10.9.0.2:30000"
    plan = plan_of(tmp_path, HEAD + hosts + "prefill: {hosts: [b]}\ndecode: {hosts: [a]}\n")
    pre = plan.process("prefill-0")
    assert pre.argv[pre.argv.index("--decode-peer") + 1] == "decode-0=http://[fd00::1]:30000"


def test_peer_flags_only_for_embedded_pd(tmp_path):
    colocated = plan_of(tmp_path, HEAD + "colocated: {replicas: 2}\n")
    sglang = plan_of(tmp_path, HEAD + "engine: sglang\nprefill: {}\ndecode: {}\n")
    for proc in colocated.processes + sglang.processes:
        assert "--prefill-bootstrap" not in proc.argv and "--decode-peer" not in proc.argv, proc.argv
    # the peers are part of the spec: a new prefill means the decodes must be restarted to trust it
    one = plan_of(tmp_path, HEAD + "prefill: {replicas: 1}\ndecode: {}\n")
    two = plan_of(tmp_path, HEAD + "prefill: {replicas: 2}\ndecode: {}\n")
    assert one.spec_hash("decode-0") != two.spec_hash("decode-0")


@pytest.mark.parametrize(
    "transfer, nics, protocol",
    [
        ("{}", "[]", "tcp"),
        ("{}", "[mlx5_0]", "rdma"),
        ("{protocol: tcp}", "[mlx5_0]", "tcp"),
        ("{protocol: nvlink}", "[]", "nvlink"),
    ],
)
def test_transfer_protocol_and_mooncake_env(tmp_path, transfer, nics, protocol):
    # the embedded runtime owns the transport: it sets Mooncake's MC_* variables itself from these
    # flags (disaggctl/transfer/mooncake.py), so the plan puts none in the environment
    text = HEAD + f"hosts: [{{name: h, address: 127.0.0.1, nics: {nics}}}]\ntransfer: {transfer}\n"
    text += "prefill: {env: {MC_LOG_LEVEL: INFO, EXTRA: '1'}}\ndecode: {}\n"
    plan = plan_of(tmp_path, text)
    for p in plan.processes[:2]:
        assert p.argv[p.argv.index("--transfer-protocol") + 1] == protocol
        assert p.argv[p.argv.index("--transfer-timeout") + 1] == "30"
        assert not [k for k in p.env if k.startswith("MC_") and k not in ("MC_LOG_LEVEL",)]
        assert p.env["PYTHONUNBUFFERED"] == "1"
    assert plan.process("prefill-0").env["MC_LOG_LEVEL"] == "INFO"  # role env is merged last
    assert plan.process("prefill-0").env["EXTRA"] == "1"
    assert "MC_LOG_LEVEL" not in plan.process("decode-0").env
    assert plan.process("proxy").env == {"PYTHONUNBUFFERED": "1"}


def test_start_order_and_kind(tmp_path):
    plan = plan_of(tmp_path, HEAD + "decode: {replicas: 2}\nprefill: {replicas: 2}\n")
    assert [p.name for p in plan.processes] == ["prefill-0", "prefill-1", "decode-0", "decode-1", "proxy"]
    assert plan.kind == "xpyd"
    assert plan_of(tmp_path, HEAD + "colocated: {}\n").kind == "colocated"
    assert plan_of(tmp_path, HEAD + GPU_HOST + "prefill: {tp: 2, ep: 2}\ndecode: {}\n").kind == "ep"
    mm = HEAD.replace("builtin:tiny}", "builtin:tiny, multimodal: true}")
    plan = plan_of(tmp_path, mm + "encoder: {}\nprefill: {}\ndecode: {}\n")
    assert plan.kind == "epd"
    assert [p.role for p in plan.processes] == ["encoder", "prefill", "decode", "proxy"]


def test_spec_hash_follows_the_spec(tmp_path):
    a = plan_of(tmp_path, HEAD + "prefill: {}\ndecode: {}\n")
    b = plan_of(tmp_path, HEAD + "prefill: {}\ndecode: {max_batch: 3}\n")
    assert a.spec_hash("prefill-0") == b.spec_hash("prefill-0")
    assert a.spec_hash("decode-0") != b.spec_hash("decode-0")
    assert json.loads(a.model_dump_json())["processes"][0]["url"] == "http://127.0.0.1:30000"


def test_hosts_bind_and_python(tmp_path):
    hosts = (
        "hosts:\n"
        "  - {name: a, address: 127.0.0.1}\n"
        "  - {name: b, address: 10.9.0.2, python: /opt/py/bin/python, ssh: {user: u, port: 2222}}\n"
        "  - {name: c, address: 10.9.0.3}\n"
    )
    text = HEAD + hosts + "prefill: {hosts: [b]}\ndecode: {hosts: [c], bind: 0.0.0.0}\nproxy: {host: a}\n"
    plan = plan_of(tmp_path, text)
    a, b, c = plan.hosts
    assert (a.local, a.python) == (True, sys.executable)
    assert (b.local, b.python, b.ssh.user, b.ssh.port) == (False, "/opt/py/bin/python", "u", 2222)
    assert (c.local, c.python) == (False, "python3")
    assert (
        plan.process("prefill-0").bind == "10.9.0.2"
        and plan.process("prefill-0").argv[0] == "/opt/py/bin/python"
    )
    assert plan.process("decode-0").bind == "0.0.0.0" and plan.process("decode-0").address == "10.9.0.3"
    assert plan.process("proxy").bind == "127.0.0.1"


# -- rejections --------------------------------------------------------------------------------------


def test_more_gpus_than_the_host_has(tmp_path):
    text = HEAD + GPU_HOST + "colocated: {tp: 16}\n"
    (line,) = rejected(tmp_path, text)
    assert (
        f":{line_no(text, 'colocated:')}: colocated.tp: a replica needs 16 GPUs but host n0 has only 8"
        in line
    )
    text = HEAD + GPU_HOST + "prefill: {replicas: 3, tp: 2}\ndecode: {tp: 4}\n"
    (line,) = rejected(tmp_path, text)
    assert (
        "decode.replicas: replica 0 of decode does not fit: it needs 4 consecutive free GPUs (free GPUs: n0: 2 of 8)"
        in line
    )


def test_overlapping_gpus(tmp_path):
    text = HEAD + GPU_HOST + "prefill: {tp: 4}\ndecode: {tp: 2, base_gpu_id: 2}\n"
    (line,) = rejected(tmp_path, text)
    assert (
        f":{line_no(text, 'decode:')}: decode.base_gpu_id: decode-0 on n0 would use GPUs 2-3, overlapping GPU 2 of prefill-0"
        in line
    )


def test_unknown_host_names(tmp_path):
    text = HEAD + "prefill: {hosts: [local, nowhere]}\ndecode: {}\nproxy: {host: elsewhere}\n"
    lines = rejected(tmp_path, text)
    assert any(
        f":{line_no(text, 'proxy:')}: proxy.host: unknown host 'elsewhere' (hosts: local)" in x for x in lines
    )
    assert any(f":{line_no(text, 'nowhere')}: prefill.hosts[1]: unknown host 'nowhere'" in x for x in lines)


@pytest.mark.parametrize("have, missing", [("prefill", "decode"), ("decode", "prefill")])
def test_prefill_and_decode_need_each_other(tmp_path, have, missing):
    text = HEAD + f"{have}: {{}}\n"
    (line,) = rejected(tmp_path, text)
    assert line.endswith(
        f":{line_no(text, have)}: {have}: {have} needs a {missing} role too (or use colocated alone)"
    )


def test_ep_must_divide_the_gpus(tmp_path):
    text = HEAD + GPU_HOST + "prefill: {tp: 4, ep: 3}\ndecode: {tp: 2, dp: 4}\n"
    lines = rejected(tmp_path, text)
    assert any("prefill.ep: EP size 3 does not divide the 4 GPUs of a replica" in x for x in lines)
    assert any("decode.dp: DP size 4 does not divide the 2 GPUs of a replica" in x for x in lines)


def test_encoder_needs_a_multimodal_model(tmp_path):
    text = HEAD + "encoder: {}\nprefill: {}\ndecode: {}\n"
    (line,) = rejected(tmp_path, text)
    assert f":{line_no(text, 'encoder')}: encoder: an encoder needs a multimodal model" in line
    # auto-detection: a local model directory whose config.json has vision_config is multimodal
    model = tmp_path / "vlm"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llava", "vision_config": {}}))
    plan = plan_of(tmp_path, text.replace("builtin:tiny", str(model)))
    assert plan.kind == "epd"
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert "needs a multimodal model" in rejected(tmp_path, text.replace("builtin:tiny", str(model)))[0]


def test_duplicate_host_names(tmp_path):
    text = (
        HEAD + "hosts:\n  - {name: a, address: 127.0.0.1}\n  - {name: a, address: 127.0.0.2}\ncolocated: {}\n"
    )
    (line,) = rejected(tmp_path, text)
    assert f":{line_no(text, '127.0.0.2')}: hosts[1].name: duplicate host name 'a' (also hosts[0])" in line


@pytest.mark.parametrize(
    "body, message",
    [
        (
            "colocated: {}\nprefill: {}\ndecode: {}\n",
            "colocated: colocated cannot be mixed with prefill/decode",
        ),
        (
            "colocated: {}\nproxy: {use: mini_lb}\n",
            "proxy.use: mini_lb is SGLang's proxy: it needs engine: sglang",
        ),
        (
            "engine: sglang\ncolocated: {}\nproxy: {use: mini_lb}\n",
            "proxy.use: mini_lb only routes prefill/decode",
        ),
        (
            "colocated: {bootstrap_port: 9000}\n",
            "colocated.bootstrap_port: only prefill has a bootstrap port",
        ),
        ("prefill: {hosts: []}\ndecode: {}\n", "prefill.hosts: an empty host list places nothing"),
        (
            "engine: sglang\n" + GPU_HOST + "prefill: {tp: 4, ep: 2}\ndecode: {}\n",
            "prefill.ep: SGLang's Mooncake MoE backend sets the EP size to tp (4)",
        ),
        (
            "hosts: [{name: a, address: 127.0.0.1}, {name: b, address: 10.9.0.2}]\nprefill: {hosts: [a]}\ndecode: {hosts: [b]}\n",
            "hosts[0].address: prefill-0 would listen on loopback (127.0.0.1) but the topology spans several hosts",
        ),
    ],
)
def test_other_rejections(tmp_path, body, message):
    lines = rejected(tmp_path, HEAD + body)
    assert any(message in x for x in lines), lines


def test_several_loopback_hosts_are_one_machine(tmp_path):
    text = HEAD + "hosts: [{name: a, address: 127.0.0.1}, {name: b, address: 127.0.0.2}]\n"
    plan = plan_of(tmp_path, text + "prefill: {hosts: [a]}\ndecode: {hosts: [b]}\n")
    assert plan.process("decode-0").bind == "127.0.0.2"  # what peers connect to


# -- tensor parallelism on the embedded runtime ------------------------------------------------------


def test_tp_size_is_passed_only_when_tp_is_above_one(tmp_path):
    from disaggctl.runtime.server import build_parser

    plan = plan_of(tmp_path, HEAD + "prefill: {tp: 2}\ndecode: {tp: 1}\n")
    pre, dec = plan.process("prefill-0"), plan.process("decode-0")
    assert pre.argv.count("--tp-size") == 1 and pre.argv[pre.argv.index("--tp-size") + 1] == "2"
    assert build_parser("prefill").parse_args(pre.argv[5:]).tp_size == 2
    assert "--tp-size" not in dec.argv and build_parser("decode").parse_args(dec.argv[5:]).tp_size == 1
    assert "--tp-size" not in plan.process("proxy").argv
    # CPU ranks on a gpus: 0 host; on a GPU host the server's GPUs are its ranks' devices, in rank order
    assert pre.gpus == [] and pre.argv[pre.argv.index("--device") + 1] == "cpu"
    plan = plan_of(tmp_path, HEAD + GPU_HOST + "colocated: {replicas: 2, tp: 2}\n")
    for r, p in enumerate(x for x in plan.processes if x.role == "colocated"):
        assert p.argv[p.argv.index("--tp-size") + 1] == "2"
        assert p.env["CUDA_VISIBLE_DEVICES"] == f"{2 * r},{2 * r + 1}" and p.base_gpu_id == 2 * r
    assert "--tp-size" not in plan_of(tmp_path, HEAD + "colocated: {}\n").process("colocated-0").argv


def test_prefill_and_decode_may_have_different_tp(tmp_path):
    for pre_tp, dec_tp in ((2, 1), (1, 2), (2, 2)):
        plan = plan_of(tmp_path, HEAD + f"prefill: {{tp: {pre_tp}}}\ndecode: {{tp: {dec_tp}}}\n")
        assert (plan.process("prefill-0").tp, plan.process("decode-0").tp) == (pre_tp, dec_tp)
        path = tmp_path / "t.yaml"
        check_launchable(load_topology(path), str(path))  # and `up` runs it


def test_a_tp_that_cannot_shard_builtin_tiny_is_refused_with_its_line(tmp_path):
    text = HEAD + "prefill:\n  replicas: 1\n  tp: 4\ndecode: {tp: 2}\n"
    (line,) = rejected(tmp_path, text)
    assert line == (
        f"{tmp_path / 't.yaml'}:{line_no(text, 'tp: 4')}: prefill.tp: 4 does not divide "
        "num_key_value_heads 2 of builtin:tiny (each rank must hold whole KV heads); use a tp that divides "
        "4 attention heads, 2 KV heads and intermediate_size 192: 1 or 2"
    )
    # both sides are checked, each at its own line
    text = HEAD + "prefill: {tp: 2}\ndecode: {tp: 3}\n"
    (line,) = rejected(tmp_path, text)
    assert f":{line_no(text, 'decode:')}: decode.tp: 3 does not divide num_key_value_heads 2" in line
    # SGLang replicates KV heads beyond tp; the rule is the embedded runtime's
    path = tmp_path / "t.yaml"
    path.write_text(HEAD + GPU_HOST + "prefill: {tp: 4}\ndecode: {tp: 4}\n")
    sglang = load_topology(path).model_copy(update={"engine": "sglang"})
    assert build_plan(sglang, str(path)).process("decode-0").tp == 4


def test_a_tp_that_cannot_shard_a_local_model_is_refused(tmp_path):
    head = model_head(tmp_path, num_attention_heads=6, num_key_value_heads=2, intermediate_size=96)
    assert plan_of(tmp_path, head + "prefill: {tp: 2}\ndecode: {}\n").process("prefill-0").tp == 2
    text = head + "prefill: {}\ndecode: {tp: 3}\n"
    (line,) = rejected(tmp_path, text)
    assert f":{line_no(text, 'decode:')}: decode.tp: 3 does not divide num_key_value_heads 2 of " in line
    assert "(each rank must hold whole KV heads)" in line and line.endswith(": 1 or 2")
    # no num_key_value_heads: one KV head per query head, as the runtime reads it
    head = model_head(tmp_path, num_attention_heads=6, intermediate_size=96)
    plan_of(tmp_path, head + "colocated: {tp: 3}\n")
    (line,) = rejected(tmp_path, head + "colocated: {tp: 4}\n")
    assert "colocated.tp: 4 does not divide num_key_value_heads 6" in line and line.endswith(": 1, 2, 3, 6")
    head = model_head(tmp_path, num_attention_heads=4, num_key_value_heads=4, intermediate_size=102)
    (line,) = rejected(tmp_path, head + "colocated: {tp: 4}\n")
    assert "colocated.tp: 4 does not divide intermediate_size 102" in line
    assert "(each rank holds an equal slice of the MLP)" in line and line.endswith(": 1 or 2")
    # a path this machine cannot read (it may exist only on the hosts): the runtime checks it at load
    missing = HEAD.replace("builtin:tiny", str(tmp_path / "elsewhere"))
    assert plan_of(tmp_path, missing + "colocated: {tp: 5}\n").process("colocated-0").tp == 5


def test_builtin_shapes_match_the_runtimes_builtin_models():
    from disaggctl.runtime import builtin
    from disaggctl.topology.checks import BUILTIN_SHAPES

    assert set(BUILTIN_SHAPES) == {builtin.PREFIX + name for name in builtin.BUILTINS}
    tiny = builtin.TINY_CONFIG
    assert BUILTIN_SHAPES["builtin:tiny"] == {k: tiny[k] for k in BUILTIN_SHAPES["builtin:tiny"]}
    from disaggctl.runtime.builtin_llava import config

    text = config(1024)["text_config"]
    assert BUILTIN_SHAPES["builtin:tiny-llava"] == {k: text[k] for k in BUILTIN_SHAPES["builtin:tiny-llava"]}
    # smollm2's config is written from its GGUF header (builtin.write_smollm2); read the same fields
    gguf = pytest.importorskip("gguf")
    try:
        path = builtin.smollm2_gguf_path()
    except builtin.ModelError as e:
        pytest.skip(str(e))
    fields = gguf.GGUFReader(str(path)).fields
    assert BUILTIN_SHAPES["builtin:smollm2"] == {
        "num_attention_heads": int(fields["llama.attention.head_count"].contents()),
        "num_key_value_heads": int(fields["llama.attention.head_count_kv"].contents()),
        "intermediate_size": int(fields["llama.feed_forward_length"].contents()),
    }


def test_up_refuses_fewer_gpus_than_ranks(tmp_path):
    path = tmp_path / "t.yaml"
    text = HEAD + GPU_HOST + "colocated: {tp: 2, gpus_per_replica: 1}\n"
    path.write_text(text)
    topology = load_topology(path)
    build_plan(topology, str(path))  # drawable (and SGLang would get its own flags)
    with pytest.raises(TopologyError) as exc:
        check_launchable(topology, str(path))
    assert str(exc.value) == (
        f"{path}:{line_no(text, 'colocated:')}: colocated.gpus_per_replica: 1 for tp 2: each rank of the "
        "embedded runtime needs a GPU of its own; set gpus_per_replica to at least 2 (or leave it out)"
    )
    path.write_text(HEAD + "colocated: {tp: 2, gpus_per_replica: 1}\n")  # CPU ranks need no GPU
    check_launchable(load_topology(path), str(path))


def test_embed_buffer_mb_reaches_the_encoder_and_its_prefill_only(tmp_path):
    from disaggctl.runtime.server import build_parser
    from disaggctl.runtime.vision.encoder_server import build_parser as encoder_parser

    head = "name: t\nmodel: {path: builtin:tiny-llava}\n" + GPU_HOST
    text = head + "encoder: {embed_buffer_mb: 8}\nprefill: {embed_buffer_mb: 16}\ndecode: {}\n"
    plan = plan_of(tmp_path, text)
    assert encoder_parser().parse_args(plan.process("encoder-0").argv[5:]).buffer_mb == 8
    assert build_parser("prefill").parse_args(plan.process("prefill-0").argv[5:]).embed_buffer_mb == 16
    unset = plan_of(tmp_path, head + "encoder: {}\nprefill: {}\ndecode: {}\n")
    assert build_parser("prefill").parse_args(unset.process("prefill-0").argv[5:]).embed_buffer_mb == 64
    assert encoder_parser().parse_args(unset.process("encoder-0").argv[5:]).buffer_mb == 256
    for bad, message in (
        ("encoder: {}\nprefill: {}\ndecode: {embed_buffer_mb: 8}\n", "decode.embed_buffer_mb: only encoders"),
        ("prefill: {embed_buffer_mb: 8}\ndecode: {}\n", "prefill.embed_buffer_mb: only encoders"),
        ("encoder: {embed_buffer_mb: 0}\nprefill: {}\ndecode: {}\n", "embed_buffer_mb"),
    ):
        with pytest.raises(TopologyError, match=message):
            plan_of(tmp_path, head + bad)
    sgl = head.replace("name: t\n", "name: t\nengine: sglang\n")
    with pytest.raises(TopologyError, match="SGLang sizes its own"):
        plan_of(tmp_path, sgl + "encoder: {embed_buffer_mb: 8}\nprefill: {}\ndecode: {}\n")
