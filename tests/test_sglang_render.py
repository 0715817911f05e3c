"""engine: sglang — the guides' example deployments, written as topologies, render the guides' commands.

Commands are compared as multisets of (flag, values), argument order aside; the interpreter name
(`python` / `python3`) is not compared, the module is.
"""

from __future__ import annotations

import copy
import shlex
from collections import Counter

import pytest

from disaggctl.topology import sglang
from disaggctl.topology.load import load_topology
from disaggctl.topology.plan import build_plan


def plan_of(tmp_path, text: str):
    path = tmp_path / "t.yaml"
    path.write_text(text)
    return build_plan(load_topology(path), str(path))


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


QWEN = "Qwen/Qwen2.5-7B-Instruct-GPTQ-Int4"


# Source: kvcache-ai/Mooncake doc/en/sglang-integration-v1.md (commit 42ebdba),
# "To run prefill instance and decode instance on different node".
def test_1p1d_two_nodes_tp2(tmp_path):
    plan = plan_of(
        tmp_path,
        f"""
name: guide-2node
engine: sglang
model: {{path: {QWEN}}}
hosts:
  - {{name: n137, address: 192.168.0.137, gpus: 8}}
  - {{name: n140, address: 192.168.0.140, gpus: 8}}
prefill: {{tp: 2, hosts: [n137], page_size: 32}}
decode: {{tp: 2, hosts: [n140], port: 30001, page_size: 32}}
proxy: {{host: n137, port: 8000, bind: 0.0.0.0, use: mini_lb}}
""",
    )
    assert ours(plan.process("prefill-0")) == guide(
        "python -m sglang.launch_server --model-path Qwen/Qwen2.5-7B-Instruct-GPTQ-Int4 --disaggregation-mode prefill "
        "--port 30000 --host 192.168.0.137 --tp-size 2 --page-size 32"
    )
    assert ours(plan.process("decode-0")) == guide(
        "python -m sglang.launch_server --model-path Qwen/Qwen2.5-7B-Instruct-GPTQ-Int4 --disaggregation-mode decode "
        "--port 30001 --host 192.168.0.140 --tp-size 2 --page-size 32"
    )
    assert ours(plan.process("proxy")) == guide(
        "python3 -m sglang.srt.disaggregation.mini_lb --prefill http://192.168.0.137:30000 "
        "--decode http://192.168.0.140:30001 --host 0.0.0.0 --port 8000"
    )


# Source: kvcache-ai/Mooncake doc/en/sglang-integration-v1.md (commit 42ebdba),
# "To run prefill instance and decode instance on the same node" (decode skips GPUs 0-1: --base-gpu-id 2).
def test_1p1d_one_node_base_gpu_id(tmp_path):
    plan = plan_of(
        tmp_path,
        f"""
name: guide-1node
engine: sglang
model: {{path: {QWEN}}}
hosts: [{{name: n137, address: 192.168.0.137, gpus: 8}}]
prefill: {{tp: 2, page_size: 32}}
decode: {{tp: 2, page_size: 32}}
proxy: {{port: 8000, bind: 0.0.0.0, use: mini_lb}}
""",
    )
    assert ours(plan.process("prefill-0")) == guide(
        "python -m sglang.launch_server --model-path Qwen/Qwen2.5-7B-Instruct-GPTQ-Int4 --disaggregation-mode prefill "
        "--port 30000 --host 192.168.0.137 --tp-size 2 --page-size 32"
    )
    assert ours(plan.process("decode-0")) == guide(
        "python -m sglang.launch_server --model-path Qwen/Qwen2.5-7B-Instruct-GPTQ-Int4 --disaggregation-mode decode "
        "--port 30001 --base-gpu-id 2 --host 192.168.0.137 --tp-size 2 --page-size 32"
    )
    assert ours(plan.process("proxy")) == guide(
        "python3 -m sglang.srt.disaggregation.mini_lb --prefill http://192.168.0.137:30000 "
        "--decode http://192.168.0.137:30001 --host 0.0.0.0 --port 8000"
    )


# Source: kvcache-ai/Mooncake doc/en/sglang-integration-v1.md (commit 42ebdba), Note "XpYd is supported",
# second example: two prefills and two decodes on one node, one bootstrap port per prefill.
def test_2p2d_one_node_bootstrap_ports(tmp_path):
    plan = plan_of(
        tmp_path,
        f"""
name: guide-xpyd
engine: sglang
model: {{path: {QWEN}}}
hosts: [{{name: n137, address: 192.168.0.137, gpus: 8}}]
prefill: {{replicas: 2, port: 30000, port_step: 100}}
decode: {{replicas: 2, port: 30200, port_step: 100}}
proxy: {{bind: 0.0.0.0, use: mini_lb}}
""",
    )
    assert ours(plan.process("proxy")) == guide(
        "python3 -m sglang.srt.disaggregation.mini_lb --prefill http://192.168.0.137:30000 "
        "http://192.168.0.137:30100 --decode http://192.168.0.137:30200 http://192.168.0.137:30300 "
        "--host 0.0.0.0 --port 8000 --prefill-bootstrap-ports 8998 8999"
    )
    # the second prefill's own bootstrap server listens where the proxy says it does
    _, p1 = ours(plan.process("prefill-1"))
    assert p1[("--disaggregation-bootstrap-port", ("8999",))] == 1
    assert p1[("--base-gpu-id", ("1",))] == 1


# Source: kvcache-ai/Mooncake doc/en/sglang-integration-v1.md (commit 42ebdba), Note "XpYd is supported",
# first example: a prefill and a decode on each of two nodes.
def test_2p2d_two_nodes(tmp_path):
    plan = plan_of(
        tmp_path,
        f"""
name: guide-xpyd-2node
engine: sglang
model: {{path: {QWEN}}}
hosts:
  - {{name: n137, address: 192.168.0.137, gpus: 8}}
  - {{name: n140, address: 192.168.0.140, gpus: 8}}
prefill: {{replicas: 2, max_per_host: 1}}
decode: {{replicas: 2, max_per_host: 1, port: 30001}}
proxy: {{bind: 0.0.0.0, use: mini_lb}}
""",
    )
    assert ours(plan.process("proxy")) == guide(
        "python3 -m sglang.srt.disaggregation.mini_lb --prefill http://192.168.0.137:30000 "
        "http://192.168.0.140:30000 --decode http://192.168.0.137:30001 http://192.168.0.140:30001 "
        "--host 0.0.0.0 --port 8000"
    )


# Source: kvcache-ai/Mooncake docs/source/deployment/integrations/sglang/pd-disaggregation.md
# (commit 4987194), "EP Backend — Expert Parallelism for MoE Models". SGLang sets ep_size = tp_size
# when --moe-a2a-backend is mooncake, so the guide (and disaggctl) leave --ep-size out.
def test_ep_deepseek(tmp_path):
    plan = plan_of(
        tmp_path,
        """
name: guide-ep
engine: sglang
model: {path: deepseek-ai/DeepSeek-V3-0324}
hosts:
  - {name: n137, address: 192.168.0.137, gpus: 8}
  - {name: n140, address: 192.168.0.140, gpus: 8}
prefill: {tp: 8, dp: 8, ep: 8, hosts: [n137]}
decode: {tp: 8, dp: 8, ep: 8, hosts: [n140], port: 30001}
""",
    )
    assert plan.kind == "ep"
    assert ours(plan.process("prefill-0")) == guide(
        "python -m sglang.launch_server --model-path deepseek-ai/DeepSeek-V3-0324 --disaggregation-mode prefill "
        "--port 30000 --host 192.168.0.137 --tp-size 8 --dp-size 8 --elastic-ep-backend mooncake "
        "--moe-a2a-backend mooncake"
    )
    assert ours(plan.process("decode-0")) == guide(
        "python -m sglang.launch_server --model-path deepseek-ai/DeepSeek-V3-0324 --disaggregation-mode decode "
        "--port 30001 --host 192.168.0.140 --tp-size 8 --dp-size 8 --elastic-ep-backend mooncake "
        "--moe-a2a-backend mooncake"
    )


def test_ep_with_nics_sets_both_ib_device_flags(tmp_path):
    # same guide: "Set --mooncake-ib-device to the same value as --disaggregation-ib-device"
    plan = plan_of(
        tmp_path,
        """
name: ep-nics
engine: sglang
model: {path: deepseek-ai/DeepSeek-V3-0324}
hosts: [{name: n, address: 127.0.0.1, gpus: 8, nics: [mlx5_0, mlx5_1, mlx5_2, mlx5_3]}]
prefill: {tp: 4, ep: 4}
decode: {tp: 4, ep: 4}
""",
    )
    for name, nics in (("prefill-0", "mlx5_0,mlx5_1"), ("decode-0", "mlx5_2,mlx5_3")):
        _, c = ours(plan.process(name))
        assert c[("--disaggregation-ib-device", (nics,))] == 1
        assert c[("--mooncake-ib-device", (nics,))] == 1


# Source: kvcache-ai/Mooncake docs/source/deployment/integrations/sglang/pd-disaggregation.md
# (commit 4987194), "EPD Backend — Encoder-Prefill-Decode for Multimodal Models", with $MODEL =
# Qwen/Qwen3-VL-8B-Instruct, $TP = 2, $MEM_FRACTION = 0.8, $CHUNK_SIZE = 8192, $PORT = 30000 (prefill) and
# 30001 (decode), and the two encoders its --encoder-urls names (30002, 30003). Normalised: `--tp` is
# SGLang's alias of `--tp-size`; `--disaggregation-transfer-backend mooncake` is SGLang's default, which
# disaggctl leaves out. All processes share one host here, so each gets its own --base-gpu-id, which the
# guide's per-node snippets do not show: that flag is checked against the placement instead.
def test_epd(tmp_path):
    plan = plan_of(
        tmp_path,
        """
name: guide-epd
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


# Source: sgl-project/sglang docs/advanced_features/epd_disaggregation.md, "Encoder transfer with Mooncake":
# one encoder and a language-only server (disaggctl: encoder + colocated).
def test_encoder_with_language_only_server(tmp_path):
    plan = plan_of(
        tmp_path,
        """
name: guide-e-lm
engine: sglang
model: {path: Qwen/Qwen3-VL-8B-Instruct, multimodal: true}
hosts: [{name: n, address: 127.0.0.1, gpus: 0}]
encoder: {port: 30000}
colocated: {port: 30002}
""",
    )
    assert ours(plan.process("encoder-0")) == guide(
        "python -m sglang.launch_server --model-path Qwen/Qwen3-VL-8B-Instruct --encoder-only "
        "--encoder-transfer-backend mooncake --port 30000"
    )
    assert ours(plan.process("colocated-0")) == guide(
        "python -m sglang.launch_server --model-path Qwen/Qwen3-VL-8B-Instruct --language-only "
        "--encoder-urls http://127.0.0.1:30000 --encoder-transfer-backend mooncake --port 30002"
    )


# -- rendering -----------------------------------------------------------------------------------------


def test_render_commands_are_copy_pastable(tmp_path):
    plan = plan_of(
        tmp_path,
        """
name: quoting
engine: sglang
model: {path: "models/my model's dir", served_name: "a b"}
hosts:
  - {name: a, address: 10.9.0.1, gpus: 4, nics: [mlx5_0]}
  - {name: b, address: 10.9.0.2, gpus: 4}
prefill: {tp: 2, hosts: [a], env: {NOTE: "x y;z"}, extra_args: [--log-level, "$(touch pwned)"]}
decode: {tp: 2, hosts: [b]}
proxy: {host: a, use: mini_lb}
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


def test_mini_lb_pairs_layout(tmp_path, monkeypatch):
    # sglang-router's mini_lb spells the bootstrap port after each prefill URL instead
    t = copy.deepcopy(sglang.template())
    t["mini_lb"]["layout"] = "pairs"
    monkeypatch.setattr(sglang, "template", lambda: t)
    plan = plan_of(
        tmp_path,
        f"""
name: pairs
engine: sglang
model: {{path: {QWEN}}}
prefill: {{replicas: 2}}
decode: {{}}
proxy: {{use: mini_lb}}
""",
    )
    assert plan.process("proxy").argv[1:] == [
        "-m", "sglang.srt.disaggregation.mini_lb",
        "--prefill", "http://127.0.0.1:30000", "8998", "--prefill", "http://127.0.0.1:30001", "8999",
        "--decode", "http://127.0.0.1:30002", "--host", "127.0.0.1", "--port", "8000",
    ]  # fmt: skip


def test_template_ships_inside_the_package():
    from importlib import resources

    assert resources.files("disaggctl").joinpath("templates", "sglang.yaml").is_file()
    assert sglang.template()["launch_server"]["module"] == "sglang.launch_server"


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_sglang_roles_keep_mooncake_env(tmp_path, role):
    plan = plan_of(
        tmp_path, f"name: e\nengine: sglang\nmodel: {{path: {QWEN}}}\nprefill: {{}}\ndecode: {{}}\n"
    )
    env = plan.process(f"{role}-0").env
    assert env["MC_FORCE_TCP"] == "1" and env["MC_TRANSFER_TIMEOUT"] == "30"
