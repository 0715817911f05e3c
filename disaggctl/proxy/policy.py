"""Load-balancing policies: which of a pool's healthy workers gets the next request.

A policy only looks at `in_flight` (requests the proxy has sent to a worker and not yet seen finish), so it
works on any object that has that attribute. Each pool has its own policy object: round-robin state is per
pool, so prefill and decode rotate independently.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Protocol, TypeVar


class Loaded(Protocol):
    in_flight: int


W = TypeVar("W", bound=Loaded)

POLICIES = ("round_robin", "random", "least_load", "power_of_two")


class RoundRobin:
    def __init__(self, rng: random.Random | None = None) -> None:
        self._next = 0

    def pick(self, candidates: Sequence[W]) -> W:
        w = candidates[self._next % len(candidates)]
        self._next += 1
        return w


class RandomChoice:
    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def pick(self, candidates: Sequence[W]) -> W:
        return self._rng.choice(candidates)


class LeastLoad:
    """Fewest in-flight requests. Ties are broken at random: picking the first of equals would send every
    request of a sequential (one-at-a-time) client to the same worker."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def pick(self, candidates: Sequence[W]) -> W:
        low = min(w.in_flight for w in candidates)
        return self._rng.choice([w for w in candidates if w.in_flight == low])


class PowerOfTwo:
    """Two distinct workers drawn at random, the less loaded of the two: close to least-load's balance
    without every picker herding onto the same momentarily-idle worker."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def pick(self, candidates: Sequence[W]) -> W:
        if len(candidates) == 1:
            return candidates[0]
        a, b = self._rng.sample(list(candidates), 2)
        return b if b.in_flight < a.in_flight else a


_CLASSES = {
    "round_robin": RoundRobin,
    "random": RandomChoice,
    "least_load": LeastLoad,
    "power_of_two": PowerOfTwo,
}


def make_policy(
    name: str, rng: random.Random | None = None
) -> RoundRobin | RandomChoice | LeastLoad | PowerOfTwo:
    try:
        cls = _CLASSES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; expected one of {', '.join(POLICIES)}") from None
    return cls(rng)
