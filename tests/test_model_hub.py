"""model.path as a hub id on the embedded runtime: resolved from a Hugging Face cache written here in the
hub's layout, with HF_HUB_OFFLINE=1 (no network); quantized checkpoints refused with the reason."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from disaggctl.runtime.builtin import ModelError, resolve_model

REVISION = "0123456789abcdef0123456789abcdef01234567"
CONFIG = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 64}


def hf_cache(root: Path, repo_id: str, config: dict | None = None) -> Path:
    """A Hugging Face hub cache holding one snapshot of `repo_id` (models--org--name/refs, snapshots)."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / REVISION
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    (snap / "config.json").write_text(json.dumps(config or CONFIG))
    (snap / "tokenizer.json").write_text("{}")
    (snap / "model.safetensors").write_bytes(b"\0" * 8)
    return snap


def resolve_in_process_env(model: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    # a fresh interpreter: huggingface_hub reads HF_HUB_* when it is imported
    code = (
        "import sys\nfrom disaggctl.runtime.builtin import ModelError, resolve_model\n"
        f"try:\n    print(resolve_model({model!r}))\n"
        "except ModelError as e:\n    print('error:', e)\n    sys.exit(2)\n"
    )
    full = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "SGLANG_"))}
    return subprocess.run([sys.executable, "-c", code], env={**full, **env}, capture_output=True, text=True)


def test_hub_id_resolves_from_the_cache_offline(tmp_path):
    snap = hf_cache(tmp_path / "hub", "acme/tiny-chat")
    r = resolve_in_process_env(
        "acme/tiny-chat", {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert Path(r.stdout.strip()) == snap.resolve()
    assert json.loads((Path(r.stdout.strip()) / "config.json").read_text()) == CONFIG


def test_hub_id_absent_offline_names_the_model(tmp_path):
    (tmp_path / "hub").mkdir()
    r = resolve_in_process_env("acme/missing", {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2
    assert "model 'acme/missing' is not in" in r.stdout and "HF_HUB_OFFLINE is set" in r.stdout
    assert "hf download acme/missing" in r.stdout


def test_quantized_checkpoints_are_refused_with_the_reason(tmp_path):
    gptq = {**CONFIG, "quantization_config": {"quant_method": "gptq", "bits": 4}}
    hf_cache(tmp_path / "hub", "Qwen/Qwen2.5-7B-Instruct-GPTQ-Int4", gptq)
    r = resolve_in_process_env(
        "Qwen/Qwen2.5-7B-Instruct-GPTQ-Int4", {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    )
    assert r.returncode == 2
    assert "quantized checkpoint (quant_method gptq)" in r.stdout and "engine: sglang" in r.stdout
    local = tmp_path / "awq"
    local.mkdir()
    (local / "config.json").write_text(json.dumps({**CONFIG, "quantization_config": {"quant_method": "awq"}}))
    with pytest.raises(ModelError, match="quant_method awq"):
        resolve_model(str(local))


def test_without_huggingface_hub_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if not installed
    with pytest.raises(ModelError, match="'acme/x' is not a local directory.*pip install huggingface_hub"):
        resolve_model("acme/x")


def test_modelscope_opt_in(monkeypatch):
    monkeypatch.setenv("SGLANG_USE_MODELSCOPE", "true")
    monkeypatch.setitem(sys.modules, "modelscope", None)
    with pytest.raises(ModelError, match="SGLANG_USE_MODELSCOPE is set but modelscope is not installed"):
        resolve_model("acme/x")


def test_paths_that_are_not_hub_ids_stay_paths(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model("./relative/nope")
