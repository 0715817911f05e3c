"""`disaggctl plan` (table, --json, --engine sglang, topology errors) and the start-up cost of `status`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from disaggctl.launch import state

TOPOLOGY = """\
name: plan-test
model: {path: builtin:tiny}
hosts:
  - {name: node0, address: 127.0.0.1, gpus: 8, nics: [mlx5_0, mlx5_1]}
prefill: {replicas: 2, tp: 2, hosts: [node0]}
decode: {replicas: 1, tp: 2, hosts: [node0]}
proxy: {host: node0, port: 8000}
"""


def run(cli, *args) -> subprocess.CompletedProcess:
    return subprocess.run([*cli, *args], capture_output=True, text=True, timeout=60)


@pytest.fixture
def planner():
    from disaggctl.topology import plan

    return plan


@pytest.fixture
def topo(tmp_path):
    path = tmp_path / "pd.yaml"
    path.write_text(TOPOLOGY)
    return path


def test_plan_json_is_the_planners_plan(cli, planner, topo):
    from disaggctl.topology.load import load_topology

    expected = planner.build_plan(load_topology(topo), str(topo))
    res = run(cli, "plan", str(topo), "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["plan"] == expected.model_dump(mode="json")
    assert doc["spec_hashes"] == {p.name: expected.spec_hash(p.name) for p in expected.processes}
    assert [p["name"] for p in doc["plan"]["processes"]] == ["prefill-0", "prefill-1", "decode-0", "proxy"]


def test_plan_table_lists_every_process(cli, planner, topo):
    res = run(cli, "plan", str(topo))
    assert res.returncode == 0, res.stderr
    for name in ("prefill-0", "prefill-1", "decode-0", "proxy"):
        assert name in res.stdout
    assert "serve prefill" in res.stdout and "--bootstrap-port" in res.stdout


def test_plan_sglang_prints_commands_per_host(cli, planner, topo):
    from disaggctl.topology import sglang
    from disaggctl.topology.load import load_topology

    res = run(cli, "plan", str(topo), "--engine", "sglang")
    assert res.returncode == 0, res.stderr
    topology = load_topology(topo).model_copy(update={"engine": "sglang"})
    expected = sglang.render_commands(planner.build_plan(topology, str(topo)))
    for host, lines in expected.items():
        assert f"# on {host}" in res.stdout
        for line in lines:
            assert line in res.stdout


def test_plan_output_redacts_secret_looking_env_values(cli, planner, tmp_path):
    from disaggctl.topology import sglang
    from disaggctl.topology.load import load_topology

    topo = tmp_path / "env.yaml"
    topo.write_text(
        TOPOLOGY.replace(
            "decode: {replicas: 1, tp: 2, hosts: [node0]}",
            "decode: {replicas: 1, tp: 2, hosts: [node0], "
            "env: {HF_TOKEN: tok-4f1e9b, MY_API_KEY: key-77ac02, MC_LOG_LEVEL: INFO}}",
        )
    )
    plan = planner.build_plan(load_topology(topo), str(topo))
    assert plan.process("decode-0").env["HF_TOKEN"] == "tok-4f1e9b"  # the plan itself keeps what up needs

    doc = json.loads(run(cli, "plan", str(topo), "--json").stdout)
    env = next(p for p in doc["plan"]["processes"] if p["name"] == "decode-0")["env"]
    assert env["HF_TOKEN"] == env["MY_API_KEY"] == "<redacted>"
    assert env["MC_LOG_LEVEL"] == "INFO"  # only secret-looking names are hidden
    assert doc["spec_hashes"]["decode-0"] == plan.spec_hash("decode-0")  # hashed from the real values
    for args in ([], ["--json"], ["--engine", "sglang"], ["--engine", "sglang", "--json"]):
        res = run(cli, "plan", str(topo), *args)
        assert res.returncode == 0, res.stderr
        assert "tok-4f1e9b" not in res.stdout and "key-77ac02" not in res.stdout, args
        assert "<redacted>" in res.stdout and "MC_LOG_LEVEL" in res.stdout, args
    # the rendered SGLang commands are the real ones but for the hidden values
    real = sglang.render_commands(
        planner.build_plan(load_topology(topo).model_copy(update={"engine": "sglang"}))
    )
    shown = run(cli, "plan", str(topo), "--engine", "sglang").stdout
    line = next(x for lines in real.values() for x in lines if "tok-4f1e9b" in x)
    assert line.replace("tok-4f1e9b", "'<redacted>'").replace("key-77ac02", "'<redacted>'") in shown


def test_plan_topology_error_names_file_and_line(cli, planner, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(TOPOLOGY.replace("replicas: 2", "replicas: two"))
    res = run(cli, "plan", str(bad))
    assert res.returncode == 2
    assert re.search(rf"{re.escape(str(bad))}:5: .*replicas", res.stderr), res.stderr
    assert "Traceback" not in res.stderr


def test_up_refuses_what_the_embedded_runtime_cannot_run_before_starting_anything(
    cli, tmp_path, disaggctl_home
):
    topo = tmp_path / "tp.yaml"
    topo.write_text(
        "name: tp\nmodel: {path: builtin:tiny, multimodal: true}\n"
        "hosts:\n  - {name: local, address: 127.0.0.1, gpus: 5}\n"
        "encoder: {replicas: 1, tp: 2}\nprefill: {replicas: 1, tp: 2, ep: 2}\ndecode: {replicas: 1}\n"
    )
    assert run(cli, "plan", str(topo)).returncode == 0  # it can be planned (and rendered for SGLang)
    res = run(cli, "up", str(topo))
    assert res.returncode == 2, res.stdout
    assert f"{topo}:5: encoder.tp: an embedded encoder runs on one device" in res.stderr
    assert f"{topo}:6: prefill.ep: builtin:tiny is not a mixture-of-experts model" in res.stderr
    assert "prefill.tp" not in res.stderr  # tensor parallelism it serves
    assert not list(disaggctl_home.iterdir())  # no state, no run directory: nothing was started


def test_up_refuses_what_experts_cannot_split_and_attention_dp(cli, tmp_path, disaggctl_home):
    model = tmp_path / "moe"
    model.mkdir()
    config = {
        "architectures": ["Qwen3MoeForCausalLM"],
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 96,
        "num_local_experts": 6,
        "moe_intermediate_size": 15,
    }
    (model / "config.json").write_text(json.dumps(config))
    topo = tmp_path / "ep.yaml"
    topo.write_text(
        f"name: ep\nmodel: {{path: {model}}}\nhosts:\n  - {{name: local, address: 127.0.0.1, gpus: 0}}\n"
        "prefill: {replicas: 1, tp: 2, ep: 1}\ndecode: {replicas: 1, tp: 2, ep: 2, dp: 2}\n"
    )
    res = run(cli, "up", str(topo))
    assert res.returncode == 2, res.stdout
    assert f"{topo}:5: prefill.tp: 2 does not divide moe_intermediate_size 15" in res.stderr
    assert f"{topo}:6: decode.dp: the embedded runtime has no attention data parallelism" in res.stderr
    assert "decode.ep" not in res.stderr  # 6 experts spread over 2 ranks: fine
    topo.write_text(topo.read_text().replace("tp: 2, ep: 1", "tp: 2, ep: 4").replace(", dp: 2", ""))
    res = run(cli, "up", str(topo))
    assert res.returncode == 2 and f"{topo}:5: prefill.ep: " in res.stderr
    assert not list(disaggctl_home.iterdir())


def test_plan_and_up_refuse_a_tp_the_model_cannot_be_split_over(cli, tmp_path, disaggctl_home):
    topo = tmp_path / "tp.yaml"
    topo.write_text(
        "name: tp\nmodel: {path: builtin:tiny}\nhosts:\n  - {name: local, address: 127.0.0.1, gpus: 0}\n"
        "prefill: {replicas: 1, tp: 2}\ndecode: {replicas: 1, tp: 4}\n"
    )
    for command in ("plan", "up"):
        res = run(cli, command, str(topo))
        assert res.returncode == 2, res.stdout
        assert res.stderr.splitlines() == [
            f"{topo}:6: decode.tp: 4 does not divide num_key_value_heads 2 of builtin:tiny (each rank must "
            "hold whole KV heads); use a tp that divides 4 attention heads, 2 KV heads and intermediate_size "
            "192: 1 or 2"
        ]
    assert not list(disaggctl_home.iterdir())
    # what SGLang would run is still drawn: it has rules of its own for heads that tp does not divide
    assert run(cli, "plan", str(topo), "--engine", "sglang").returncode == 0


def test_plan_bad_engine_is_a_usage_error(cli, tmp_path):
    res = run(cli, "plan", str(tmp_path / "x.yaml"), "--engine", "vllm")
    assert res.returncode == 2 and "--engine must be embedded or sglang" in res.stderr


# -- status start-up --------------------------------------------------------------------------------------

PROBE = """
import runpy, sys
sys.argv = ["disaggctl", "status", "--json"]
try:
    runpy.run_module("disaggctl", run_name="__main__")
except SystemExit as e:
    code = e.code
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "aiohttp", "paramiko", "numpy")
               or m.startswith(("disaggctl.runtime", "disaggctl.transfer")))
print("HEAVY", heavy, "EXIT", code, file=sys.stderr)
"""


def _record(name: str, url: str) -> state.ProcRecord:
    return state.ProcRecord(
        name=name, host="local", pid=1, start_time=0.0, log_path="/nonexistent", started_at=time.time(),
        spec_hash="h", url=url, backend="local", role="proxy",
    )  # fmt: skip


def test_status_imports_nothing_heavy_and_starts_fast(cli, disaggctl_home):
    # a deployment whose only process is dead (pid 1 with another start time): status exits 3
    st = state.DeploymentState(
        name="quick",
        created_at=time.time(),
        hosts=[state.HostRecord(name="local", address="127.0.0.1")],
        processes=[_record("proxy", "http://127.0.0.1:9")],
    )
    state.save(st)
    res = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60)
    assert "HEAVY [] EXIT 3" in res.stderr, res.stderr
    doc = json.loads(res.stdout)
    assert doc["processes"][0]["alive"] is False and doc["healthy"] is False
    t0 = time.monotonic()
    timed = run(cli, "status")
    wall = time.monotonic() - t0
    print(f"\n`disaggctl status` wall time: {wall:.2f} s")
    assert timed.returncode == 3 and "proxy" in timed.stdout
    assert wall < 3.0


def test_commands_without_a_deployment(cli, disaggctl_home):
    res = run(cli, "status")
    assert res.returncode == 1 and "no deployment is running" in res.stderr
    assert run(cli, "logs").returncode == 1
    down = run(cli, "down")
    assert down.returncode == 0 and "nothing to stop" in down.stderr


def test_status_shows_a_servers_ranks_in_one_row(cli, disaggctl_home):
    st = state.DeploymentState(
        name="ranks",
        created_at=time.time(),
        hosts=[state.HostRecord(name="local", address="127.0.0.1")],
        processes=[
            _record("prefill-0", "http://127.0.0.1:9").model_copy(
                update={"role": "prefill", "gpus": [2, 3], "tp": 2}
            ),
            _record("decode-0", "http://127.0.0.1:9").model_copy(update={"role": "decode", "tp": 2}),
            _record("proxy", "http://127.0.0.1:9"),
        ],
    )
    state.save(st)
    doc = json.loads(run(cli, "status", "--json").stdout)
    assert [(p["name"], p["tp"], p["gpus"]) for p in doc["processes"]] == [
        ("prefill-0", 2, [2, 3]),
        ("decode-0", 2, []),
        ("proxy", 1, []),
    ]
    rows = [line for line in run(cli, "status").stdout.splitlines() if "-0 " in line]
    assert len(rows) == 2, rows  # one row per server, whatever its ranks
    assert "2,3 (tp 2)" in rows[0] and "CPU (tp 2)" in rows[1]
