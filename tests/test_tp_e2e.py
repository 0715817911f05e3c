"""Tensor parallelism end to end: `disaggctl up` of PD deployments whose servers run several CPU ranks
(gloo), prefill and decode with the same or different tp, KV through Mooncake TCP; output against
`transformers` and a colocated tp-1 server; `down` of every rank; a rank killed mid-request."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
from conftest import wait_for
from hf_reference import hf_greedy
from test_pd_e2e import (  # noqa: F401  (model_dir: the random Qwen2 fixture, 4 heads, 2 KV heads)
    CHUNK,
    HTTP_TIMEOUT_S,
    PAGE_SIZE,
    Deployment,
    free_block,
    get_json,
    greedy,
    metrics,
    model_dir,
    post,
    prompt,
    serve_colocated,
)

pytestmark = pytest.mark.slow

RANK_MODULE = "disaggctl.runtime.tp_worker"
# one token, a partial page, several pages and prefill chunks (PAGE_SIZE 4, CHUNK 8)
CASES = [(1, 6), (6, 9), (19, 7), (41, 12)]


class TpDeployment(Deployment):
    """One prefill and one decode with the given tp each, on CPU ranks."""

    def __init__(self, cli, home: Path, tmp: Path, model: str, prefill_tp: int, decode_tp: int):
        super().__init__(cli, home, tmp, model, 1, 1)
        self.tp = {"prefill-0": prefill_tp, "decode-0": decode_tp, "proxy": 1}
        self.file = tmp / f"tp-{prefill_tp}-{decode_tp}.yaml"
        self.file.write_text(
            f"""\
name: tp{prefill_tp}-{decode_tp}
model: {{path: {json.dumps(model)}}}
hosts:
  - {{name: local, address: 127.0.0.1, gpus: 0, python: {json.dumps(sys.executable)}}}
transfer: {{protocol: tcp, timeout_s: 10}}
prefill: {{tp: {prefill_tp}, port: {free_block(1)}, bootstrap_port: {free_block(1)},
          page_size: {PAGE_SIZE}, chunk_size: {CHUNK}}}
decode: {{tp: {decode_tp}, port: {free_block(1)}, page_size: {PAGE_SIZE}}}
proxy: {{host: local, port: {self.proxy.rsplit(":", 1)[1]}, policy: round_robin}}
"""
        )

    def ranks(self, name: str) -> list[psutil.Process]:
        """Ranks 1..tp-1 of a server: its children running the rank module."""
        server = psutil.Process(int(self.procs[name]["pid"]))
        return [c for c in server.children() if RANK_MODULE in " ".join(c.cmdline())]


@pytest.fixture
def deploy_tp(cli, tmp_path, model_dir):  # noqa: F811
    made: list[TpDeployment] = []

    def make(prefill_tp: int, decode_tp: int) -> TpDeployment:
        home = tmp_path / f"home{len(made)}"
        home.mkdir()
        d = TpDeployment(cli, home, tmp_path, model_dir, prefill_tp, decode_tp)
        made.append(d)
        d.up()
        return d

    yield make
    for d in made:
        d.down()


@pytest.fixture(scope="module")
def expected(model_dir):  # noqa: F811
    """(prompt, new tokens, greedy ids) per case: transformers' answer, which a colocated tp-1 server
    must give too."""
    cases = [(prompt(n, seed), m) for seed, (n, m) in enumerate(CASES)]
    colo, url = serve_colocated(model_dir)
    try:
        got = [post(url + "/generate", greedy(ids, m)) for ids, m in cases]
    finally:
        colo.terminate()
        colo.wait(30)
    out = []
    for (ids, m), (status, body) in zip(cases, got, strict=True):
        want = hf_greedy(model_dir, ids, m)
        assert status == 200, body
        assert body["output_ids"] == want, f"colocated tp 1 differs from transformers for {len(ids)} tokens"
        out.append((ids, m, want))
    return out


def alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def processes_of(model: str) -> list[str]:
    """Command lines of live processes that run `model` (servers and their ranks)."""
    paths = {model, str(Path(model).resolve())}
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "disaggctl" in cmd and any(path in cmd for path in paths) and alive(p):
            found.append(cmd)
    return found


@pytest.mark.parametrize("shape", [(2, 1), (1, 2), (2, 2)], ids=["p2-d1", "p1-d2", "p2-d2"])
def test_tp_pd_greedy_equals_transformers_and_colocated(deploy_tp, model_dir, expected, shape):  # noqa: F811
    d = deploy_tp(*shape)
    ranks = {name: d.ranks(name) for name in ("prefill-0", "decode-0")}
    assert [len(ranks["prefill-0"]) + 1, len(ranks["decode-0"]) + 1] == list(shape)
    with ThreadPoolExecutor(len(expected)) as pool:
        got = list(pool.map(lambda c: post(d.proxy + "/generate", greedy(c[0], c[1])), expected))
    for (ids, _, want), (status, body) in zip(expected, got, strict=True):
        assert status == 200, f"{body}\n{d.logs()}"
        assert body["output_ids"] == want, (
            f"prefill tp {shape[0]} / decode tp {shape[1]} differ for {len(ids)} tokens"
        )
    for name in ("prefill-0", "decode-0"):
        m = metrics(d.url(name))
        assert m["request_success_total"] == len(expected) and m["kv_pages_used"] == 0, name

    d.down()
    assert not [p for rs in ranks.values() for p in rs if alive(p)], "a rank outlived down"
    assert not processes_of(model_dir)
    assert {name: p["tp"] for name, p in d.procs.items()} == d.tp


def test_a_decode_rank_killed_mid_request_fails_the_request_and_its_server(deploy_tp):
    d = deploy_tp(1, 2)
    decode = psutil.Process(int(d.procs["decode-0"]["pid"]))
    with ThreadPoolExecutor(1) as pool:
        victim = pool.submit(post, d.proxy + "/generate", greedy(prompt(20, 1), 900))
        wait_for(lambda: metrics(d.url("decode-0"))["num_requests_running"] >= 1, 60, "the request to decode")
        (rank1,) = d.ranks("decode-0")
        t0 = time.monotonic()
        os.kill(rank1.pid, signal.SIGKILL)
        status, body = victim.result(timeout=HTTP_TIMEOUT_S)
        elapsed = time.monotonic() - t0
    assert status != 200 or "error" in body, body
    assert elapsed < 30, elapsed
    wait_for(lambda: not alive(decode), 30, "the decode server to exit")
    wait_for(
        lambda: any(
            w["url"] == d.url("decode-0") and not w["healthy"]
            for w in get_json(d.proxy + "/workers")[1]["workers"]
        ),
        20,
        "the proxy to mark the decode unhealthy",
    )
    res = d.run("status", "--json")
    assert res.returncode == 3, res.stdout
    state = {p["name"]: p for p in json.loads(res.stdout)["processes"]}
    assert state["decode-0"]["alive"] is False and state["prefill-0"]["healthy"] is True
    wait_for(lambda: metrics(d.url("prefill-0"))["kv_pages_used"] == 0, 20, "the prefill's pages back")
