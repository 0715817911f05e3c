"""The `transformers` reference the runtime is checked against: random models saved as HF directories,
and greedy generation on them."""

from __future__ import annotations

import os
import shutil

import torch


def save_random_model(
    config, out_dir, tokenizer_dir: str, seed: int = 0, perturb_biases: bool = False, prepare=None
) -> str:
    """Save a random model of `config` (init std from its initializer_range) with the tokenizer files of
    `tokenizer_dir`. Norm weights (and biases) are perturbed: their default init (ones, zeros) would hide
    mistakes in how they are applied. `prepare(model)`, when given, changes the model before it is saved."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or (perturb_biases and name.endswith("bias")):
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
        if prepare is not None:
            prepare(model)
    model.save_pretrained(out_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tokenizer_dir, name), os.path.join(out_dir, name))
    return str(out_dir)


def tiny_tokenizer_dir(cache_dir) -> str:
    """builtin:tiny, generated into a private cache: the tokenizer files random test models are saved with."""
    import pytest

    from disaggctl.runtime.builtin import resolve_model

    mp = pytest.MonkeyPatch()
    mp.setenv("DISAGGCTL_CACHE", str(cache_dir))
    try:
        return resolve_model("builtin:tiny")
    finally:
        mp.undo()


_loaded: dict[str, object] = {}


def hf_greedy(model_dir: str, ids: list[int], n: int) -> list[int]:
    """`n` greedy tokens after `ids` from transformers, float32, EOS ignored."""
    from transformers import AutoModelForCausalLM

    if model_dir not in _loaded:
        _loaded[model_dir] = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = _loaded[model_dir].generate(
        torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    return out[0, len(ids) :].tolist()
