"""Expert parallelism's dispatch and combine, rank by rank without processes (each rank's share of a
mixture built by the loader's own `shard`, its partial output summed as the all-reduce would), and an EP
server whose rank dies mid-request."""

from __future__ import annotations

import os
import signal

import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import wait_for  # noqa: E402
from test_deepseek import deepseek_config  # noqa: E402

from disaggctl.runtime.config import ModelConfig  # noqa: E402
from disaggctl.runtime.models.deepseek import DeepseekMoE  # noqa: E402
from disaggctl.runtime.parallel import TensorParallel, shard  # noqa: E402

RANKS = 2


def model_config() -> ModelConfig:
    raw = {**deepseek_config().to_dict(), "architectures": ["DeepseekV3ForCausalLM"]}
    return ModelConfig.from_hf_dict(raw)


@pytest.fixture(scope="module")
def mixtures():
    """(the whole mixture, each EP rank's share of it) with the same random weights and correction bias."""
    cfg = model_config()
    torch.manual_seed(7)
    whole = DeepseekMoE(cfg, TensorParallel()).eval()
    with torch.no_grad():
        for t in whole.state_dict().values():
            t.copy_(torch.randn(t.shape) * 0.2)
    full = whole.state_dict()
    ranks = []
    for r in range(RANKS):
        tp = TensorParallel(rank=r, size=RANKS, ep=True)
        part = DeepseekMoE(cfg, tp).eval()
        # the names a checkpoint gives them (…mlp.experts.N…), so that shard() decides as at load time
        part.load_state_dict(
            {n: shard(f"mlp.{n}", full[n], tuple(full[n].shape), tp) for n in part.state_dict()}
        )
        ranks.append(part)
    return cfg, whole, ranks


def record_inputs(moe: DeepseekMoE) -> dict[int, list[torch.Tensor]]:
    """Expert id -> the rows each of its calls was given."""
    seen: dict[int, list[torch.Tensor]] = {}
    for e, expert in moe.experts.items():
        expert.register_forward_hook(lambda _m, args, _out, e=int(e): seen.setdefault(e, []).append(args[0]))
    return seen


def test_each_token_goes_to_the_ranks_that_own_its_experts(mixtures):
    cfg, _, ranks = mixtures
    x = torch.randn(33, cfg.hidden_size)
    per_rank = cfg.num_experts // RANKS
    for r, part in enumerate(ranks):
        assert sorted(map(int, part.experts)) == list(range(r * per_rank, (r + 1) * per_rank))
        seen = record_inputs(part)
        weights, chosen = part.route(x)
        out = part.dispatch(x, weights, chosen)
        for e in range(cfg.num_experts):
            tokens = torch.where(chosen == e)[0]
            if e // per_rank == r and tokens.numel():
                (rows,) = seen.pop(e)  # one call per expert, with exactly its tokens
                assert torch.equal(rows, x[tokens])
        assert not seen, f"rank {r} ran experts no token chose: {sorted(seen)}"
        # a token none of whose experts live here contributes nothing from this rank
        mine = ((chosen // per_rank) == r).any(dim=1)
        assert torch.equal(out[~mine], torch.zeros_like(out[~mine]))


def test_combining_the_ranks_weights_each_expert_once(mixtures):
    """The ranks' parts summed (the all-reduce) equal the whole mixture and, independently, the routing
    weights times each chosen expert's output, plus the shared expert: a weight applied twice, or an
    expert run on two ranks, would not."""
    cfg, whole, ranks = mixtures
    x = torch.randn(21, cfg.hidden_size)
    weights, chosen = whole.route(x)
    parts = []
    for part in ranks:
        w, c = part.route(x)  # the router is replicated: every rank routes alike
        assert torch.equal(c, chosen) and torch.equal(w, weights)
        parts.append(part.dispatch(x, w, c) + part.shared_experts(x))
    combined = sum(parts)
    want = whole.shared_experts(x).clone()
    for t in range(x.shape[0]):
        for k in range(cfg.num_experts_per_tok):
            want[t] += weights[t, k] * whole.experts[str(int(chosen[t, k]))](x[t : t + 1])[0]
    assert torch.allclose(combined, want, atol=1e-5)
    assert torch.allclose(combined, whole(x), atol=1e-5)
    # routing: the chosen experts' unbiased scores renormalised, times routed_scaling_factor
    assert torch.allclose(weights.sum(dim=1), torch.full((x.shape[0],), cfg.routed_scaling_factor))


@pytest.mark.slow
def test_a_dead_rank_fails_an_ep_server_mid_request(tmp_path):
    """Rank 1 of an ep-2 engine is killed while a request decodes: rank 0's next collective fails, the
    request ends with an error, and the engine reports the death (the server's health says it and the
    server exits, see docs/topology.md) instead of hanging."""
    from test_deepseek import build_deepseek, engine
    from test_runtime_vs_hf import greedy, prompts

    from disaggctl.runtime.engine import Request

    build_deepseek(tmp_path)
    e = engine(str(tmp_path), 2, 2, dist_timeout_s=60.0)
    try:
        e.start()
        events = []
        e.add_request(Request("r", prompts(384)[0], greedy(10_000), on_event=events.append))
        wait_for(lambda: len(events) >= 3, 60, "the request to decode a few tokens")
        os.kill(e.ranks.procs[0].pid, signal.SIGKILL)
        wait_for(lambda: events[-1].finished, 60, "the request to fail")
        assert events[-1].error is not None
        wait_for(lambda: e.failure() is not None, 30, "rank 0 to notice its peer died")
        assert not e.alive() and "rank 1" in e.failure()
    finally:
        e.stop()


def test_up_refuses_mooncake_a2a_where_the_wheel_has_no_ep(tmp_path, disaggctl_home, cli):
    """The CPU wheel of mooncake-transfer-engine has neither mooncake.ep nor mooncake.pg: `up` stops at
    pre-flight, before any process starts, and says why."""
    import subprocess

    pytest.importorskip("mooncake.engine")
    try:
        import mooncake.ep  # noqa: F401
        import mooncake.pg  # noqa: F401

        pytest.skip("this Mooncake wheel has the EP backend")
    except ImportError:
        pass
    model = tmp_path / "model"
    deepseek_config().save_pretrained(model)
    (model / "model.safetensors").write_bytes(b"")  # pre-flight checks paths, not weights
    topo = tmp_path / "ep.yaml"
    topo.write_text(
        f"name: a2a\nmodel: {{path: {model}}}\n"
        "hosts: [{name: local, address: 127.0.0.1, gpus: 0}]\n"
        "prefill: {tp: 2, ep: 2, moe_a2a_backend: mooncake}\ndecode: {tp: 2, ep: 2, moe_a2a_backend: mooncake}\n"
    )
    res = subprocess.run([*cli, "up", str(topo)], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    out = res.stdout + res.stderr
    assert "cannot import mooncake.ep" in out and "CPU wheel does not" in out, out
    status = subprocess.run([*cli, "status", "--json"], capture_output=True, text=True, timeout=60)
    assert '"pid"' not in status.stdout  # nothing was started


@pytest.mark.slow
def test_local_ep_example_comes_up_and_answers(tmp_path, monkeypatch, cli):
    """topologies/local-ep.yaml as shipped (ports moved to free ones): `up`, the README's request, and
    greedy tokens equal to transformers on builtin:tiny-moe (a checkpoint transformers loads as it is)."""
    import subprocess
    import sys
    from pathlib import Path

    import yaml
    from conftest import free_block
    from hf_reference import hf_greedy
    from test_pd_e2e import greedy, post, prompt

    from disaggctl.runtime.builtin import resolve_model

    monkeypatch.setenv("DISAGGCTL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DISAGGCTL_CACHE", str(tmp_path / "cache"))
    raw = yaml.safe_load((Path(__file__).parent.parent / "topologies" / "local-ep.yaml").read_text())
    raw["hosts"][0]["python"] = sys.executable
    raw["prefill"].update(port=free_block(1), bootstrap_port=free_block(1))
    raw["decode"]["port"] = free_block(1)
    raw["proxy"]["port"] = proxy_port = free_block(1)
    topo = tmp_path / "local-ep.yaml"
    topo.write_text(yaml.safe_dump(raw))
    proxy = f"http://127.0.0.1:{proxy_port}"
    try:
        res = subprocess.run(
            [*cli, "up", str(topo), "--timeout", "180"], capture_output=True, text=True, timeout=240
        )
        assert res.returncode == 0, res.stdout + res.stderr
        status, body = post(
            proxy + "/generate",
            {
                "text": "Let me tell you a long story ",
                "sampling_params": {"temperature": 0, "max_new_tokens": 8},
            },
        )
        assert status == 200 and body["text"], body
        ids = prompt(11, 0)
        status, body = post(proxy + "/generate", greedy(ids, 8))
        assert status == 200, body
        assert body["output_ids"] == hf_greedy(resolve_model("builtin:tiny-moe"), ids, 8)
    finally:
        res = subprocess.run([*cli, "down"], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr
