"""`builtin:tiny-llava`: a tiny random LLaVA (CLIP tower 32x32 pixels in 8x8 patches, a Qwen2 decoder) with
the tiny tokenizer plus an `<image>` token, generated from a seed; no download. For trying EPD on a CPU."""

from __future__ import annotations

import json
from pathlib import Path

TINY_LLAVA_VERSION = "tiny-llava-v1"
IMAGE_TOKEN = "<image>"
SEED = 4321
INIT_STD, NORM_STD = 0.2, 0.5


def config(image_id: int) -> dict:
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "image_token_index": image_id,
        "image_seq_length": 16,
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True,
        "tie_word_embeddings": False,
        "eos_token_id": 2,
        "torch_dtype": "float32",
        "text_config": {
            "model_type": "qwen2",
            "vocab_size": image_id + 16,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 1024,
            "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
        },
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
            "num_channels": 3,
            "layer_norm_eps": 1e-5,
            "hidden_act": "quick_gelu",
        },
    }


def add_image_token(tokenizer: dict) -> int:
    """Add `IMAGE_TOKEN` to a tokenizer.json document as a special token after its vocabulary; its id."""
    image_id = len(tokenizer["model"]["vocab"])
    tokenizer["added_tokens"].append(
        {
            "id": image_id,
            "content": IMAGE_TOKEN,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
    )
    return image_id


def write_tiny_llava(out: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from disaggctl.runtime import builtin
    from disaggctl.runtime.config import ModelConfig
    from disaggctl.runtime.models.llava import LlavaForConditionalGeneration

    tok = json.loads(builtin.tiny_tokenizer_json())
    image_id = add_image_token(tok)
    cfg = config(image_id)
    with torch.device("meta"):
        shapes = LlavaForConditionalGeneration(ModelConfig.from_hf_dict(cfg)).state_dict()
    g = torch.Generator().manual_seed(SEED)
    sd = {}
    for name in sorted(shapes):
        shape = tuple(shapes[name].shape)
        noise = torch.randn(shape, generator=g, dtype=torch.float32)
        sd[name] = 1.0 + noise * NORM_STD if "norm" in name and name.endswith("weight") else noise * INIT_STD
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    builtin._write_json(out / "config.json", cfg)
    builtin._write_json(
        out / "generation_config.json", {"bos_token_id": 0, "eos_token_id": [2, 0], "pad_token_id": 0}
    )
    (out / "tokenizer.json").write_text(json.dumps(tok), encoding="utf-8")
    specials = dict(enumerate(builtin.TINY_SPECIALS)) | {image_id: IMAGE_TOKEN}
    builtin._write_json(
        out / "tokenizer_config.json",
        builtin._tokenizer_config(specials, "<|im_end|>", "<|endoftext|>", None, 1024),
    )
    builtin._write_json(
        out / "preprocessor_config.json",
        {
            "image_processor_type": "CLIPImageProcessor",
            "size": {"shortest_edge": 32},
            "crop_size": {"height": 32, "width": 32},
            "do_resize": True,
            "do_center_crop": True,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "do_convert_rgb": True,
            "resample": 3,
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711],
        },
    )
