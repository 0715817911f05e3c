"""The DeepSeek-V3 architecture (MLA with its latent KV cache, sigmoid group-limited routing with the
correction bias, shared experts, first dense layers) on the embedded runtime against `transformers`,
token for token: one rank, and experts spread whole over 2 CPU ranks (ep 2) with MLA's heads split."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_runtime_vs_hf import PAGE, hf_greedy, perturb, prompts, run_staggered  # noqa: E402

from disaggctl.runtime.config import EngineConfig, ModelConfig  # noqa: E402
from disaggctl.runtime.engine import Engine  # noqa: E402

YARN = {
    "rope_type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 32,
    "mscale": 0.7,
    "mscale_all_dim": 1.0,
    "beta_fast": 32,
    "beta_slow": 1,
    "rope_theta": 10000.0,
}


def deepseek_config(**override):
    """Eight routed experts in four groups (two groups kept, two experts a token), one shared expert,
    layer 0 dense; q through a LoRA rank, YaRN RoPE with mscale on interleaved pairs."""
    fields = dict(
        vocab_size=384,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_shared_experts=1,
        n_routed_experts=8,
        n_group=4,
        topk_group=2,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        routed_scaling_factor=2.5,
        kv_lora_rank=16,
        q_lora_rank=24,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=12,
        rms_norm_eps=1e-5,
        max_position_embeddings=128,
        rope_parameters=dict(YARN),
        initializer_range=0.2,
    )
    return transformers.DeepseekV3Config(**{**fields, **override})


# the second variant: q straight from the hidden state, plain RoPE on halves, biased projections
VARIANTS = {
    "lora-q-yarn-interleaved": {},
    "plain-q-default-rope-biases": dict(
        q_lora_rank=None,
        rope_interleave=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        attention_bias=True,
        norm_topk_prob=False,
    ),
}


def build_deepseek(out, **override):
    torch.manual_seed(5)
    hf = transformers.AutoModelForCausalLM.from_config(deepseek_config(**override)).eval()
    perturb(hf)
    with torch.no_grad():  # a buffer, not a parameter: its default (zeros) would hide how it is applied
        for layer in hf.model.layers[hf.config.first_k_dense_replace :]:
            layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(hf.config.n_routed_experts) * 0.2)
    hf.save_pretrained(out)
    return hf


def engine(path: str, tp: int = 1, ep: int = 1, **kw) -> Engine:
    kw.setdefault("max_pages", 64)
    return Engine(
        EngineConfig(model=path, page_size=PAGE, device="cpu", dtype="float32", tp_size=tp, ep_size=ep, **kw)
    )


@pytest.fixture(scope="module", params=list(VARIANTS))
def deepseek(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("deepseek")
    hf = build_deepseek(out, **VARIANTS[request.param])
    batch = prompts(hf.config.vocab_size)
    return request.param, str(out), batch, [hf_greedy(hf, p) for p in batch]


def test_config_reads_mla_and_routing(deepseek):
    _, path, _, _ = deepseek
    cfg = ModelConfig.from_hf_dir(path)
    assert cfg.mla and cfg.head_dim == 8 and (cfg.kv_lora_rank, cfg.v_head_dim) == (16, 12)
    assert (cfg.num_experts, cfg.n_group, cfg.topk_group, cfg.n_shared_experts) == (8, 4, 2, 1)
    assert cfg.sparse_layers == [1, 2] and cfg.routed_scaling_factor == 2.5


def test_greedy_matches_transformers(deepseek):
    """One rank; prefill chunks shorter than a prompt (cached prefix + new rows) mixed with decodes."""
    name, path, batch, want = deepseek
    e = engine(path, chunk_size=PAGE + 1)
    try:
        # the pool is the latent: one part per layer, one "head" of kv_lora_rank + qk_rope_head_dim
        assert (e.kv_cache.parts, e.kv_cache.num_kv_heads, e.kv_cache.tensor.shape[-1]) == (1, 1, 24)
        got = run_staggered(e, batch)
        for i, (tokens, logprobs) in enumerate(want):
            assert got[str(i)]["tokens"] == tokens, f"{name}, prompt {i}"
            assert got[str(i)]["logprobs"] == pytest.approx(logprobs, abs=1e-4)
        assert e.stats()["pages_used"] == 0
    finally:
        e.stop()


@pytest.mark.slow
@pytest.mark.parametrize("ep", [1, 2], ids=["tp2-experts-split", "ep2"])
def test_two_ranks_greedy_matches_transformers(deepseek, ep):
    """Two CPU ranks: half the query heads each over a replicated latent cache; every expert split in two
    (ep 1) or four whole experts each (ep 2)."""
    name, path, batch, want = deepseek
    if name != "lora-q-yarn-interleaved":
        pytest.skip("the ranks are checked on one variant (the other one's differences are per rank)")
    e = engine(path, 2, ep, chunk_size=PAGE + 1)
    try:
        experts = e.model.model.layers[1].mlp.experts
        assert sorted(experts) == (["0", "1", "2", "3"] if ep == 2 else [str(i) for i in range(8)])
        assert [(p["head_start"], p["num_heads"]) for p in e.pools] == [(0, 1), (0, 1)]
        got = run_staggered(e, batch)
        for i, (tokens, logprobs) in enumerate(want):
            assert got[str(i)]["tokens"] == tokens, f"ep {ep}, prompt {i}"
            assert got[str(i)]["logprobs"] == pytest.approx(logprobs, abs=1e-4)
    finally:
        e.stop()


# ---- MLA through PD: the latent pages move through the same merged Mooncake writes ----


@pytest.fixture(scope="module")
def deepseek_dir(tmp_path_factory):
    """The first variant with builtin:tiny's tokenizer (vocab 1024), for a deployment through `up`."""
    from hf_reference import save_random_model, tiny_tokenizer_dir

    tiny = tiny_tokenizer_dir(tmp_path_factory.mktemp("cache"))
    cfg = deepseek_config(vocab_size=1024, num_hidden_layers=2, max_position_embeddings=1024, eos_token_id=2)
    cfg.rope_parameters["original_max_position_embeddings"] = 256

    def random_correction_bias(model):
        for layer in model.model.layers[cfg.first_k_dense_replace :]:
            layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(cfg.n_routed_experts) * 0.2)

    return save_random_model(cfg, tmp_path_factory.mktemp("ds-pd"), tiny, prepare=random_correction_bias)


@pytest.mark.slow
def test_pd_with_expert_parallelism_on_both_sides_equals_transformers(deepseek_dir, tmp_path):
    """Prefill and decode each tp 2 / ep 2: every decode rank gets the whole latent from one prefill rank."""
    from test_moe import pd_ep2_equals_transformers

    pd_ep2_equals_transformers(deepseek_dir, tmp_path, "ds-pd")


def test_decode_slots_from_a_paged_kernel_meta_equal_the_gathered_ones():
    """On CUDA with Triton the step's meta carries decode rows' page tables instead of slots; MLA derives
    the same slots and mask from them."""
    from disaggctl.runtime.attention import SeqSlice, build_meta
    from disaggctl.runtime.models.deepseek import decode_slots

    seqs = [
        SeqSlice(1, 9, [4, 2, 7]),
        SeqSlice(5, 5, [1, 3]),
        SeqSlice(1, 2, [0]),
        SeqSlice(1, 12, [5, 6, 8]),
    ]
    plain = build_meta(seqs, PAGE, 1.0, "cpu")
    paged = build_meta(seqs, PAGE, 1.0, "cpu", paged_decode=True)
    assert paged.decode_slots is None and paged.decode_table is not None
    (want_slots, want_mask), (slots, mask) = decode_slots(plain), decode_slots(paged)
    assert torch.equal(mask, want_mask) and torch.equal(slots, want_slots)
