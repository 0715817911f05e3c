"""The command lines of the embedded runtime's servers and of the built-in proxy (`python -m disaggctl
serve ROLE ...`), beside topology/sglang.py, which renders SGLang's for engine: sglang."""

from __future__ import annotations

from disaggctl.topology.schema import Proxy, Role, Topology
from disaggctl.topology.spec import ProcessSpec


def _timeout_text(timeout_s: float) -> str:
    return str(int(timeout_s)) if float(timeout_s).is_integer() else str(timeout_s)


def _hostport(address: str, port: int | None) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _peer_args(p: ProcessSpec, procs: list[ProcessSpec]) -> list[str]:
    """The peers a PD worker may deal with, bound by the plan: a decode sends KV registrations only to
    these prefill bootstrap endpoints, a prefill writes KV only to these decodes. A bootstrap address
    that arrives in a request is then checked, not trusted."""
    argv: list[str] = []
    if p.role == "decode":
        for q in procs:
            if q.role == "prefill":
                argv += ["--prefill-bootstrap", _hostport(q.address, q.bootstrap_port)]
    elif p.role == "prefill":
        for q in procs:
            if q.role == "decode":
                argv += ["--decode-peer", f"{q.name}={q.url}"]
    # EPD: a prefill takes embeddings from these encoders only; an encoder writes into these prefills only
    peer_of = {"prefill": ("encoder", "--encoder-peer"), "encoder": ("prefill", "--prefill-peer")}
    if p.role in peer_of:
        role, flag = peer_of[p.role]
        argv += [a for q in procs if q.role == role for a in (flag, f"{q.name}={q.url}")]
    return argv


def embedded_argv(
    p: ProcessSpec, role: Role, topology: Topology, python: str, protocol: str, procs: list[ProcessSpec]
) -> list[str]:
    m = topology.model
    argv = [python, "-m", "disaggctl", "serve", p.role, "--host", p.bind, "--port", str(p.port)]
    argv += ["--model", m.path, "--dtype", m.dtype, "--device", "cuda" if p.gpus else "cpu"]
    if p.tp > 1:
        argv += ["--tp-size", str(p.tp)]
    if p.ep > 1:
        argv += ["--ep-size", str(p.ep)]
    if role.moe_a2a_backend == "mooncake":
        argv += ["--moe-a2a-backend", "mooncake"]
    kv_knobs = p.role != "encoder"  # an encoder has no KV pool and no context
    for flag, value in (
        ("--page-size", role.page_size),
        ("--max-pages", role.max_pages),
        ("--max-batch", role.max_batch),
        ("--chunk-size", role.chunk_size),
        ("--max-model-len", m.max_model_len),
        ("--served-model-name", m.served_name),
    ):
        if value is not None and (kv_knobs or flag == "--max-batch"):
            argv += [flag, str(value)]
    if role.cuda_graph is False and kv_knobs:
        argv.append("--no-cuda-graph")
    if role.overlap_schedule is False and kv_knobs:
        argv.append("--no-overlap-schedule")
    if role.embed_buffer_mb is not None:  # checks.py allows it on an encoder and an EPD prefill only
        argv += ["--embed-buffer-mb", str(role.embed_buffer_mb)]
    if p.role == "prefill":
        argv += ["--bootstrap-port", str(p.bootstrap_port)]
    if p.role in ("prefill", "decode", "encoder"):
        # Mooncake names each side by this address: the peer must reach it even when binding 0.0.0.0.
        argv += ["--advertise-host", p.address]
        argv += ["--transfer-protocol", protocol]
        if p.nics:
            argv += ["--ib-device", ",".join(p.nics)]
        argv += ["--transfer-timeout", _timeout_text(topology.transfer.timeout_s)]
        argv += _peer_args(p, procs)
    return argv + list(role.extra_args)


def builtin_proxy_argv(
    python: str, bind: str, port: int, proxy: Proxy, workers: list[ProcessSpec]
) -> list[str]:
    argv = [
        python,
        "-m",
        "disaggctl",
        "serve",
        "proxy",
        "--host",
        bind,
        "--port",
        str(port),
        "--policy",
        proxy.policy,
        "--read-timeout",
        _timeout_text(proxy.read_timeout_s),
        "--request-timeout",
        _timeout_text(proxy.request_timeout_s),
        "--retries",
        str(proxy.retries),
        "--breaker-failures",
        str(proxy.breaker_failures),
        "--breaker-cooldown",
        _timeout_text(proxy.breaker_cooldown_s),
    ]
    for w in workers:
        if w.role == "prefill":
            argv += ["--prefill", w.url, "--bootstrap-port", str(w.bootstrap_port)]
    for w in workers:
        if w.role == "decode":
            argv += ["--decode", w.url]
    for w in workers:
        if w.role == "colocated":
            argv += ["--worker", w.url]
    return argv
