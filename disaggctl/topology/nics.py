"""Which RDMA NICs a process's GPUs use (the plan and the SGLang renderer both need it)."""

from __future__ import annotations

from disaggctl.topology.schema import Host


def gpu_nics(gpu: int, host_gpus: int, nics: list[str]) -> list[str]:
    """GPU i's NICs: nics[i * len(nics) // gpus] (the NIC sharing its PCIe switch), or, with more NICs
    than GPUs, its whole share nics[i * n // gpus : (i + 1) * n // gpus]."""
    start = gpu * len(nics) // host_gpus
    return nics[start : max(start + 1, (gpu + 1) * len(nics) // host_gpus)]


def nics_for(gpus: list[int], host: Host, override: list[str] | None) -> list[str]:
    """The distinct NICs of the process's GPUs, in GPU order; a process without GPUs gets them all."""
    nics = list(host.nics if override is None else override)
    if not nics:
        return []
    if not gpus:
        return nics
    out: list[str] = []
    for g in gpus:
        out += [nic for nic in gpu_nics(g, host.gpus, nics) if nic not in out]
    return out
