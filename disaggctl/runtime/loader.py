"""Build a model from a Hugging Face directory: config.json + safetensors (one file or shards + index)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from disaggctl.runtime.config import ConfigError, ModelConfig
from disaggctl.runtime.models import model_class
from disaggctl.runtime.parallel import TensorParallel, shard

# Buffers some checkpoints carry that the runtime recomputes.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"{index}: cannot read the shard index: {e}") from e
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ConfigError(f"{path}: shards listed in the index are missing: {', '.join(missing)}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{path}: no *.safetensors file (only safetensors checkpoints are supported)")
    return files


def load_model(
    path: str | Path,
    dtype: torch.dtype,
    device: str,
    cfg: ModelConfig | None = None,
    tp: TensorParallel | None = None,
    cls=None,
):
    """The model (this rank's shard of it with tensor parallelism) with its weights, cast to `dtype`, on
    `device`, in eval mode. Each rank reads only its slices of the split tensors. `cls`: another class than
    the config's (a multimodal model's vision part alone, for an encoder)."""
    from safetensors import safe_open

    path = Path(path)
    cfg = cfg or ModelConfig.from_hf_dir(path)
    tp = tp or TensorParallel()
    with torch.device("meta"):
        model = (cls or model_class(cfg))(cfg, tp)
    wanted = dict(model.state_dict())
    # a model whose checkpoint spells its tensors several ways says which spelling it uses
    rename = getattr(model, "checkpoint_name", lambda n: n)
    lm_head = getattr(model, "lm_head_name", "lm_head.weight")
    if cfg.tie_word_embeddings:
        wanted.pop(lm_head, None)
    # tensors the model keeps in fp32 whatever the dtype (DeepSeek's router: its choices are that sensitive)
    fp32 = getattr(model, "fp32_params", ())
    params: dict[str, torch.Tensor] = {}
    unexpected = []
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for stored in f.keys():
                name = rename(stored)
                if name.endswith(IGNORED_SUFFIXES) or (cfg.tie_word_embeddings and name == lm_head):
                    continue
                if name not in wanted:
                    if not model.foreign(name):
                        unexpected.append(name)
                    continue
                piece = f.get_slice(stored)
                full = tuple(piece.get_shape())
                try:
                    t = shard(name, piece, full, tp)
                except ValueError as e:
                    raise ConfigError(f"{file.name}: {e}") from e
                if tuple(t.shape) != tuple(wanted[name].shape):
                    raise ConfigError(
                        f"{file.name}: {name} has shape {tuple(t.shape)}, the config implies "
                        f"{tuple(wanted[name].shape)}"
                    )
                params[name] = t.to(device=device, dtype=torch.float32 if name.endswith(fp32) else dtype)
    missing = sorted(set(wanted) - set(params))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors: {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected tensors: {_few(sorted(unexpected))}")
        raise ConfigError(f"{path}: checkpoint does not match {cfg.architecture}: {'; '.join(parts)}")
    model.load_state_dict(params, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    model.init_buffers(device)  # buffers built under the meta device hold no values
    return model.eval()


def _few(names: list[str], n: int = 6) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")
