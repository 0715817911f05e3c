"""The PD hand-off rendezvous: decode registers its KV pages for a room, prefill writes them and answers.

Prefill side: `PrefillBootstrap` serves `POST /v1/kv/{room}` on the bootstrap port. The decode's request
stays open until the prefill calls `complete` or `fail`; pairing with the proxy's request for the same
room (`expect`) works in either order. A decode that disconnects fails its room, so the prefill can free
its pages (`DecodeRegistration.gone`, or the `on_room_failed` callback). `POST /v1/kv/{room}/cancel` ends
a room from the decode's side and answers only once no write into its pages can still be under way, so the
decode may reuse them at once.
Decode side: `DecodeBootstrapClient.register_and_wait` sends the registration and waits for the answer,
failing fast when the prefill dies or stops answering.

Trust (docs/security.md): every call here carries a proof of the deployment secret (`disaggctl.trust`),
and every answer the decode acts on carries one back. A registration names only a Mooncake session; where
the KV goes (base address, pool size) is what that decode announced itself when the prefill asked it at the
address the plan gave (`DecodeDirectory`), never what the registration claims.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from disaggctl.httpkit import TooLarge, error_body, read_limited
from disaggctl.transfer.kv_layout import KvLayout, RankPool, pools_incompatibility
from disaggctl.trust import HEADER, AuthError, DeploymentKey

log = logging.getLogger(__name__)

ROOM_MAX = 2**63 - 1
_MAX_SESSION_ID = 300
_FINISHED_KEEP = 100_000
LAYOUT_PATH = "/internal/kv_layout"  # served by each decode: its Mooncake session and pool layout
DEFAULT_MAX_OPEN_ROOMS = 256
# A registration is a few hundred bytes plus its page ids; this fits 65k pages (1M tokens at 16 a page).
DEFAULT_MAX_BODY_BYTES = 1024 * 1024


class KvTransferError(RuntimeError):
    """The KV of `room` did not arrive (or cannot be sent); `reason` says why."""

    def __init__(self, room: int | str, reason: str):
        self.room = room
        self.reason = reason
        super().__init__(f"KV hand-off for room {room} failed: {reason}")


def parse_room(text: str) -> int:
    """A room id from a URL segment: a decimal integer in [0, 2**63). ValueError otherwise."""
    if not (isinstance(text, str) and text.isascii() and text.isdigit() and len(text) <= 19):
        raise ValueError(f"room id must be a decimal integer below 2**63, got {text[:40]!r}")
    room = int(text)
    if room > ROOM_MAX:
        raise ValueError(f"room id {room} is not below 2**63")
    return room


def check_room(room: Any) -> int:
    if isinstance(room, bool) or not isinstance(room, int) or not 0 <= room <= ROOM_MAX:
        raise ValueError(f"room id must be an integer in [0, 2**63), got {room!r}")
    return room


def bootstrap_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host and not host.startswith("[") else f"http://{host}:{port}"


def _int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return value


def _session_id(value: Any) -> str:
    if not isinstance(value, str) or ":" not in value or len(value) > _MAX_SESSION_ID:
        raise ValueError(f"session_id must be a 'host:port' string, got {str(value)[:80]!r}")
    return value


@dataclass
class DecodeRegistration:
    """What a decode sends for one room: which of its pages receive the prompt's KV.

    `layout` is what the decode says about its pool; the prefill writes by the layout the decode announced
    through `DecodeDirectory` and refuses a registration whose claim differs from it."""

    room: int
    session_id: str
    layout: KvLayout
    page_ids: list[int]
    prompt_len: int
    pools: list[RankPool] = field(default_factory=list)  # what that decode announced: where to write
    # Set when the decode side is gone or the room failed: the prefill should stop and free its pages.
    gone: asyncio.Event = field(default_factory=asyncio.Event, repr=False, compare=False)
    gone_reason: str | None = field(default=None, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "layout": self.layout.to_dict(),
            "page_ids": list(self.page_ids),
            "prompt_len": self.prompt_len,
        }

    @classmethod
    def from_json(cls, room: int, data: Any) -> DecodeRegistration:
        """Parse and check a registration body; ValueError with the reason when it is malformed."""
        if not isinstance(data, dict):
            raise ValueError("registration must be a JSON object")
        session_id = _session_id(data.get("session_id"))
        layout = KvLayout.from_dict(data.get("layout"))
        page_ids = data.get("page_ids")
        if not isinstance(page_ids, list):
            raise ValueError("page_ids must be a list of integers")
        page_ids = [_int(p, "page id") for p in page_ids]
        prompt_len = _int(data.get("prompt_len"), "prompt_len")
        if prompt_len < 1:
            raise ValueError(f"prompt_len must be at least 1, got {prompt_len}")
        needed = math.ceil(prompt_len / layout.page_size)
        if len(page_ids) != needed:
            raise ValueError(
                f"{prompt_len} tokens need {needed} pages of {layout.page_size}, got {len(page_ids)} page ids"
            )
        if any(not 0 <= p < layout.num_pages for p in page_ids):
            raise ValueError(f"page ids must be in [0, {layout.num_pages})")
        if len(set(page_ids)) != len(page_ids):
            raise ValueError("page ids repeat a page")
        return cls(room, session_id, layout, page_ids, prompt_len)


@dataclass
class KvResult:
    """The prefill's answer once the KV has landed: the first sampled token and its logprob."""

    room: int
    first_token: int
    logprob: float | None
    extra: dict[str, Any]


# -- where decodes of this deployment keep their KV -------------------------------------------------------


class DecodeDirectory:
    """The decodes the plan started, by Mooncake session: the only places a prefill writes KV into.

    `peers` maps each decode's plan name to its HTTP URL (from the plan, never from a request). A session not
    seen yet makes the directory ask every peer for its announcement (`GET /internal/kv_layout`, signed both
    ways); a decode that restarted announces a new session, so stale entries are simply never matched again.
    """

    def __init__(self, peers: Mapping[str, str], key: DeploymentKey, fetch_timeout_s: float = 5.0):
        self.peers = dict(peers)
        self.key = key
        self.fetch_timeout_s = fetch_timeout_s
        self._known: dict[str, tuple[str, list[RankPool]]] = {}
        self._refresh: asyncio.Task | None = None
        self._session: aiohttp.ClientSession | None = None

    def announce(self, name: str, pools: list[RankPool]) -> None:
        """Record what decode `name` said about itself: its ranks' pools, rank 0 first, whose session names
        the decode (what a fetch does; also for in-process use)."""
        self._known = {s: v for s, v in self._known.items() if v[0] != name}
        self._known[pools[0].session_id] = (name, list(pools))

    async def resolve(self, session_id: str) -> tuple[str, list[RankPool]]:
        """(decode name, its announced rank pools) for a session this deployment started. KeyError otherwise."""
        if session_id not in self._known:
            if self._refresh is None or self._refresh.done():
                self._refresh = asyncio.ensure_future(self._fetch_all())
            await asyncio.shield(self._refresh)
        if session_id not in self._known:
            raise KeyError(session_id)
        return self._known[session_id]

    async def close(self) -> None:
        if self._refresh is not None and not self._refresh.done():
            self._refresh.cancel()
            with contextlib.suppress(BaseException):
                await self._refresh
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _fetch_all(self) -> None:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
        results = await asyncio.gather(
            *(self._fetch(name, url) for name, url in self.peers.items()), return_exceptions=True
        )
        for (name, url), result in zip(self.peers.items(), results, strict=True):
            if isinstance(result, BaseException):
                log.warning("decode %s at %s did not announce its KV pool: %s", name, url, result)
            else:
                self.announce(name, result)

    async def _fetch(self, name: str, url: str) -> list[RankPool]:
        limits = aiohttp.ClientTimeout(total=self.fetch_timeout_s)
        headers = self.key.headers("GET", LAYOUT_PATH)
        async with self._session.get(url.rstrip("/") + LAYOUT_PATH, headers=headers, timeout=limits) as r:
            body = await r.read()
            if r.status != 200:
                raise RuntimeError(f"answered {r.status}: {body[:200]!r}")
            self.key.verify_answer(LAYOUT_PATH, r.status, body, r.headers.get(HEADER))
        ranks = json.loads(body).get("ranks")
        if not isinstance(ranks, list) or not ranks or len(ranks) > 1024:
            raise ValueError("the announcement has no list of rank pools")
        pools = [RankPool.from_dict(r) for r in ranks]
        for pool in pools:
            _session_id(pool.session_id)
        return pools


def layout_announcement(key: DeploymentKey, pools: list[RankPool]) -> tuple[bytes, dict]:
    """The body and headers a decode answers `GET /internal/kv_layout` with (signed): every rank's pool."""
    body = json.dumps({"ranks": [p.to_dict() for p in pools]}).encode()
    return body, {HEADER: key.sign_answer(LAYOUT_PATH, 200, body), "Content-Type": "application/json"}


# -- prefill side -------------------------------------------------------------------------------------------


class _Room:
    def __init__(self, room: int, loop: asyncio.AbstractEventLoop):
        self.room = room
        self.registration: DecodeRegistration | None = None
        self.expected = False
        self.registered: asyncio.Future = loop.create_future()
        self.paired: asyncio.Future = loop.create_future()
        self.answer: asyncio.Future = loop.create_future()


class PrefillBootstrap:
    """The bootstrap endpoint of one prefill process.

    `key` proves calls and answers; `directory` says which decode sessions exist and where their pools are.
    `layout`, when given, is the prefill's own KV layout: decodes that cannot receive its pages are refused
    with 400. `bootstrap_timeout_s` bounds pairing (either side waiting for the other); `transfer_timeout_s`
    bounds the time from pairing to `complete`/`fail`. At most `max_open_rooms` registrations are held open.
    Room-table methods (`expect`, `complete`, `fail`, `track_write`) must be called on the server's event loop.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        layout: KvLayout | None = None,
        pools: list[RankPool] | None = None,
        bootstrap_timeout_s: float = 60.0,
        transfer_timeout_s: float = 60.0,
        replay_window_s: float = 600.0,
        on_room_failed: Callable[[int, str], None] | None = None,
        *,
        key: DeploymentKey,
        directory: DecodeDirectory,
        max_open_rooms: int = DEFAULT_MAX_OPEN_ROOMS,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ):
        self.host = host
        self.port = port
        self.layout = layout
        self.pools = pools
        self.bootstrap_timeout_s = bootstrap_timeout_s
        self.transfer_timeout_s = transfer_timeout_s
        self.replay_window_s = replay_window_s
        self.on_room_failed = on_room_failed
        self.key = key
        self.directory = directory
        self.max_open_rooms = max_open_rooms
        self.max_body_bytes = max_body_bytes
        self.refused: dict[str, int] = {"unauthenticated": 0, "unknown_session": 0, "too_many_rooms": 0}
        self._rooms: dict[int, _Room] = {}
        self._writes: dict[int, asyncio.Future] = {}
        self._finished: OrderedDict[int, tuple[float, str]] = OrderedDict()
        self._runner: web.AppRunner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- server ---------------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body_bytes)
        app.router.add_get("/health", self._health)
        app.router.add_post("/v1/kv/{room}", self._register)
        app.router.add_post("/v1/kv/{room}/cancel", self._cancel)
        return app

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        # Cancelling handlers on disconnect is how a vanished decode is noticed.
        self._runner = web.AppRunner(
            self.app(), handler_cancellation=True, access_log=None, shutdown_timeout=2.0
        )
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        self.port = self._runner.addresses[0][1]
        log.info("KV bootstrap listening on %s", self.url)

    async def stop(self) -> None:
        for room in list(self._rooms):
            self._fail(room, "prefill bootstrap is shutting down", 503)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.directory.close()

    @property
    def url(self) -> str:
        return bootstrap_url(self.host, self.port)

    @property
    def open_rooms(self) -> int:
        return len(self._rooms)

    @property
    def writes_in_flight(self) -> int:
        return len(self._writes)

    # --- room table (prefill side) ----------------------------------------------------------------------

    async def expect(self, room: int, timeout: float | None = None) -> DecodeRegistration:
        """Wait for the decode's registration of `room` (it may already be there). KvTransferError on timeout."""
        self._check_loop()
        try:
            check_room(room)
        except ValueError as exc:
            raise KvTransferError(room, str(exc)) from None
        self._forget_old()
        if room in self._finished:
            raise KvTransferError(room, f"room already finished ({self._finished[room][1]})")
        entry = self._rooms.get(room)
        if entry is None:
            entry = self._rooms[room] = _Room(room, self._loop)
        if entry.expected:
            raise KvTransferError(room, "room is already being served by another request")
        entry.expected = True
        wait = self.bootstrap_timeout_s if timeout is None else timeout
        try:
            registration = await asyncio.wait_for(asyncio.shield(entry.registered), timeout=wait)
        except asyncio.TimeoutError:
            reason = f"decode did not register within {wait:g}s"
            self._fail(room, reason, 504, notify=False)
            raise KvTransferError(room, reason) from None
        except asyncio.CancelledError:
            self._fail(room, "prefill request was cancelled", 503, notify=False)
            raise
        if not entry.paired.done():
            entry.paired.set_result(None)
        return registration

    def track_write(self, room: int, write: asyncio.Future) -> None:
        """`write` puts KV into the decode's pages of `room`: a cancel of the room waits for it to end."""
        self._check_loop()
        self._writes[room] = write
        write.add_done_callback(
            lambda _f: self._writes.pop(room, None) if self._writes.get(room) is write else None
        )

    def complete(
        self, room: int, first_token: int, logprob: float | None = None, extra: dict | None = None
    ) -> bool:
        """Answer the decode: its KV is written. False if the room is no longer open (decode gone, timed out)."""
        self._check_loop()
        entry = self._rooms.get(room)
        if entry is None or entry.registration is None or entry.answer.done():
            return False
        body = {
            "room": room,
            "first_token": int(first_token),
            "logprob": logprob,
            "pages": len(entry.registration.page_ids),
            "extra": extra or {},
        }
        entry.answer.set_result((200, body))
        self._rooms.pop(room, None)
        self._remember(room, "completed")
        return True

    def fail(self, room: int, reason: str) -> bool:
        """Answer the decode with an error. False if the room was no longer open."""
        self._check_loop()
        return self._fail(room, reason, 500, notify=False)

    def _check_loop(self) -> None:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if self._loop is None or running is not self._loop:
            raise RuntimeError(
                "call PrefillBootstrap room methods on its event loop (loop.call_soon_threadsafe from threads)"
            )

    def _remember(self, room: int, outcome: str) -> None:
        self._finished[room] = (time.monotonic(), outcome)
        self._finished.move_to_end(room)
        self._forget_old()

    def _forget_old(self) -> None:
        horizon = time.monotonic() - self.replay_window_s
        while self._finished:
            room, (when, _) = next(iter(self._finished.items()))
            if when >= horizon and len(self._finished) <= _FINISHED_KEEP:
                break
            self._finished.popitem(last=False)

    def _fail(self, room: int, reason: str, status: int, notify: bool = True) -> bool:
        entry = self._rooms.pop(room, None)
        if entry is None:
            return False
        self._remember(room, f"failed: {reason}")
        log.warning("KV room %d failed: %s", room, reason)
        if not entry.answer.done():
            entry.answer.set_result((status, error_body(reason, status, "kv_transfer_failed")))
        if not entry.registered.done() and entry.expected:
            entry.registered.set_exception(KvTransferError(room, reason))
        if entry.registration is not None:
            entry.registration.gone_reason = reason
            entry.registration.gone.set()
        if notify and entry.expected and self.on_room_failed is not None:
            try:
                self.on_room_failed(room, reason)
            except Exception:
                log.exception("on_room_failed callback raised for room %d", room)
        return True

    # --- HTTP handlers ------------------------------------------------------------------------------

    def _answer(self, request: web.Request, body: dict, status: int) -> web.Response:
        data = json.dumps(body).encode()
        headers = {HEADER: self.key.sign_answer(request.raw_path, status, data)}
        return web.Response(body=data, status=status, headers=headers, content_type="application/json")

    def _error(self, request: web.Request, message: str, kind: str, status: int) -> web.Response:
        return self._answer(request, error_body(message, status, kind), status)

    async def _authentic(self, request: web.Request) -> bytes | web.Response:
        """The request's body once its proof checks out; else the 4xx to answer with."""
        try:
            raw = await read_limited(request, self.max_body_bytes)
        except TooLarge:
            message = f"registration body too large (limit {self.max_body_bytes} bytes)"
            return self._error(request, message, "invalid_request", 413)
        try:
            self.key.verify(request.method, request.raw_path, raw, request.headers.get(HEADER))
        except AuthError as exc:
            self.refused["unauthenticated"] += 1
            return self._error(request, str(exc), "unauthorized", 401)
        return raw

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "open_rooms": len(self._rooms)})

    async def _room_call(self, request: web.Request) -> tuple[int, bytes] | web.Response:
        """(room, body) of an authentic call about a room; else the 4xx to answer with."""
        try:
            room = parse_room(request.match_info["room"])
        except ValueError as exc:
            return self._error(request, str(exc), "invalid_request", 400)
        raw = await self._authentic(request)
        return raw if isinstance(raw, web.Response) else (room, raw)

    async def _register(self, request: web.Request) -> web.Response:
        call = await self._room_call(request)
        if isinstance(call, web.Response):
            return call
        room, raw = call
        self._forget_old()
        if room in self._finished:
            message = f"room {room} already finished ({self._finished[room][1]})"
            return self._error(request, message, "room_conflict", 409)
        entry = self._rooms.get(room)
        if entry is not None and entry.registration is not None:
            return self._error(request, f"room {room} is already registered", "room_conflict", 409)
        if sum(1 for r in self._rooms.values() if r.registration is not None) >= self.max_open_rooms:
            self.refused["too_many_rooms"] += 1
            message = f"this prefill holds {self.max_open_rooms} open rooms already; retry later"
            return self._error(request, message, "too_many_rooms", 503)
        try:
            registration = DecodeRegistration.from_json(room, json.loads(raw))
        except (ValueError, RecursionError) as exc:  # includes malformed JSON
            return self._error(request, f"bad registration: {exc}", "invalid_request", 400)
        try:
            name, announced = await self.directory.resolve(registration.session_id)
        except KeyError:
            self.refused["unknown_session"] += 1
            message = f"session {registration.session_id} is not a decode this deployment started"
            return self._error(request, message, "unknown_session", 403)
        if registration.layout != announced[0].layout:
            message = f"the registration's KV layout is not the one decode {name} announced"
            return self._error(request, message, "invalid_request", 400)
        if self.pools:
            reason = pools_incompatibility(self.pools, announced)
        else:
            reason = self.layout.incompatibility(announced[0].layout) if self.layout else None
        if reason:
            message = f"decode {name}'s KV layout is incompatible with this prefill: {reason}"
            return self._error(request, message, "invalid_request", 400)
        registration.pools = announced
        # Read the room again: while the session was looked up, the prefill's own request may have opened
        # it (fine), or a concurrent registration won it, or it finished (not fine).
        entry = self._rooms.get(room)
        if entry is not None and entry.registration is not None:
            message = f"room {room} was registered meanwhile"
            return self._error(request, message, "room_conflict", 409)
        if room in self._finished:
            message = f"room {room} already finished ({self._finished[room][1]})"
            return self._error(request, message, "room_conflict", 409)
        if entry is None:
            entry = self._rooms[room] = _Room(room, self._loop)
        entry.registration = registration
        entry.registered.set_result(registration)
        try:
            try:
                await asyncio.wait_for(asyncio.shield(entry.paired), timeout=self.bootstrap_timeout_s)
            except asyncio.TimeoutError:
                self._fail(
                    room, f"prefill got no request for this room within {self.bootstrap_timeout_s:g}s", 504
                )
            else:
                try:
                    await asyncio.wait_for(asyncio.shield(entry.answer), timeout=self.transfer_timeout_s)
                except asyncio.TimeoutError:
                    self._fail(room, f"prefill did not finish within {self.transfer_timeout_s:g}s", 504)
        except asyncio.CancelledError:
            self._fail(room, "decode disconnected", 499)
            raise
        status, body = entry.answer.result()
        return self._answer(request, body, status)

    async def _cancel(self, request: web.Request) -> web.Response:
        """The decode gives up on a room: after this answer nothing of ours writes into its pages."""
        call = await self._room_call(request)
        if isinstance(call, web.Response):
            return call
        room, _ = call
        if not self._fail(room, "the decode cancelled the room", 499) and room not in self._finished:
            self._remember(room, "cancelled by the decode")  # a late request for it must not pair
        write = self._writes.get(room)
        in_flight = False
        if write is not None:
            try:
                await asyncio.wait_for(asyncio.shield(write), timeout=self.transfer_timeout_s)
            except asyncio.TimeoutError:
                in_flight = True
            except Exception:
                pass  # a failed write has ended all the same
        return self._answer(request, {"room": room, "write_in_flight": in_flight}, 200)


# -- decode side ----------------------------------------------------------------------------------------


class DecodeBootstrapClient:
    """Decode side of the hand-off. One instance per decode process (it keeps an HTTP session).

    While the registration is open, `/health` of the prefill's bootstrap is polled every `heartbeat_s`;
    `heartbeat_misses` failures in a row end the wait, so a frozen prefill is noticed before `timeout`.
    """

    def __init__(
        self,
        key: DeploymentKey,
        connect_timeout_s: float = 5.0,
        heartbeat_s: float = 5.0,
        heartbeat_misses: int = 2,
        cancel_timeout_s: float = 5.0,
    ):
        self.key = key
        self.connect_timeout_s = connect_timeout_s
        self.heartbeat_s = heartbeat_s
        self.heartbeat_misses = heartbeat_misses
        self.cancel_timeout_s = cancel_timeout_s
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # No pooling: a kept-alive connection to a dead prefill would only add a failure mode.
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def register_and_wait(
        self, bootstrap_url: str, room: int, registration: DecodeRegistration, timeout: float
    ) -> KvResult:
        """Register the pages of `room` with the prefill and wait until its KV is written. KvTransferError otherwise.

        Cancelling this call closes the connection, which tells the prefill to drop the room.
        """
        check_room(room)
        base = bootstrap_url.rstrip("/")
        post = asyncio.create_task(self._post(base, room, registration, timeout))
        watch = asyncio.create_task(self._watch_health(base, room))
        try:
            await asyncio.wait({post, watch}, return_when=asyncio.FIRST_COMPLETED)
            if post.done():
                return post.result()
            return watch.result()  # only returns by raising
        finally:
            for task in (post, watch):
                if not task.done():
                    task.cancel()
            for task in (post, watch):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def cancel(self, bootstrap_url: str, room: int) -> bool:
        """End `room` at the prefill. True once the prefill has proved no write into our pages is under way
        (they may be reused at once); False when that cannot be known (unreachable, unproven answer)."""
        path = f"/v1/kv/{check_room(room)}/cancel"
        limits = aiohttp.ClientTimeout(total=self.cancel_timeout_s, connect=self.connect_timeout_s)
        try:
            async with self._http().post(
                bootstrap_url.rstrip("/") + path,
                data=b"",
                headers=self.key.headers("POST", path),
                timeout=limits,
            ) as response:
                body = await response.read()
                if response.status != 200:
                    return False
                self.key.verify_answer(path, response.status, body, response.headers.get(HEADER))
        except (asyncio.TimeoutError, aiohttp.ClientError, OSError, AuthError) as exc:
            log.warning("cancel of room %d at %s failed: %s", room, bootstrap_url, exc)
            return False
        try:
            return json.loads(body).get("write_in_flight") is False
        except (ValueError, AttributeError):
            return False

    async def _post(self, base: str, room: int, registration: DecodeRegistration, timeout: float) -> KvResult:
        path = f"/v1/kv/{room}"
        payload = json.dumps(registration.to_json()).encode()
        headers = {**self.key.headers("POST", path, payload), "Content-Type": "application/json"}
        limits = aiohttp.ClientTimeout(total=timeout, connect=min(self.connect_timeout_s, timeout))
        try:
            async with self._http().post(
                base + path, data=payload, headers=headers, timeout=limits
            ) as response:
                body = await response.read()
                status = response.status
                proof = response.headers.get(HEADER)
        except asyncio.TimeoutError:
            raise KvTransferError(room, f"no KV from {base} within {timeout:g}s") from None
        except aiohttp.ClientConnectorError as exc:
            # Stage 1: nothing listens there (the prefill is not running, or not yet).
            raise KvTransferError(
                room,
                f"cannot reach the prefill bootstrap at {base} (is the prefill running?): {exc.os_error}",
            ) from None
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, aiohttp.ClientPayloadError) as exc:
            # Stage 2: connected, then the connection ended without an answer. Whether the kernel reports a
            # reset or a clean close depends on how the prefill died; the message does not.
            raise KvTransferError(
                room,
                f"connection to the prefill bootstrap at {base} was lost before it answered "
                f"(the prefill died or restarted): {type(exc).__name__}",
            ) from None
        except aiohttp.ClientError as exc:
            raise KvTransferError(room, f"request to the prefill bootstrap at {base} failed: {exc}") from None
        if status == 200:
            try:
                self.key.verify_answer(path, status, body, proof)
            except AuthError as exc:
                raise KvTransferError(
                    room, f"the answer from {base} is not from this deployment: {exc}"
                ) from None
        return _parse_answer(room, status, body.decode(errors="replace"), len(registration.page_ids))

    async def _watch_health(self, base: str, room: int) -> KvResult:
        misses = 0
        limits = aiohttp.ClientTimeout(total=self.heartbeat_s)
        while True:
            await asyncio.sleep(self.heartbeat_s)
            try:
                async with self._http().get(f"{base}/health", timeout=limits) as response:
                    healthy = response.status == 200
            except (asyncio.TimeoutError, aiohttp.ClientError):
                healthy = False
            misses = 0 if healthy else misses + 1
            if misses >= self.heartbeat_misses:
                raise KvTransferError(room, f"prefill bootstrap at {base} stopped answering health checks")


def _parse_answer(room: int, status: int, text: str, pages: int) -> KvResult:
    try:
        body = json.loads(text)
    except (ValueError, RecursionError):
        body = None
    if status != 200:
        message = text[:300]
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            message = str(body["error"].get("message", message))
        raise KvTransferError(room, f"prefill answered {status}: {message}")
    if not isinstance(body, dict) or isinstance(body.get("first_token"), bool):
        raise KvTransferError(room, f"malformed answer from the prefill bootstrap: {text[:200]!r}")
    first_token, logprob, extra = body.get("first_token"), body.get("logprob"), body.get("extra") or {}
    if not isinstance(first_token, int) or not (logprob is None or isinstance(logprob, (int, float))):
        raise KvTransferError(room, f"malformed answer from the prefill bootstrap: {text[:200]!r}")
    if body.get("room") != room or body.get("pages") != pages:
        raise KvTransferError(
            room,
            f"the prefill's answer is for room {body.get('room')} and {body.get('pages')} pages, "
            f"not room {room} and {pages} pages",
        )
    return KvResult(room, first_token, None if logprob is None else float(logprob), extra)
