"""What the engine needs to know: the model (normalised from a Hugging Face config.json) and the engine knobs.

Checkpoints of one family disagree on how they spell things (`rope_parameters` in transformers 5,
`rope_theta` + `rope_scaling` before; `head_dim` present or implied; biases implied by the family), so
everything is resolved here once and the model code only reads plain fields.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# architecture name -> family; the family decides the defaults that config.json leaves implicit
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "DeepseekV3ForCausalLM": "deepseek_v3",
    "LlavaForConditionalGeneration": "llava",  # a vision tower in front of one of the above
}
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
DTYPES = ("auto", "bfloat16", "float16", "float32")
DEVICES = ("auto", "cpu", "cuda")


class ConfigError(ValueError):
    """A model directory or engine setting that the runtime cannot use; the message says why."""


@dataclass
class ModelConfig:
    architecture: str
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    rope_theta: float
    rope: dict = field(default_factory=dict)  # rope_type plus that type's parameters
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    checkpoint_dtype: str | None = None
    sliding_window: int | None = None
    # mixture of experts (0 experts: a dense model)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    sparse_layers: list[int] = field(default_factory=list)  # layers whose MLP is the experts'
    # DeepSeek-V3: sigmoid routing within the best `topk_group` of `n_group` expert groups, a correction
    # bias that only chooses, `routed_scaling_factor` on the chosen weights, always-on shared experts
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    n_shared_experts: int = 0
    # multi-head latent attention (kv_lora_rank 0: not MLA): the KV cache holds one compressed latent of
    # kv_lora_rank + qk_rope_head_dim per token; head_dim is then the rotary part, as in transformers
    kv_lora_rank: int = 0
    q_lora_rank: int | None = None
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = False

    @property
    def mla(self) -> bool:
        return self.kv_lora_rank > 0

    # a vision-language model: the vision tower's settings (runtime.vision.config.VisionConfig); the fields
    # above describe its language model
    vision: Any = None
    load_vision: bool = True  # False: build the language model only (the encoders run the vision tower)

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        raw = _read_json(path / "config.json", required=True)
        gen = _read_json(path / "generation_config.json", required=False) or {}
        return cls.from_hf_dict(raw, gen, where=str(path))

    @classmethod
    def from_hf_dict(cls, raw: dict, gen: dict | None = None, where: str = "config.json") -> ModelConfig:
        archs = raw.get("architectures") or []
        if "LlavaForConditionalGeneration" in archs or raw.get("model_type") == "llava":
            return _llava(cls, raw, gen, where)
        arch = next((a for a in archs if a in ARCHITECTURES), None)
        if arch is None and not archs:  # configs written without `architectures`
            arch = {a.removesuffix("ForCausalLM").lower(): a for a in ARCHITECTURES}.get(
                raw.get("model_type")
            )
        if arch is None:
            raise ConfigError(
                f"{where}: unsupported architecture {archs or raw.get('model_type')!r}; "
                f"supported: {', '.join(ARCHITECTURES)}"
            )
        family = ARCHITECTURES[arch]
        get = _getter(raw, where)
        hidden, heads = get("hidden_size", int), get("num_attention_heads", int)
        # Qwen3 configs default head_dim to 128 whatever hidden/heads is; the others derive it.
        head_dim = raw.get("head_dim") or (128 if family in ("qwen3", "qwen3_moe") else hidden // heads)
        if family == "deepseek_v3":  # RoPE spans only the rotary part of each head
            head_dim = get("qk_rope_head_dim", int)
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{where}: hidden_act {act!r} is not supported (only silu)")
        if raw.get("use_sliding_window"):
            raise ConfigError(f"{where}: sliding-window attention is not supported")
        if float(raw.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ConfigError(f"{where}: partial_rotary_factor != 1 is not supported")
        attention_bias = bool(raw.get("attention_bias", False))
        if family == "qwen2":  # q/k/v always biased, o never; Qwen2 configs carry no attention_bias key
            qkv_bias, o_bias = True, False
        else:
            qkv_bias = o_bias = attention_bias
        theta, rope = _rope(raw, where)
        cfg = cls(
            architecture=arch,
            family=family,
            vocab_size=get("vocab_size", int),
            hidden_size=hidden,
            intermediate_size=get("intermediate_size", int),
            num_layers=get("num_hidden_layers", int),
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(raw.get("mlp_bias", False)) if family == "llama" else False,
            qk_norm=family in ("qwen3", "qwen3_moe"),
            rope_theta=theta,
            rope=rope,
            eos_token_ids=_eos(gen or {}, raw),
            bos_token_id=(gen or {}).get("bos_token_id", raw.get("bos_token_id")),
            checkpoint_dtype=raw.get("dtype") or raw.get("torch_dtype"),
            # Mistral-style windows: full attention is the same thing up to the window, so the engine
            # caps the context there instead of refusing the model.
            sliding_window=int(raw["sliding_window"])
            if family == "llama" and raw.get("sliding_window")
            else None,
        )
        if family == "qwen3_moe":
            _moe(cfg, raw, get)
        if family == "deepseek_v3":
            _deepseek(cfg, raw, get, where)
        if cfg.num_heads % cfg.num_kv_heads:
            raise ConfigError(
                f"{where}: num_attention_heads {cfg.num_heads} is not a multiple of "
                f"num_key_value_heads {cfg.num_kv_heads}"
            )
        return cfg


def _llava(cls, raw: dict, gen: dict | None, where: str) -> ModelConfig:
    """A LLaVA checkpoint: its text_config read as a plain decoder, plus the vision settings."""
    from disaggctl.runtime.vision.config import llava_vision

    text = raw.get("text_config")
    if not isinstance(text, dict):
        raise ConfigError(f"{where}: a LLaVA config needs a text_config object")
    try:
        vision = llava_vision(raw, where)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    # the eos and bos ids of a LLaVA checkpoint live at the top level (or in generation_config.json)
    text = {
        **{k: raw[k] for k in ("eos_token_id", "bos_token_id") if k in raw},
        **{k: v for k, v in text.items() if v is not None},
    }
    text.setdefault("tie_word_embeddings", raw.get("tie_word_embeddings", False))
    cfg = cls.from_hf_dict(text, gen, where=f"{where} (text_config)")
    cfg.vision = vision
    return cfg


def _moe(cfg: ModelConfig, raw: dict, get) -> None:
    """Qwen3-MoE: which layers route to experts (every `decoder_sparse_step`-th, minus `mlp_only_layers`)."""
    # transformers 5 writes num_local_experts where older configs (and the Hub's checkpoints) say num_experts
    cfg.num_experts = int(raw["num_local_experts"]) if "num_local_experts" in raw else get("num_experts", int)
    cfg.num_experts_per_tok = get("num_experts_per_tok", int)
    cfg.moe_intermediate_size = get("moe_intermediate_size", int)
    cfg.norm_topk_prob = bool(raw.get("norm_topk_prob", False))
    step = int(raw.get("decoder_sparse_step", 1))
    dense = set(raw.get("mlp_only_layers") or [])
    cfg.sparse_layers = [
        i for i in range(cfg.num_layers) if i not in dense and step > 0 and (i + 1) % step == 0
    ]


def _deepseek(cfg: ModelConfig, raw: dict, get, where: str) -> None:
    """DeepSeek-V3: MLA's ranks and head widths, the router's groups, and which layers are routed (all but the
    first `first_k_dense_replace`)."""
    cfg.kv_lora_rank = get("kv_lora_rank", int)
    cfg.q_lora_rank = int(raw["q_lora_rank"]) if raw.get("q_lora_rank") else None
    cfg.qk_nope_head_dim = get("qk_nope_head_dim", int)
    cfg.qk_rope_head_dim = get("qk_rope_head_dim", int)
    cfg.v_head_dim = get("v_head_dim", int)
    cfg.rope_interleave = bool(raw.get("rope_interleave", True))
    cfg.num_experts = int(raw.get("n_routed_experts") or raw.get("num_local_experts") or 0)
    if cfg.num_experts:
        cfg.num_experts_per_tok = get("num_experts_per_tok", int)
        cfg.moe_intermediate_size = get("moe_intermediate_size", int)
        cfg.norm_topk_prob = bool(raw.get("norm_topk_prob", True))
        cfg.n_group = int(raw.get("n_group") or 1)
        cfg.topk_group = int(raw.get("topk_group") or 1)
        cfg.routed_scaling_factor = float(raw.get("routed_scaling_factor", 1.0))
        cfg.n_shared_experts = int(raw.get("n_shared_experts") or 0)
        first_dense = int(raw.get("first_k_dense_replace") or 0)
        cfg.sparse_layers = list(range(first_dense, cfg.num_layers))
        if cfg.num_experts % cfg.n_group or cfg.topk_group > cfg.n_group:
            raise ConfigError(
                f"{where}: {cfg.num_experts} experts in n_group {cfg.n_group} groups, topk_group "
                f"{cfg.topk_group}: the groups must divide the experts and topk_group be at most n_group"
            )
        if cfg.num_experts // cfg.n_group < 2:
            raise ConfigError(f"{where}: a group scores by its best two experts; give it at least two")


def _read_json(path: Path, required: bool) -> dict | None:
    if not path.is_file():
        if required:
            raise ConfigError(f"{path} not found (a model directory needs config.json and *.safetensors)")
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read JSON: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def _getter(raw: dict, where: str):
    def get(key: str, typ):
        if key not in raw:
            raise ConfigError(f"{where}: config.json has no {key!r}")
        try:
            value = typ(raw[key])
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}: {key!r} must be {typ.__name__}, got {raw[key]!r}") from e
        if value <= 0:
            raise ConfigError(f"{where}: {key!r} must be positive, got {value}")
        return value

    return get


def _rope(raw: dict, where: str) -> tuple[float, dict]:
    """(rope_theta, {rope_type, ...}) from rope_parameters (transformers 5) or rope_theta + rope_scaling."""
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:  # per-layer-type form
        params = params["full_attention"]
    scaling = raw.get("rope_scaling")
    rope = dict(params or scaling or {})
    theta = rope.pop("rope_theta", None) or raw.get("rope_theta") or 10000.0
    rope_type = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
    if rope_type not in ROPE_TYPES:
        raise ConfigError(
            f"{where}: rope type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}"
        )
    needs = {"linear": ["factor"], "llama3": ["factor", "low_freq_factor", "high_freq_factor"], "yarn": []}
    missing = [k for k in needs.get(rope_type, []) if rope.get(k) is None]
    if missing:
        raise ConfigError(f"{where}: rope type {rope_type!r} needs {', '.join(missing)}")
    if rope_type in ("llama3", "yarn"):
        rope.setdefault("original_max_position_embeddings", raw.get("max_position_embeddings", 2048))
        if rope_type == "yarn" and rope.get("factor") is None:
            rope["factor"] = (
                raw.get("max_position_embeddings", 2048) / rope["original_max_position_embeddings"]
            )
    rope["rope_type"] = rope_type
    return float(theta), rope


def _eos(gen: dict, raw: dict) -> list[int]:
    eos = gen.get("eos_token_id", raw.get("eos_token_id"))
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, list) else [eos])]


@dataclass
class EngineConfig:
    model: str
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    device: str = "auto"  # auto: cuda when available
    # The one default of the embedded runtime's page size: `serve --page-size` and a topology's `page_size`
    # leave it unset unless given. 16 tokens: small enough that the last, partly filled page of a request
    # wastes little, large enough that a hand-off moves few, long ranges (one write range per page and layer).
    page_size: int = 16
    max_pages: int | None = None  # default: memory_fraction of the free memory (capped on CPU)
    memory_fraction: float = 0.85  # of the device memory left after the weights, for the KV pool
    max_batch: int = 128  # requests in the running batch
    chunk_size: int = 512  # prefill tokens per step (all prefilling requests together)
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    quarantine_s: float = 30.0  # how long pages of a failed remote transfer stay unused
    seed: int = 0  # for requests that sample without a seed of their own
    tp_size: int = 1  # tensor-parallel ranks of this server (one process each)
    ep_size: int = 1  # 1: experts split like the dense MLP; tp_size: whole experts spread over the ranks
    moe_a2a_backend: str = "none"  # mooncake: the ranks' collectives over Mooncake's process group
    vision: bool = True  # load a multimodal model's vision tower (False: the encoders run it)
    dist_timeout_s: float = 120.0  # bound on every collective: a dead rank fails its peers, never hangs them
    cuda_graph: bool = True  # replay decode steps as CUDA graphs (CUDA with Triton, dense models)
    # queue each step on the device before reading the previous step's samples; None: on CUDA at tp_size 1
    overlap_schedule: bool | None = None

    def validate(self, spell: Callable[[str], str] = str) -> None:
        """The one check of the engine's knobs, for an Engine built in code and for the server's command
        line alike (which runs it before loading anything); `spell` names a knob in the messages
        (`--page-size` on the command line)."""
        if self.dtype not in DTYPES:
            raise ConfigError(f"{spell('dtype')} {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            raise ConfigError(
                f"{spell('device')} {self.device!r} is not one of {', '.join(DEVICES)} (or cuda:N)"
            )
        for name in ("page_size", "max_batch", "chunk_size", "tp_size", "ep_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{spell(name)} must be a positive integer, got {value!r}")
        for name in ("max_pages", "max_model_len"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"{spell(name)} must be a positive integer, got {value!r}")
        if self.ep_size not in (1, self.tp_size):
            raise ConfigError(
                f"{spell('ep_size')} must be 1 or the {spell('tp_size')} ({self.tp_size}): experts are spread "
                f"over the server's ranks, got {self.ep_size}"
            )
        if self.moe_a2a_backend not in ("none", "mooncake"):
            raise ConfigError(
                f"{spell('moe_a2a_backend')} must be none or mooncake, got {self.moe_a2a_backend!r}"
            )
        if self.moe_a2a_backend == "mooncake" and self.ep_size == 1:
            raise ConfigError(
                f"{spell('moe_a2a_backend')} mooncake exchanges tokens between expert-parallel ranks; "
                f"set {spell('ep_size')}"
            )
        if self.overlap_schedule and self.tp_size > 1:
            raise ConfigError(
                f"the overlap schedule runs with {spell('tp_size')} 1 only: the other ranks need each step's "
                "input tokens before it starts"
            )
        if not 0.0 < self.memory_fraction <= 1.0:
            raise ConfigError(f"{spell('memory_fraction')} must be in (0, 1], got {self.memory_fraction}")

    def resolve_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"device {self.device!r} was asked for but CUDA is not available")
        return self.device

    def resolve_dtype(self, device: str):
        import torch

        if self.dtype == "auto":
            return torch.bfloat16 if device.startswith("cuda") else torch.float32
        return getattr(torch, self.dtype)
