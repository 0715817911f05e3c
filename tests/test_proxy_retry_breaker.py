"""The proxy's circuit breaker as a state machine, on a clock the test moves."""

from __future__ import annotations

from disaggctl.proxy.breaker import CLOSED, HALF_OPEN, OPEN, Breaker
from disaggctl.proxy.policy import make_policy
from disaggctl.proxy.workers import NoHealthyWorker, Pool, Worker


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_failures_in_a_row_only():
    clock = Clock()
    b = Breaker("w", failures=3, cooldown_s=10, clock=clock)
    b.failed()
    b.failed()
    b.succeeded()  # an answer in between: the count starts again
    b.failed()
    b.failed()
    assert b.state == CLOSED and b.allows()
    b.failed()
    assert b.state == OPEN and not b.allows() and b.opens == 1
    assert b.retry_in() == 10


def test_half_open_lets_one_trial_through_and_its_outcome_decides():
    clock = Clock()
    b = Breaker("w", failures=1, cooldown_s=10, clock=clock)
    b.failed()
    clock.now += 9.9
    assert not b.allows()
    clock.now += 0.1
    assert b.state == HALF_OPEN and b.allows()
    b.picked()
    assert not b.allows()  # the trial is out: nothing else
    b.abandoned()  # the trial ended with no verdict (cancelled): another may go
    assert b.allows()
    b.picked()
    b.failed()
    assert b.state == OPEN and b.opens == 2  # a failed trial opens it again, for a whole cool-down
    clock.now += 10
    b.picked()
    b.succeeded()
    assert b.state == CLOSED and b.allows() and b.consecutive == 0


def test_a_pool_skips_open_breakers_and_excluded_workers_and_says_why():
    clock = Clock()
    a, b = Worker("http://a:1", "prefill"), Worker("http://b:1", "prefill")
    for w in (a, b):
        w.breaker = Breaker(w.name, failures=1, cooldown_s=5, clock=clock)
    pool = Pool("prefill", [a, b], make_policy("round_robin"))
    a.request_failed("connection reset", unreachable=True)
    a.set_health(True)  # its probes answer again
    assert pool.available() == [b]
    assert {pool.pick() for _ in range(3)} == {b}
    try:
        pool.pick(exclude={b})
    except NoHealthyWorker as e:
        assert "circuit open after 1 failure(s)" in str(e) and "failed this request" in str(e)
    else:
        raise AssertionError("no worker should be available")
    clock.now += 5
    assert pool.available() == [a, b]
