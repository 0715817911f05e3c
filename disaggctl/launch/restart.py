"""Restart policies (`restart: no | on-failure | always`) and their pacing: pure, so that the keeper's
decisions can be tested without processes.

The n-th restart of a process within the last `window_s` waits `backoff_s * 2**(n-1)`, at most
`backoff_max_s`; a process that would need more than `max_restarts` restarts in the window is left dead
in state "crash-loop" until `disaggctl up` starts it again. Restarts older than the window no longer
count, so a process that ran well for a while starts again from the short delay.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from typing import Any

# What the keeper is doing about a process (ProcRecord.keeper_state); "" is "running as started".
STARTING = "starting"  # restarted by the keeper, not healthy yet
BACKOFF = "backoff"  # dead, to be restarted at next_restart_at
EXITED = "exited"  # dead, and its policy says to leave it so
CRASH_LOOP = "crash-loop"  # dead, restarted too often in the window: left so until `up`
STATES = ("", STARTING, BACKOFF, EXITED, CRASH_LOOP)


@dataclass(frozen=True)
class Decision:
    restart: bool
    delay_s: float
    state: str  # BACKOFF, EXITED or CRASH_LOOP
    reason: str


def is_failure(exit_code: int | None) -> bool:
    """Anything but a clean exit. None (the status is unknown: a process this keeper did not start, so
    the kernel told its own parent) counts as a failure: nothing of disaggctl stopped it, since `down`
    and `up` stop the keeper before they stop a process."""
    return exit_code != 0


def describe_exit(exit_code: int | None) -> str:
    if exit_code is None:
        return "exited (status unknown: started before this keeper)"
    if exit_code < 0:
        try:
            return f"killed by {signal.Signals(-exit_code).name}"
        except ValueError:
            return f"killed by signal {-exit_code}"
    return f"exit status {exit_code}"


def backoff(settings: Any, n: int) -> float:
    """The wait before the n-th restart (n >= 1) within the window."""
    return min(settings.backoff_max_s, settings.backoff_s * 2 ** (n - 1))


@dataclass
class History:
    """When one process was restarted, and what the next death of it should lead to. `settings` is the
    topology's `keeper` section (schema.Keeper)."""

    settings: Any
    restarted_at: list[float] = field(default_factory=list)

    def recent(self, now: float) -> int:
        self.restarted_at = [t for t in self.restarted_at if now - t < self.settings.window_s]
        return len(self.restarted_at)

    def decide(self, policy: str, exit_code: int | None, now: float) -> Decision:
        how = describe_exit(exit_code)
        if policy == "no":
            return Decision(False, 0.0, EXITED, f"{how}; restart: no")
        if policy == "on-failure" and not is_failure(exit_code):
            return Decision(False, 0.0, EXITED, f"{how}; restart: on-failure restarts only failures")
        n = self.recent(now) + 1
        if n > self.settings.max_restarts:
            return Decision(
                False,
                0.0,
                CRASH_LOOP,
                f"{how}; already restarted {n - 1} times in {self.settings.window_s:g} s "
                f"(keeper.max_restarts): left stopped until `disaggctl up`",
            )
        delay = backoff(self.settings, n)
        return Decision(True, delay, BACKOFF, f"{how}; restart {n} in the window, in {delay:g} s")

    def restarted(self, now: float) -> None:
        self.restarted_at.append(now)
