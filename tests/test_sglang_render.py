"""engine: sglang — the guides' example deployments, written as topologies, render the guides' commands.

Commands are compared as multisets of (flag, values), argument order aside; the interpreter name
(`python` / `python3`) is not compared, the module is. A test cites a guide only for what the guide
writes; where disaggctl deliberately renders something else, the test says so and docs/sglang.md
("Where the commands differ from the guides") explains why.

GUIDE is Mooncake's current SGLang guide: kvcache-ai/Mooncake
docs/source/deployment/integrations/sglang/pd-disaggregation.md at commit 4987194.
"""

from __future__ import annotations

import json
import shlex
from collections import Counter

import pytest

from disaggctl.topology import sglang
from disaggctl.topology.load import TopologyError, load_topology
from disaggctl.topology.plan import build_plan
from disaggctl.topology.sglang_args import PINNED_ROUTER, PINNED_SGLANG, snapshot


def plan_of(tmp_path, text: str):
    path = tmp_path / "t.yaml"
    path.write_text(text)
    return build_plan(load_topology(path), str(path))


def rejected(tmp_path, text: str) -> str:
    path = tmp_path / "t.yaml"
    path.write_text(text)
    with pytest.raises(TopologyError) as exc:
        build_plan(load_topology(path), str(path))
    return str(exc.value)


def flags(tokens: list[str]) -> tuple[str, Counter]:
    """['python', '-m', MODULE, --flag, v1, v2, --switch, ...] -> (MODULE, Counter{(flag, (v1, v2)): n})."""
    assert tokens[1] == "-m", tokens
    out: Counter = Counter()
    flag, values = None, []
    for tok in [*tokens[3:], "--end"]:
        if tok.startswith("--"):
            if flag is not None:
                out[(flag, tuple(values))] += 1
            flag, values = tok, []
        else:
            values.append(tok)
    return tokens[2], out


def guide(command: str) -> tuple[str, Counter]:
    return flags(shlex.split(command))


def ours(proc) -> tuple[str, Counter]:
    return flags(proc.argv)


def without(parsed: tuple[str, Counter], *names: str) -> tuple[str, Counter]:
    module, c = parsed
    return module, Counter({k: v for k, v in c.items() if k[0] not in names})


def flag_value(proc, name: str) -> str | None:
    return proc.argv[proc.argv.index(name) + 1] if name in proc.argv else None


QWEN = "Qwen/Qwen2.5-7B-Instruct-GPTQ-Int4"
TWO_NODES = """hosts:
  - {name: n137, address: 192.168.0.137, gpus: 8}
  - {name: n140, address: 192.168.0.140, gpus: 8}
"""


# -- Mooncake's current guide: router as proxy ----------------------------------------------------------


# GUIDE, "Multi-Node".
def test_1p1d_two_nodes(tmp_path):
    plan = plan_of(
        tmp_path,
        f"name: g\nengine: sglang\nmodel: {{path: {QWEN}}}\n{TWO_NODES}"
        "prefill: {tp: 2, hosts: [n137]}\ndecode: {tp: 2, hosts: [n140], port: 30001}\n"
        "proxy: {host: n137, port: 8000, bind: 0.0.0.0}\n",
    )
    assert ours(plan.process("prefill-0")) == guide(
        f"python -m sglang.launch_server --model-path {QWEN} --disaggregation-mode prefill "
        "--port 30000 --host 192.168.0.137 --tp-size 2"
    )
    assert ours(plan.process("decode-0")) == guide(
        f"python -m sglang.launch_server --model-path {QWEN} --disaggregation-mode decode "
        "--port 30001 --host 192.168.0.140 --tp-size 2"
    )
    assert ours(plan.process("proxy")) == guide(
        'python3 -m sglang_router.launch_router --pd-disaggregation --prefill "http://192.168.0.137:30000" 8998 '
        '--decode "http://192.168.0.140:30001" --policy round_robin --host 0.0.0.0 --port 8000'
    )


# GUIDE, "Single-Node": the decode skips the prefill's GPUs 0-1 with --base-gpu-id 2.
def test_1p1d_one_node_base_gpu_id(tmp_path):
    plan = plan_of(
        tmp_path,
        f"name: g\nengine: sglang\nmodel: {{path: {QWEN}}}\n"
        "hosts: [{name: n137, address: 192.168.0.137, gpus: 8}]\n"
        "prefill: {tp: 2}\ndecode: {tp: 2, port: 30001}\nproxy: {port: 8000, bind: 0.0.0.0}\n",
    )
    assert ours(plan.process("prefill-0")) == guide(
        f"python -m sglang.launch_server --model-path {QWEN} --disaggregation-mode prefill "
        "--port 30000 --host 192.168.0.137 --tp-size 2"
    )
    assert ours(plan.process("decode-0")) == guide(
        f"python -m sglang.launch_server --model-path {QWEN} --disaggregation-mode decode "
        "--port 30001 --base-gpu-id 2 --host 192.168.0.137 --tp-size 2"
    )
    assert ours(plan.process("proxy")) == guide(
        'python3 -m sglang_router.launch_router --pd-disaggregation --prefill "http://192.168.0.137:30000" 8998 '
        '--decode "http://192.168.0.137:30001" --policy round_robin --host 0.0.0.0 --port 8000'
    )


# GUIDE, "Router for multi node": one prefill, decodes on 192.168.0.137 and 192.168.0.140. Deliberate
# difference: the guide joins the decode URLs with a comma after one --decode; sglang_router takes
# exactly one URL per --decode (nargs=1, repeated), so disaggctl writes one --decode per decode.
def test_1p2d_router_two_decode_nodes(tmp_path):
    plan = plan_of(
        tmp_path,
        f"name: g\nengine: sglang\nmodel: {{path: {QWEN}}}\n{TWO_NODES}"
        "prefill: {tp: 2, hosts: [n137]}\ndecode: {tp: 2, replicas: 2, max_per_host: 1, port: 30001}\n"
        "proxy: {host: n137, port: 8000, bind: 0.0.0.0}\n",
    )
    text = guide(
        'python3 -m sglang_router.launch_router --pd-disaggregation --prefill "http://192.168.0.137:30000" 8998 '
        '--decode "http://192.168.0.137:30001,http://192.168.0.140:30001" --policy round_robin '
        "--host 0.0.0.0 --port 8000"
    )
    module, c = text
    joined = next(k for k in c if k[0] == "--decode")
    del c[joined]
    for url in joined[1][0].split(","):
        c[("--decode", (url,))] += 1
    assert ours(plan.process("proxy")) == (module, c)
    assert [flag_value(plan.process(f"decode-{i}"), "--host") for i in (0, 1)] == [
        "192.168.0.137",
        "192.168.0.140",
    ]


# GUIDE, "EP Backend". Deliberate difference: the guide's `--dp-size 8` is attention DP inside the TP-8
# world (8 GPUs); since SGLang 0.5.22 --dp-size counts whole replicas (it would ask for 64 GPUs) and
# attention DP is --attn-dp-size, which is what disaggctl's dp renders for 0.5.22 and later.
def test_ep_deepseek(tmp_path):
    plan = plan_of(
        tmp_path,
        f"name: g\nengine: sglang\nmodel: {{path: deepseek-ai/DeepSeek-V3-0324}}\n{TWO_NODES}"
        "prefill: {tp: 8, dp: 8, ep: 8, hosts: [n137]}\ndecode: {tp: 8, dp: 8, ep: 8, hosts: [n140], port: 30001}\n",
    )
    assert plan.kind == "ep"
    for name, role, host, port in (
        ("prefill-0", "prefill", "137", 30000),
        ("decode-0", "decode", "140", 30001),
    ):
        assert plan.process(name).gpus == list(range(8))
        module, text = guide(
            "python -m sglang.launch_server --model-path deepseek-ai/DeepSeek-V3-0324 "
            f"--disaggregation-mode {role} --port {port} --host 192.168.0.{host} --tp-size 8 --dp-size 8 "
            "--elastic-ep-backend mooncake --moe-a2a-backend mooncake"
        )
        text[("--attn-dp-size", ("8",))] = text.pop(("--dp-size", ("8",)))
        assert ours(plan.process(name)) == (module, text)


def test_attention_dp_before_0_5_22_is_dp_size_with_enable_dp_attention(tmp_path):
    plan = plan_of(
        tmp_path,
        "name: g\nengine: sglang\nsglang: {version: 0.5.21}\nmodel: {path: m/m}\n"
        "hosts: [{name: n, address: 127.0.0.1, gpus: 8}]\nprefill: {tp: 4, dp: 4}\ndecode: {tp: 4, dp: 2}\n",
    )
    p, d = plan.process("prefill-0"), plan.process("decode-0")
    assert (p.gpus, d.gpus) == ([0, 1, 2, 3], [4, 5, 6, 7])  # DP attention partitions the TP world
    assert flag_value(p, "--dp-size") == "4" and "--enable-dp-attention" in p.argv
    assert "--attn-dp-size" not in p.argv
    assert flag_value(d, "--dp-size") == "2" and "--enable-dp-attention" in d.argv


# GUIDE: "Set --mooncake-ib-device to the same value as --disaggregation-ib-device". The EP backend takes
# a comma-joined list only; the KV transfer gets each GPU's own NIC through SGLang's per-GPU map.
def test_ep_with_nics_sets_both_ib_device_flags(tmp_path):
    plan = plan_of(
        tmp_path,
        "name: g\nengine: sglang\nmodel: {path: deepseek-ai/DeepSeek-V3-0324}\n"
        "hosts: [{name: n, address: 127.0.0.1, gpus: 8, nics: [mlx5_0, mlx5_1, mlx5_2, mlx5_3]}]\n"
        "prefill: {tp: 4, ep: 4}\ndecode: {tp: 4, ep: 4}\n",
    )
    for name, first, nics in (("prefill-0", 0, ["mlx5_0", "mlx5_1"]), ("decode-0", 4, ["mlx5_2", "mlx5_3"])):
        p = plan.process(name)
        per_gpu = {str(first + i): nics[i // 2] for i in range(4)}
        assert json.loads(flag_value(p, "--disaggregation-ib-device")) == per_gpu
        assert flag_value(p, "--mooncake-ib-device") == ",".join(nics)


# GUIDE, "EPD Backend", with $MODEL = Qwen/Qwen3-VL-8B-Instruct, $TP = 2, $MEM_FRACTION = 0.8,
# $CHUNK_SIZE = 8192, $PORT = 30000 (prefill) and 30001 (decode), and the two encoders its --encoder-urls
# names (30002, 30003). Normalised: `--tp` is SGLang's alias of `--tp-size`;
# `--disaggregation-transfer-backend mooncake` is SGLang's default, which disaggctl leaves out. All
# processes share one host here, so each gets its own --base-gpu-id, which the guide's per-node snippets
# do not show: that flag is checked against the placement instead.
def test_epd(tmp_path):
    plan = plan_of(
        tmp_path,
        """
name: g
engine: sglang
model: {path: Qwen/Qwen3-VL-8B-Instruct, multimodal: true}
hosts: [{name: n, address: 127.0.0.1, gpus: 8}]
encoder: {replicas: 2, port: 30002}
prefill: {tp: 2, port: 30000, chunk_size: 8192, extra_args: [--mem-fraction-static, '0.8']}
decode: {port: 30001}
""",
    )

    def norm(parsed):
        module, c = without(parsed, "--disaggregation-transfer-backend", "--base-gpu-id")
        return module, Counter({(("--tp-size" if k[0] == "--tp" else k[0]), k[1]): v for k, v in c.items()})

    for i, port in enumerate((30002, 30003)):
        assert norm(ours(plan.process(f"encoder-{i}"))) == norm(
            guide(
                "python -m sglang.launch_server --model-path Qwen/Qwen3-VL-8B-Instruct --encoder-only "
                f"--encoder-transfer-backend mooncake --port {port}"
            )
        )
    assert norm(ours(plan.process("prefill-0"))) == norm(
        guide(
            "python -m sglang.launch_server --model-path Qwen/Qwen3-VL-8B-Instruct --disaggregation-mode prefill "
            "--disaggregation-transfer-backend mooncake --encoder-transfer-backend mooncake --tp 2 "
            "--mem-fraction-static 0.8 --chunked-prefill-size 8192 --language-only "
            "--encoder-urls http://127.0.0.1:30002 http://127.0.0.1:30003 --port 30000"
        )
    )
    assert norm(ours(plan.process("decode-0"))) == norm(
        guide(
            "python -m sglang.launch_server --model-path Qwen/Qwen3-VL-8B-Instruct --disaggregation-mode decode "
            "--disaggregation-transfer-backend mooncake --port 30001"
        )
    )
    for p in plan.processes[:-1]:
        _, c = ours(p)
        base = [k[1] for k in c if k[0] == "--base-gpu-id"]
        assert base == ([] if p.gpus[0] == 0 else [(str(p.gpus[0]),)])


# sgl-project/sglang docs/advanced_features/epd_disaggregation.md (commit 3cc424a), "EP Disaggregation":
# two encoders and a language-only server (disaggctl: encoder + colocated). Deliberate difference: the
# doc's encoder transfer backend is zmq_to_scheduler; disaggctl moves embeddings through Mooncake, the
# transfer engine it configures (NICs, protocol, timeouts), so it writes mooncake.
def test_encoders_with_language_only_server(tmp_path):
    plan = plan_of(
        tmp_path,
        """
name: g
engine: sglang
model: {path: Qwen/Qwen3-VL-8B-Instruct, multimodal: true}
hosts: [{name: n, address: 127.0.0.1, gpus: 0}]
encoder: {replicas: 2, port: 30000}
colocated: {port: 30002}
""",
    )

    def norm(parsed):
        module, c = without(parsed, "--encoder-transfer-backend")
        return module, c

    for i in (0, 1):
        assert flag_value(plan.process(f"encoder-{i}"), "--encoder-transfer-backend") == "mooncake"
        assert norm(ours(plan.process(f"encoder-{i}"))) == norm(
            guide(
                "python -m sglang.launch_server --model-path Qwen/Qwen3-VL-8B-Instruct --encoder-only "
                f"--encoder-transfer-backend zmq_to_scheduler --port 3000{i}"
            )
        )
    assert norm(ours(plan.process("colocated-0"))) == norm(
        guide(
            "python -m sglang.launch_server --model-path Qwen/Qwen3-VL-8B-Instruct --language-only "
            "--encoder-urls http://127.0.0.1:30000 http://127.0.0.1:30001 "
            "--encoder-transfer-backend zmq_to_scheduler --port 30002"
        )
    )
    assert plan.process("proxy").argv[2:5] == [
        "sglang_router.launch_router",
        "--worker-urls",
        "http://127.0.0.1:30002",
    ]


# -- SGLang's mini_lb, for pinned releases that had it ------------------------------------------------


# kvcache-ai/Mooncake doc/en/sglang-integration-v1.md (commit 42ebdba), Note "XpYd is supported": that
# guide's mini_lb takes space-separated lists, as SGLang 0.4.6.post3 to 0.5.1 parse them. Its first
# example: a prefill and a decode on each of two nodes.
def test_mini_lb_lists_2p2d_two_nodes(tmp_path):
    plan = plan_of(
        tmp_path,
        f"name: g\nengine: sglang\nsglang: {{version: 0.5.1}}\nmodel: {{path: {QWEN}}}\n{TWO_NODES}"
        "prefill: {replicas: 2, max_per_host: 1}\ndecode: {replicas: 2, max_per_host: 1, port: 30001}\n"
        "proxy: {bind: 0.0.0.0}\n",
    )
    assert ours(plan.process("proxy")) == guide(
        "python3 -m sglang.srt.disaggregation.mini_lb --prefill http://192.168.0.137:30000 "
        "http://192.168.0.140:30000 --decode http://192.168.0.137:30001 http://192.168.0.140:30001 "
        "--host 0.0.0.0 --port 8000"
    )


# The same guide's second example: two prefills and two decodes on one node, where that guide says
# to give each prefill its bootstrap port (--prefill-bootstrap-ports 8998 8999). (Mooncake's current
# guide says several prefills on one node are not supported, for that port clash; disaggctl gives each
# prefill a bootstrap port of its own, with the router too: test_two_prefills_on_one_node_with_router.)
def test_mini_lb_lists_2p2d_one_node_bootstrap_ports(tmp_path):
    plan = plan_of(
        tmp_path,
        f"name: g\nengine: sglang\nsglang: {{version: 0.5.1}}\nmodel: {{path: {QWEN}}}\n"
        "hosts: [{name: n137, address: 192.168.0.137, gpus: 8}]\n"
        "prefill: {replicas: 2, port: 30000, port_step: 100}\ndecode: {replicas: 2, port: 30200, port_step: 100}\n"
        "proxy: {bind: 0.0.0.0}\n",
    )
    assert ours(plan.process("proxy")) == guide(
        "python3 -m sglang.srt.disaggregation.mini_lb --prefill http://192.168.0.137:30000 "
        "http://192.168.0.137:30100 --decode http://192.168.0.137:30200 http://192.168.0.137:30300 "
        "--host 0.0.0.0 --port 8000 --prefill-bootstrap-ports 8998 8999"
    )
    assert flag_value(plan.process("prefill-1"), "--disaggregation-bootstrap-port") == "8999"


# kvcache-ai/Mooncake doc/en/sglang-integration-v1.md (commit 2cf3abd), Note "XpYd is supported": the
# original mini_lb (SGLang up to 0.4.6.post2) splits comma-joined lists.
def test_mini_lb_commas_for_the_original_mini_lb(tmp_path):
    plan = plan_of(
        tmp_path,
        f"name: g\nengine: sglang\nsglang: {{version: 0.4.6}}\nmodel: {{path: {QWEN}}}\n{TWO_NODES}"
        "prefill: {replicas: 2, max_per_host: 1}\ndecode: {replicas: 2, max_per_host: 1, port: 30001}\n"
        "proxy: {bind: 0.0.0.0, use: mini_lb}\n",
    )
    assert ours(plan.process("proxy")) == guide(
        "python3 -m sglang.srt.disaggregation.mini_lb --prefill http://192.168.0.137:30000,http://192.168.0.140:30000 "
        "--decode http://192.168.0.137:30001,http://192.168.0.140:30001 --host 0.0.0.0 --port 8000"
    )
    two = plan_of(
        tmp_path,
        f"name: g\nengine: sglang\nsglang: {{version: 0.4.6}}\nmodel: {{path: {QWEN}}}\n"
        "hosts: [{name: n, address: 10.0.0.1, gpus: 8}]\nprefill: {replicas: 2}\ndecode: {}\n",
    )
    assert flag_value(two.process("proxy"), "--prefill-bootstrap-ports") == "8998,8999"


# -- disaggctl's own layouts and rules ------------------------------------------------------------------


def test_two_prefills_on_one_node_with_router(tmp_path):
    plan = plan_of(
        tmp_path,
        f"name: g\nengine: sglang\nmodel: {{path: {QWEN}}}\n"
        "hosts: [{name: n137, address: 192.168.0.137, gpus: 8}]\n"
        "prefill: {replicas: 2, port: 30000, port_step: 100}\ndecode: {replicas: 2, port: 30200, port_step: 100}\n"
        "proxy: {bind: 0.0.0.0, policy: power_of_two}\n",
    )
    assert ours(plan.process("proxy")) == guide(
        "python3 -m sglang_router.launch_router --pd-disaggregation "
        "--prefill http://192.168.0.137:30000 8998 --prefill http://192.168.0.137:30100 8999 "
        "--decode http://192.168.0.137:30200 --decode http://192.168.0.137:30300 "
        "--policy power_of_two --host 0.0.0.0 --port 8000"
    )
    p1 = plan.process("prefill-1")
    assert (
        flag_value(p1, "--disaggregation-bootstrap-port") == "8999" and flag_value(p1, "--base-gpu-id") == "1"
    )


def test_page_size_is_always_written(tmp_path):
    # SGLang's page size is not 1 by default: it depends on the attention backend
    plan = plan_of(
        tmp_path,
        "name: g\nengine: sglang\nmodel: {path: m/m}\nprefill: {page_size: 1, max_pages: 100}\ndecode: {}\n",
    )
    p = plan.process("prefill-0")
    assert flag_value(p, "--page-size") == "1" and flag_value(p, "--max-total-tokens") == "100"
    msg = rejected(
        tmp_path, "name: g\nengine: sglang\nmodel: {path: m/m}\nprefill: {max_pages: 9}\ndecode: {}\n"
    )
    assert "prefill.max_pages: needs page_size with engine: sglang" in msg


def test_proxy_choice(tmp_path):
    head = "name: g\nengine: sglang\nmodel: {path: m/m}\n"
    pd = "prefill: {}\ndecode: {}\n"
    assert plan_of(tmp_path, head + pd).process("proxy").argv[2] == "sglang_router.launch_router"
    # a policy the router lacks: auto falls back to disaggctl's proxy, an explicit router is refused
    least = plan_of(tmp_path, head + pd + "proxy: {policy: least_load}\n")
    assert least.process("proxy").argv[2:5] == ["disaggctl", "serve", "proxy"]
    assert "proxy.policy: sglang_router has no least_load policy" in rejected(
        tmp_path, head + pd + "proxy: {policy: least_load, use: router}\n"
    )
    assert plan_of(tmp_path, head + pd + "proxy: {use: builtin}\n").process("proxy").argv[2] == "disaggctl"
    # a pinned release that still had mini_lb gets it; mini_lb needs to know the release
    old = plan_of(
        tmp_path, head.replace("engine: sglang\n", "engine: sglang\nsglang: {version: 0.4.9}\n") + pd
    )
    assert old.process("proxy").argv[2] == "sglang.srt.disaggregation.mini_lb"
    assert "proxy.use: mini_lb needs sglang.version" in rejected(
        tmp_path, head + pd + "proxy: {use: mini_lb}\n"
    )
    gone = head.replace("engine: sglang\n", "engine: sglang\nsglang: {version: 0.5.2}\n")
    assert "SGLang 0.5.2 has no mini_lb" in rejected(tmp_path, gone + pd + "proxy: {use: mini_lb}\n")
    embedded = "name: g\nmodel: {path: builtin:tiny}\n" + pd
    assert "router is sglang_router's proxy: it needs engine: sglang" in rejected(
        tmp_path, embedded + "proxy: {use: router}\n"
    )


def test_unknown_extra_args_and_missing_features_are_refused_at_plan_time(tmp_path):
    head = "name: g\nengine: sglang\nmodel: {path: m/m, multimodal: true}\n"
    text = head + "prefill: {}\ndecode: {extra_args: [--mem-fraction-statc, '0.8']}\n"
    msg = rejected(tmp_path, text)
    assert "t.yaml:5: decode.extra_args: SGLang 0.5.23 would refuse these arguments" in msg
    assert "--mem-fraction-statc is not an option" in msg
    # a release without snapshot is not checked
    plan_of(tmp_path, text.replace("engine: sglang\n", "engine: sglang\nsglang: {version: 0.5.19}\n"))
    # EPD on a release that had no encoder role
    epd = head.replace("engine: sglang\n", "engine: sglang\nsglang: {version: 0.4.6}\n")
    msg = rejected(tmp_path, epd + "encoder: {}\nprefill: {}\ndecode: {}\n")
    assert (
        "encoder: encoder-0's command uses what SGLang 0.4.6 does not have: --encoder-only is not an option"
        in msg
    )


def test_language_only_servers_sharing_a_host_get_their_own_encoder_bootstrap_port(tmp_path):
    plan = plan_of(
        tmp_path,
        "name: g\nengine: sglang\nmodel: {path: m/m, multimodal: true}\n"
        "encoder: {}\nprefill: {replicas: 2}\ndecode: {}\n",
    )
    assert flag_value(plan.process("prefill-0"), "--encoder-bootstrap-port") is None  # SGLang's 8997
    assert flag_value(plan.process("prefill-1"), "--encoder-bootstrap-port") == "8996"


# -- NICs ----------------------------------------------------------------------------------------------


def _nic_plan(tmp_path, host: str, roles: str, version: str = ""):
    pin = f"sglang: {{version: {version}}}\n" if version else ""
    return plan_of(
        tmp_path,
        f"name: g\nengine: sglang\n{pin}model: {{path: m/m, multimodal: true}}\nhosts: [{host}]\n{roles}",
    )


def test_several_nics_per_process_and_per_gpu(tmp_path):
    # the first guide's "erdma_0,erdma_1": one GPU with two NICs
    plan = plan_of(
        tmp_path,
        "name: g\nengine: sglang\nmodel: {path: m/m}\nhosts:\n"
        "  - {name: p, address: 10.0.0.1, gpus: 1, nics: [erdma_0, erdma_1]}\n"
        "  - {name: d, address: 10.0.0.2, gpus: 1, nics: [erdma_0, erdma_1]}\n"
        "prefill: {hosts: [p]}\ndecode: {hosts: [d]}\n",
    )
    for name in ("prefill-0", "decode-0"):
        assert flag_value(plan.process(name), "--disaggregation-ib-device") == "erdma_0,erdma_1"
    plan = _nic_plan(
        tmp_path,
        "{name: n, address: 10.0.0.1, gpus: 2, nics: [erdma_0, erdma_1, erdma_2, erdma_3]}",
        "prefill: {}\ndecode: {}\n",
    )
    assert plan.process("prefill-0").nics == ["erdma_0", "erdma_1"]
    assert flag_value(plan.process("prefill-0"), "--disaggregation-ib-device") == "erdma_0,erdma_1"
    assert flag_value(plan.process("decode-0"), "--disaggregation-ib-device") == "erdma_2,erdma_3"
    # tp 2 over GPUs with different NICs: SGLang's per-GPU map, keyed by the host's GPU index
    plan = _nic_plan(
        tmp_path,
        "{name: n, address: 10.0.0.1, gpus: 4, nics: [a0, a1, a2, a3, a4, a5, a6, a7]}",
        "prefill: {tp: 2}\ndecode: {tp: 2}\n",
    )
    assert json.loads(flag_value(plan.process("decode-0"), "--disaggregation-ib-device")) == {
        "2": "a4,a5",
        "3": "a6,a7",
    }
    # GPUs sharing one NIC: the plain form
    plan = _nic_plan(
        tmp_path,
        "{name: n, address: 10.0.0.1, gpus: 8, nics: [m0, m1]}",
        "prefill: {tp: 4}\ndecode: {tp: 4}\n",
    )
    assert flag_value(plan.process("prefill-0"), "--disaggregation-ib-device") == "m0"
    # releases before the per-GPU form get the process's NICs
    plan = _nic_plan(
        tmp_path,
        "{name: n, address: 10.0.0.1, gpus: 8, nics: [m0, m1, m2, m3]}",
        "prefill: {tp: 4}\ndecode: {tp: 4}\n",
        version="0.5.1",
    )
    assert flag_value(plan.process("prefill-0"), "--disaggregation-ib-device") == "m0,m1"


def test_encoders_and_cpu_processes_get_their_nics(tmp_path):
    plan = _nic_plan(
        tmp_path,
        "{name: n, address: 10.0.0.1, gpus: 4, nics: [m0, m1, m2, m3]}",
        "encoder: {}\nprefill: {}\ndecode: {}\n",
    )
    assert flag_value(plan.process("encoder-0"), "--disaggregation-ib-device") == "m0"
    assert flag_value(plan.process("prefill-0"), "--disaggregation-ib-device") == "m1"
    cpu = _nic_plan(tmp_path, "{name: n, address: 10.0.0.1, nics: [m0, m1]}", "prefill: {}\ndecode: {}\n")
    assert flag_value(cpu.process("decode-0"), "--disaggregation-ib-device") == "m0,m1"
    none = _nic_plan(tmp_path, "{name: n, address: 10.0.0.1, gpus: 2}", "prefill: {}\ndecode: {}\n")
    assert "--disaggregation-ib-device" not in none.process("prefill-0").argv


# -- environment ----------------------------------------------------------------------------------------


MC_TRANSPORT = (
    "MC_FORCE_TCP",
    "MC_FORCE_HCA",
    "MC_INTRANODE_NVLINK",
    "MC_FORCE_MNNVL",
    "SGLANG_MOONCAKE_CUSTOM_MEM_POOL",
)


@pytest.mark.parametrize(
    "protocol, two_hosts, expected",
    [
        ("auto", False, {}),  # Mooncake picks RDMA when it finds an HCA, else TCP
        ("tcp", False, {"MC_FORCE_TCP": "1"}),
        ("rdma", False, {"MC_FORCE_HCA": "1"}),
        (
            "nvlink",
            False,
            {"SGLANG_MOONCAKE_CUSTOM_MEM_POOL": "INTRA_NODE_NVLINK", "MC_INTRANODE_NVLINK": "1"},
        ),
        ("nvlink", True, {"SGLANG_MOONCAKE_CUSTOM_MEM_POOL": "NVLINK", "MC_FORCE_MNNVL": "1"}),
    ],
)
def test_transfer_environment_per_protocol(tmp_path, protocol, two_hosts, expected):
    hosts = (
        "hosts:\n  - {name: a, address: 10.0.0.1, gpus: 8, nics: [m0]}\n  - {name: b, address: 10.0.0.2, gpus: 8}\n"
        if two_hosts
        else "hosts: [{name: a, address: 10.0.0.1, gpus: 8, nics: [m0]}]\n"
    )
    body = f"transfer: {{protocol: {protocol}}}\nprefill: {{hosts: [a]}}\ndecode: {{hosts: [{'b' if two_hosts else 'a'}]}}\n"
    for engine in ("sglang", "embedded"):
        plan = plan_of(tmp_path, f"name: g\nengine: {engine}\nmodel: {{path: builtin:tiny}}\n{hosts}{body}")
        for p in plan.processes[:2]:
            if engine == "embedded":
                # the runtime sets the MC_* variables itself from these flags
                want = "rdma" if protocol == "auto" else protocol
                assert flag_value(p, "--transfer-protocol") == want
                assert not [k for k in p.env if k.startswith(("MC_", "SGLANG_"))]
                continue
            assert {k: v for k, v in p.env.items() if k in MC_TRANSPORT} == expected
            assert p.env["MC_TRANSFER_TIMEOUT"] == p.env["MC_TCP_PROGRESS_TIMEOUT_SEC"] == "30"
            assert "SGLANG_DISAGGREGATION_WAITING_TIMEOUT" not in p.env  # SGLang's own 300 s stay
        assert plan.process("proxy").env == {"PYTHONUNBUFFERED": "1"}


def test_timeout_reaches_sglang_when_the_topology_sets_it(tmp_path):
    plan = plan_of(
        tmp_path,
        "name: g\nengine: sglang\nmodel: {path: m/m}\ntransfer: {timeout_s: 42.5}\nprefill: {}\n"
        "decode: {env: {SGLANG_DISAGGREGATION_WAITING_TIMEOUT: 900}}\n",
    )
    p, d = plan.process("prefill-0"), plan.process("decode-0")
    assert (
        p.env["SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT"]
        == p.env["SGLANG_DISAGGREGATION_WAITING_TIMEOUT"]
        == "43"
    )
    assert p.env["MC_TRANSFER_TIMEOUT"] == "43"
    assert d.env["SGLANG_DISAGGREGATION_WAITING_TIMEOUT"] == "900"  # the role's env has the last word


@pytest.mark.parametrize("timeout_s, protocol, mc_timeout", [(2, "tcp", "5"), (45.5, "rdma", "46")])
def test_sglang_and_the_embedded_runtime_get_one_mooncake_environment(
    tmp_path, timeout_s, protocol, mc_timeout
):
    # the SGLang server's rendered MC_* and what the embedded runtime sets in its own process agree,
    # Mooncake's 5 s floor for MC_TRANSFER_TIMEOUT included
    from disaggctl.transfer import mooncake

    plan = plan_of(
        tmp_path,
        f"name: g\nengine: sglang\nmodel: {{path: m/m}}\ntransfer: {{protocol: {protocol}, timeout_s: {timeout_s}}}\n"
        "prefill: {}\ndecode: {}\n",
    )
    rendered = {k: v for k, v in plan.process("prefill-0").env.items() if k.startswith("MC_")}
    runtime = mooncake.transport_env(protocol, timeout_s, {})
    assert rendered == {k: v for k, v in runtime.items() if v is not None}
    assert rendered["MC_TRANSFER_TIMEOUT"] == mc_timeout  # Mooncake would raise 2 s to 5 s itself


def test_only_transferring_processes_get_the_transfer_environment(tmp_path):
    colocated = plan_of(tmp_path, "name: g\nengine: sglang\nmodel: {path: m/m}\ncolocated: {replicas: 2}\n")
    assert all(p.env == {"PYTHONUNBUFFERED": "1"} for p in colocated.processes)
    epd = plan_of(
        tmp_path,
        "name: g\nengine: sglang\nmodel: {path: m/m, multimodal: true}\nencoder: {}\ncolocated: {}\n",
    )
    assert "MC_TRANSFER_TIMEOUT" in epd.process("encoder-0").env
    assert "MC_TRANSFER_TIMEOUT" in epd.process("colocated-0").env  # it receives the embeddings


# -- rendering -----------------------------------------------------------------------------------------


def test_render_commands_are_copy_pastable(tmp_path):
    plan = plan_of(
        tmp_path,
        """
name: quoting
engine: sglang
model: {path: "models/my model's dir", served_name: "a b"}
hosts:
  - {name: a, address: 10.9.0.1, gpus: 4, nics: [mlx5_0, mlx5_1]}
  - {name: b, address: 10.9.0.2, gpus: 4}
prefill: {tp: 2, hosts: [a], env: {NOTE: "x y;z"}, extra_args: [--log-level, "$(touch pwned)"]}
decode: {tp: 2, hosts: [b]}
proxy: {host: a}
""",
    )
    commands = sglang.render_commands(plan)
    assert list(commands) == ["a", "b"]
    assert len(commands["a"]) == 2 and len(commands["b"]) == 1
    by_line = dict(zip([p.name for p in plan.processes if p.host == "a"], commands["a"], strict=True))
    by_line["decode-0"] = commands["b"][0]
    for name, line in by_line.items():
        p = plan.process(name)
        tokens = shlex.split(line)
        env = dict(t.split("=", 1) for t in tokens[: len(p.env)])
        assert env == p.env and tokens[len(p.env) :] == p.argv
        assert "CUDA_VISIBLE_DEVICES" not in p.env
    assert "'$(touch pwned)'" in by_line["prefill-0"]


def test_template_ships_inside_the_package_and_its_defaults_are_sglangs():
    from importlib import resources

    assert resources.files("disaggctl").joinpath("templates", "sglang.yaml").is_file()
    t = sglang.template()
    assert t["launch_server"]["module"] == "sglang.launch_server"
    options = snapshot("sglang", PINNED_SGLANG)["sglang.launch_server"]
    specs = [*t["launch_server"]["flags"].values(), t["launch_server"]["attn_dp"]["flag"]]
    specs.append(t["launch_server"]["language"]["encoder_bootstrap_port"])
    router = snapshot("sglang-router", PINNED_ROUTER)["sglang_router.launch_router"]
    checks = [(spec, options) for spec in specs] + [(spec, router) for spec in t["router"]["flags"].values()]
    for spec, known in checks:
        assert spec["flag"] in known, spec
        if "default" in spec:  # left out when equal to SGLang's default: it must be SGLang's default
            assert str(known[spec["flag"]].get("default")) == str(spec["default"]), spec


def test_moe_a2a_backend_none_leaves_mooncakes_ep_switches_out(tmp_path):
    """moe_a2a_backend unset or mooncake renders the guide's --moe-a2a-backend mooncake; none leaves the
    all-to-all to SGLang's default (and ep without experts' ranks is refused)."""
    text = "name: g\nengine: sglang\nmodel: {path: m/m}\nhosts: [{name: n, address: 127.0.0.1, gpus: 8}]\n"
    for backend, switches in ((None, True), ("mooncake", True), ("none", False)):
        field = f", moe_a2a_backend: {backend}" if backend else ""
        plan = plan_of(
            tmp_path, text + f"prefill: {{tp: 4, ep: 4{field}}}\ndecode: {{tp: 4, ep: 4{field}}}\n"
        )
        for name in ("prefill-0", "decode-0"):
            argv = plan.process(name).argv
            assert (flag_value(plan.process(name), "--moe-a2a-backend") == "mooncake") == switches, backend
            assert ("--elastic-ep-backend" in argv) == switches
    with pytest.raises(TopologyError, match="set ep > 1"):
        plan_of(tmp_path, text + "prefill: {tp: 4, moe_a2a_backend: mooncake}\ndecode: {tp: 4}\n")
