"""Model classes by Hugging Face architecture name.

Dense Llama-style decoders share one class; a mixture-of-experts or vision model registers its own class
here, under its architecture name, with the same forward signature.
"""

from __future__ import annotations

from disaggctl.runtime.config import ARCHITECTURES, ConfigError, ModelConfig


def model_class(cfg: ModelConfig):
    """The class that implements `cfg.architecture` (imported on demand: it pulls in torch)."""
    if cfg.vision is not None:
        from disaggctl.runtime.models.llava import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration
    if cfg.family in ("llama", "qwen2", "qwen3"):
        from disaggctl.runtime.models.llama import LlamaForCausalLM

        return LlamaForCausalLM
    if cfg.family == "qwen3_moe":
        from disaggctl.runtime.models.moe import Qwen3MoeForCausalLM

        return Qwen3MoeForCausalLM
    if cfg.family == "deepseek_v3":
        from disaggctl.runtime.models.deepseek import DeepseekV3ForCausalLM

        return DeepseekV3ForCausalLM
    raise ConfigError(f"no model class for {cfg.architecture!r}; supported: {', '.join(ARCHITECTURES)}")
