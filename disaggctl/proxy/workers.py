"""The proxy's workers: one pool per role, in-flight/served/failure counts, and health tracking.

A worker is skipped by its pool's policy while it is unhealthy. It becomes unhealthy when a request to it
fails at the connection level (refused, reset, timed out) or when a health probe fails, and healthy again
when a probe succeeds. Everything here runs on the proxy's one event loop, so counters need no locks.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp

log = logging.getLogger("disaggctl.proxy")


@dataclass
class Worker:
    url: str
    role: str  # "prefill", "decode" or "colocated"
    bootstrap_port: int | None = None
    # Optimistic until the first probe: the launcher starts the proxy after its workers are healthy.
    healthy: bool = True
    in_flight: int = 0
    served: int = 0
    failures: int = 0
    last_error: str | None = None

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    def set_health(self, ok: bool, reason: str | None = None) -> None:
        if ok and not self.healthy:
            log.warning("%s %s is healthy again", self.role, self.url)
        elif not ok and self.healthy:
            log.warning("%s %s marked unhealthy: %s", self.role, self.url, reason)
        self.healthy = ok
        if not ok:
            self.last_error = reason

    def request_failed(self, reason: str, unreachable: bool) -> None:
        """Count a failed request; a worker that could not be reached is also taken out of rotation."""
        self.failures += 1
        self.last_error = reason
        if unreachable:
            self.set_health(False, reason)

    def as_dict(self) -> dict:
        out = {
            "url": self.url,
            "role": self.role,
            "healthy": self.healthy,
            "in_flight": self.in_flight,
            "served": self.served,
            "failures": self.failures,
            "last_error": self.last_error,
        }
        if self.bootstrap_port is not None:
            out["bootstrap_port"] = self.bootstrap_port
        return out


@contextmanager
def in_flight(worker: Worker) -> Iterator[None]:
    worker.in_flight += 1
    try:
        yield
    finally:
        worker.in_flight -= 1


class NoHealthyWorker(Exception):
    pass


class Pool:
    def __init__(self, role: str, workers: Sequence[Worker], policy) -> None:
        self.role = role
        self.workers = list(workers)
        self.policy = policy

    def healthy(self) -> list[Worker]:
        return [w for w in self.workers if w.healthy]

    def pick(self) -> Worker:
        candidates = self.healthy()
        if not candidates:
            why = "; ".join(f"{w.url}: {w.last_error or 'unhealthy'}" for w in self.workers)
            raise NoHealthyWorker(f"no healthy {self.role} worker ({why})")
        return self.policy.pick(candidates)


def describe(exc: BaseException, timeout_s: float | None = None) -> str:
    """A one-line reason for a failed upstream call (aiohttp's own messages, minus the class noise)."""
    if isinstance(exc, asyncio.TimeoutError):
        return f"no answer within {timeout_s:g} s" if timeout_s else "timed out"
    text = str(exc) or type(exc).__name__
    return text


async def probe(session: aiohttp.ClientSession, worker: Worker, timeout_s: float) -> bool:
    try:
        async with session.get(
            worker.url + "/health", timeout=aiohttp.ClientTimeout(total=timeout_s)
        ) as resp:
            await resp.read()
            ok, reason = resp.status == 200, f"/health answered {resp.status}"
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
        ok, reason = False, f"/health probe failed: {describe(e, timeout_s)}"
    worker.set_health(ok, reason)
    return ok


async def probe_all(session: aiohttp.ClientSession, workers: Sequence[Worker], timeout_s: float) -> None:
    await asyncio.gather(*(probe(session, w, timeout_s) for w in workers))


async def health_loop(
    session: aiohttp.ClientSession, workers: Sequence[Worker], interval_s: float, timeout_s: float
) -> None:
    while True:
        await probe_all(session, workers, timeout_s)
        await asyncio.sleep(interval_s)
