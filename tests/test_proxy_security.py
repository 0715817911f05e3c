"""What the proxy guarantees its workers and its clients (issue #16): every request to a worker carries the
deployment key's proof over exactly what is sent, PD mode refuses to run without the key, request bodies
are bounded (size, nesting, numbers) with 4xx answers, and a worker that goes silent or stops answering
health checks cannot hold a request for the whole request timeout.

Same set-up as test_proxy.py: the proxy in a subprocess, aiohttp backends in the test process; a backend
that must be SIGSTOPped runs in a process of its own."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from aiohttp import web
from conftest import free_port, wait_for
from test_proxy import (
    KEY,
    Backend,
    eventually,
    hold,
    hold_stream,
    pd,
    post,
    proxy_env,
    read_event,
    run,
    running,
    workers_of,
)

from disaggctl.trust import ENV_FILE, ENV_HEX, HEADER, AuthError, DeploymentKey

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

GENERATE = ("/generate", "/v1/completions", "/v1/chat/completions")
# What a client may try to smuggle through the proxy: its own bootstrap fields and its own proof.
FORGED = {"bootstrap_host": "203.0.113.9", "bootstrap_port": 1, "bootstrap_room": 7}
FORGED_PROOF = {HEADER: DeploymentKey.generate().sign("POST", "/generate", b"{}")}


async def metrics_of(session, proxy) -> str:
    async with session.get(proxy.url + "/metrics") as r:
        return await r.text()


# ---- the deployment key ----


@pytest.mark.parametrize("how", ["hex", "file"])
def test_pd_requests_carry_a_proof_of_the_exact_bytes_and_path(how, tmp_path):
    p, d = Backend("p", key=KEY), Backend("d", key=KEY)  # both refuse, with 401, what does not verify
    key_env = KEY.env(KEY.write(tmp_path / "secret")) if how == "file" else KEY.env()

    async def scenario():
        async with running([p, d], pd([p], [d]), key_env=key_env) as (session, proxy):
            for path in GENERATE:
                body = {"text": "hi", "rid": path, **FORGED}
                async with session.post(proxy.url + path, json=body, headers=FORGED_PROOF) as r:
                    assert r.status == 200, await r.text()
        assert p.refused == d.refused == []
        for b in (p, d):
            assert b.paths == list(GENERATE)
            for path, raw, proof, body in zip(b.paths, b.raws, b.proofs, b.bodies, strict=True):
                KEY.verify("POST", path, raw, proof)  # what a runtime worker checks
                assert proof != FORGED_PROOF[HEADER]
                assert body["bootstrap_host"] == "127.0.0.1" and body["bootstrap_port"] == 9001
                assert body["bootstrap_room"] != FORGED["bootstrap_room"]
                # The proof is bound to this key, these bytes and this path: any change is detected.
                with pytest.raises(AuthError, match="does not match"):
                    DeploymentKey.generate().verify("POST", path, raw, proof)
                with pytest.raises(AuthError, match="does not match"):
                    KEY.verify("POST", path, raw.replace(b'"hi"', b'"ho"'), proof)
                with pytest.raises(AuthError, match="does not match"):
                    KEY.verify("POST", "/generate?x=1", raw, proof)

    run(scenario)


def test_workers_refuse_a_proxy_with_another_deployments_key():
    p, d = Backend("p", key=KEY), Backend("d", key=KEY)

    async def scenario():
        other = DeploymentKey.generate()
        async with running([p, d], pd([p], [d]), key_env=other.env()) as (session, proxy):
            for stream in (False, True):
                status, raw = await post(session, proxy.url + "/generate", {"text": "hi", "stream": stream})
                err = json.loads(raw)["error"]
                # Not the client's fault: a 502 that names the cause, not the workers' 401.
                assert status == 502 and err["code"] == 502, raw
                assert (
                    "refused the proxy's proof" in err["message"]
                    and "same deployment secret" in err["message"]
                )
            seen = await workers_of(session, proxy)
        # At least one refusal per request (the proxy stops asking the other worker once one refused).
        assert len(p.refused) + len(d.refused) >= 2
        assert all("does not match" in why for why in p.refused + d.refused)
        assert seen[p.url]["healthy"] and seen[d.url]["healthy"]

    run(scenario)


@pytest.mark.parametrize("with_key", [False, True])
def test_colocated_never_forwards_client_bootstrap_fields_or_proofs(with_key):
    w = Backend("w")

    async def scenario():
        key_env = KEY.env() if with_key else {}
        async with running([w], lambda: ["--worker", w.url], key_env=key_env) as (session, proxy):
            body = {"text": "hi", **FORGED}
            async with session.post(proxy.url + "/generate", json=body, headers=FORGED_PROOF) as r:
                assert r.status == 200, await r.text()
        assert w.bodies == [{"text": "hi"}]
        if with_key:  # signed anyway: harmless, and the body it vouches for has no bootstrap fields
            KEY.verify("POST", "/generate", w.raws[0], w.proofs[0])
        else:  # an absent proof is what a verifying worker detects
            assert w.proofs == [None]
            with pytest.raises(AuthError, match="no X-Disaggctl-Auth header"):
                KEY.verify("POST", "/generate", w.raws[0], w.proofs[0])

    run(scenario)


def _secret_file(tmp_path, mode: int) -> str:
    path = tmp_path / "secret"
    KEY.write(path)
    path.chmod(mode)
    return str(path)


@pytest.mark.parametrize(
    "key_env, message",
    [
        (lambda tmp: {}, "`disaggctl up` provides it"),
        (lambda tmp: {ENV_HEX: "not hex"}, "not valid hex"),
        (lambda tmp: {ENV_HEX: "00ff"}, "not valid hex of 16+ bytes"),
        (lambda tmp: {ENV_FILE: str(tmp / "missing")}, "cannot read the deployment secret"),
        (lambda tmp: {ENV_FILE: _secret_file(tmp, 0o644)}, "readable by others"),
    ],
)
def test_pd_proxy_refuses_to_start_without_a_usable_key(key_env, message, tmp_path):
    argv = ["--prefill", "http://127.0.0.1:1", "--bootstrap-port", "9", "--decode", "http://127.0.0.1:2"]
    r = subprocess.run(
        [sys.executable, "-m", "disaggctl", "serve", "proxy", "--port", str(free_port()), *argv],
        capture_output=True,
        text=True,
        timeout=30,
        env=proxy_env(key_env(tmp_path)),
    )
    assert r.returncode == 2, r
    assert message in r.stderr and "Traceback" not in r.stderr, r.stderr
    if not key_env(tmp_path):
        assert ENV_HEX in r.stderr  # how to give it one for a deployment started by hand


# ---- request bodies ----


def _body_of_size(n: int) -> bytes:
    head = b'{"text": "'
    tail = b'"}'
    return head + b"x" * (n - len(head) - len(tail)) + tail


async def _chunked(data: bytes):
    for i in range(0, len(data), 300):
        yield data[i : i + 300]


def test_oversized_bodies_get_413_with_a_json_error():
    w = Backend("w")

    async def scenario():
        async with running([w], lambda: ["--worker", w.url, "--max-body-bytes", "1000"]) as (session, proxy):
            status, raw = await post(session, proxy.url + "/generate", None, raw=_body_of_size(1000))
            assert status == 200, raw  # the limit itself is allowed
            for data in (_body_of_size(1001), _chunked(_body_of_size(1001))):  # with and without a length
                async with session.post(proxy.url + "/v1/completions", data=data) as r:
                    status, body = r.status, await r.json()
                assert status == 413, body
                assert body["error"]["code"] == 413 and body["error"]["type"] == "invalid_request_error"
                assert "more than 1000 bytes" in body["error"]["message"]
            text = await metrics_of(session, proxy)
        assert len(w.bodies) == 1
        assert 'disaggctl_proxy_rejected_requests_total{reason="too_large"} 2' in text
        assert 'disaggctl_proxy_requests_total{path="/v1/completions",status="413"} 2' in text

    run(scenario)


def test_default_body_limit_is_4_mib():
    w = Backend("w")

    async def scenario():
        async with running([w], lambda: ["--worker", w.url]) as (session, proxy):
            status, raw = await post(session, proxy.url + "/generate", None, raw=_body_of_size(4 * 2**20 + 1))
        assert status == 413 and f"more than {4 * 2**20} bytes" in json.loads(raw)["error"]["message"]
        assert w.bodies == []

    run(scenario)


def _nested(depth: int) -> bytes:
    """A request whose field nests arrays so that the whole body is `depth` levels deep."""
    return b'{"text": "hi", "x": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"


def test_deeply_nested_json_is_a_400_not_a_recursion_error():
    p, d = Backend("p"), Backend("d")

    async def scenario():
        async with running([p, d], pd([p], [d])) as (session, proxy):
            for raw in (b"[" * 100_000, b'{"a": ' * 100_000, _nested(65), _nested(100_000)):
                status, body = await post(session, proxy.url + "/generate", None, raw=raw)
                assert status == 400, body
                assert "nested too deeply (at most 64 levels" in json.loads(body)["error"]["message"]
            status, body = await post(session, proxy.url + "/generate", None, raw=_nested(64))
            assert status == 200, body
            text = await metrics_of(session, proxy)
        assert len(d.bodies) == 1 and d.bodies[0]["x"] == json.loads(_nested(64))["x"]
        assert 'disaggctl_proxy_rejected_requests_total{reason="too_deep"} 4' in text

    run(scenario)


MALFORMED = [
    (b"", "not valid JSON"),
    (b"   ", "not valid JSON"),
    (b"\xff\xfe{}", "not UTF-8"),
    ('{"text": "hi"}'.encode("utf-16"), "not UTF-8"),
    (b'\xef\xbb\xbf{"text": "hi"}', "not valid JSON"),
    (b'{"text": "hi"} {}', "not valid JSON"),
    (b'{"text": NaN}', "numbers must be finite"),
    (b'{"text": "hi", "sampling_params": {"temperature": Infinity}}', "numbers must be finite"),
    (b'{"text": "hi", "x": -Infinity}', "numbers must be finite"),
    (b'{"text": "hi", "x": 1e999}', "numbers must be finite"),
    (b'{"text": "hi", "x": -1e999}', "numbers must be finite"),
    (b'{"text": "hi", "x": ' + b"9" * 100_000 + b"}", "an integer of 100000 digits is out of range"),
    (b'{"text": "hi", "x": -' + b"9" * 4301 + b"}", "an integer of 4301 digits is out of range"),
    (b"[]", "must be a JSON object"),
    (b'"text"', "must be a JSON object"),
    (b"null", "must be a JSON object"),
    (b"12", "must be a JSON object"),
    (b'"' + b"[" * 1000 + b'"', "must be a JSON object"),
    (b'{"text": "hi", "stream": 1}', "'stream' must be true or false"),
    (b'{"text": "hi", "stream": null}', "'stream' must be true or false"),
]
# Odd but valid JSON: the proxy passes it on (the worker judges it), it does not fail on it.
ODD_BUT_VALID = [
    b'{"text": "\\ud800"}',
    b'{"text": "a", "text": "b"}',
    b'{"text": "hi", "x": 1e308, "y": -0.0, "z": 123456789012345678901234567890}',
    b'{"text": "hi", "x": ' + b"9" * 4300 + b"}",
    b'{"text": "hi", "x": "' + b"[{" * 1000 + b'"}',
]


def test_malformed_bodies_are_4xx_never_5xx():
    p, d = Backend("p"), Backend("d")

    async def scenario():
        async with running([p, d], pd([p], [d])) as (session, proxy):
            for raw, why in MALFORMED:
                status, body = await post(session, proxy.url + "/generate", None, raw=raw)
                assert status == 400, (raw[:40], body)
                assert why in json.loads(body)["error"]["message"], (raw[:40], body)
            for raw in ODD_BUT_VALID:
                status, body = await post(session, proxy.url + "/generate", None, raw=raw)
                assert status == 200, (raw[:40], body)
            text = await metrics_of(session, proxy)
        assert len(d.bodies) >= len(ODD_BUT_VALID)
        bad_fields = sum(1 for _, why in MALFORMED if "JSON object" in why or "'stream'" in why)
        assert f'disaggctl_proxy_rejected_requests_total{{reason="bad_fields"}} {bad_fields}' in text
        assert 'status="500"' not in text

    run(scenario)


# ---- silent and stopped workers ----


@pytest.mark.parametrize("mode", ["pd", "colocated"])
def test_a_stream_that_goes_silent_ends_with_an_error_event_after_read_timeout(mode):
    p, d = Backend("p"), Backend("d", hold_stream)  # d: one event, then nothing for 30 s

    async def scenario():
        backends, argv = ([p, d], pd([p], [d])) if mode == "pd" else ([d], lambda: ["--worker", d.url])
        role = "decode" if mode == "pd" else "colocated"
        async with running(backends, lambda: [*argv(), "--read-timeout", "1"]) as (session, proxy):
            async with session.post(proxy.url + "/generate", json={"text": "hi", "stream": True}) as resp:
                assert resp.status == 200
                first = await read_event(resp)
                t0 = time.monotonic()
                error = await read_event(resp, timeout_s=15)
                silent_s = time.monotonic() - t0
                done = await read_event(resp)
                rest = await asyncio.wait_for(resp.content.read(), 5)
            assert first == b'data: {"text": "", "output_ids": []}\n\n'
            err = json.loads(error[len(b"data: ") :])["error"]
            assert err["code"] == 502 and d.url in err["message"] and "--read-timeout" in err["message"], err
            assert 0.9 <= silent_s < 10, silent_s  # cut by the read timeout, far before the 30 s hold
            assert done == b"data: [DONE]\n\n" and rest == b""
            await eventually(lambda: _true(len(d.cancelled) == 1), 5, "the silent request closed upstream")
            text = await metrics_of(session, proxy)
        assert f'disaggctl_proxy_worker_read_timeouts_total{{url="{d.url}",role="{role}"}} 1' in text

    run(scenario)


def test_a_stream_silent_before_its_first_byte_is_a_502():
    p, d = Backend("p"), Backend("d", hold)  # d sends not even its headers for 30 s

    async def scenario():
        async with running([p, d], lambda: [*pd([p], [d])(), "--read-timeout", "1"]) as (session, proxy):
            status, raw = await post(session, proxy.url + "/generate", {"text": "hi", "stream": True})
            err = json.loads(raw)["error"]
            assert status == 502 and d.url in err["message"] and "--read-timeout" in err["message"], raw
            await eventually(lambda: _true(len(d.cancelled) == 1), 5, "the silent request closed upstream")

    run(scenario)


def test_a_slow_non_streamed_answer_is_not_cut_by_read_timeout():
    async def slow(b, request, body):
        await asyncio.sleep(2.5)
        return web.json_response({"text": "worth the wait"})

    p, d = Backend("p"), Backend("d", slow)

    async def scenario():
        async with running([p, d], lambda: [*pd([p], [d])(), "--read-timeout", "1"]) as (session, proxy):
            status, raw = await post(session, proxy.url + "/generate", {"text": "hi"})
            assert status == 200 and json.loads(raw)["text"] == "worth the wait", raw
            seen = await workers_of(session, proxy)
        assert seen[d.url]["read_timeouts"] == 0 and seen[d.url]["failures"] == 0

    run(scenario)


async def _true(v: bool) -> bool:
    return v


# A worker in a process of its own, so that the test can SIGSTOP it: it answers /health, says on stdout
# when a request arrived, and then holds it (streamed: after one event).
STOPPABLE_WORKER = r"""
import asyncio, sys
from aiohttp import web

async def health(request):
    return web.json_response({"status": "ok"})

async def generate(request):
    body = await request.json()
    if body.get("stream"):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"text": "", "output_ids": []}\n\n')
    print("got", body.get("bootstrap_room"), flush=True)
    await asyncio.sleep(600)

app = web.Application()
app.router.add_get("/health", health)
app.router.add_post("/generate", generate)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None, shutdown_timeout=1)
"""


class StoppableWorker:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", STOPPABLE_WORKER, str(self.port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=proxy_env({}),
        )
        self.lines: queue.Queue[bytes] = queue.Queue()
        # A daemon thread, not the event loop's executor: a read that never returns must not keep the
        # test's event loop from closing.
        threading.Thread(target=self._read_lines, daemon=True).start()

    def _read_lines(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)

    def healthy(self) -> bool:
        assert self.proc.poll() is None, "the stoppable worker exited"
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    async def received(self) -> str:
        """The next line the worker prints (one per request it got)."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                return self.lines.get_nowait().decode()
            except queue.Empty:
                await asyncio.sleep(0.05)
        raise AssertionError("the stoppable worker got no request within 10 s")

    def close(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)  # a stopped process does not act on SIGTERM
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def stoppable_worker():
    w = StoppableWorker()
    try:
        wait_for(w.healthy, 20, "the stoppable worker to answer /health")
        yield w
    finally:
        w.close()


@pytest.mark.parametrize("stream", [False, True])
def test_a_decode_that_stops_answering_health_has_its_requests_ended(stream, stoppable_worker):
    p, d = Backend("p"), stoppable_worker

    async def ask(session, proxy) -> tuple[int, list[bytes], dict]:
        """Status, the stream's events (streamed), and the error the request ended with."""
        async with session.post(proxy.url + "/generate", json={"text": "hi", "stream": stream}) as resp:
            if not stream:
                return resp.status, [], (await resp.json())["error"]
            # The worker's one event, then the proxy's error event and [DONE].
            events = [await read_event(resp, timeout_s=30) for _ in range(3)]
            return resp.status, events, json.loads(events[1][len(b"data: ") :])["error"]

    async def scenario():
        # Both timeouts far beyond the test: only the health checks can end the request.
        argv = [
            "--bootstrap-port",
            "9001",
            "--decode",
            d.url,
            "--request-timeout",
            "300",
            "--read-timeout",
            "300",
        ]
        async with running([p], lambda: ["--prefill", p.url, *argv]) as (session, proxy):
            request = asyncio.create_task(ask(session, proxy))
            assert (await d.received()).startswith("got ")
            os.kill(d.proc.pid, signal.SIGSTOP)
            t0 = time.monotonic()
            status, events, err = await asyncio.wait_for(request, 30)
            ended_s = time.monotonic() - t0
            text = await metrics_of(session, proxy)
            seen = await workers_of(session, proxy)
        if stream:
            assert status == 200 and len(events) == 3, events
            assert events[0] == b'data: {"text": "", "output_ids": []}\n\n'
            assert events[2] == b"data: [DONE]\n\n"
        else:
            assert status == 502, err
        assert err["code"] == 502
        assert f"decode {d.url} stopped answering health checks" in err["message"], err
        assert ended_s < 30, ended_s  # ended by the probes, not by the 300 s timeouts
        assert f'disaggctl_proxy_worker_lost_requests_total{{url="{d.url}",role="decode"}} 1' in text
        assert not seen[d.url]["healthy"] and seen[d.url]["in_flight"] == 0

    run(scenario)


@pytest.mark.parametrize("role", ["prefill", "decode", "encoder"])
def test_servers_with_internal_endpoints_refuse_to_start_without_the_key(role, tmp_path):
    argv = [
        sys.executable,
        "-m",
        "disaggctl",
        "serve",
        role,
        "--model",
        "builtin:tiny",
        "--port",
        str(free_port()),
    ]
    argv += {"prefill": ["--bootstrap-port", str(free_port())], "decode": [], "encoder": []}[role]
    env = {k: v for k, v in os.environ.items() if k not in (ENV_FILE, ENV_HEX)}
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 2, r
    assert "needs the deployment secret" in r.stderr and "Traceback" not in r.stderr, r.stderr
