"""The proxy's workers: one pool per role, in-flight/served/failure counts, and health tracking.

A worker is skipped by its pool's policy while it is unhealthy or its circuit breaker is open (breaker.py).
It becomes unhealthy when a request to it fails at the connection level (refused, reset, timed out) or
when a health probe fails, and healthy again when a probe succeeds. A worker that leaves probes
unanswered `LOST_AFTER_PROBES` times in a row (hung, SIGSTOPped, its host gone) is also declared lost:
its in-flight requests are ended at once instead of waiting out the whole request timeout. Everything here runs on the proxy's one event loop, so counters
need no locks.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar
from urllib.parse import urlsplit

import aiohttp

from disaggctl.proxy.breaker import HALF_OPEN, Breaker

log = logging.getLogger("disaggctl.proxy")

# One unanswered probe can be a hiccup (a long GC pause, a busy loop); two in a row, a probe interval
# apart, is a worker that will not finish what it holds either.
LOST_AFTER_PROBES = 2

T = TypeVar("T")


@dataclass(eq=False)  # identity: workers are kept in sets
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
    unanswered_probes: int = 0  # in a row; an answer of any status resets it
    read_timeouts: int = 0  # streamed answers cut after --read-timeout seconds of silence
    lost_requests: int = 0  # requests ended because the worker stopped answering health checks
    # Resolved (with the reason) when the worker is declared lost; every in-flight request waits on it.
    _lost: asyncio.Future | None = field(default=None, repr=False)
    breaker: Breaker | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.breaker is None:
            self.breaker = Breaker(self.name)

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def name(self) -> str:
        """How messages name the worker: "prefill URL", "decode URL", or "worker URL" when colocated."""
        return f"worker {self.url}" if self.role == "colocated" else f"{self.role} {self.url}"

    def set_health(self, ok: bool, reason: str | None = None) -> None:
        if ok and not self.healthy:
            log.warning("%s %s is healthy again", self.role, self.url)
        elif not ok and self.healthy:
            log.warning("%s %s marked unhealthy: %s", self.role, self.url, reason)
        self.healthy = ok
        if not ok:
            self.last_error = reason

    def lost_signal(self) -> asyncio.Future:
        """The future a request to this worker races against: it resolves if the worker is declared lost."""
        if self._lost is None:
            self._lost = asyncio.get_running_loop().create_future()
        return self._lost

    def probe_answered(self) -> None:
        self.unanswered_probes = 0

    def probe_unanswered(self, reason: str) -> None:
        self.unanswered_probes += 1
        if self.unanswered_probes < LOST_AFTER_PROBES:
            return
        # Every failed round past the threshold ends what is in flight, not only the first: nothing new
        # should reach an unhealthy worker, but a request that did must not hang either.
        lost, self._lost = self._lost, None
        if lost is None or lost.done():
            return
        if self.in_flight:
            log.warning(
                "%s stopped answering health checks (%d probes in a row, last: %s): "
                "ending its %d in-flight request(s)",
                self.name,
                self.unanswered_probes,
                reason,
                self.in_flight,
            )
        lost.set_result(f"{self.name} stopped answering health checks ({reason})")

    def answered(self) -> None:
        """The worker answered a request (with any status): it is up, as far as the breaker goes."""
        self.breaker.succeeded()

    def request_failed(self, reason: str, unreachable: bool) -> None:
        """Count a failed request; a worker that could not be reached is also taken out of rotation, and
        counts towards opening its breaker."""
        self.failures += 1
        self.last_error = reason
        if unreachable:
            self.set_health(False, reason)
            self.breaker.failed()

    def as_dict(self) -> dict:
        out = {
            "url": self.url,
            "role": self.role,
            "healthy": self.healthy,
            "in_flight": self.in_flight,
            "served": self.served,
            "failures": self.failures,
            "read_timeouts": self.read_timeouts,
            "lost_requests": self.lost_requests,
            "last_error": self.last_error,
            "breaker": self.breaker.state,
            "breaker_opens": self.breaker.opens,
            "consecutive_failures": self.breaker.consecutive,
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
        if worker.breaker.state == HALF_OPEN:
            worker.breaker.abandoned()  # no-op once the trial's answer or failure moved it on


class NoHealthyWorker(Exception):
    pass


class WorkerLost(Exception):
    """The worker stopped answering health checks while a request to it was in flight."""


async def until_lost(worker: Worker, coro: Awaitable[T]) -> T:
    """Await `coro` (a request to `worker`), or cancel it and raise WorkerLost if the worker is declared
    lost first: a hung worker would otherwise hold a non-streamed request for the whole request timeout,
    since its silence looks the same as a long generation."""
    lost = worker.lost_signal()
    task = asyncio.ensure_future(coro)
    try:
        await asyncio.wait({task, lost}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise
    if task.done():  # a finished request wins over a loss noticed at the same moment
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    raise WorkerLost(lost.result())


class Pool:
    def __init__(self, role: str, workers: Sequence[Worker], policy) -> None:
        self.role = role
        self.workers = list(workers)
        self.policy = policy

    def healthy(self) -> list[Worker]:
        return [w for w in self.workers if w.healthy]

    def available(self, exclude: Collection[Worker] = ()) -> list[Worker]:
        """The workers a request may go to now: healthy, breaker letting it through, not in `exclude`."""
        return [w for w in self.workers if w.healthy and w.breaker.allows() and w not in exclude]

    def pick(self, exclude: Collection[Worker] = ()) -> Worker:
        candidates = self.available(exclude)
        if not candidates:
            why = "; ".join(f"{w.url}: {_unavailable(w, exclude)}" for w in self.workers)
            raise NoHealthyWorker(f"no healthy {self.role} worker ({why})")
        w = self.policy.pick(candidates)
        w.breaker.picked()
        return w


def _unavailable(w: Worker, exclude: Collection[Worker]) -> str:
    if w in exclude:
        return f"failed this request ({w.last_error})" if w.last_error else "failed this request"
    if w.healthy and not w.breaker.allows():
        breaker = w.breaker
        return f"circuit open after {breaker.consecutive} failure(s) in a row, a trial in {breaker.retry_in():.0f} s"
    return w.last_error or "unhealthy"


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
        # A worker that answers, even 503 (stopping, draining), is alive: what it holds may still finish.
        worker.probe_answered()
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
        ok, reason = False, f"/health probe failed: {describe(e, timeout_s)}"
        worker.probe_unanswered(reason)
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
