"""LLaVA: a CLIP vision tower and a projector in front of a Llama/Qwen2 decoder.

The engine runs the decoder as for any text model; the rows of a step that hold image tokens take the
projector's output instead of the token embedding (`forward(..., embeds=(rows, values))`). Who computes
those embeddings depends on the deployment: this model itself (`encode`, colocated or a prefill without
encoders) or an encoder process (`clip.LlavaVision`), in which case the vision tower is not loaded here.
"""

from __future__ import annotations

import torch
from torch import nn

from disaggctl.runtime.models.clip import Projector, VisionTower, checkpoint_name, unused_vision
from disaggctl.runtime.models.llama import LlamaForCausalLM


class LlavaForConditionalGeneration(nn.Module):
    # decode steps run eagerly: the graphs are captured around the language model's forward, not this one
    cuda_graphs = False

    def __init__(self, cfg, tp=None):
        super().__init__()
        self.config = cfg
        self.language_model = LlamaForCausalLM(cfg, tp)
        self.tp = self.language_model.tp
        # a language-only server (an EPD prefill, a decode) leaves the vision tower to the encoders
        if cfg.load_vision:
            self.vision_tower = VisionTower(cfg.vision)
            self.multi_modal_projector = Projector(cfg.vision, cfg.hidden_size)
        else:
            self.vision_tower = self.multi_modal_projector = None

    checkpoint_name = staticmethod(checkpoint_name)
    lm_head_name = "language_model.lm_head.weight"

    def foreign(self, name: str) -> bool:
        if name.startswith(("vision_tower.", "multi_modal_projector.")):
            return self.vision_tower is None or unused_vision(name, self.config.vision)
        return name.startswith("language_model.") and self.language_model.foreign(
            name[len("language_model.") :]
        )

    def tie_weights(self) -> None:
        self.language_model.tie_weights()

    def init_buffers(self, device) -> None:
        self.language_model.init_buffers(device)

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """[images, C, H, W] -> [images, tokens_per_image, hidden] in the decoder's dtype."""
        if self.vision_tower is None:
            raise RuntimeError("this server runs the language model only; images go to an encoder")
        out = self.multi_modal_projector(self.vision_tower(pixels))
        return out.to(self.language_model.lm_head.weight.dtype)

    def forward(self, input_ids, positions, kv_cache, meta, logit_rows, embeds=None):
        return self.language_model(input_ids, positions, kv_cache, meta, logit_rows, embeds=embeds)
