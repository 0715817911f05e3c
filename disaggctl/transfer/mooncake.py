"""A thin, time-bounded wrapper around Mooncake's TransferEngine (P2P handshake, no metadata server).

Mooncake never raises on transport errors and its sync calls can block for a minute on a hung peer,
so every call here goes through a small dedicated thread pool and is bounded by our own deadline.
A deadline that fires does not stop the C++ call: the bytes may still land later (see
`TransferError`), which is why callers must treat the destination pages of a failed write as dirty.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

from disaggctl.mooncake_env import LOG_LEVEL, mooncake_env

log = logging.getLogger(__name__)

PROTOCOLS = ("tcp", "rdma", "nvlink", "auto")
INSTALL_HINT = (
    "pip install mooncake-transfer-engine-non-cuda (or mooncake-transfer-engine on CUDA machines) "
    "and apt install libibverbs1 libnuma1"
)
# Mooncake adds 1 ns per byte to its transfer timeout; our deadline follows the same rule.
_SECONDS_PER_BYTE = 1e-9
# Grace on top of Mooncake's own timeout, so its clearer -1 normally wins over our deadline.
_DEADLINE_GRACE_S = 1.0
_RDMA_SYSFS = Path("/sys/class/infiniband")
# The 0.3.13 TCP transport rejects a batch of more than ~2k entries outright ("TCP lane queue-full"),
# whatever MC_TCP_MAX_QUEUED_TRANSFERS_PER_PEER says; larger writes go out as consecutive batches.
MAX_BATCH_ENTRIES = 1024
# Over same-host NVLink a few ranges (a page-major prompt is one per page run) go through Mooncake's
# single-range call, one each; many ranges stay one batch, which amortises its fixed cost over them. On an
# H200 (2026-12-03, docs/benchmarks.md §11) this took a one-range hand-off of 16k tokens from 1.57 to
# 1.46 ms and of 1k tokens from 0.54 to 0.45 ms: a small gain. The rest of the gap to one raw write was the
# host building the write list (§12), not the call.
NVLINK_SINGLE_WRITES_UPTO = 16


class MooncakeUnavailableError(RuntimeError):
    """The `mooncake` package (or a library it links against) cannot be imported."""


class TransferError(RuntimeError):
    """A transfer to `peer` failed. Bytes of the failed write may still land at the peer afterwards."""

    def __init__(self, peer: str, reason: str, code: int | None = None):
        self.peer = peer
        self.reason = reason
        self.code = code
        suffix = f" (code {code})" if code is not None else ""
        super().__init__(f"transfer to {peer} failed: {reason}{suffix}")


def load_engine_module() -> Any:
    """Import `mooncake.engine`, turning the usual import failures into one actionable message."""
    # glog reads its level at import time, so this must precede the import.
    os.environ.setdefault("MC_LOG_LEVEL", LOG_LEVEL)
    try:
        import mooncake.engine as engine_module
    except ImportError as exc:
        raise MooncakeUnavailableError(
            f"Mooncake Transfer Engine is not usable: {exc}. {INSTALL_HINT}"
        ) from exc
    return engine_module


def rdma_devices() -> list[str]:
    """RDMA NICs the kernel exposes (empty on machines without RDMA)."""
    try:
        return sorted(p.name for p in _RDMA_SYSFS.iterdir())
    except OSError:
        return []


def select_transport(protocol: str, ib_device: str | None, nvlink_supported: bool) -> str:
    """The transport Mooncake will pick for `protocol` once `transport_env` is applied ("tcp", "rdma"
    or "nvlink", one host's GPUs).

    Mooncake chooses its transport from the environment and the NICs it finds, not from the
    protocol string, so we decide here and set the environment to match.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown transfer protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}")
    if protocol == "tcp":
        return "tcp"
    if protocol == "nvlink":
        if not nvlink_supported:
            raise MooncakeUnavailableError(
                "transfer protocol nvlink needs the CUDA build of Mooncake (pip install mooncake-transfer-engine)"
            )
        return "nvlink"
    devices = rdma_devices()
    if ib_device:
        wanted = [d.strip() for d in ib_device.split(",") if d.strip()]
        missing = [d for d in wanted if d not in devices]
        if missing:
            found = ", ".join(devices) or "none"
            raise MooncakeUnavailableError(f"RDMA device(s) {', '.join(missing)} not found (found: {found})")
        devices = wanted
    if devices:
        return "rdma"
    if protocol == "rdma":
        raise MooncakeUnavailableError("transfer protocol rdma requested but this machine has no RDMA device")
    return "tcp"


def transport_env(
    transport: str, timeout_s: float, environ: Mapping[str, str] | None = None
) -> dict[str, str | None]:
    """The MC_* changes for `transport` and `timeout_s`: name -> value, or None to unset (pure).
    An MC_LOG_LEVEL already in the environment stays."""
    current = os.environ if environ is None else environ
    return mooncake_env(transport, timeout_s, current.get("MC_LOG_LEVEL", LOG_LEVEL))


def apply_env(changes: Mapping[str, str | None]) -> None:
    for name, value in changes.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def default_workers() -> int:
    """Threads for blocking Mooncake calls: each waiting call spins a core, so leave most cores alone."""
    return max(2, min(4, (os.cpu_count() or 2) // 2))


def session_id_for(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class MooncakeAgent:
    """One Mooncake TransferEngine bound to `hostname`, with registered memory and bounded writes.

    `hostname` must be an address the peer can route to (it is part of the session id).
    `timeout_s` bounds every write (plus 1 ns per byte, like Mooncake) and every probe.
    `thread_setup` runs once on each worker thread (e.g. choosing its CUDA device). `nvlink_settle` runs
    on the writing thread after each same-host NVLink write and must wait until the bytes have landed:
    Mooncake's copy there is a device-to-device `cudaMemcpy`, which CUDA allows to return before the copy
    is done, and the peer process reads the pages with nothing ordering its reads after our copy.
    """

    def __init__(
        self,
        hostname: str = "127.0.0.1",
        protocol: str = "tcp",
        ib_device: str | None = None,
        timeout_s: float = 30.0,
        workers: int | None = None,
        thread_setup: Callable[[], None] | None = None,
        nvlink_settle: Callable[[], None] | None = None,
    ):
        if timeout_s <= 0:
            raise ValueError(f"transfer timeout must be positive, got {timeout_s}")
        if hostname in ("", "0.0.0.0", "::"):
            raise ValueError(f"hostname {hostname!r} is not an address a peer can reach; use this host's IP")
        module = load_engine_module()
        self.hostname = hostname
        self.protocol = protocol
        self.timeout_s = float(timeout_s)
        self.transport = select_transport(
            protocol, ib_device, bool(getattr(module, "SUPPORT_INTRA_NVLINK", False))
        )
        # Mooncake reads these when the engine is created; the environment is process-wide on purpose.
        apply_env(transport_env(self.transport, self.timeout_s))
        self._engine = module.TransferEngine()
        device_filter = (ib_device or "") if self.transport == "rdma" else ""
        # The protocol string only picks Mooncake's buffer allocator; the environment picks the transport.
        # Mooncake reads "nvlink" as multi-node NVLink (a build option); one host's GPUs are "nvlink_intra".
        mc_protocol = "nvlink_intra" if self.transport == "nvlink" else self.transport
        rc = self._engine.initialize(hostname, "P2PHANDSHAKE", mc_protocol, device_filter)
        if rc != 0:
            raise TransferError(hostname, "Mooncake engine initialisation failed", rc)
        self.session_id = session_id_for(hostname, self._engine.get_rpc_port())
        self._registered: dict[int, int] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(
            max_workers=workers or default_workers(), thread_name_prefix="mooncake", initializer=thread_setup
        )
        self._nvlink_settle = nvlink_settle if self.transport == "nvlink" else None
        self._thread_setup = thread_setup
        # Same-host NVLink peers written to once: Mooncake holds their descriptor and the mapping of their
        # memory, so a write is a copy on our own device that cannot wait on the peer; it then runs on the
        # caller's thread, sparing the hop to a worker and back.
        self._mapped_peers: set[str] = set()
        self._closed = False
        log.info(
            "mooncake agent %s: transport %s (protocol %s%s)",
            self.session_id,
            self.transport,
            protocol,
            f", devices {ib_device}" if ib_device else "",
        )

    @property
    def engine(self) -> Any:
        """The underlying TransferEngine, for diagnostics and raw baselines; bypasses our deadlines."""
        return self._engine

    def register(self, ptr: int, nbytes: int) -> None:
        """Make [ptr, ptr+nbytes) writable by peers (and usable as a source). Keep the memory alive."""
        if ptr <= 0 or nbytes <= 0:
            raise ValueError(f"cannot register {nbytes} bytes at address {ptr:#x}")
        with self._lock:
            rc = self._engine.register_memory(ptr, nbytes)
            if rc != 0:
                why = "overlaps an already registered range" if rc == -7 else "register_memory failed"
                raise TransferError(self.session_id, f"{why} ({nbytes} bytes at {ptr:#x})", rc)
            self._registered[ptr] = nbytes

    def unregister(self, ptr: int) -> None:
        """Undo `register(ptr, ...)`; call it before the memory is freed."""
        with self._lock:
            if ptr not in self._registered:
                raise ValueError(f"address {ptr:#x} is not registered with this agent")
            rc = self._engine.unregister_memory(ptr)
            del self._registered[ptr]
        if rc != 0:
            raise TransferError(self.session_id, f"unregister_memory failed for {ptr:#x}", rc)

    def deadline_s(self, nbytes: int) -> float:
        return self.timeout_s + nbytes * _SECONDS_PER_BYTE + _DEADLINE_GRACE_S

    def _submit(self, fn: Callable[..., int], *args: Any) -> Future:
        if self._closed:
            raise RuntimeError("mooncake agent is closed")
        return self._pool.submit(fn, *args)

    def _write_now(self, peer: str, srcs: list[int], dsts: list[int], lens: list[int]) -> None:
        self._issue(peer, srcs, dsts, lens)
        if self._nvlink_settle is not None:
            self._nvlink_settle()

    def _issue(self, peer: str, srcs: list[int], dsts: list[int], lens: list[int]) -> None:
        if self.transport == "nvlink" and len(lens) <= NVLINK_SINGLE_WRITES_UPTO:
            for i, (src, dst, n) in enumerate(zip(srcs, dsts, lens, strict=True)):
                rc = self._engine.transfer_sync_write(peer, src, dst, n)
                if rc != 0:
                    raise TransferError(peer, f"write of range {i} of {len(lens)}, {n} bytes, failed", rc)
            return
        for lo in range(0, len(lens), MAX_BATCH_ENTRIES):
            hi = lo + MAX_BATCH_ENTRIES
            rc = self._engine.batch_transfer_sync_write(peer, srcs[lo:hi], dsts[lo:hi], lens[lo:hi])
            if rc != 0:
                what = f"batch write of {len(lens)} ranges, {sum(lens)} bytes, failed at range {lo}"
                raise TransferError(peer, what, rc)

    def _check_batch(self, peer: str, srcs: Sequence[int], dsts: Sequence[int], lens: Sequence[int]):
        if not isinstance(peer, str) or not peer:
            raise ValueError(f"peer session id must be a non-empty 'host:port' string, got {peer!r}")
        if not (len(srcs) == len(dsts) == len(lens)):
            raise ValueError(f"srcs/dsts/lens lengths differ: {len(srcs)}/{len(dsts)}/{len(lens)}")
        return [int(a) for a in srcs], [int(a) for a in dsts], [int(n) for n in lens]

    def write(self, peer: str, srcs: Sequence[int], dsts: Sequence[int], lens: Sequence[int]) -> None:
        """Write local ranges into the peer's registered memory; raise TransferError on failure. Blocks the
        calling thread (never call it on an event loop).

        One Mooncake batch per MAX_BATCH_ENTRIES ranges, all under one deadline. A write to a same-host
        NVLink peer already mapped runs on the calling thread (after `thread_setup`, if given).
        """
        srcs, dsts, lens = self._check_batch(peer, srcs, dsts, lens)
        if not lens:
            return
        if peer in self._mapped_peers:
            if self._closed:
                raise RuntimeError("mooncake agent is closed")
            if self._thread_setup is not None:
                self._thread_setup()
            self._write_now(peer, srcs, dsts, lens)
            return
        deadline = self.deadline_s(sum(lens))
        future = self._submit(self._write_now, peer, srcs, dsts, lens)
        try:
            future.result(timeout=deadline)
        except FutureTimeout:
            raise TransferError(peer, f"no completion within {deadline:.1f}s (peer hung?)") from None
        if self.transport == "nvlink":
            self._mapped_peers.add(peer)

    def _probe_now(self, peer: str) -> int:
        return self._engine.send_probe(peer)

    def probe(self, peer: str, timeout_s: float | None = None) -> bool:
        """True if the peer's handshake port answers within the timeout. Also warms the peer descriptor cache."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        try:
            return self._submit(self._probe_now, peer).result(timeout=timeout) == 0
        except FutureTimeout:
            return False

    def close(self) -> None:
        """Unregister everything and stop taking work. Calls still running finish in the background."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            for ptr in list(self._registered):
                self._engine.unregister_memory(ptr)
            self._registered.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> MooncakeAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
