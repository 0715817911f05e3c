"""Load-balancing policies and worker pools (unit tests, no network)."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import pytest

from disaggctl.proxy.policy import POLICIES, LeastLoad, PowerOfTwo, RandomChoice, RoundRobin, make_policy
from disaggctl.proxy.workers import NoHealthyWorker, Pool, Worker


@dataclass(eq=False)
class W:
    name: str
    in_flight: int = 0


def picks(policy, candidates, n):
    return Counter(policy.pick(candidates).name for _ in range(n))


def test_round_robin_visits_each_in_turn():
    ws = [W("a"), W("b"), W("c")]
    rr = RoundRobin()
    assert [rr.pick(ws).name for _ in range(7)] == ["a", "b", "c", "a", "b", "c", "a"]


def test_round_robin_keeps_rotating_when_the_candidate_list_shrinks():
    ws = [W("a"), W("b"), W("c")]
    rr = RoundRobin()
    rr.pick(ws)
    got = picks(rr, ws[:2], 10)
    assert got == {"a": 5, "b": 5}


@pytest.mark.parametrize("cls", [RandomChoice, PowerOfTwo, LeastLoad])
def test_equal_load_spreads_evenly(cls):
    ws = [W("a"), W("b"), W("c"), W("d")]
    got = picks(cls(random.Random(7)), ws, 4000)
    assert set(got) == {"a", "b", "c", "d"}
    # Binomial(4000, 1/4): sd ~ 27; 150 is > 5 sd.
    assert all(abs(n - 1000) < 150 for n in got.values()), got


def test_random_is_reproducible_with_a_seeded_rng():
    ws = [W(str(i)) for i in range(5)]
    a, b = RandomChoice(random.Random(3)), RandomChoice(random.Random(3))
    seq1 = [a.pick(ws).name for _ in range(50)]
    seq2 = [b.pick(ws).name for _ in range(50)]
    assert seq1 == seq2
    assert len(set(seq1)) > 1


def test_least_load_picks_the_least_loaded():
    ws = [W("a", 3), W("b", 1), W("c", 2)]
    ll = LeastLoad(random.Random(0))
    assert all(ll.pick(ws).name == "b" for _ in range(50))


def test_least_load_breaks_ties_among_the_least_loaded_only():
    ws = [W("a", 1), W("b", 4), W("c", 1)]
    got = picks(LeastLoad(random.Random(0)), ws, 400)
    assert set(got) == {"a", "c"}
    assert min(got.values()) > 120


def test_power_of_two_picks_the_less_loaded_of_two():
    ws = [W("a", 5), W("b", 2)]
    p2 = PowerOfTwo(random.Random(0))
    assert all(p2.pick(ws).name == "b" for _ in range(50))


def test_power_of_two_never_picks_the_most_loaded():
    # The most loaded worker loses every comparison it takes part in; the least loaded wins every one,
    # and takes part in 2 of the 3 possible pairs.
    ws = [W("a", 0), W("b", 5), W("c", 9)]
    got = picks(PowerOfTwo(random.Random(1)), ws, 3000)
    assert "c" not in got
    assert abs(got["a"] / 3000 - 2 / 3) < 0.05, got


def test_power_of_two_with_one_candidate():
    w = W("only", 9)
    assert PowerOfTwo().pick([w]) is w


def simulated_spread(name: str) -> list[int]:
    """Closed loop of 40 requests on 4 workers: each step a random request finishes and a new one is
    placed by the policy; returns max - min in-flight after every placement."""
    rng = random.Random(11)
    ws = [W(str(i)) for i in range(4)]
    policy = make_policy(name, random.Random(5))
    running: list[W] = []
    for _ in range(40):
        w = policy.pick(ws)
        w.in_flight += 1
        running.append(w)
    spread = []
    for _ in range(2000):
        done = running.pop(rng.randrange(len(running)))
        done.in_flight -= 1
        w = policy.pick(ws)
        w.in_flight += 1
        running.append(w)
        spread.append(max(x.in_flight for x in ws) - min(x.in_flight for x in ws))
    return spread


def test_load_aware_policies_keep_load_balanced():
    baseline = sum(simulated_spread("random")) / 2000
    p2 = sum(simulated_spread("power_of_two")) / 2000
    assert max(simulated_spread("least_load")) <= 1
    assert p2 < baseline / 2, (p2, baseline)


def test_make_policy_names():
    for name in POLICIES:
        assert hasattr(make_policy(name), "pick")
    with pytest.raises(ValueError, match="unknown policy 'fastest'.*round_robin"):
        make_policy("fastest")


def test_pool_skips_unhealthy_and_names_the_reasons():
    a, b = Worker("http://127.0.0.1:1", "decode"), Worker("http://127.0.0.1:2", "decode")
    pool = Pool("decode", [a, b], RoundRobin())
    a.set_health(False, "connection refused")
    assert {pool.pick().url for _ in range(4)} == {b.url}
    b.request_failed("reset by peer", unreachable=True)
    with pytest.raises(
        NoHealthyWorker, match=r"no healthy decode worker.*:1: connection refused.*:2: reset by peer"
    ):
        pool.pick()
    a.set_health(True)
    assert pool.pick() is a


def test_request_failed_without_unreachable_keeps_worker_in_rotation():
    w = Worker("http://127.0.0.1:3", "prefill", 9000)
    w.request_failed("answered HTTP 500", unreachable=False)
    assert w.healthy and w.failures == 1
    assert w.host == "127.0.0.1"
    assert w.as_dict()["bootstrap_port"] == 9000
