"""The rules a topology must keep beyond its schema, which need the whole file (hosts, roles, the
model's shape): each broken one is an Issue naming the field, raised together as one TopologyError."""

from __future__ import annotations

import json
import math
from pathlib import Path

from disaggctl.topology.load import Issue, TopologyError
from disaggctl.topology.schema import Topology
from disaggctl.topology.sglang import topology_issues


class Rejections:
    """Every rule a topology breaks, collected so that one error names them all."""

    def __init__(self) -> None:
        self.issues: list[Issue] = []

    def add(self, path: tuple, message: str) -> None:
        self.issues.append(Issue(path, message))

    def raise_if_any(self, topology: Topology, source: str) -> None:
        if self.issues:
            raise TopologyError(source, self.issues, topology._lines)


def _model_config(topology: Topology) -> dict | None:
    """The model's config.json when `model.path` is a directory on this machine, else None."""
    config = Path(topology.model.path).expanduser() / "config.json"
    try:
        raw = json.loads(config.read_text())
    except (OSError, ValueError):
        return None
    return raw if isinstance(raw, dict) else None


# built-in models with a vision tower (disaggctl/runtime/builtin.py makes them)
BUILTIN_MULTIMODAL = ("builtin:tiny-llava",)


def _multimodal(topology: Topology) -> bool:
    if topology.model.multimodal != "auto":
        return bool(topology.model.multimodal)
    if topology.model.path in BUILTIN_MULTIMODAL:
        return True
    return "vision_config" in (_model_config(topology) or {})


# The shapes tensor parallelism splits, for the built-in models. The runtime generates their configs
# (disaggctl/runtime/builtin.py: TINY_CONFIG, and SmolLM2-135M's GGUF header for smollm2), which the
# control plane may not import; tests/test_plan.py fails when this table and builtin.py disagree.
BUILTIN_SHAPES: dict[str, dict[str, int]] = {
    "builtin:tiny": {"num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 192},
    "builtin:tiny-moe": {"num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 128},
    "builtin:smollm2": {"num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1536},
    "builtin:tiny-llava": {"num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128},
}
# (experts, moe_intermediate_size) of the built-in mixture-of-experts models
BUILTIN_EXPERTS: dict[str, tuple[int, int]] = {"builtin:tiny-moe": (8, 32)}

# What each rank of a tensor-parallel server holds a 1/tp share of, the KV heads first: they are the
# fewest, so the first to refuse a tp.
_SHARDED = (
    ("num_key_value_heads", "each rank must hold whole KV heads"),
    ("num_attention_heads", "each rank must hold whole query heads"),
    ("intermediate_size", "each rank holds an equal slice of the MLP"),
)


def model_shape(topology: Topology) -> dict[str, int] | None:
    """Head counts and intermediate size of the model as the embedded runtime reads them, or None when
    this machine cannot know them (a path that is not a local directory, an unreadable config.json);
    the runtime then checks them itself when it loads the model."""
    path = topology.model.path
    if path in BUILTIN_SHAPES:
        return dict(BUILTIN_SHAPES[path])
    raw = _model_config(topology)
    if raw is None:
        return None
    try:
        heads = int(raw["num_attention_heads"])
        # the runtime's rule (and transformers'): no KV head count means one KV head per query head
        kv = int(raw.get("num_key_value_heads") or heads)
        inter = int(raw["intermediate_size"])
    except (KeyError, TypeError, ValueError):
        return None
    if min(heads, kv, inter) <= 0:
        return None
    return {"num_attention_heads": heads, "num_key_value_heads": kv, "intermediate_size": inter}


def moe_shape(topology: Topology) -> tuple[int, int] | None:
    """(experts, intermediate size of one expert) of the model, (0, 0) for a dense one, None when this
    machine cannot tell (the runtime checks at load)."""
    if topology.model.path in BUILTIN_SHAPES:
        return BUILTIN_EXPERTS.get(topology.model.path, (0, 0))
    raw = _model_config(topology)
    if raw is None:
        return None
    try:
        # transformers 5 writes num_local_experts where Hub checkpoints say num_experts (DeepSeek:
        # n_routed_experts)
        experts = int(
            raw.get("num_local_experts") or raw.get("num_experts") or raw.get("n_routed_experts") or 0
        )
        inter = int(raw.get("moe_intermediate_size") or 0)
    except (TypeError, ValueError):
        return None
    return experts, inter


def _check_experts(topology: Topology, rej: Rejections) -> None:
    """Expert parallelism on the embedded runtime spreads whole experts over a server's tp ranks (ep = tp;
    SGLang's default too), or, at ep 1, splits every expert like the dense MLP: say now what cannot split."""
    if topology.engine != "embedded":
        return
    shape = moe_shape(topology)
    for role_name, role in topology.roles():
        if role.ep > 1 and role.ep != role.tp:
            rej.add(
                (role_name, "ep"),
                f"{role.ep} with tp {role.tp}: the embedded runtime spreads the experts over the server's "
                f"tp ranks, so ep is 1 or equal to tp ({role.tp})",
            )
            continue
        if shape is None:
            continue
        experts, inter = shape
        if role.ep > 1 and not experts:
            rej.add(
                (role_name, "ep"), f"{topology.model.path} is not a mixture-of-experts model; leave ep at 1"
            )
        elif role.ep > 1 and experts % role.ep:
            rej.add((role_name, "ep"), f"{role.ep} does not divide the model's {experts} experts")
        elif experts and role.ep == 1 and role.tp > 1 and inter % role.tp:
            rej.add(
                (role_name, "tp"),
                f"{role.tp} does not divide moe_intermediate_size {inter} (at ep 1 every expert is split over "
                f"the ranks); set ep: {role.tp} to spread whole experts instead",
            )


def _alternatives(values: list[int]) -> str:
    return " or ".join(map(str, values)) if len(values) <= 2 else ", ".join(map(str, values))


def check_tp_shards(topology: Topology, rej: Rejections) -> None:
    """The embedded runtime gives each of a server's tp ranks 1/tp of the query heads, the KV heads and
    the MLP, and refuses a model where one does not divide; say so now, with the line, rather than
    from a server's log after `up` has started half the deployment. (SGLang replicates KV heads when
    tp exceeds them, so it has rules of its own.)"""
    if topology.engine != "embedded":
        return
    shape = model_shape(topology)
    if shape is None:
        return
    common = math.gcd(*shape.values())
    valid = [n for n in range(1, common + 1) if common % n == 0]
    for role_name, role in topology.roles():
        for key, why in _SHARDED:
            if shape[key] % role.tp:
                rej.add(
                    (role_name, "tp"),
                    f"{role.tp} does not divide {key} {shape[key]} of {topology.model.path} ({why}); "
                    f"use a tp that divides {shape['num_attention_heads']} attention heads, "
                    f"{shape['num_key_value_heads']} KV heads and intermediate_size "
                    f"{shape['intermediate_size']}: {_alternatives(valid)}",
                )
                break


def check_launchable(topology: Topology, source: str) -> None:
    """TopologyError for what a plan can describe but `up` cannot run yet: the embedded runtime has no
    encoder role and serves dp/ep 1 only (SGLang servers do all of these). `plan` stays permissive so
    that such layouts can be drawn and rendered for SGLang."""
    if topology.engine != "embedded":
        return
    hosts = {h.name: h for h in topology.hosts}
    rej = Rejections()
    for role_name, role in topology.roles():
        if role_name == "encoder" and not topology.prefill:
            rej.add((role_name,), "the embedded runtime runs encoders in front of prefill + decode (EPD) only")
        if role_name == "encoder" and role.tp > 1:
            rej.add((role_name, "tp"), "an embedded encoder runs on one device (tp: 1)")
        # rank r of a server runs on the r-th GPU of its CUDA_VISIBLE_DEVICES: fewer GPUs than ranks
        # would leave the last ranks without a device
        on_gpus = any(hosts[n].gpus > 0 for n in (role.hosts or list(hosts)) if n in hosts)
        if on_gpus and role.gpus_per_replica is not None and role.gpus_per_replica < role.tp:
            rej.add(
                (role_name, "gpus_per_replica"),
                f"{role.gpus_per_replica} for tp {role.tp}: each rank of the embedded runtime needs a GPU "
                f"of its own; set gpus_per_replica to at least {role.tp} (or leave it out)",
            )
        if role.dp > 1:
            rej.add(
                (role_name, "dp"),
                "the embedded runtime has no attention data parallelism (SGLang's --attn-dp-size); use "
                f"engine: sglang for dp: {role.dp}, or more replicas",
            )
    _check_experts(topology, rej)
    rej.raise_if_any(topology, source)


def check_roles(topology: Topology, rej: Rejections) -> None:
    t = topology
    if bool(t.prefill) != bool(t.decode):
        have, missing = ("prefill", "decode") if t.prefill else ("decode", "prefill")
        rej.add((have,), f"{have} needs a {missing} role too (or use colocated alone)")
    if t.colocated and (t.prefill or t.decode):
        rej.add(("colocated",), "colocated cannot be mixed with prefill/decode in one topology")
    if t.encoder:
        if not (t.prefill or t.colocated):
            rej.add(("encoder",), "encoder needs prefill + decode (EPD) or a colocated language model")
        if not _multimodal(t):
            rej.add(
                ("encoder",),
                f"an encoder needs a multimodal model: {t.model.path!r} is not one "
                "(a local model is multimodal when its config.json has vision_config; "
                "otherwise set model.multimodal: true)",
            )
    for path, message in topology_issues(t):
        rej.add(path, message)
    names = [h.name for h in t.hosts]
    if t.proxy.host is not None and t.proxy.host not in names:
        rej.add(("proxy", "host"), f"unknown host {t.proxy.host!r} (hosts: {', '.join(names)})")

    for role_name, role in t.roles():
        where = (role_name,)
        for i, h in enumerate(role.hosts or []):
            if h not in names:
                rej.add((*where, "hosts", i), f"unknown host {h!r} (hosts: {', '.join(names)})")
        if role.hosts is not None and not role.hosts:
            rej.add((*where, "hosts"), "an empty host list places nothing")
        n = role.gpus_per_replica or role.tp
        if n % role.ep:
            rej.add((*where, "ep"), f"EP size {role.ep} does not divide the {n} GPUs of a replica")
        if n % role.dp:
            rej.add((*where, "dp"), f"DP size {role.dp} does not divide the {n} GPUs of a replica")
        if t.engine == "sglang" and role.ep > 1 and role.ep != role.tp:
            rej.add(
                (*where, "ep"),
                f"SGLang's Mooncake MoE backend sets the EP size to tp ({role.tp}); ep: {role.ep} cannot be honoured",
            )
        if role.bootstrap_port is not None and role_name != "prefill":
            rej.add((*where, "bootstrap_port"), "only prefill has a bootstrap port")
        if role.embed_buffer_mb is not None:
            if t.engine != "embedded":
                rej.add((*where, "embed_buffer_mb"), "an embedded-runtime knob: SGLang sizes its own buffers")
            elif role_name not in ("encoder", "prefill") or not t.encoder:
                rej.add(
                    (*where, "embed_buffer_mb"),
                    "only encoders and the prefills behind them (EPD) hold image embeddings",
                )
        for j, nic in enumerate(role.nics or []):
            if not nic or "," in nic or any(c.isspace() for c in nic):
                rej.add((*where, "nics", j), f"NIC name {nic!r} must be one device name")


def check_hosts(topology: Topology, rej: Rejections) -> None:
    seen: dict[str, int] = {}
    for i, h in enumerate(topology.hosts):
        if h.name in seen:
            rej.add(("hosts", i, "name"), f"duplicate host name {h.name!r} (also hosts[{seen[h.name]}])")
        seen.setdefault(h.name, i)
