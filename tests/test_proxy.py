"""The proxy as users run it (`python -m disaggctl serve proxy ...` in a subprocess) in front of small real
aiohttp backends in the test process, which record what they receive and answer as told.

The proxy gets a deployment key (DISAGGCTL_SECRET) as `disaggctl up` would give it one: PD mode needs it.
Bounds, proofs and timeouts are tested in test_proxy_security.py, on the helpers of this module."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from conftest import free_port

from disaggctl.trust import ENV_FILE, ENV_HEX, HEADER, AuthError, DeploymentKey

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

TIMEOUT = aiohttp.ClientTimeout(total=15)
KEY = DeploymentKey.generate()  # the deployment key of every proxy and verifying backend here
BOOTSTRAP_FIELDS = ("bootstrap_host", "bootstrap_port", "bootstrap_room")


class Backend:
    """An aiohttp server standing in for a runtime server.

    `on_generate(backend, request, body)` answers the generation routes (default: JSON naming the backend).
    Handlers are cancelled when their client disconnects, as with a runtime server that aborts a request
    whose client went away; `cancelled` records the rooms (or rids) of the requests that ended that way.
    With `key`, a request with bootstrap fields must prove itself with that key, or gets the 401 a
    runtime worker gives (`refused` records why).
    """

    def __init__(
        self,
        name: str,
        on_generate: Callable[..., Awaitable[web.StreamResponse]] | None = None,
        key: DeploymentKey | None = None,
    ):
        self.name = name
        self.on_generate = on_generate or answer_json
        self.key = key
        self.bodies: list[dict] = []
        self.paths: list[str] = []  # path and query, as received
        self.raws: list[bytes] = []
        self.proofs: list[str | None] = []  # the HEADER of each request, None when absent
        self.refused: list[str] = []
        self.cancelled: list[object] = []
        self.cancelled_at: list[float] = []
        self.gate = asyncio.Semaphore(0)
        self.runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> Backend:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        for path in ("/generate", "/v1/completions", "/v1/chat/completions"):
            app.router.add_post(path, self._generate)
        self.runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", port)
        await site.start()
        self.port = self.runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def _health(self, request):
        return web.json_response({"status": "ok"})

    async def _models(self, request):
        return web.json_response({"object": "list", "data": [{"id": f"model-of-{self.name}"}]})

    async def _generate(self, request):
        raw = await request.read()
        body = json.loads(raw)
        self.bodies.append(body)
        self.paths.append(request.path_qs)
        self.raws.append(raw)
        self.proofs.append(request.headers.get(HEADER))
        if self.key is not None and any(k in body for k in BOOTSTRAP_FIELDS):
            try:
                self.key.verify("POST", request.path_qs, raw, request.headers.get(HEADER))
            except AuthError as e:
                self.refused.append(str(e))
                return web.json_response(
                    {"error": {"message": str(e), "type": "auth", "code": 401}}, status=401
                )
        try:
            return await self.on_generate(self, request, body)
        except asyncio.CancelledError:
            self.cancelled.append(body.get("bootstrap_room", body.get("rid")))
            self.cancelled_at.append(time.monotonic())
            raise


async def answer_json(b: Backend, request, body):
    return web.json_response({"text": f"from {b.name}", "echo": body})


async def sse_events(b: Backend, request, events: list[bytes]) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for e in events:
        await resp.write(e)
    await resp.write_eof()
    return resp


def proxy_env(key_env: dict[str, str] | None) -> dict[str, str]:
    """This environment with the deployment key given by `key_env` only (none when None)."""
    env = {k: v for k, v in os.environ.items() if k not in (ENV_FILE, ENV_HEX)}
    return {**env, **(key_env or {})}


class Proxy:
    def __init__(self, *args: str, key_env: dict[str, str] | None = None):
        """`key_env`: how the proxy gets its deployment key (default: KEY as hex; {} for none)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "disaggctl", "serve", "proxy", "--port", str(self.port), *args]
        env = proxy_env(KEY.env() if key_env is None else key_env)
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)

    async def wait_up(self, session: aiohttp.ClientSession) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"proxy exited: {self.proc.stdout.read().decode()}")
            try:
                async with session.get(self.url + "/health", timeout=aiohttp.ClientTimeout(total=1)) as r:
                    if r.status == 200:
                        return
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass
            await asyncio.sleep(0.05)
        raise AssertionError("proxy did not answer /health within 20 s")

    def stop(self) -> str:
        self.proc.terminate()
        try:
            out, _ = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return out.decode(errors="replace")


def run(scenario) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 50))


@contextlib.asynccontextmanager
async def running(
    backends: list[Backend], argv: Callable[[], list[str]], key_env: dict[str, str] | None = None
):
    """Start the backends, then the proxy with argv() (called once the backend ports are known); yield a
    client session and the proxy; stop everything afterwards and check the proxy logged no traceback."""
    for b in backends:
        if b.runner is None:
            await b.start()
    proxy = Proxy("--health-interval", "0.2", *argv(), key_env=key_env)
    try:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            await proxy.wait_up(session)
            yield session, proxy
    finally:
        log = proxy.stop()
        for b in backends:
            await b.stop()
    assert "Traceback" not in log, log


def pd(prefills: list[Backend], decodes: list[Backend], first_bootstrap_port: int = 9001):
    def argv() -> list[str]:
        out = []
        for i, b in enumerate(prefills):
            out += ["--prefill", b.url, "--bootstrap-port", str(first_bootstrap_port + i)]
        for b in decodes:
            out += ["--decode", b.url]
        return out

    return argv


async def post(session, url, body, raw: bytes | None = None, timeout: float | None = None):
    data = raw if raw is not None else json.dumps(body).encode()
    kw = {"timeout": aiohttp.ClientTimeout(total=timeout)} if timeout else {}
    async with session.post(url, data=data, headers={"Content-Type": "application/json"}, **kw) as r:
        return r.status, await r.read()


async def workers_of(session, proxy) -> dict[str, dict]:
    async with session.get(proxy.url + "/workers") as r:
        return {w["url"]: w for w in (await r.json())["workers"]}


async def eventually(cond, timeout_s: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not await cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout_s} s")
        await asyncio.sleep(0.05)


# ---- PD ----


def test_pd_sends_the_same_bootstrap_fields_to_both_and_returns_decode_answer():
    prefills = [Backend("p0"), Backend("p1")]
    decodes = [Backend("d0"), Backend("d1")]

    async def scenario():
        async with running(prefills + decodes, pd(prefills, decodes)) as (session, proxy):
            paths = ["/generate", "/v1/completions", "/v1/chat/completions"] * 4
            sent = [
                {"text": f"prompt {i}", "sampling_params": {"max_new_tokens": 3}, "rid": f"r{i}"}
                for i in range(len(paths))
            ]
            answers = await asyncio.gather(
                *(post(session, proxy.url + p, b) for p, b in zip(paths, sent, strict=True))
            )
            seen = await workers_of(session, proxy)
        assert all(status == 200 for status, _ in answers)
        rooms = []
        for (_, raw), body in zip(answers, sent, strict=True):
            ans = json.loads(raw)
            assert ans["text"] in ("from d0", "from d1")  # the client gets D's answer
            echo = ans["echo"]
            assert {k: echo[k] for k in body} == body  # the client's fields arrive untouched
            rooms.append(echo["bootstrap_room"])
        assert len(set(rooms)) == len(rooms)
        assert all(isinstance(r, int) and 0 <= r < 2**63 for r in rooms)
        for port, p in zip((9001, 9002), prefills, strict=True):
            for pb in p.bodies:
                assert pb["bootstrap_host"] == "127.0.0.1" and pb["bootstrap_port"] == port
        by_room_p = {b["bootstrap_room"]: b for p in prefills for b in p.bodies}
        by_room_d = {b["bootstrap_room"]: b for d in decodes for b in d.bodies}
        assert set(by_room_p) == set(by_room_d) == set(rooms)
        for room in rooms:
            assert by_room_p[room] == by_room_d[room]  # the same body, room included, to P and D
        # Round robin per pool: each of two workers got half, on the client's own path.
        assert [len(w.bodies) for w in prefills + decodes] == [6, 6, 6, 6]
        assert sorted(p for w in decodes for p in w.paths) == sorted(paths)
        assert all(seen[w.url]["served"] == 6 and seen[w.url]["in_flight"] == 0 for w in prefills + decodes)

    run(scenario)


def stream_events() -> list[bytes]:
    events = [b'data: {"text": "%d", "output_ids": [%d]}\n\n' % (i, i) for i in range(4)]
    events.append(b'data: {"text": "' + b"x" * 100_000 + b'"}\n\n')  # bigger than one socket read
    events.append(b"data: [DONE]\n\n")
    return events


async def gated_stream(b: Backend, request, body):
    """Write one event, then wait until the test has seen it before producing the next: if anything between
    the backend and the client held a chunk back, the gate would never open."""
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for i, e in enumerate(stream_events()):
        if i == 2:
            # One event in two writes: the proxy may deliver it only once it is whole.
            await resp.write(e[:10])
            await asyncio.sleep(0.05)
            await resp.write(e[10:])
        else:
            await resp.write(e)
        await asyncio.wait_for(b.gate.acquire(), 5)
    await resp.write_eof()
    return resp


async def read_event(resp: aiohttp.ClientResponse, timeout_s: float = 5.0) -> bytes:
    out = b""
    while not out.endswith(b"\n\n"):
        line = await asyncio.wait_for(resp.content.readline(), timeout_s)
        if not line:
            break
        out += line
    return out


@pytest.mark.parametrize("mode", ["pd", "colocated"])
def test_streams_are_passed_through_event_by_event_and_byte_exact(mode):
    async def answer_prefill(b, request, body):
        return await sse_events(b, request, [b'data: {"text": ""}\n\n', b"data: [DONE]\n\n"])

    p = Backend("p", answer_prefill)
    d = Backend("d", gated_stream)

    async def scenario():
        if mode == "pd":
            backends, argv = [p, d], pd([p], [d])
        else:
            backends, argv = [d], lambda: ["--worker", d.url]
        async with running(backends, argv) as (session, proxy):
            body = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
            async with session.post(proxy.url + "/v1/chat/completions", json=body) as resp:
                assert resp.status == 200
                assert resp.content_type == "text/event-stream"
                got = []
                for _ in stream_events():
                    got.append(await read_event(resp))
                    d.gate.release()
                assert await asyncio.wait_for(resp.content.read(), 5) == b""
        assert got == stream_events()

    run(scenario)


async def fail_after(delay_s: float, status: int, message: str):
    async def handler(b, request, body):
        await asyncio.sleep(delay_s)
        return web.json_response({"error": {"message": message, "type": "x", "code": status}}, status=status)

    return handler


async def hold(b, request, body):
    """A decode waiting for KV that never comes (its own timeout is longer than the test)."""
    await asyncio.sleep(30)
    return web.json_response({"text": "too late"})


async def hold_stream(b, request, body):
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await resp.write(b'data: {"text": "", "output_ids": []}\n\n')
    await asyncio.sleep(30)
    return resp


def test_prefill_error_fails_the_request_promptly_and_aborts_decode():
    async def scenario():
        p = Backend("p", await fail_after(0.3, 500, "KV transfer to decode timed out"))
        d = Backend("d", hold)
        async with running([p, d], pd([p], [d])) as (session, proxy):
            t0 = time.monotonic()
            status, raw = await post(session, proxy.url + "/generate", {"text": "hi"})
            took = time.monotonic() - t0
            err = json.loads(raw)["error"]
            assert status == 502 and took < 3, (status, took)
            assert "KV transfer to decode timed out" in err["message"] and p.url in err["message"]
            room = d.bodies[0]["bootstrap_room"]
            await eventually(lambda: _true(d.cancelled == [room]), 3, "decode request cancelled")
            assert d.cancelled_at[0] - t0 < 3
            seen = await workers_of(session, proxy)
            assert seen[p.url]["failures"] == 1 and seen[d.url]["in_flight"] == 0
            assert seen[p.url]["healthy"]  # it answered: an error about one request, not a dead worker

    run(scenario)


async def _true(v: bool) -> bool:
    return v


def test_prefill_error_mid_stream_ends_the_stream_with_an_error_event():
    async def scenario():
        p = Backend("p", await fail_after(0.5, 503, "prefill out of KV pages"))
        d = Backend("d", hold_stream)
        async with running([p, d], pd([p], [d])) as (session, proxy):
            t0 = time.monotonic()
            async with session.post(proxy.url + "/generate", json={"text": "hi", "stream": True}) as resp:
                assert resp.status == 200
                first = await read_event(resp)
                error = await read_event(resp)
                done = await read_event(resp)
                rest = await asyncio.wait_for(resp.content.read(), 5)
            assert time.monotonic() - t0 < 3
            assert first == b'data: {"text": "", "output_ids": []}\n\n'
            err = json.loads(error[len(b"data: ") :])["error"]
            assert "prefill out of KV pages" in err["message"] and err["code"] == 502
            assert done == b"data: [DONE]\n\n" and rest == b""
            await eventually(lambda: _true(len(d.cancelled) == 1), 3, "decode request cancelled")

    run(scenario)


def test_prefill_dropping_the_connection_is_a_502_and_marks_it_unhealthy():
    async def drop(b, request, body):
        await asyncio.sleep(0.1)
        request.transport.close()
        await asyncio.sleep(5)

    async def scenario():
        p = Backend("p", drop)
        d = Backend("d", hold)
        # A long probe interval, so that the mark seen below comes from the failed request.
        async with running([p, d], lambda: [*pd([p], [d])(), "--health-interval", "30"]) as (session, proxy):
            status, raw = await post(session, proxy.url + "/generate", {"text": "hi"})
            assert status == 502
            assert f"prefill {p.url} failed" in json.loads(raw)["error"]["message"]
            await eventually(lambda: _true(len(d.cancelled) == 1), 3, "decode request cancelled")
            seen = await workers_of(session, proxy)
            assert not seen[p.url]["healthy"] and seen[p.url]["failures"] == 1
            status, raw = await post(session, proxy.url + "/generate", {"text": "again"})
            assert status == 503 and "no healthy prefill worker" in json.loads(raw)["error"]["message"]
            assert len(d.bodies) == 1  # the second request never reached decode

    run(scenario)


def test_decode_error_is_passed_through_and_prefill_is_cancelled():
    async def scenario():
        p = Backend("p", hold)
        d = Backend("d", await fail_after(0.2, 400, "'max_new_tokens' must be >= 0"))
        async with running([p, d], pd([p], [d])) as (session, proxy):
            status, raw = await post(session, proxy.url + "/generate", {"text": "hi"})
            assert status == 400 and json.loads(raw)["error"]["message"] == "'max_new_tokens' must be >= 0"
            await eventually(lambda: _true(len(p.cancelled) == 1), 3, "prefill request cancelled")

    run(scenario)


def test_client_going_away_aborts_both_upstream_requests():
    async def scenario():
        p, d = Backend("p", hold), Backend("d", hold)
        async with running([p, d], pd([p], [d])) as (session, proxy):
            with pytest.raises(asyncio.TimeoutError):
                await post(session, proxy.url + "/generate", {"text": "hi"}, timeout=0.5)
            await eventually(lambda: _true(len(p.cancelled) == len(d.cancelled) == 1), 3, "both cancelled")
            seen = await workers_of(session, proxy)
            assert seen[p.url]["in_flight"] == seen[d.url]["in_flight"] == 0

    run(scenario)


# ---- colocated, health ----


def test_dead_worker_is_skipped_and_comes_back():
    a, b = Backend("a"), Backend("b")

    async def texts(session, proxy, n):
        got = []
        for i in range(n):
            status, raw = await post(session, proxy.url + "/generate", {"text": str(i)})
            assert status == 200, raw
            got.append(json.loads(raw)["text"])
        return got

    async def scenario():
        async with running([a, b], lambda: ["--worker", a.url, "--worker", b.url]) as (session, proxy):
            assert sorted(await texts(session, proxy, 4)) == ["from a"] * 2 + ["from b"] * 2
            port = a.port
            await a.stop()
            assert await texts(session, proxy, 6) == ["from b"] * 6
            seen = await workers_of(session, proxy)
            assert not seen[a.url]["healthy"] and seen[b.url]["healthy"]
            async with session.get(proxy.url + "/health", params={"deep": "1"}) as r:
                assert r.status == 200
            await b.stop()
            async with session.get(proxy.url + "/health") as r:
                assert r.status == 200  # the proxy itself is up
            async with session.get(proxy.url + "/health_generate") as r:
                assert r.status == 503 and "no healthy colocated worker" in (await r.json())["status"]
            status, raw = await post(session, proxy.url + "/generate", {"text": "x"})
            assert status == 503 and "no healthy colocated worker" in json.loads(raw)["error"]["message"]
            await a.start(port)

            async def a_back():
                return (await workers_of(session, proxy))[a.url]["healthy"]

            await eventually(a_back, 5, "worker a healthy again")
            assert await texts(session, proxy, 2) == ["from a"] * 2

    run(scenario)


def test_malformed_requests_are_400_and_reach_no_worker():
    p, d = Backend("p"), Backend("d")

    async def scenario():
        async with running([p, d], pd([p], [d])) as (session, proxy):
            for raw, why in [
                (b'{"text": "hi"', "not valid JSON"),
                (b'["text"]', "must be a JSON object"),
                (b'{"text": "hi", "stream": "yes"}', "'stream' must be true or false"),
                (b"\xff\xfe", "not valid JSON"),
            ]:
                status, body = await post(session, proxy.url + "/v1/completions", None, raw=raw)
                assert status == 400, body
                assert why in json.loads(body)["error"]["message"]
            async with session.get(proxy.url + "/metrics") as r:
                text = await r.text()
            async with session.get(proxy.url + "/v1/models") as r:
                models = await r.json()
        assert p.bodies == [] and d.bodies == []
        assert 'disaggctl_proxy_requests_total{path="/v1/completions",status="400"} 4' in text
        assert f'disaggctl_proxy_worker_healthy{{url="{d.url}",role="decode"}} 1' in text
        assert models["data"][0]["id"] == "model-of-d"

    run(scenario)


# ---- command line ----


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "no workers"),
        (["--prefill", "http://127.0.0.1:1", "--decode", "http://127.0.0.1:2"], "needs its --bootstrap-port"),
        (
            ["--prefill", "http://127.0.0.1:1", "--bootstrap-port", "9"],
            "at least one --prefill and one --decode",
        ),
        (["--worker", "127.0.0.1:1"], "expected http://HOST:PORT"),
        (["--worker", "http://127.0.0.1:1", "--decode", "http://127.0.0.1:2"], "not both"),
        (["--worker", "http://127.0.0.1:1", "--policy", "fastest"], "invalid choice: 'fastest'"),
        (["--worker", "http://127.0.0.1:1", "--health-interval", "0"], "--health-interval must be > 0"),
        (["--worker", "http://127.0.0.1:1/v1"], "base URL only"),
        (["--worker", "http://127.0.0.1:1", "--read-timeout", "0"], "--read-timeout must be > 0"),
        (["--worker", "http://127.0.0.1:1", "--max-body-bytes", "0"], "--max-body-bytes must be >= 1"),
    ],
)
def test_bad_command_line_exits_2_with_a_clear_message(argv, message):
    r = subprocess.run(
        [sys.executable, "-m", "disaggctl", "serve", "proxy", *argv],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2, r
    assert message in r.stderr and "Traceback" not in r.stderr


def test_port_in_use_exits_1():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "disaggctl",
                "serve",
                "proxy",
                "--port",
                str(port),
                "--worker",
                "http://127.0.0.1:1",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert r.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in r.stderr, r
