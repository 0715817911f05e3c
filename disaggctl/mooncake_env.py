"""Mooncake's environment: the MC_* variables that pick its transport and bound its waits.

Mooncake reads these when a TransferEngine is created, not from its API, so both places that start
one use this module: the embedded runtime (transfer/mooncake.py applies it to its own process) and
the SGLang renderer (topology/sglang.py puts it in the server's environment). Pure and torch-free,
so the control plane may import it.
"""

from __future__ import annotations

import math

# Mooncake raises any MC_TRANSFER_TIMEOUT below 5 s to 5 s (measured on the 0.3.13 wheel: a write to a
# frozen peer with =2 blocks 5 s, like =5). Writing the value it will use keeps the environment honest,
# and our own deadline for a write (MooncakeAgent.deadline_s) is derived from the same number.
# The TCP progress/status timeouts have no such floor: they are what ends a hung TCP write sooner.
MIN_TRANSFER_TIMEOUT_S = 5
LOG_LEVEL = "WARNING"

# The variable that forces each transport. "nvlink" is one host's GPUs (CUDA IPC); "mnnvl" is
# multi-node NVLink (NVL72-class), which needs a Mooncake build with it.
FORCE = {
    "tcp": "MC_FORCE_TCP",
    "rdma": "MC_FORCE_HCA",
    "nvlink": "MC_INTRANODE_NVLINK",
    "mnnvl": "MC_FORCE_MNNVL",
}


def timeout_env(timeout_s: float) -> dict[str, str]:
    """MC_TRANSFER_TIMEOUT and the TCP progress/status timeouts for a hand-off bounded by `timeout_s`
    (whole seconds, rounded up)."""
    if timeout_s <= 0:
        raise ValueError(f"transfer timeout must be positive, got {timeout_s}")
    whole = math.ceil(timeout_s)
    return {
        "MC_TRANSFER_TIMEOUT": str(max(MIN_TRANSFER_TIMEOUT_S, whole)),
        "MC_TCP_PROGRESS_TIMEOUT_SEC": str(whole),
        "MC_TCP_STATUS_TIMEOUT_SEC": str(whole),
    }


def transport_env(transport: str) -> dict[str, str | None]:
    """The forcing variables for `transport` ("auto" forces none, and Mooncake picks RDMA when it finds
    an HCA, else TCP): name -> "1", or None where the variable must be absent."""
    if transport != "auto" and transport not in FORCE:
        raise ValueError(
            f"unknown Mooncake transport {transport!r}; expected auto or one of {', '.join(FORCE)}"
        )
    env: dict[str, str | None] = {name: "1" if t == transport else None for t, name in FORCE.items()}
    # Legacy TCP framing drops rejected writes silently; never let it leak in from the environment.
    env["MC_TCP_PROTO"] = None
    return env


def mooncake_env(transport: str, timeout_s: float, log_level: str = LOG_LEVEL) -> dict[str, str | None]:
    """Everything Mooncake reads from the environment for one transfer engine: name -> value, or None
    where the variable must be absent (a process's own environment pops it; a rendered one omits it)."""
    return {**timeout_env(timeout_s), "MC_LOG_LEVEL": log_level, **transport_env(transport)}
