"""Qwen3-MoE on the embedded runtime against `transformers`, token for token: one rank, experts split like
the dense MLP over 2 ranks (ep 1), and experts spread whole over 2 ranks (expert parallelism, ep 2)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_runtime_vs_hf import PAGE, hf_greedy, perturb, prompts, run_staggered  # noqa: E402

from disaggctl.runtime.config import ConfigError, EngineConfig, ModelConfig  # noqa: E402
from disaggctl.runtime.engine import Engine  # noqa: E402


def moe_config(**override):
    """Four experts, two per token; layer 1 dense (mlp_only_layers), the others routed."""
    fields = dict(
        vocab_size=384,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        mlp_only_layers=[1],
        initializer_range=0.2,
    )
    return transformers.Qwen3MoeConfig(**{**fields, **override})


def build_moe(out, norm_topk_prob: bool):
    cfg = moe_config(norm_topk_prob=norm_topk_prob)
    torch.manual_seed(3)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    perturb(hf)
    hf.save_pretrained(out)
    return hf


def engine(path: str, tp: int = 1, ep: int = 1, **kw) -> Engine:
    kw.setdefault("max_pages", 64)
    return Engine(
        EngineConfig(model=path, page_size=PAGE, device="cpu", dtype="float32", tp_size=tp, ep_size=ep, **kw)
    )


@pytest.fixture(scope="module", params=[True, False], ids=["norm_topk", "raw_topk"])
def moe(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen3moe")
    hf = build_moe(out, request.param)
    batch = prompts(hf.config.vocab_size)
    return str(out), batch, [hf_greedy(hf, p) for p in batch]


def test_config_reads_the_routed_layers(moe):
    path, _, _ = moe
    cfg = ModelConfig.from_hf_dir(path)
    assert (cfg.family, cfg.num_experts, cfg.num_experts_per_tok, cfg.sparse_layers) == (
        "qwen3_moe",
        4,
        2,
        [0, 2],
    )


@pytest.mark.slow
@pytest.mark.parametrize("tp,ep", [(1, 1), (2, 1), (2, 2)], ids=["one-rank", "tp2-experts-split", "ep2"])
def test_moe_greedy_matches_transformers(moe, tp, ep):
    path, batch, want = moe
    e = engine(path, tp, ep, chunk_size=PAGE + 1)
    try:
        if ep > 1:  # each rank holds two whole experts of every routed layer
            layer = e.model.model.layers[0].mlp
            assert sorted(layer.experts) == ["0", "1"]
        got = run_staggered(e, batch)
        for i, (tokens, logprobs) in enumerate(want):
            assert got[str(i)]["tokens"] == tokens, f"prompt {i}, tp {tp}, ep {ep}"
            assert got[str(i)]["logprobs"] == pytest.approx(logprobs, abs=1e-4)
    finally:
        e.stop()


def test_expert_parallelism_needs_experts_and_a_divisible_count(moe, tmp_path):
    from test_runtime_vs_hf import build_model

    build_model("llama", tmp_path)
    with pytest.raises(ConfigError, match="needs a mixture-of-experts model"):
        engine(str(tmp_path), 2, 2)
    with pytest.raises(ConfigError, match="ep_size must be 1 or the tp_size"):
        engine(moe[0], 2, 3)


# ---- expert parallelism through `disaggctl up`: a PD pair whose both sides spread the experts ----


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    """A random Qwen3-MoE with builtin:tiny's tokenizer (vocab 1024), init std 0.2, perturbed norms."""
    from hf_reference import save_random_model, tiny_tokenizer_dir

    tiny = tiny_tokenizer_dir(tmp_path_factory.mktemp("cache"))
    cfg = moe_config(
        vocab_size=1024, num_hidden_layers=2, mlp_only_layers=[], max_position_embeddings=1024, eos_token_id=2
    )
    return save_random_model(cfg, tmp_path_factory.mktemp("moe-pd"), tiny)


@pytest.mark.slow
def test_pd_with_expert_parallelism_on_both_sides_equals_transformers(moe_dir, tmp_path):
    def ep_in_argv(d) -> None:
        assert "--ep-size" in " ".join(psutil_cmdline(d.procs["prefill-0"]["pid"]))

    pd_ep2_equals_transformers(moe_dir, tmp_path, "ep-pd", ep_in_argv)


def pd_ep2_equals_transformers(model_dir: str, tmp_path, name: str, check=None) -> None:
    """`up` a 1P1D deployment of `model_dir` with tp 2 / ep 2 on both sides; greedy output through the
    proxy must equal transformers. `check(deployment)` runs once it is up."""
    import json
    import sys
    from concurrent.futures import ThreadPoolExecutor

    from conftest import free_block
    from hf_reference import hf_greedy as hf_greedy_dir
    from test_pd_e2e import Deployment, greedy, post, prompt

    home = tmp_path / "home"
    home.mkdir()
    d = Deployment([sys.executable, "-m", "disaggctl"], home, tmp_path, model_dir, 1, 1)
    d.file.write_text(
        f"""\
name: {name}
model: {{path: {json.dumps(model_dir)}}}
hosts:
  - {{name: local, address: 127.0.0.1, gpus: 0, python: {json.dumps(sys.executable)}}}
transfer: {{protocol: tcp, timeout_s: 10}}
prefill: {{tp: 2, ep: 2, port: {free_block(1)}, bootstrap_port: {free_block(1)}, page_size: 4, chunk_size: 8}}
decode: {{tp: 2, ep: 2, port: {free_block(1)}, page_size: 4}}
proxy: {{host: local, port: {d.proxy.rsplit(":", 1)[1]}}}
"""
    )
    try:
        d.up()
        if check is not None:
            check(d)
        cases = [(prompt(n, seed), m) for seed, (n, m) in enumerate([(1, 6), (9, 8), (23, 10)])]
        with ThreadPoolExecutor(len(cases)) as pool:
            got = list(pool.map(lambda c: post(d.proxy + "/generate", greedy(*c)), cases))
        for (ids, n), (status, body) in zip(cases, got, strict=True):
            assert status == 200, body
            assert body["output_ids"] == hf_greedy_dir(model_dir, ids, n), f"{len(ids)}-token prompt"
    finally:
        d.down()


def psutil_cmdline(pid: int) -> list[str]:
    import psutil

    return psutil.Process(int(pid)).cmdline()
