"""The attacks of a security review, replayed against a live 1P1D deployment (`disaggctl up`, Mooncake TCP on
loopback): each must be refused or bounded while a victim's greedy output stays equal to transformers and
every worker's `/health` keeps answering within a second (docs/security.md)."""

from __future__ import annotations

import json
import os
import random
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
from conftest import wait_for
from hf_reference import hf_greedy
from test_pd_e2e import Deployment, greedy, metrics, model_dir, post, prompt  # noqa: F401

from disaggctl.runtime.protocol import MAX_STOP_CHARS, MAX_STOP_STRINGS
from disaggctl.trust import HEADER, DeploymentKey

pytestmark = pytest.mark.slow
HEALTH_BOUND_S = 1.0


@pytest.fixture(scope="module")
def pd(model_dir, tmp_path_factory):  # noqa: F811
    tmp = tmp_path_factory.mktemp("security")
    home = tmp / "home"
    home.mkdir()
    d = Deployment([sys.executable, "-m", "disaggctl"], home, tmp, model_dir, 1, 1)
    try:
        d.up()
        yield d
    finally:
        d.down()


def deployment_key(d: Deployment) -> DeploymentKey:
    """The deployment's secret, as only its own processes (and its operator) can read it."""
    (path,) = Path(d.env["DISAGGCTL_HOME"]).rglob("secret")
    return DeploymentKey.read(path)


def raw_post(url: str, data: bytes, headers: dict | None = None, timeout: float = 30) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        body = e.read()
        try:
            return e.code, json.loads(body or b"{}")
        except ValueError:
            return e.code, {"raw": body[:200].decode(errors="replace")}


def signed_get(url: str, path: str, key: DeploymentKey | None) -> tuple[int, bytes, dict]:
    headers = key.headers("GET", path) if key else {}
    req = urllib.request.Request(url + path, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


class Watch:
    """While attacks run: victims through the proxy (each checked against transformers) and every worker's
    /health polled; `check()` fails on a wrong victim, a slow or failed health answer, or a dead process."""

    def __init__(self, d: Deployment, model: str):
        self.d = d
        self.model = model
        self.stop = threading.Event()
        self.health_worst: dict[str, float] = {}
        self.health_failures: list[str] = []
        self.victims: list[tuple[list[int], int, int, dict]] = []
        self.threads = [threading.Thread(target=self._health, daemon=True)]
        self.threads.append(threading.Thread(target=self._victims, daemon=True))

    def __enter__(self) -> Watch:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(120)

    def _health(self) -> None:
        urls = {n: p["url"] for n, p in self.d.procs.items() if p["role"] in ("prefill", "decode")}
        while not self.stop.is_set():
            for name, url in urls.items():
                t0 = time.monotonic()
                try:
                    with urllib.request.urlopen(url + "/health", timeout=5) as r:
                        ok = r.status == 200
                except OSError as e:
                    ok, why = False, str(e)
                took = time.monotonic() - t0
                self.health_worst[name] = max(self.health_worst.get(name, 0.0), took)
                if not ok:
                    self.health_failures.append(f"{name}: {why}")
            time.sleep(0.05)

    def _victims(self) -> None:
        seed = 100
        while not self.stop.is_set():
            ids, n = prompt(37, seed), 60
            self.victims.append((ids, n, *post(self.d.proxy + "/generate", greedy(ids, n))))
            seed += 1

    def check(self) -> None:
        assert self.victims, "no victim request ran during the attack"
        for ids, n, status, body in self.victims:
            assert status == 200, body
            assert body["output_ids"] == hf_greedy(self.model, ids, n), "a victim's output changed"
        assert not self.health_failures, self.health_failures[:5]
        slow = {n: round(t, 3) for n, t in self.health_worst.items() if t > HEALTH_BOUND_S}
        assert not slow, f"/health took longer than {HEALTH_BOUND_S} s: {slow}"
        for name, proc in self.d.procs.items():
            assert psutil.pid_exists(proc["pid"]), f"{name} died"


def test_forged_kv_registration_is_refused_even_with_the_real_session_and_base_pointer(pd, model_dir):  # noqa: F811
    key = deployment_key(pd)
    decode, prefill = pd.url("decode-0"), pd.procs["prefill-0"]
    boot = f"http://127.0.0.1:{prefill['bootstrap_port']}"
    # Without the secret, the decode does not even say where its pool is.
    status, _, _ = signed_get(decode, "/internal/kv_layout", None)
    assert status == 401
    # The attacker is assumed to know it anyway (here: read with the deployment's own key).
    status, raw, headers = signed_get(decode, "/internal/kv_layout", key)
    assert status == 200
    key.verify_answer("/internal/kv_layout", 200, raw, headers.get(HEADER))
    real = json.loads(raw)["ranks"][0]  # rank 0's pool: the session a registration names
    before = metrics(pd.url("prefill-0"))
    with Watch(pd, model_dir) as watch:
        for i in range(40):
            room = random.getrandbits(63)
            body = json.dumps(
                {"session_id": real["session_id"], "layout": real["layout"], "page_ids": [i % 8], "prompt_len": 3}
            ).encode()
            attacker = DeploymentKey(os.urandom(32))  # a proof made with any other secret
            for headers in ({}, attacker.headers("POST", f"/v1/kv/{room}", body)):
                status, answer = raw_post(f"{boot}/v1/kv/{room}", body, headers, timeout=10)
                assert status == 401, answer
            time.sleep(0.02)
    watch.check()
    after = metrics(pd.url("prefill-0"))
    assert after["kv_refused_unauthenticated_total"] - before["kv_refused_unauthenticated_total"] == 80
    assert after["kv_open_rooms"] == 0


def test_decode_refuses_a_client_that_names_a_bootstrap(pd, model_dir):  # noqa: F811
    """A client talking to a decode directly cannot make it call out (SSRF), hand over its session or pool,
    or decode from pages it did not fill."""
    key = deployment_key(pd)
    decode = pd.url("decode-0")
    hits: list[bytes] = []
    trap = socket.socket()
    trap.bind(("127.0.0.1", 0))
    trap.listen(16)
    trap.settimeout(0.2)

    def accept():
        while not stop.is_set():
            try:
                conn, _ = trap.accept()
            except OSError:
                continue
            conn.settimeout(1)
            try:
                hits.append(conn.recv(65536))
            except OSError:
                hits.append(b"")
            conn.close()

    stop = threading.Event()
    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    port = trap.getsockname()[1]
    fields = {"bootstrap_host": "127.0.0.1", "bootstrap_port": port, "bootstrap_room": 12345}
    try:
        with Watch(pd, model_dir) as watch:
            for path, body in (
                ("/generate", greedy(prompt(9, 1), 20, **fields)),
                ("/v1/completions", {"prompt": "hello", "max_tokens": 5, **fields}),
                ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], **fields}),
            ):
                status, answer = post(decode + path, body)
                assert status == 401, answer
            # Even a caller holding the secret cannot point the decode at a bootstrap outside the plan.
            data = json.dumps(greedy(prompt(9, 1), 20, **fields)).encode()
            status, answer = raw_post(decode + "/generate", data, key.headers("POST", "/generate", data))
            assert status == 403 and "not a prefill of this deployment" in answer["error"]["message"]
        watch.check()
    finally:
        stop.set()
        acceptor.join(5)
        trap.close()
    assert hits == [], "the decode connected to an address a client named"
    assert metrics(decode)["kv_pages_used"] == 0


def test_long_stop_strings_are_bounded_and_do_not_stall_the_worker(pd, model_dir):  # noqa: F811
    with Watch(pd, model_dir) as watch:
        huge = {**greedy(prompt(9, 2), 10), "sampling_params": {"max_new_tokens": 10, "stop": ["x" * 20000] * 16}}
        status, answer = post(pd.proxy + "/generate", huge)
        assert status == 400 and "at most" in answer["error"]["message"]
        # The largest allowed set, matched against a long generation: linear work, the loop stays free.
        stops = ["".join(random.Random(i).choice("ab") for _ in range(MAX_STOP_CHARS)) for i in range(16)]
        assert len(stops) == MAX_STOP_STRINGS
        body = {
            "input_ids": prompt(20, 3),
            "sampling_params": {"max_new_tokens": 300, "temperature": 0, "ignore_eos": True, "stop": stops},
        }
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda _: post(pd.proxy + "/generate", body), range(4)))
        assert all(status == 200 for status, _ in results), results
    watch.check()


def test_huge_prompts_are_refused_before_tokenizing(pd, model_dir):  # noqa: F811
    decode = pd.url("decode-0")
    with Watch(pd, model_dir) as watch:
        thirty_mb = json.dumps({"text": "a" * (30 * 1024 * 1024)}).encode()
        for url in (pd.proxy, decode):
            status, answer = raw_post(url + "/generate", thirty_mb, timeout=60)
            assert status == 413, answer
        # Under the body limit, but more bytes than the context can hold as tokens: 400, never tokenized.
        status, answer = post(pd.proxy + "/generate", {"text": "word " * 30000})
        assert status in (400, 413), answer
        status, answer = post(pd.proxy + "/generate", {"text": "ab " * 6000})
        assert status == 400 and "context" in answer["error"]["message"], answer
    watch.check()


def test_registration_flood_without_the_secret_holds_nothing(pd, model_dir):  # noqa: F811
    prefill = pd.procs["prefill-0"]
    boot = f"http://127.0.0.1:{prefill['bootstrap_port']}"
    rss_before = psutil.Process(prefill["pid"]).memory_info().rss
    big = json.dumps({"session_id": "127.0.0.1:1", "page_ids": list(range(400_000))}).encode()
    with Watch(pd, model_dir) as watch:
        with ThreadPoolExecutor(20) as pool:
            results = list(pool.map(lambda i: raw_post(f"{boot}/v1/kv/{i + 1}", big, timeout=30), range(60)))
    watch.check()
    assert all(status in (401, 413) for status, _ in results), {s for s, _ in results}
    assert metrics(pd.url("prefill-0"))["kv_open_rooms"] == 0
    grown = psutil.Process(prefill["pid"]).memory_info().rss - rss_before
    assert grown < 100 * 1024 * 1024, f"prefill grew by {grown >> 20} MB under a refused flood"


def test_clients_that_disconnect_early_leave_no_quarantined_pages(pd, model_dir):  # noqa: F811
    host, port = pd.proxy.removeprefix("http://").split(":")

    def hang_up(i: int) -> None:
        body = json.dumps(greedy(prompt(30, 1000 + i), 50)).encode()
        head = f"POST /generate HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        head += f"Content-Length: {len(body)}\r\n\r\n"
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(head.encode() + body)
            time.sleep(random.Random(i).uniform(0.0, 0.3))

    decode = pd.url("decode-0")
    with Watch(pd, model_dir) as watch:
        with ThreadPoolExecutor(40) as pool:
            list(pool.map(hang_up, range(400)))

        def settled():
            m = metrics(decode)
            return m["in_flight_requests"] == 0 and m["num_requests_waiting"] == 0 and m
        wait_for(settled, 120, "the decode to drop the abandoned requests")
    watch.check()
    m = metrics(decode)
    # Abandoned hand-offs were ended with the prefill, not parked for the quarantine period.
    assert m["kv_pages_quarantined"] == 0 and m["kv_pages_used"] == 0, m
    t0 = time.monotonic()
    ids = prompt(40, 77)
    status, body = post(pd.proxy + "/generate", greedy(ids, 8), timeout=60)
    assert status == 200 and body["output_ids"] == hf_greedy(model_dir, ids, 8)
    assert time.monotonic() - t0 < 20, "a normal request waited for pages after the flood"
