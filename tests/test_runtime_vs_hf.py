"""The embedded engine against `transformers` on the same weights: greedy tokens, token for token.

Tiny random models of each supported family are built with transformers, with a large init and perturbed
norms and biases (at the usual 0.02 init attention is near-uniform and position or bias bugs hide), saved,
and loaded back through the runtime's own loader. The engine then serves several prompts of different
lengths that join while others decode, with chunked prefill at several chunk sizes and with a pool small
enough to force preemption; every request must produce exactly what `hf.generate` produces alone.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from disaggctl.runtime.config import ConfigError, EngineConfig, ModelConfig  # noqa: E402
from disaggctl.runtime.engine import Engine, Request  # noqa: E402
from disaggctl.runtime.sampling import SamplingParams  # noqa: E402

NEW_TOKENS = 20
PAGE = 4
PROMPT_LENS = (7, 1, 13, 4, 9)

BASE = dict(vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=2, initializer_range=0.2)
MODELS = {
    # GQA, untied, biases on q/k/v/o, a non-default rope theta
    "llama": lambda: transformers.LlamaConfig(
        **BASE, num_attention_heads=4, num_key_value_heads=2, attention_bias=True, rope_theta=5e5
    ),
    # Qwen2: q/k/v biased, o not, tied embeddings
    "qwen2-tied": lambda: transformers.Qwen2Config(
        **BASE, num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True
    ),
    # Qwen3: head_dim != hidden / heads, qk-norm
    "qwen3": lambda: transformers.Qwen3Config(
        **BASE, num_attention_heads=4, num_key_value_heads=2, head_dim=32
    ),
    # Llama 3.1 style rope scaling, multi-query attention, tied
    "llama3-rope": lambda: transformers.LlamaConfig(
        **BASE,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
}


def perturb(model) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.5)
            elif name.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.5)


def build_model(kind: str, out_dir) -> object:
    """A perturbed tiny HF model of `kind`, saved to `out_dir`; returns the HF model."""
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(MODELS[kind]()).eval()
    perturb(hf)
    hf.save_pretrained(out_dir)
    return hf


def prompts(vocab: int, lens=PROMPT_LENS) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lens]


def hf_greedy(hf, prompt: list[int], n: int = NEW_TOKENS) -> tuple[list[int], list[float]]:
    out = hf.generate(
        torch.tensor([prompt]),
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    tokens = out.sequences[0, len(prompt) :].tolist()
    logprobs = [
        torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, tokens, strict=True)
    ]
    return tokens, logprobs


def greedy(n: int = NEW_TOKENS) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)


def run_staggered(engine: Engine, batch: list[list[int]], params: SamplingParams | None = None) -> dict:
    """Submit one prompt per step (later ones join while earlier ones decode), step until all finish."""
    results: dict[str, dict] = {}

    def on_event(ev):
        r = results.setdefault(ev.rid, {"tokens": [], "logprobs": [], "events": []})
        r["tokens"] += ev.token_ids
        r["logprobs"] += ev.logprobs
        r["events"].append(ev)

    for i, p in enumerate(batch):
        engine.add_request(Request(str(i), p, params or greedy(), on_event=on_event))
        engine.step()
    for _ in range(10_000):
        if not engine.step():
            break
    engine.scheduler.check()
    return results


@pytest.fixture(scope="module", params=list(MODELS))
def model(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    hf = build_model(request.param, out)
    batch = prompts(hf.config.vocab_size)
    want = [hf_greedy(hf, p) for p in batch]
    return request.param, str(out), batch, want


def engine_for(path: str, **kw) -> Engine:
    kw.setdefault("max_pages", 64)
    return Engine(EngineConfig(model=path, page_size=PAGE, device="cpu", dtype="float32", **kw))


@pytest.mark.parametrize("overlap", [False, True], ids=["settled-each-step", "overlap"])
def test_greedy_matches_transformers(model, overlap):
    kind, path, batch, want = model
    # chunk sizes 1, page - 1, page + 1 and whole prompts on qwen3; two of them on the other families
    for chunk in [1, PAGE - 1, PAGE + 1, 64] if kind == "qwen3" else [PAGE - 1, 64]:
        engine = engine_for(path, chunk_size=chunk, overlap_schedule=overlap)
        got = run_staggered(engine, batch)
        for i, (tokens, logprobs) in enumerate(want):
            assert got[str(i)]["tokens"] == tokens, f"{kind} prompt {i} (len {len(batch[i])}), chunk {chunk}"
            assert got[str(i)]["logprobs"] == pytest.approx(logprobs, abs=1e-4)
            last = got[str(i)]["events"][-1]
            assert last.finished and last.finish_reason == "length"
        stats = engine.stats()
        assert stats["pages_used"] == 0 and stats["running"] == 0
        assert stats["generation_tokens"] == NEW_TOKENS * len(batch)


@pytest.mark.parametrize("overlap", [False, True], ids=["settled-each-step", "overlap"])
def test_preemption_keeps_tokens(model, overlap):
    """A pool far too small for the batch: requests are preempted and recomputed, tokens unchanged."""
    kind, path, batch, want = model
    # the longest request needs ceil((13 + 20) / 4) = 9 pages; 10 pages cannot hold two of them
    engine = engine_for(path, chunk_size=PAGE + 1, max_pages=10, overlap_schedule=overlap)
    got = run_staggered(engine, batch)
    assert engine.stats()["preemptions"] > 0
    for i, (tokens, _) in enumerate(want):
        assert got[str(i)]["tokens"] == tokens, f"{kind} prompt {i} after preemption"
    assert engine.kv_cache.allocator.num_free == 10


def test_loader_rejects_mismatched_checkpoint(tmp_path):
    build_model("qwen2-tied", tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    # Qwen3 implies q/k norms, no biases, and a head_dim of 128 unless told
    (tmp_path / "config.json").write_text(json.dumps({**raw, "architectures": ["Qwen3ForCausalLM"]}))
    with pytest.raises(
        ConfigError, match=r"k_proj.weight has shape \(16, 64\), the config implies \(128, 64\)"
    ):
        engine_for(str(tmp_path))
    (tmp_path / "config.json").write_text(
        json.dumps({**raw, "architectures": ["Qwen3ForCausalLM"], "head_dim": 16})
    )
    with pytest.raises(ConfigError, match="missing tensors: .*q_norm.*unexpected tensors: .*q_proj.bias"):
        engine_for(str(tmp_path))
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="no \\*.safetensors file"):
        engine_for(str(tmp_path))


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "factor": 4.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
        {
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 64,
            "beta_fast": 16,
            "mscale": 1.0,
            "mscale_all_dim": 0.5,
        },
    ],
)
def test_rope_scaling_matches_transformers(rope):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from disaggctl.runtime.models.llama import rope_inv_freq

    hf_cfg = transformers.LlamaConfig(
        **BASE,
        num_attention_heads=2,
        max_position_embeddings=256,
        rope_parameters={"rope_theta": 1e4, **rope},
    )
    want_freq, want_factor = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf_cfg, "cpu")
    ours = ModelConfig.from_hf_dict(hf_cfg.to_dict())
    freq, factor = rope_inv_freq(ours)
    torch.testing.assert_close(freq, want_freq.float(), rtol=1e-6, atol=0)
    assert factor == pytest.approx(want_factor)


def test_config_rejects_unsupported_clearly():
    raw = transformers.LlamaConfig(**BASE, num_attention_heads=2).to_dict()
    with pytest.raises(ConfigError, match="rope type 'dynamic' is not supported"):
        ModelConfig.from_hf_dict({**raw, "rope_parameters": {"rope_type": "dynamic", "factor": 2.0}})
    with pytest.raises(ConfigError, match="unsupported architecture"):
        ModelConfig.from_hf_dict({**raw, "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(ConfigError, match="hidden_act"):
        ModelConfig.from_hf_dict({**raw, "hidden_act": "gelu"})


def test_config_reads_older_rope_keys_and_eos_lists():
    raw = transformers.Qwen2Config(**BASE, num_attention_heads=4, num_key_value_heads=2).to_dict()
    raw.pop("rope_parameters", None)
    raw.update(rope_theta=1e6, rope_scaling={"type": "linear", "factor": 2.0})
    cfg = ModelConfig.from_hf_dict(raw, {"eos_token_id": [5, 7]})
    assert cfg.rope_theta == 1e6 and cfg.rope == {"rope_type": "linear", "factor": 2.0}
    assert cfg.eos_token_ids == [5, 7]
    assert cfg.qkv_bias and not cfg.o_bias and not cfg.qk_norm
    q3 = transformers.Qwen3Config(**BASE, num_attention_heads=4, num_key_value_heads=2).to_dict()
    q3.pop("head_dim")
    assert ModelConfig.from_hf_dict(q3).head_dim == 128  # Qwen3's default, not hidden / heads
