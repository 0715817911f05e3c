"""Restart policies and their pacing (launch/restart.py), and how the topology carries them to the plan."""

from __future__ import annotations

import pytest

from disaggctl.launch import restart
from disaggctl.topology.load import TopologyError, load_topology
from disaggctl.topology.plan import build_plan
from disaggctl.topology.schema import Keeper

SETTINGS = Keeper(backoff_s=1, backoff_max_s=8, max_restarts=5, window_s=100)


def test_backoff_doubles_up_to_its_cap():
    h = restart.History(SETTINGS)
    delays = []
    for i in range(5):
        d = h.decide("on-failure", 1, now=float(i))
        assert d.restart and d.state == restart.BACKOFF
        delays.append(d.delay_s)
        h.restarted(float(i))
    assert delays == [1, 2, 4, 8, 8]


def test_more_restarts_than_allowed_in_the_window_is_a_crash_loop():
    h = restart.History(SETTINGS)
    for i in range(5):
        h.restarted(float(i))
    d = h.decide("always", -9, now=10.0)
    assert not d.restart and d.state == restart.CRASH_LOOP
    assert "restarted 5 times in 100 s" in d.reason and "disaggctl up" in d.reason


def test_restarts_older_than_the_window_no_longer_count():
    h = restart.History(SETTINGS)
    for t in (0.0, 1.0, 2.0, 3.0, 4.0):
        h.restarted(t)
    d = h.decide("on-failure", 1, now=103.5)  # only the one at 4.0 is inside the window
    assert d.restart and d.delay_s == 2
    d = h.decide("on-failure", 1, now=500.0)
    assert d.restart and d.delay_s == 1  # a process that ran well starts again from the short delay


@pytest.mark.parametrize(
    ("policy", "code", "restarts"),
    [
        ("no", 1, False),
        ("no", -9, False),
        ("no", None, False),
        ("on-failure", 0, False),
        ("on-failure", 1, True),
        ("on-failure", -9, True),
        ("on-failure", None, True),  # not our child: the kernel told its own parent, not us
        ("always", 0, True),
        ("always", 1, True),
    ],
)
def test_which_exits_each_policy_restarts(policy, code, restarts):
    d = restart.History(SETTINGS).decide(policy, code, now=0.0)
    assert d.restart is restarts
    assert d.state == (restart.BACKOFF if restarts else restart.EXITED)


def test_exits_are_described_for_people():
    assert restart.describe_exit(-9) == "killed by SIGKILL"
    assert restart.describe_exit(3) == "exit status 3"
    assert "status unknown" in restart.describe_exit(None)


def test_the_topology_carries_policies_keeper_settings_and_proxy_flags_into_the_plan(tmp_path):
    topo = tmp_path / "t.yaml"
    topo.write_text(
        """\
name: t
model: {path: builtin:tiny}
prefill: {replicas: 2, restart: always}
decode: {restart: no}
proxy: {retries: 1, breaker_failures: 4, breaker_cooldown_s: 2.5}
keeper: {backoff_s: 0.5, max_restarts: 3}
"""
    )
    plan = build_plan(load_topology(topo), str(topo))
    policies = {p.name: p.restart for p in plan.processes}
    assert policies == {"prefill-0": "always", "prefill-1": "always", "decode-0": "no", "proxy": "on-failure"}
    assert plan.keeper.backoff_s == 0.5 and plan.keeper.max_restarts == 3 and plan.keeper.backoff_max_s == 60
    argv = plan.process("proxy").argv
    assert argv[argv.index("--retries") + 1] == "1"
    assert argv[argv.index("--breaker-failures") + 1] == "4"
    assert argv[argv.index("--breaker-cooldown") + 1] == "2.5"
    # a new policy is not a new spec: it takes effect without restarting the process
    before = plan.spec_hash("decode-0")
    topo.write_text(topo.read_text().replace("decode: {restart: no}", "decode: {restart: always}"))
    assert build_plan(load_topology(topo), str(topo)).spec_hash("decode-0") == before


@pytest.mark.parametrize(
    ("fragment", "message"),
    [
        ("decode: {restart: sometimes}", "decode.restart"),
        ("decode: {}\nkeeper: {backoff_s: 10, backoff_max_s: 5}", "backoff_max_s must be at least backoff_s"),
        ("decode: {}\nproxy: {retries: -1}", "proxy.retries"),
    ],
)
def test_bad_restart_settings_are_refused_with_their_field(tmp_path, fragment, message):
    topo = tmp_path / "t.yaml"
    topo.write_text(f"name: t\nmodel: {{path: builtin:tiny}}\nprefill: {{}}\n{fragment}\n")
    with pytest.raises(TopologyError) as e:
        load_topology(topo)
    assert message in str(e.value)
