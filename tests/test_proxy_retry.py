"""The proxy's retries and circuit breaker (issue #25), with the set-up of test_proxy.py: the proxy in a
subprocess, aiohttp backends in the test process.

The fake prefill and decode pair up as the runtime's do: a decode answers (or, streamed, sends its events)
only once the prefill of the same room has "written the KV", and sends SSE comments while it waits. So a
decode of a failed prefill never answers by itself: the proxy must close it and pair the request anew."""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict

import pytest
from aiohttp import web
from test_proxy import Backend, eventually, pd, post, read_event, run, running, workers_of

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

KV_WAIT_S = 10


class Rooms:
    """The KV hand-offs between the fake prefills and decodes: room -> set once its prefill succeeded."""

    def __init__(self) -> None:
        self.written: dict[int, asyncio.Event] = defaultdict(asyncio.Event)


def prefill(rooms: Rooms, mode: str = "ok") -> Backend:
    """A prefill whose `mode` ("ok", "500", "drop") the test may change while it runs."""

    async def handler(b, request, body):
        room = body["bootstrap_room"]
        await asyncio.sleep(0.1)  # prefill and pairing take a moment: D is waiting for the KV by now
        if b.mode == "500":
            return web.json_response({"error": {"message": "engine failed", "code": 500}}, status=500)
        if b.mode == "drop":
            request.transport.close()
            await asyncio.sleep(5)
        rooms.written[room].set()
        return web.json_response({"text": ""})

    b = Backend(f"p-{mode}", handler)
    b.mode = mode
    return b


def decode(rooms: Rooms, event_first: bool = False) -> Backend:
    """A decode that answers once its room's KV was written; streamed, it sends comments meanwhile (and,
    with `event_first`, an event before them, as an OpenAI chat stream opens with its role)."""

    async def handler(b, request, body):
        room = body["bootstrap_room"]
        if not body.get("stream"):
            await asyncio.wait_for(rooms.written[room].wait(), KV_WAIT_S)
            return web.json_response({"text": f"from {b.name}", "room": room})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            if event_first:
                await resp.write(b'data: {"text": "", "room": %d}\n\n' % room)
            while not rooms.written[room].is_set():
                await resp.write(b": keep-alive\n\n")
                try:
                    await asyncio.wait_for(rooms.written[room].wait(), 0.05)
                except asyncio.TimeoutError:
                    pass
            for i in range(3):
                await resp.write(b'data: {"text": "%d", "room": %d}\n\n' % (i, room))
            await resp.write(b"data: [DONE]\n\n")
        except ConnectionError:  # the proxy closed the request while we wrote: the same as a cancel
            b.cancelled.append(room)
            raise asyncio.CancelledError() from None
        await resp.write_eof()
        return resp

    return Backend("d", handler)


async def metrics_of(session, proxy) -> str:
    async with session.get(proxy.url + "/metrics") as r:
        return await r.text()


async def stream_events(session, url: str, body: dict) -> tuple[int, list[bytes]]:
    async with session.post(url, json={**body, "stream": True}) as resp:
        events = []
        while True:
            event = await read_event(resp, timeout_s=10)
            if not event:
                return resp.status, events
            events.append(event)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("how", ["500", "drop"])
def test_a_prefill_that_fails_before_the_first_byte_is_retried_on_the_other_prefill(stream, how):
    rooms = Rooms()
    bad, good, d = prefill(rooms, how), prefill(rooms), decode(rooms)

    async def scenario():
        # A long probe interval: the bad prefill's health is what the failed request says of it.
        argv = lambda: [*pd([bad, good], [d])(), "--health-interval", "30"]  # noqa: E731
        async with running([bad, good, d], argv) as (session, proxy):
            if stream:
                status, events = await stream_events(session, proxy.url + "/generate", {"text": "hi"})
                assert status == 200, events
                # only the retried pair's events: no comment or event of the failed one, no error
                data = [json.loads(e[len(b"data: ") :]) for e in events if e.startswith(b"data: {")]
                assert [x["text"] for x in data] == ["0", "1", "2"] and events[-1] == b"data: [DONE]\n\n"
                answered_room = data[0]["room"]
                assert all(b"error" not in e for e in events)
            else:
                status, raw = await post(session, proxy.url + "/generate", {"text": "hi"})
                assert status == 200, raw
                answered_room = json.loads(raw)["room"]
            (first,), (second,) = bad.bodies, good.bodies
            # a new room for the new pair, and the decode of the failed pair closed (its pages freed)
            assert first["bootstrap_room"] != second["bootstrap_room"] == answered_room
            assert [b["bootstrap_room"] for b in d.bodies] == [first["bootstrap_room"], answered_room]
            assert first["bootstrap_port"] != second["bootstrap_port"]
            await eventually(
                lambda: _true(d.cancelled == [first["bootstrap_room"]]), 5, "the failed pair's decode closed"
            )
            text = await metrics_of(session, proxy)
            seen = await workers_of(session, proxy)
        assert "disaggctl_proxy_retries_total 1" in text
        assert seen[bad.url]["failures"] == 1 and seen[good.url]["served"] == 1
        # refused or reset: out of rotation; an error answer: still up
        assert seen[bad.url]["healthy"] is (how == "500")

    run(scenario)


def test_a_prefill_that_fails_after_bytes_reached_the_client_is_not_retried():
    rooms = Rooms()
    bad, good, d = prefill(rooms, "500"), prefill(rooms), decode(rooms, event_first=True)

    async def scenario():
        async with running([bad, good, d], pd([bad, good], [d])) as (session, proxy):
            status, events = await stream_events(session, proxy.url + "/generate", {"text": "hi"})
            text = await metrics_of(session, proxy)
        assert status == 200
        data = [e for e in events if e.startswith(b"data:")]
        assert len(data) == 3, events  # the decode's first event, the proxy's error, [DONE]
        err = json.loads(data[1][len(b"data: ") :])["error"]
        assert err["code"] == 502 and bad.url in err["message"] and "engine failed" in err["message"]
        assert data[2] == b"data: [DONE]\n\n"
        assert good.bodies == []  # never retried
        assert "disaggctl_proxy_retries_total 0" in text
        assert 'disaggctl_proxy_not_retried_total{reason="client_had_bytes"} 1' in text

    run(scenario)


def test_a_decode_that_refuses_the_connection_is_replaced_and_the_prefill_request_closed():
    rooms = Rooms()
    p, gone, d = prefill(rooms), decode(rooms), decode(rooms)
    probed = asyncio.Event()
    answer_health = gone._health

    async def health(request):
        probed.set()
        return await answer_health(request)

    gone._health = health

    async def scenario():
        argv = lambda: [*pd([p], [gone, d])(), "--health-interval", "30"]  # noqa: E731
        async with running([p, gone, d], argv) as (session, proxy):
            await asyncio.wait_for(probed.wait(), 10)
            await gone.stop()  # after the proxy's first probe: it counts it healthy for 30 s
            status, raw = await post(session, proxy.url + "/generate", {"text": "hi"})
            assert status == 200, raw
            assert len(p.bodies) == 2 and len(d.bodies) == 1 and gone.bodies == []
            await eventually(lambda: _true(len(p.cancelled) == 1), 5, "the first prefill request closed")
            seen = await workers_of(session, proxy)
        assert not seen[gone.url]["healthy"]

    run(scenario)


def test_a_decode_that_is_not_ready_is_replaced_and_out_of_rotation():
    rooms = Rooms()
    p, draining, d = prefill(rooms), Backend("draining", not_ready), decode(rooms)

    async def scenario():
        argv = lambda: [*pd([p], [draining, d])(), "--health-interval", "30"]  # noqa: E731
        async with running([p, draining, d], argv) as (session, proxy):
            for _ in range(3):
                status, raw = await post(session, proxy.url + "/generate", {"text": "hi"})
                assert status == 200, raw
            seen = await workers_of(session, proxy)
            text = await metrics_of(session, proxy)
        assert len(draining.bodies) == 1 and len(d.bodies) == 3  # tried once, then out of rotation
        assert not seen[draining.url]["healthy"] and "answered 503" in seen[draining.url]["last_error"]
        assert "disaggctl_proxy_retries_total 1" in text

    run(scenario)


async def not_ready(b, request, body):
    """What a runtime server answers while it loads or drains on its way out."""
    message = "the server is not ready (model loading or stopping); retry later"
    return web.json_response({"error": {"message": message, "code": 503}}, status=503)


def test_retries_are_bounded_and_the_client_hears_every_attempt():
    rooms = Rooms()
    ps = [prefill(rooms, "500") for _ in range(3)]
    d = decode(rooms)

    async def scenario():
        async with running([*ps, d], lambda: [*pd(ps, [d])(), "--retries", "1"]) as (session, proxy):
            status, raw = await post(session, proxy.url + "/generate", {"text": "hi"})
            text = await metrics_of(session, proxy)
        assert status == 502
        message = json.loads(raw)["error"]["message"]
        assert "after 1 retried attempt(s)" in message and message.count("engine failed") == 2
        assert sum(len(p.bodies) for p in ps) == 2
        assert "disaggctl_proxy_retries_total 1" in text
        assert 'disaggctl_proxy_not_retried_total{reason="retries_used"} 1' in text

    run(scenario)


def test_the_breaker_opens_after_failures_in_a_row_and_a_trial_closes_it():
    rooms = Rooms()
    flaky, steady, d = prefill(rooms, "drop"), prefill(rooms), decode(rooms)

    def breaker(text: str, b: Backend) -> tuple[int, int]:
        """(state, opens) of `b`'s breaker in the proxy's metrics."""
        labels = f'{{url="{b.url}",role="prefill"}}'
        state = next(
            line
            for line in text.splitlines()
            if line.startswith("disaggctl_proxy_worker_breaker_state" + labels)
        )
        opens = next(
            line
            for line in text.splitlines()
            if line.startswith("disaggctl_proxy_worker_breaker_opens_total" + labels)
        )
        return int(state.rsplit(" ", 1)[1]), int(opens.rsplit(" ", 1)[1])

    async def scenario():
        argv = lambda: [*pd([flaky, steady], [d])(), "--breaker-failures", "2", "--breaker-cooldown", "1"]  # noqa: E731
        async with running([flaky, steady, d], argv) as (session, proxy):

            async def flaky_in_rotation():
                return (await workers_of(session, proxy))[flaky.url]["healthy"]

            async def until_flaky_gets_one():
                # the health probes (every 0.2 s) put it back after each failure; round robin reaches it
                before = len(flaky.bodies)
                for _ in range(10):
                    await eventually(flaky_in_rotation, 5, "the flaky prefill back in rotation")
                    status, raw = await post(session, proxy.url + "/generate", {"text": "hi"})
                    assert status == 200, raw  # retried on the steady one whenever the flaky one dropped it
                    if len(flaky.bodies) > before:
                        return
                raise AssertionError("round robin never picked the flaky prefill")

            await until_flaky_gets_one()
            assert breaker(await metrics_of(session, proxy), flaky) == (0, 0)
            await until_flaky_gets_one()  # the second failure in a row
            assert breaker(await metrics_of(session, proxy), flaky) == (1, 1)
            # open: out of rotation although its probes succeed
            await eventually(flaky_in_rotation, 5, "the flaky prefill healthy by its probes")
            n = len(flaky.bodies)
            for _ in range(4):
                status, _ = await post(session, proxy.url + "/generate", {"text": "hi"})
                assert status == 200
            assert len(flaky.bodies) == n

            # after the cool-down one trial goes to it; a failed trial opens the breaker again
            async def half_open():
                return breaker(await metrics_of(session, proxy), flaky)[0] == 2

            await eventually(half_open, 5, "the breaker half-open after its cool-down")
            await until_flaky_gets_one()
            assert breaker(await metrics_of(session, proxy), flaky) == (1, 2)
            # a trial that is answered closes it
            flaky.mode = "ok"
            await eventually(half_open, 5, "the breaker half-open again")
            await until_flaky_gets_one()
            assert breaker(await metrics_of(session, proxy), flaky) == (0, 2)
            seen = await workers_of(session, proxy)
        assert seen[flaky.url]["breaker"] == "closed" and seen[flaky.url]["breaker_opens"] == 2

    run(scenario)


async def _true(v: bool) -> bool:
    return v
