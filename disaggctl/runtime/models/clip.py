"""The CLIP vision tower (as LLaVA uses it) and LLaVA's projector: pixels in, one embedding per image token.

Only the encoder layers up to the feature layer run (LLaVA reads the second-to-last layer's output by
default, before `post_layernorm`), so the later layers are never built and their tensors are skipped at
load time. Parameter names are the checkpoint's, under `vision_tower.` and `multi_modal_projector.`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from disaggctl.runtime.vision.config import VisionConfig


def activation(name: str):
    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    if name == "gelu_pytorch_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    return F.gelu


class Embeddings(nn.Module):
    def __init__(self, v: VisionConfig):
        super().__init__()
        self.patch_size = v.patch_size
        self.class_embedding = nn.Parameter(torch.empty(v.hidden_size))
        self.patch_embedding = nn.Conv2d(
            v.num_channels, v.hidden_size, kernel_size=v.patch_size, stride=v.patch_size, bias=False
        )
        self.position_embedding = nn.Embedding(v.num_patches + 1, v.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = (
            self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        )
        cls = self.class_embedding.expand(pixels.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight[None]


class Attention(nn.Module):
    def __init__(self, v: VisionConfig):
        super().__init__()
        self.heads = v.num_heads
        self.q_proj = nn.Linear(v.hidden_size, v.hidden_size)
        self.k_proj = nn.Linear(v.hidden_size, v.hidden_size)
        self.v_proj = nn.Linear(v.hidden_size, v.hidden_size)
        self.out_proj = nn.Linear(v.hidden_size, v.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

        # every patch sees every other (no mask): the whole image is one attention window
        o = F.scaled_dot_product_attention(
            heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        )
        return self.out_proj(o.transpose(1, 2).reshape(b, n, d))


class MLP(nn.Module):
    def __init__(self, v: VisionConfig):
        super().__init__()
        self.act = activation(v.hidden_act)
        self.fc1 = nn.Linear(v.hidden_size, v.intermediate_size)
        self.fc2 = nn.Linear(v.intermediate_size, v.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, v: VisionConfig):
        super().__init__()
        self.self_attn = Attention(v)
        self.layer_norm1 = nn.LayerNorm(v.hidden_size, eps=v.layer_norm_eps)
        self.mlp = MLP(v)
        self.layer_norm2 = nn.LayerNorm(v.hidden_size, eps=v.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, v: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(v) for _ in range(v.layers_used))


class VisionTower(nn.Module):
    def __init__(self, v: VisionConfig):
        super().__init__()
        self.config = v
        self.embeddings = Embeddings(v)
        self.pre_layrnorm = nn.LayerNorm(v.hidden_size, eps=v.layer_norm_eps)  # sic: the checkpoints' name
        self.encoder = Encoder(v)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """[images, channels, H, W] -> the feature layer's hidden states [images, tokens_per_image, hidden]."""
        h = self.pre_layrnorm(self.embeddings(pixels))
        for layer in self.encoder.layers:
            h = layer(h)
        return h if self.config.keep_cls else h[:, 1:]


class Projector(nn.Module):
    def __init__(self, v: VisionConfig, text_hidden: int):
        super().__init__()
        self.act = activation(v.projector_act)
        self.linear_1 = nn.Linear(v.hidden_size, text_hidden, bias=v.projector_bias)
        self.linear_2 = nn.Linear(text_hidden, text_hidden, bias=v.projector_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


def unused_vision(name: str, v: VisionConfig) -> bool:
    """A vision tower tensor the runtime never builds: layers after the feature layer, the final norm."""
    if name.startswith("vision_tower.post_layernorm."):
        return True
    prefix = "vision_tower.encoder.layers."
    return name.startswith(prefix) and int(name[len(prefix) :].split(".", 1)[0]) >= v.layers_used


# LLaVA checkpoints spell their tensors three ways (transformers < 4.52, the hub's llava-hf repos with
# `vision_tower.vision_model.`, and transformers >= 4.52 in memory); the runtime uses the first.
RENAMES = (
    ("model.language_model.", "language_model.model."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("lm_head.", "language_model.lm_head."),
    ("vision_tower.vision_model.", "vision_tower."),
)


def checkpoint_name(name: str) -> str:
    for old, new in RENAMES:
        if name.startswith(old):
            name = new + name[len(old) :]
    return name


class LlavaVision(nn.Module):
    """What an encoder runs: the vision tower and the projector, nothing of the language model."""

    def __init__(self, cfg, tp=None):
        super().__init__()
        self.config = cfg
        self.tp = tp
        self.vision_tower = VisionTower(cfg.vision)
        self.multi_modal_projector = Projector(cfg.vision, cfg.hidden_size)

    def foreign(self, name: str) -> bool:
        return not name.startswith(("vision_tower.", "multi_modal_projector.")) or unused_vision(
            name, self.config.vision
        )

    checkpoint_name = staticmethod(lambda name: checkpoint_name(name))
    lm_head_name = "language_model.lm_head.weight"

    def init_buffers(self, device) -> None:
        pass

    def tie_weights(self) -> None:
        pass

    @torch.inference_mode()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """[images, C, H, W] -> [images, tokens_per_image, text hidden size]."""
        return self.multi_modal_projector(self.vision_tower(pixels))
