"""The `transformers` reference the runtime is checked against: random models saved as HF directories,
and greedy generation on them."""

from __future__ import annotations

import os
import shutil

import torch

# the image token and its tokenizer entry as the runtime's built-in LLaVA spells them
from disaggctl.runtime.builtin_llava import add_image_token


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


def save_random_llava(
    out_dir, tokenizer_dir: str, seed: int = 0, text: str = "qwen2", image_size: int = 32
) -> str:
    """A random `LlavaForConditionalGeneration` (CLIP tower, 2-layer projector, a `text` decoder) saved
    with the tiny tokenizer plus an `<image>` token, and a CLIP image processor for `image_size` pixels.
    Weights: init std 0.2; norms and biases perturbed."""
    import json

    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        Qwen2Config,
    )

    tok = json.loads(open(os.path.join(tokenizer_dir, "tokenizer.json"), encoding="utf-8").read())
    image_id = add_image_token(tok)
    text_cls = Qwen2Config if text == "qwen2" else LlamaConfig
    text_cfg = text_cls(
        vocab_size=image_id + 16,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.2,
        eos_token_id=2,
        bos_token_id=0,
        pad_token_id=0,
    )
    vision_cfg = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=8,
        projection_dim=32,
        initializer_range=0.2,
        initializer_factor=10.0,
    )
    cfg = LlavaConfig(
        vision_config=vision_cfg,
        text_config=text_cfg,
        image_token_index=image_id,
        image_seq_length=(image_size // 8) ** 2,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
            elif "vision" in name or "projector" in name:  # the CLIP init is far smaller than std 0.2
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    model.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tok, f)
    shutil.copy(
        os.path.join(tokenizer_dir, "tokenizer_config.json"), os.path.join(out_dir, "tokenizer_config.json")
    )
    CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size=image_size).save_pretrained(out_dir)
    return str(out_dir)


def hf_llava_greedy(model_dir: str, ids: list[int], pixels, n: int) -> list[int]:
    """`n` greedy tokens from transformers' LLaVA after `ids` (image tokens expanded) with `pixels`."""
    from transformers import LlavaForConditionalGeneration

    if model_dir not in _loaded:
        _loaded[model_dir] = LlavaForConditionalGeneration.from_pretrained(
            model_dir, dtype=torch.float32
        ).eval()
    out = _loaded[model_dir].generate(
        input_ids=torch.tensor([ids]),
        pixel_values=pixels,
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[0, len(ids) :].tolist()
