"""The other ranks of a tensor-parallel server: rank 0 (the server process) starts them and drives them.

Each rank is a process of its own (`python -m disaggctl.runtime.tp_worker`), in rank 0's process group, so
`disaggctl down` stops them with it, and with its log file as stdout. Rank 0 and each rank share a control
connection (a socket pair): rank 0 sends every step's `StepBatch` before running it itself, so all ranks
run the same forward pass and meet in its all-reduces; KV writes for the PD hand-off go the same way and
their outcome comes back. A rank that dies closes its connection: rank 0 notices at once and fails the
server rather than waiting on a collective; a rank whose rank 0 dies is killed by the kernel
(PR_SET_PDEATHSIG) or ends at the closed connection.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import itertools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from multiprocessing.connection import Connection

log = logging.getLogger("disaggctl.runtime.tp_worker")

READY_TIMEOUT_S = 600.0  # loading a shard of a large model from disk


class RankDied(RuntimeError):
    pass


class Ranks:
    """Rank 0's handle on ranks 1..N-1 of its server."""

    def __init__(self, procs: list[subprocess.Popen], conns: list[Connection]):
        self.procs = procs
        self.conns = conns
        self._send_locks = [threading.Lock() for _ in conns]
        self._pending: dict[int, concurrent.futures.Future] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._ready: list[concurrent.futures.Future] = [concurrent.futures.Future() for _ in conns]
        self.death: str | None = None
        self._closing = False
        self._readers = [
            threading.Thread(target=self._read, args=(i,), name=f"rank-{i + 1}-reader", daemon=True)
            for i in range(len(conns))
        ]
        for t in self._readers:
            t.start()

    @classmethod
    def spawn(cls, spec: dict, size: int) -> Ranks:
        """Start ranks 1..size-1 with `spec` (engine config, pool size, rendezvous, transfer settings)."""
        procs, conns = [], []
        try:
            for rank in range(1, size):
                ours, theirs = socket.socketpair()
                argv = [
                    sys.executable,
                    "-m",
                    "disaggctl.runtime.tp_worker",
                    json.dumps({**spec, "rank": rank}),
                ]
                proc = subprocess.Popen(
                    [*argv, str(theirs.fileno())], pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL
                )
                theirs.close()
                procs.append(proc)
                conns.append(Connection(ours.detach()))
        except BaseException:
            for p in procs:
                p.kill()
            raise
        return cls(procs, conns)

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> list[dict]:
        """Each rank's KV pool (`RankPool.to_dict`) once it has loaded; RankDied if one fails first."""
        deadline = time.monotonic() + timeout_s
        pools = []
        for i, fut in enumerate(self._ready):
            try:
                pools.append(fut.result(timeout=max(0.0, deadline - time.monotonic())))
            except concurrent.futures.TimeoutError:
                raise RankDied(f"rank {i + 1} did not load within {timeout_s:g} s") from None
        return pools

    def step(self, batch) -> None:
        self._send_all(("step", batch))

    def write(self, rank: int, session_id: str, srcs, dsts, lens) -> concurrent.futures.Future:
        """Have `rank` write from its pool; the future ends with None or raises RuntimeError(reason)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if self.death is not None:
            fut.set_exception(RankDied(self.death))
            return fut
        with self._lock:
            wid = next(self._ids)
            self._pending[wid] = fut
        try:
            self._send(rank - 1, ("write", wid, session_id, list(srcs), list(dsts), list(lens)))
        except (OSError, ValueError) as e:
            with self._lock:
                self._pending.pop(wid, None)
            fut.set_exception(RankDied(f"rank {rank} is gone: {e}"))
        return fut

    def close(self, timeout_s: float = 10.0) -> None:
        self._closing = True
        for i in range(len(self.conns)):
            try:
                self._send(i, ("stop",))
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + timeout_s
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        for c in self.conns:
            c.close()

    def _send(self, i: int, msg) -> None:
        with self._send_locks[i]:
            self.conns[i].send(msg)

    def _send_all(self, msg) -> None:
        if self.death is not None:
            raise RankDied(self.death)
        for i in range(len(self.conns)):
            try:
                self._send(i, msg)
            except (OSError, ValueError) as e:
                self._died(i, f"rank {i + 1} is gone: {e}")
                raise RankDied(self.death) from e

    def _read(self, i: int) -> None:
        conn = self.conns[i]
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                code = self.procs[i].poll()
                self._died(i, f"rank {i + 1} exited" + (f" with code {code}" if code is not None else ""))
                return
            kind = msg[0]
            if kind == "ready":
                self._ready[i].set_result(msg[1])
            elif kind == "written":
                with self._lock:
                    fut = self._pending.pop(msg[1], None)
                if fut is not None:
                    fut.set_result(None) if msg[2] is None else fut.set_exception(RuntimeError(msg[2]))
            elif kind == "error":
                self._died(i, f"rank {i + 1} failed: {msg[1]}")

    def _died(self, i: int, why: str) -> None:
        if self.death is None and not self._closing:
            self.death = why
            log.error("%s: this server cannot go on", why)
        err = RankDied(why)
        if not self._ready[i].done():
            self._ready[i].set_exception(err)
        with self._lock:
            pending, self._pending = self._pending, {}
        for fut in pending.values():
            fut.set_exception(err)


# ---- the worker process ----------------------------------------------------------------------------


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: the closed control connection ends us instead


def main(argv: list[str]) -> int:
    spec, fd = json.loads(argv[0]), int(argv[1])
    rank, size = spec["rank"], spec["size"]
    _die_with_parent()
    logging.basicConfig(
        level=spec.get("log_level", "INFO"),
        format=f"%(asctime)s {spec.get('role', 'server')} rank {rank} %(levelname)s %(message)s",
    )
    conn = Connection(fd)
    if os.getppid() != spec["parent"]:
        return 1  # rank 0 died before we could ask to die with it
    import torch

    from disaggctl.runtime.config import EngineConfig, ModelConfig
    from disaggctl.runtime.model_runner import ModelRunner, TransferSettings
    from disaggctl.runtime.parallel import TensorParallel, destroy_process_group, init_process_group

    config = EngineConfig(**spec["config"])
    tp = TensorParallel(rank, size, config.ep_size > 1)
    device = config.resolve_device()
    if device.startswith("cuda"):
        device = f"cuda:{rank}"  # CUDA_VISIBLE_DEVICES holds this server's GPUs, rank 0 first
        torch.cuda.set_device(device)
    try:
        init_process_group(tp, "127.0.0.1", spec["dist_port"], device, spec["timeout_s"])
        model_config = ModelConfig.from_hf_dir(config.model)
        runner = ModelRunner(
            config, model_config, device, config.resolve_dtype(device), spec["max_len"], tp, spec["num_pages"]
        )
        if spec.get("transfer"):
            runner.attach_agent(TransferSettings(**spec["transfer"]))
    except Exception as e:
        log.exception("rank %d failed to start", rank)
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return 1
    conn.send(("ready", runner.pool()))
    try:
        runner.capture_graphs(sample_rows=False)  # with rank 0, which captures once every rank is ready
    except Exception as e:
        log.exception("rank %d failed to capture its CUDA graphs", rank)
        conn.send(("error", f"CUDA graph capture failed: {type(e).__name__}: {e}"))
        return 1
    send_lock = threading.Lock()

    def write(wid: int, session_id: str, srcs, dsts, lens) -> None:
        try:
            runner.write(session_id, srcs, dsts, lens)
            error = None
        except Exception as e:  # reported to rank 0, which fails the hand-off
            error = f"rank {rank}: {e}"
        with send_lock:
            conn.send(("written", wid, error))

    log.info("rank %d of %d ready on %s", rank, size, device)
    try:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                return 0  # rank 0 is gone
            if msg[0] == "step":
                try:
                    runner.forward(msg[1], sample_rows=False)
                except Exception as e:  # our peers are inside the same collectives: stop them all
                    log.exception("forward pass failed on rank %d", rank)
                    with send_lock:
                        conn.send(("error", f"forward pass failed: {type(e).__name__}: {e}"))
                    return 1
            elif msg[0] == "write":
                threading.Thread(target=write, args=msg[1:], daemon=True).start()
            elif msg[0] == "stop":
                return 0
    finally:
        runner.close()
        destroy_process_group()


def worker_spec(
    config, size: int, num_pages: int, max_len: int, dist_port: int, transfer, timeout_s: float
) -> dict:
    """What rank 0 sends each rank (a JSON argument: no secrets in it)."""
    return {
        "config": asdict(config),
        "size": size,
        "num_pages": num_pages,
        "max_len": max_len,
        "dist_port": dist_port,
        "transfer": asdict(transfer) if transfer is not None else None,
        "timeout_s": timeout_s,
        "parent": os.getpid(),
    }


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
