"""A circuit breaker per worker: out of rotation after repeated failures, one trial request to come back.

closed: the worker takes requests. After `failures` requests in a row that it left unanswered (refused
or reset connections, silence past a timeout, lost to health checks) it opens: no request goes to it for
`cooldown_s`, whatever its health probes say, since a worker that answers probes and then drops every
request (crash-looping, a broken NIC) would otherwise be put back after every probe. Then it is
half-open: one trial request may go to it; an answer closes the breaker, a failure opens it again.

An error *answer* (a 5xx) is not a failure here: in PD one side's error is mostly the other side's
failure passed on (a prefill answers 500 when its decode went away), and the worker that answered is up.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger("disaggctl.proxy")

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
# the value of disaggctl_proxy_worker_breaker_state (sgl-router's numbering)
STATE_VALUES = {CLOSED: 0, OPEN: 1, HALF_OPEN: 2}

DEFAULT_FAILURES = 3
DEFAULT_COOLDOWN_S = 10.0


class Breaker:
    def __init__(
        self,
        name: str,
        failures: int = DEFAULT_FAILURES,
        cooldown_s: float = DEFAULT_COOLDOWN_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name  # for the log
        self.threshold = failures
        self.cooldown_s = cooldown_s
        self.clock = clock
        self._state = CLOSED
        self.consecutive = 0  # failures in a row
        self.opens = 0
        self.opened_at = 0.0
        self.trial = False  # half-open: the one trial request is out

    @property
    def state(self) -> str:
        if self._state == OPEN and self.clock() - self.opened_at >= self.cooldown_s:
            self._state = HALF_OPEN
            self.trial = False
            log.info(
                "%s: circuit half-open after %g s: one trial request may go to it", self.name, self.cooldown_s
            )
        return self._state

    def allows(self) -> bool:
        state = self.state
        return state == CLOSED or (state == HALF_OPEN and not self.trial)

    def retry_in(self) -> float:
        """Seconds until an open breaker lets a trial through."""
        return max(0.0, self.opened_at + self.cooldown_s - self.clock()) if self._state == OPEN else 0.0

    def picked(self) -> None:
        if self.state == HALF_OPEN:
            self.trial = True

    def succeeded(self) -> None:
        self.consecutive = 0
        if self._state != CLOSED:
            log.warning("%s: circuit closed: it answered", self.name)
        self._state = CLOSED
        self.trial = False

    def failed(self) -> None:
        self.consecutive += 1
        state = self.state
        if state == HALF_OPEN or (state == CLOSED and self.consecutive >= self.threshold):
            self._state = OPEN
            self.opened_at = self.clock()
            self.opens += 1
            self.trial = False
            log.warning(
                "%s: circuit open after %d failure(s) in a row: out of rotation for %g s",
                self.name,
                self.consecutive,
                self.cooldown_s,
            )

    def abandoned(self) -> None:
        """A request ended with no verdict on the worker (cancelled because the other side failed, or
        the client left): a half-open breaker may send another trial."""
        if self._state == HALF_OPEN:
            self.trial = False
