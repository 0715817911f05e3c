"""The vision half of a LLaVA-style config.json: a CLIP vision tower, a projector and the image token.

The language half is an ordinary decoder config (`text_config`), read by `ModelConfig` as if it stood
alone; this adds what the vision tower, the projector and the prompt expansion need.
"""

from __future__ import annotations

from dataclasses import dataclass

ACTIVATIONS = ("quick_gelu", "gelu", "gelu_pytorch_tanh")


@dataclass
class VisionConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    num_channels: int
    layer_norm_eps: float
    hidden_act: str
    feature_layer: int  # which hidden state feeds the projector (-2: the output of the second-to-last layer)
    keep_cls: bool  # vision_feature_select_strategy "full" keeps the class token, "default" drops it
    projector_act: str
    projector_bias: bool
    image_token_id: int

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def tokens_per_image(self) -> int:
        """Prompt tokens (and embedding rows) one image takes."""
        return self.num_patches + (1 if self.keep_cls else 0)

    @property
    def layers_used(self) -> int:
        """Encoder layers that run: those up to the feature layer (hidden state 0 is the embeddings)."""
        k = self.feature_layer
        return self.num_layers + 1 + k if k < 0 else k


def llava_vision(raw: dict, where: str) -> VisionConfig:
    """The vision settings of a `LlavaForConditionalGeneration` config.json; ValueError names the field."""
    v = raw.get("vision_config")
    if not isinstance(v, dict):
        raise ValueError(f"{where}: a LLaVA config needs a vision_config object")
    if v.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise ValueError(
            f"{where}: vision_config.model_type {v.get('model_type')!r} is not supported (clip_vision_model)"
        )

    def get(key: str, default=None):
        value = v.get(key, default)
        if value is None:
            raise ValueError(f"{where}: vision_config has no {key!r}")
        return value

    layer = raw.get("vision_feature_layer", -2)
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise ValueError(f"{where}: vision_feature_layer {layer!r} is not supported (one layer index only)")
    strategy = raw.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise ValueError(f"{where}: vision_feature_select_strategy {strategy!r} is not default or full")
    token = raw.get("image_token_index", raw.get("image_token_id"))
    if not isinstance(token, int) or isinstance(token, bool):
        raise ValueError(f"{where}: a LLaVA config needs image_token_index")
    cfg = VisionConfig(
        hidden_size=int(get("hidden_size", 1024)),
        intermediate_size=int(get("intermediate_size", 4096)),
        num_layers=int(get("num_hidden_layers", 24)),
        num_heads=int(get("num_attention_heads", 16)),
        image_size=int(get("image_size", 336)),
        patch_size=int(get("patch_size", 14)),
        num_channels=int(get("num_channels", 3)),
        layer_norm_eps=float(get("layer_norm_eps", 1e-5)),
        hidden_act=str(get("hidden_act", "quick_gelu")),
        feature_layer=layer,
        keep_cls=strategy == "full",
        projector_act=str(raw.get("projector_hidden_act", "gelu")),
        projector_bias=bool(raw.get("multimodal_projector_bias", True)),
        image_token_id=token,
    )
    for act in (cfg.hidden_act, cfg.projector_act):
        if act not in ACTIVATIONS:
            raise ValueError(
                f"{where}: activation {act!r} is not supported; supported: {', '.join(ACTIVATIONS)}"
            )
    if not 0 < cfg.layers_used <= cfg.num_layers:
        raise ValueError(
            f"{where}: vision_feature_layer {layer} is outside the {cfg.num_layers} vision layers"
        )
    if cfg.image_size % cfg.patch_size or cfg.hidden_size % cfg.num_heads:
        raise ValueError(f"{where}: image_size must be a multiple of patch_size, hidden_size of the heads")
    return cfg
