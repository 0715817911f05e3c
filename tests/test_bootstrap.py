"""The PD bootstrap hand-off: pairing, timeouts, disconnects, refusals and dead prefills, over real HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import time

import aiohttp
import pytest
from aiohttp import web

from disaggctl.transfer.bootstrap import (
    DecodeBootstrapClient,
    DecodeDirectory,
    DecodeRegistration,
    KvTransferError,
    PrefillBootstrap,
    parse_room,
)
from disaggctl.transfer.kv_layout import KvLayout, RankPool
from disaggctl.trust import HEADER, DeploymentKey

LAYOUT = KvLayout(base_ptr=1 << 20, num_layers=2, num_pages=64, page_bytes=256, page_size=4)
SESSION = "127.0.0.1:15123"
# A decode of the deployment whose pool cannot take this prefill's pages (another model's page bytes).
ODD_SESSION, ODD_LAYOUT = "127.0.0.1:15999", KvLayout(1 << 30, 2, 64, 512, 4)
ROOM = 8_589_934_597
KEY = DeploymentKey(bytes(range(32)))


def pool(session: str, layout: KvLayout) -> RankPool:
    return RankPool(session, layout, 0, 1, layout.token_bytes)  # one rank; its heads as one unit


def directory() -> DecodeDirectory:
    """The decodes 'the plan started', announced in process (the runtime fetches the same from each decode)."""
    d = DecodeDirectory({}, KEY)
    d.announce("decode-0", [pool(SESSION, LAYOUT)])
    d.announce("decode-1", [pool(ODD_SESSION, ODD_LAYOUT)])
    return d


def registration(room: int = ROOM, prompt_len: int = 10, layout: KvLayout = LAYOUT) -> DecodeRegistration:
    pages = list(range(3, 3 + -(-prompt_len // layout.page_size)))
    return DecodeRegistration(room, SESSION, layout, pages, prompt_len)


def run(coro, timeout: float = 30):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def started(**kwargs) -> PrefillBootstrap:
    server = PrefillBootstrap("127.0.0.1", 0, layout=LAYOUT, key=KEY, directory=directory(), **kwargs)
    await server.start()
    return server


def test_pairs_when_decode_registers_first():
    async def scenario():
        server, client = await started(), DecodeBootstrapClient(KEY)
        try:
            decode = asyncio.create_task(client.register_and_wait(server.url, ROOM, registration(), 10))
            await asyncio.sleep(0.2)
            reg = await server.expect(ROOM, timeout=5)
            assert (reg.session_id, reg.page_ids, reg.prompt_len, reg.layout) == (
                "127.0.0.1:15123",
                [3, 4, 5],
                10,
                LAYOUT,
            )
            assert server.complete(ROOM, 42, -0.25, {"cached": 0})
            result = await decode
            assert (result.room, result.first_token, result.logprob, result.extra) == (
                ROOM,
                42,
                -0.25,
                {"cached": 0},
            )
            assert server.open_rooms == 0 and not reg.gone.is_set()
        finally:
            await client.close()
            await server.stop()

    run(scenario())


def test_pairs_when_prefill_expects_first():
    async def scenario():
        server, client = await started(), DecodeBootstrapClient(KEY)
        try:
            prefill = asyncio.create_task(server.expect(ROOM, timeout=5))
            await asyncio.sleep(0.2)
            assert not prefill.done()
            decode = asyncio.create_task(client.register_and_wait(server.url, ROOM, registration(), 10))
            reg = await prefill
            assert reg.room == ROOM and reg.page_ids == [3, 4, 5]
            assert server.complete(ROOM, 7)
            assert (await decode).first_token == 7
        finally:
            await client.close()
            await server.stop()

    run(scenario())


def test_prefill_failure_reaches_decode():
    async def scenario():
        server, client = await started(), DecodeBootstrapClient(KEY)
        try:
            decode = asyncio.create_task(client.register_and_wait(server.url, ROOM, registration(), 10))
            reg = await server.expect(ROOM, timeout=5)
            assert server.fail(ROOM, "mooncake write failed")
            with pytest.raises(KvTransferError, match="500: mooncake write failed"):
                await decode
            assert reg.gone.is_set() and not server.complete(ROOM, 1)
        finally:
            await client.close()
            await server.stop()

    run(scenario())


def test_timeouts_on_both_sides():
    async def scenario():
        server = await started(bootstrap_timeout_s=0.5, transfer_timeout_s=0.5)
        client = DecodeBootstrapClient(KEY)
        try:
            # Prefill waits for a decode that never comes; a late registration is then refused.
            began = time.monotonic()
            with pytest.raises(KvTransferError, match="did not register"):
                await server.expect(1, timeout=0.3)
            assert time.monotonic() - began < 1.0
            with pytest.raises(KvTransferError, match="409"):
                await client.register_and_wait(server.url, 1, registration(1), 5)
            # Decode registers but the prefill never gets the request.
            began = time.monotonic()
            with pytest.raises(KvTransferError, match="504: prefill got no request"):
                await client.register_and_wait(server.url, 2, registration(2), 5)
            assert time.monotonic() - began < 2.0
            # Paired, but the prefill never completes: the decode is answered and the prefill sees the room gone.
            decode = asyncio.create_task(client.register_and_wait(server.url, 3, registration(3), 5))
            reg = await server.expect(3, timeout=5)
            with pytest.raises(KvTransferError, match="504: prefill did not finish"):
                await decode
            assert reg.gone.is_set() and "did not finish" in reg.gone_reason
            # The decode's own deadline holds even if the prefill would wait longer.
            slow = await started(bootstrap_timeout_s=30)
            try:
                began = time.monotonic()
                with pytest.raises(KvTransferError, match="no KV .* within 0.5s"):
                    await client.register_and_wait(slow.url, 4, registration(4), 0.5)
                assert time.monotonic() - began < 1.5
            finally:
                await slow.stop()
        finally:
            await client.close()
            await server.stop()

    run(scenario())


def test_decode_disconnect_fails_the_room_for_prefill():
    async def scenario():
        failed = []
        server = await started(on_room_failed=lambda room, reason: failed.append((room, reason)))
        client = DecodeBootstrapClient(KEY)
        try:
            decode = asyncio.create_task(client.register_and_wait(server.url, ROOM, registration(), 10))
            reg = await server.expect(ROOM, timeout=5)
            decode.cancel()
            await asyncio.wait_for(reg.gone.wait(), timeout=2)
            assert reg.gone_reason == "decode disconnected"
            assert failed == [(ROOM, "decode disconnected")]
            assert not server.complete(ROOM, 1)
            assert server.open_rooms == 0
        finally:
            await client.close()
            await server.stop()

    run(scenario())


def test_bogus_replayed_and_incompatible_registrations_are_refused():
    async def scenario():
        server = await started()
        good = registration().to_json()
        try:
            async with aiohttp.ClientSession() as http:

                async def post(path: str, body=None, raw: str | None = None):
                    data = (raw if raw is not None else json.dumps(body)).encode()
                    async with http.post(
                        server.url + path,
                        data=data,
                        headers=KEY.headers("POST", path, data),
                        timeout=aiohttp.ClientTimeout(total=5),
                    ) as r:
                        return r.status, await r.json()

                for bad in ("abc", "-1", "1e3", "9223372036854775808", "99999999999999999999", "%20"):
                    status, body = await post(f"/v1/kv/{bad}", good)
                    assert status == 400, bad
                    assert "room id" in body["error"]["message"]
                assert (await post("/v1/kv/5", raw="{not json"))[0] == 400
                odd = dict(good, session_id=ODD_SESSION, layout=ODD_LAYOUT.to_dict())
                status, body = await post("/v1/kv/5", odd)
                assert status == 400 and "page_bytes differs" in body["error"]["message"]
                # What a registration claims about the pool must be what that decode announced.
                wrong_layers = dict(good, layout=dict(good["layout"], num_layers=3))
                status, body = await post("/v1/kv/5", wrong_layers)
                assert status == 400 and "not the one decode decode-0 announced" in body["error"]["message"]
                bigger = dict(good, layout=dict(good["layout"], num_pages=1 << 20))
                assert (await post("/v1/kv/5", bigger))[0] == 400
                status, body = await post("/v1/kv/5", dict(good, page_ids=[1, 2]))
                assert status == 400 and "need 3 pages" in body["error"]["message"]
                assert (await post("/v1/kv/5", dict(good, page_ids=[1, 1, 2])))[0] == 400
                assert (await post("/v1/kv/5", dict(good, page_ids=[1, 2, 64])))[0] == 400
                assert (await post("/v1/kv/5", dict(good, session_id=None)))[0] == 400
                # Room 5 was never registered by any of these, so it still pairs normally.
                first = asyncio.create_task(post("/v1/kv/5", good))
                await server.expect(5, timeout=5)
                assert (await post("/v1/kv/5", good))[0] == 409  # registered twice
                server.complete(5, 11)
                assert (await first)[0] == 200
                assert (await post("/v1/kv/5", good))[0] == 409  # replayed after it finished
                with pytest.raises(KvTransferError, match="already finished"):
                    await server.expect(5, timeout=1)
                async with http.get(server.url + "/health", timeout=aiohttp.ClientTimeout(total=5)) as r:
                    assert r.status == 200
        finally:
            await server.stop()

    run(scenario())


def test_room_ids_and_loop_guard():
    assert parse_room("0") == 0 and parse_room(str(2**63 - 1)) == 2**63 - 1
    for bad in ("", "+1", "١٢", "0x10", str(2**63)):
        with pytest.raises(ValueError):
            parse_room(bad)
    server = PrefillBootstrap(key=KEY, directory=directory())
    with pytest.raises(RuntimeError, match="event loop"):
        server.complete(1, 1)


PREFILL_PROCESS = textwrap.dedent(
    """
    import asyncio, sys
    from disaggctl.transfer.bootstrap import DecodeDirectory, PrefillBootstrap
    from disaggctl.transfer.kv_layout import KvLayout, RankPool
    from disaggctl.trust import DeploymentKey

    async def main():
        key = DeploymentKey(bytes(range(32)))
        plan = DecodeDirectory({}, key)
        layout = KvLayout(1 << 20, 2, 64, 256, 4)
        plan.announce("decode-0", [RankPool("127.0.0.1:15123", layout, 0, 1, 256 // 4)])
        server = PrefillBootstrap("127.0.0.1", 0, key=key, directory=plan)
        await server.start()
        print(server.port, flush=True)
        # Tell the test when a registration is held open: it kills us at that moment, not after a sleep.
        while server.open_rooms == 0:
            await asyncio.sleep(0.01)
        print("registered", flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
    """
)


def read_line(proc: subprocess.Popen, timeout: float) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "the prefill bootstrap process said nothing"
    return proc.stdout.readline().strip()


@pytest.fixture
def prefill_process():
    proc = subprocess.Popen([sys.executable, "-c", PREFILL_PROCESS], stdout=subprocess.PIPE, text=True)
    port = int(read_line(proc, 30))
    yield proc, f"http://127.0.0.1:{port}"
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_dead_prefill_fails_decode_quickly_with_the_message_of_its_stage(prefill_process):
    """What decode reports depends on when the prefill died, never on how the kernel tore its sockets down:
    while the registration is open -> "lost before it answered"; once the process is gone -> "cannot reach"."""
    proc, url = prefill_process

    async def scenario():
        client = DecodeBootstrapClient(KEY)
        try:
            decode = asyncio.create_task(client.register_and_wait(url, ROOM, registration(), 30))
            assert await asyncio.to_thread(read_line, proc, 20) == "registered"
            assert not decode.done()
            os.kill(proc.pid, signal.SIGKILL)
            began = time.monotonic()
            with pytest.raises(KvTransferError, match="lost before it answered"):
                await decode
            assert time.monotonic() - began < 2.0
            await asyncio.to_thread(proc.wait, 10)  # the process is gone, so are its sockets
            began = time.monotonic()
            with pytest.raises(KvTransferError, match="cannot reach the prefill bootstrap"):
                await client.register_and_wait(url, ROOM + 1, registration(ROOM + 1), 30)
            assert time.monotonic() - began < 2.0
        finally:
            await client.close()

    run(scenario())


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_prefill_dying_after_its_answer_does_not_touch_the_decode():
    async def scenario():
        server = await started()
        client = DecodeBootstrapClient(KEY)
        try:
            decode = asyncio.create_task(client.register_and_wait(server.url, ROOM, registration(), 30))
            await server.expect(ROOM, timeout=10)
            server.complete(ROOM, 7, -0.5)
            result = await decode
            await server.stop()  # the prefill goes away after it answered: the decode has its KV already
            assert (result.first_token, result.logprob) == (7, -0.5)
        finally:
            await client.close()
            await server.stop()

    run(scenario())


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_frozen_prefill_is_noticed_by_heartbeat(prefill_process):
    proc, url = prefill_process

    async def scenario():
        client = DecodeBootstrapClient(KEY, heartbeat_s=0.3, heartbeat_misses=2)
        try:
            decode = asyncio.create_task(client.register_and_wait(url, ROOM, registration(), 30))
            assert await asyncio.to_thread(read_line, proc, 20) == "registered"
            await asyncio.sleep(0.8)  # healthy heartbeats pass while the prefill is alive
            assert not decode.done()
            os.kill(proc.pid, signal.SIGSTOP)
            began = time.monotonic()
            with pytest.raises(KvTransferError, match="stopped answering"):
                await decode
            assert time.monotonic() - began < 3.0
        finally:
            await client.close()

    run(scenario())


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_full_hand_off_writes_kv_into_the_decode_pool():
    """Bootstrap pairing + merged Mooncake write + completion, as the PD roles will chain them."""
    from test_transfer import LAYERS, PAGE_SIZE, SRC_PAGES, Peer, expected_crcs, random_pool

    from disaggctl.transfer import MooncakeAgent, kv_write_batches

    peer = Peer()
    src = random_pool(SRC_PAGES, seed=11)
    agent = MooncakeAgent("127.0.0.1", "tcp", timeout_s=5)
    agent.register(src.data_ptr(), src.numel() * src.element_size())
    src_layout = KvLayout.from_tensor(src)
    src_pages = [4, 5, 6, 12, 13]
    prompt_len = 4 * PAGE_SIZE + 2
    dst_pages = [20, 21, 2, 3, 9]

    async def scenario():
        plan = DecodeDirectory({}, KEY)
        plan.announce("decode-0", [pool(peer.session_id, peer.layout)])
        server = PrefillBootstrap("127.0.0.1", 0, layout=src_layout, key=KEY, directory=plan)
        await server.start()
        client = DecodeBootstrapClient(KEY)
        try:
            reg = DecodeRegistration(ROOM, peer.session_id, peer.layout, dst_pages, prompt_len)
            decode = asyncio.create_task(client.register_and_wait(server.url, ROOM, reg, 30))
            got = await server.expect(ROOM, timeout=10)
            batches = kv_write_batches(src_layout, src_pages, got.layout, got.page_ids, got.prompt_len)
            await asyncio.to_thread(agent.write, got.session_id, *batches)
            server.complete(ROOM, 99, -1.5)
            result = await decode
            assert (result.first_token, result.logprob) == (99, -1.5)
            # Four runs contiguous on both sides, for each (layer, k/v).
            assert len(batches[0]) == 4 * 2 * LAYERS
        finally:
            await client.close()
            await server.stop()

    try:
        run(scenario())
        assert peer.crcs() == expected_crcs(src, src_pages, dst_pages, peer.layout.num_pages, prompt_len)
    finally:
        peer.kill()
        agent.close()


# ---- trust: who may register, whose answers count, when pages are safe to reuse ----


def test_registrations_without_the_deployment_proof_are_refused():
    async def scenario():
        server = await started()
        body = json.dumps(registration().to_json()).encode()
        other = DeploymentKey(bytes(32 * [7]))
        try:
            async with aiohttp.ClientSession() as http:
                for headers in (
                    {},
                    other.headers("POST", f"/v1/kv/{ROOM}", body),  # another deployment's secret
                    KEY.headers("POST", f"/v1/kv/{ROOM + 1}", body),  # a proof for another room
                    KEY.headers("POST", f"/v1/kv/{ROOM}", body + b" "),  # for other bytes
                    {HEADER: KEY.sign("POST", f"/v1/kv/{ROOM}", body, now=time.time() - 3600)},  # stale
                ):
                    async with http.post(f"{server.url}/v1/kv/{ROOM}", data=body, headers=headers) as r:
                        assert r.status == 401, headers
                        assert "proof" in (await r.json())["error"]["message"] or not headers
                # None of them touched the room: the real decode still pairs.
                assert server.open_rooms == 0 and server.refused["unauthenticated"] == 5
            client = DecodeBootstrapClient(KEY)
            decode = asyncio.create_task(client.register_and_wait(server.url, ROOM, registration(), 10))
            await server.expect(ROOM, timeout=5)
            server.complete(ROOM, 3)
            assert (await decode).first_token == 3
            await client.close()
        finally:
            await server.stop()

    run(scenario())


def test_a_session_the_deployment_did_not_start_is_refused_before_any_write():
    async def scenario():
        server, client = await started(), DecodeBootstrapClient(KEY)
        try:
            forged = registration()
            forged.session_id = "10.9.9.9:15000"  # somebody else's Mooncake agent
            with pytest.raises(KvTransferError, match="403: session 10.9.9.9:15000 is not a decode"):
                await client.register_and_wait(server.url, ROOM, forged, 10)
            assert server.refused["unknown_session"] == 1 and server.open_rooms == 0
        finally:
            await client.close()
            await server.stop()

    run(scenario())


def test_decode_believes_only_answers_signed_by_its_deployment():
    """A bootstrap that is not the deployment's (an impostor on the port) cannot tell decode "KV done"."""

    async def impostor(request: web.Request) -> web.Response:
        room = int(request.match_info["room"])
        return web.json_response({"room": room, "first_token": 5, "logprob": 0.0, "pages": 3, "extra": {}})

    async def scenario():
        app = web.Application()
        app.router.add_post("/v1/kv/{room}", impostor)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        client = DecodeBootstrapClient(KEY)
        try:
            with pytest.raises(KvTransferError, match="not from this deployment"):
                await client.register_and_wait(url, ROOM, registration(), 10)
            assert not await client.cancel(url, ROOM)  # nor prove that our pages are safe to reuse
        finally:
            await client.close()
            await runner.cleanup()

    run(scenario())


def test_cancel_answers_once_no_write_into_the_pages_is_under_way():
    async def scenario():
        server, client = await started(), DecodeBootstrapClient(KEY)
        try:
            decode = asyncio.create_task(client.register_and_wait(server.url, ROOM, registration(), 10))
            await server.expect(ROOM, timeout=5)
            write_done = asyncio.Event()

            async def slow_write():
                await write_done.wait()

            write = asyncio.ensure_future(slow_write())
            server.track_write(ROOM, write)
            decode.cancel()  # the client went away; the prefill is still writing
            cancel = asyncio.create_task(client.cancel(server.url, ROOM))
            await asyncio.sleep(0.3)
            assert not cancel.done(), "cancel answered while a write into the pages was under way"
            write_done.set()
            assert await cancel is True
            assert server.writes_in_flight == 0
            # A room cancelled before the prefill's request came can no longer be paired.
            assert await client.cancel(server.url, ROOM + 1) is True
            with pytest.raises(KvTransferError, match="already finished"):
                await server.expect(ROOM + 1, timeout=1)
        finally:
            await client.close()
            await server.stop()

    run(scenario())


def test_open_rooms_and_body_size_are_capped():
    async def scenario():
        server = await started(max_open_rooms=2, max_body_bytes=4096)
        client = DecodeBootstrapClient(KEY)
        try:
            held = [
                asyncio.create_task(client.register_and_wait(server.url, r, registration(r), 10)) for r in (1, 2)
            ]
            await asyncio.sleep(0.3)
            with pytest.raises(KvTransferError, match="503: this prefill holds 2 open rooms"):
                await client.register_and_wait(server.url, 3, registration(3), 10)
            big = registration(4, prompt_len=4 * 60, layout=LAYOUT)
            big.page_ids = list(range(60))
            padded = json.dumps({**big.to_json(), "pad": "x" * 5000}).encode()
            async with aiohttp.ClientSession() as http:
                async with http.post(
                    f"{server.url}/v1/kv/4", data=padded, headers=KEY.headers("POST", "/v1/kv/4", padded)
                ) as r:
                    assert r.status == 413
            for task in held:
                task.cancel()
        finally:
            await client.close()
            await server.stop()

    run(scenario())
