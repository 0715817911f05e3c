"""The prefill and decode roles: one request's KV computed in one process and decoded in another.

Decode (`DecodeRole`) allocates the prompt's pages (engine mode `remote_kv`), registers them with the
prefill's bootstrap endpoint for the request's room, and waits; when the prefill answers, the KV is in
its pages and the answer carries the first token, so it decodes on as if it had prefilled itself.
Prefill (`PrefillRole`) prefills (mode `prefill_only`), pairs the room with the decode's registration,
writes every layer's K and V pages into the decode's pool with one batched Mooncake write, answers the
decode, and frees its pages. Either side failing ends the other's wait with a reason (docs/architecture.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from disaggctl.runtime.model_runner import TransferSettings
from disaggctl.runtime.protocol import InvalidRequest, Job
from disaggctl.runtime.roles import Role, TokenEvent
from disaggctl.transfer.bootstrap import (
    DecodeBootstrapClient,
    DecodeDirectory,
    DecodeRegistration,
    KvTransferError,
    PrefillBootstrap,
    bootstrap_url,
    layout_announcement,
)
from disaggctl.transfer.kv_layout import KvLayout, RankPool, rank_write_batches, write_pairs
from disaggctl.trust import DeploymentKey

log = logging.getLogger("disaggctl.runtime.disagg")

# How long either side waits for the other to show up for a room (a loaded prefill may queue a while).
PAIRING_TIMEOUT_S = 60.0


@dataclass
class TransferConfig:
    """What the PD roles need from the command line, typed (`from_args`)."""

    host: str  # where the bootstrap listens
    advertise_host: str  # where peers reach this server (Mooncake names its agents by it)
    protocol: str
    ib_device: str
    timeout_s: float
    bootstrap_port: int | None = None
    decode_peers: dict[str, str] = field(default_factory=dict)  # prefill: the plan's decodes
    prefill_bootstraps: set[tuple[str, int]] = field(default_factory=set)  # decode: the plan's prefills
    max_open_rooms: int | None = None

    @classmethod
    def from_args(cls, args) -> TransferConfig:
        advertise = args.advertise_host or args.host
        if advertise in ("0.0.0.0", "::", ""):
            raise ValueError(f"--host {args.host} is not an address peers can reach; give --advertise-host")
        return cls(
            host=args.host,
            advertise_host=advertise,
            protocol=args.transfer_protocol,
            ib_device=args.ib_device or "",
            timeout_s=args.transfer_timeout,
            # the prefill's parser and the decode's differ in these (server.build_parser)
            bootstrap_port=getattr(args, "bootstrap_port", None),
            decode_peers=decode_peers(getattr(args, "decode_peer", None)),
            prefill_bootstraps=prefill_bootstraps(getattr(args, "prefill_bootstrap", None)),
            max_open_rooms=getattr(args, "max_open_rooms", None),
        )

    def settings(self) -> TransferSettings:
        """How each rank's Mooncake agent is made."""
        return TransferSettings(self.advertise_host, self.protocol, self.ib_device or None, self.timeout_s)


class TransferRole(Role):
    """What prefill and decode share: the KV pools of the engine's ranks, each registered with Mooncake by
    its rank (`Engine.pools`), and the deployment key."""

    def __init__(self, engine, eos_token_ids: list[int], config: TransferConfig, key: DeploymentKey):
        super().__init__(engine)
        self.eos_token_ids = eos_token_ids
        self.config = config
        self.key = key
        self.pools: list[RankPool] = [RankPool.from_dict(p) for p in engine.pools]
        self.layout: KvLayout = self.pools[0].layout
        self.session_id: str = self.pools[0].session_id

    @classmethod
    def create(cls, engine, tokenizer, args, key: DeploymentKey | None = None):
        if key is None:
            raise ValueError(
                f"a {cls.name} server needs the deployment secret (DISAGGCTL_SECRET_FILE or DISAGGCTL_SECRET "
                "in its environment); `disaggctl up` provides it"
            )
        return cls(engine, tokenizer.eos_token_ids, TransferConfig.from_args(args), key)

    def prompt_pages(self, prompt_len: int) -> int:
        return self.engine.kv_cache.pages_for(prompt_len)

    def check(self, job: Job) -> None:
        if job.bootstrap_room is None or job.bootstrap_host is None or job.bootstrap_port is None:
            raise InvalidRequest(
                f"a {self.name} server needs bootstrap_host, bootstrap_port and bootstrap_room "
                "(send requests through the disaggctl proxy)"
            )

    def last_event(self, token: int) -> TokenEvent:
        reason = "stop" if token in self.eos_token_ids else "length"
        return TokenEvent(token_ids=[token], finished=True, finish_reason=reason)


class PrefillRole(TransferRole):
    name = "prefill"

    def __init__(self, engine, eos_token_ids, config, key):
        super().__init__(engine, eos_token_ids, config, key)
        self.bootstrap: PrefillBootstrap | None = None
        self._tasks: set[asyncio.Task] = set()
        # hand-offs that wrote every page, their bytes and their time (from submitting the writes to the
        # last one's end): what a hand-off costs next to the TTFT a client sees
        self.kv_sent = {"kv_handoffs": 0, "kv_handoff_bytes": 0, "kv_handoff_seconds": 0.0}

    async def start(self) -> None:
        cfg = self.config
        # The largest honest registration: one page id per page of a full-length prompt.
        max_pages = self.engine.kv_cache.pages_for(self.engine.config.max_model_len)
        self.bootstrap = PrefillBootstrap(
            host=cfg.host,
            port=cfg.bootstrap_port,
            layout=self.layout,
            pools=self.pools,
            bootstrap_timeout_s=PAIRING_TIMEOUT_S,
            transfer_timeout_s=cfg.timeout_s + PAIRING_TIMEOUT_S,
            key=self.key,
            directory=DecodeDirectory(cfg.decode_peers, self.key),
            max_open_rooms=cfg.max_open_rooms or max(64, 4 * self.engine.config.max_batch),
            max_body_bytes=16 * 1024 + 24 * max_pages,
        )
        try:
            await self.bootstrap.start()
        except OSError as e:
            raise OSError(
                e.errno, f"cannot listen on bootstrap port {cfg.host}:{cfg.bootstrap_port}: {e}"
            ) from e

    def stats(self) -> dict:
        if self.bootstrap is None:
            return {}
        refused = {f"kv_refused_{k}": v for k, v in self.bootstrap.refused.items()}
        return {
            "kv_open_rooms": self.bootstrap.open_rooms,
            "kv_writes_in_flight": self.bootstrap.writes_in_flight,
            **refused,
            **self.kv_sent,
        }

    async def close(self) -> None:
        if self.bootstrap is not None:
            await self.bootstrap.stop()
        for task in list(self._tasks):  # writes in flight read our pages: let them end before the agents
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(task), self.config.timeout_s)

    async def generate(self, job: Job) -> AsyncIterator[TokenEvent]:
        self.check(job)
        room = job.bootstrap_room
        stream = self.submit(job, "prefill_only", self.eos_token_ids)
        # Prefill and pairing run at once: the decode usually registers while the prompt is computed.
        pairing = asyncio.ensure_future(self.bootstrap.expect(room))
        prefilled = None
        handed_off = False
        try:
            ev = await stream.next_raw()
            if ev.kind != "prefilled":  # the pairing is cancelled on the way out
                yield TokenEvent(finished=True, finish_reason=ev.finish_reason, error=ev.error or "aborted")
                return
            prefilled = ev
            try:
                registration = await pairing
            except KvTransferError as e:
                yield TokenEvent(finished=True, error=e.reason)
                return
            write = asyncio.ensure_future(self._send(registration, prefilled, len(job.prompt_ids)))
            self.bootstrap.track_write(room, write)
            self._tasks.add(write)
            write.add_done_callback(self._tasks.discard)
            # The write reads our pages: they are released only once it has ended, even if we are cancelled.
            write.add_done_callback(lambda _t: self.engine.release(job.rid))
            handed_off = True
            error = await asyncio.shield(write)
            if error is not None:
                self.bootstrap.fail(room, error)
                yield TokenEvent(finished=True, error=f"KV transfer to decode failed: {error}")
                return
            first = prefilled.token_ids[0]
            logprob = prefilled.logprobs[0] if prefilled.logprobs else None
            if not self.bootstrap.complete(room, first, logprob):
                yield TokenEvent(
                    finished=True, error="the decode side went away before the KV was handed off"
                )
                return
            yield self.last_event(first)
        finally:
            if not pairing.done():
                pairing.cancel()
            with contextlib.suppress(BaseException):
                await pairing  # retrieves a pairing failure we did not wait for (no "never retrieved")
            if not handed_off:
                # Not prefilled yet: abort; prefilled but never written: the pages are held, free them.
                if prefilled is None:
                    self.engine.abort(job.rid)
                else:
                    self.engine.release(job.rid)
            # No-op once completed; otherwise the decode hears at once instead of after its timeout.
            self.bootstrap.fail(room, "the prefill request ended before the KV was handed off")

    async def _send(self, registration: DecodeRegistration, prefilled, prompt_len: int) -> str | None:
        """Write the prompt's KV into the decode's pages. The reason it failed, or None."""
        n = self.prompt_pages(prompt_len)
        if registration.prompt_len != prompt_len or len(registration.page_ids) != n:
            return (
                f"decode registered {len(registration.page_ids)} pages for a {registration.prompt_len}-token "
                f"prompt; this prefill has {prompt_len} tokens in {n} pages (same model and tokenizer?)"
            )
        try:
            # every (our rank, decode rank) pair that shares KV heads, replicas once: one batched write each
            jobs = []
            for rank, src, dst in write_pairs(self.pools, registration.pools):
                srcs, dsts, lens = rank_write_batches(
                    src, prefilled.page_ids[:n], dst, registration.page_ids, prompt_len
                )
                if srcs:
                    jobs.append((rank, dst.session_id, srcs, dsts, lens))
        except ValueError as e:  # a registration that does not fit the announced pools
            return str(e)
        # No await between this check and the writes' submission: a cancel either came first or waits.
        if registration.gone.is_set():
            return registration.gone_reason or "decode went away"
        began = time.perf_counter()
        futures = [asyncio.wrap_future(self.engine.write_kv(*job)) for job in jobs]
        # Every write is bounded by Mooncake's own timeout (or ends when its rank dies), and all of them
        # must have ended before this returns: the cancel of a room waits on it.
        results = await asyncio.gather(*futures, return_exceptions=True)
        errors = [str(r) for r in results if isinstance(r, BaseException)]
        if not errors:
            self.kv_sent["kv_handoffs"] += 1
            self.kv_sent["kv_handoff_bytes"] += sum(sum(lens) for *_, lens in jobs)
            self.kv_sent["kv_handoff_seconds"] += time.perf_counter() - began
        return "; ".join(errors) or None


class DecodeRole(TransferRole):
    name = "decode"

    def __init__(self, engine, eos_token_ids, config, key):
        super().__init__(engine, eos_token_ids, config, key)
        self.client = DecodeBootstrapClient(key)
        # Only the prefills of the plan: a request naming any other bootstrap is refused before we call it.
        self.prefills = config.prefill_bootstraps
        self._cancels: set[asyncio.Task] = set()

    async def close(self) -> None:
        for task in list(self._cancels):  # a stopping server cannot wait; their pages stay quarantined
            task.cancel()
        await self.client.close()

    def announcement(self) -> tuple[bytes, dict]:
        """What `GET /internal/kv_layout` answers: our Mooncake session and pool layout, signed."""
        return layout_announcement(self.key, self.pools)

    def check(self, job: Job) -> None:
        super().check(job)
        target = (normal_host(job.bootstrap_host), job.bootstrap_port)
        if target not in self.prefills:
            raise InvalidRequest(
                f"bootstrap {job.bootstrap_host}:{job.bootstrap_port} is not a prefill of this deployment",
                403,
                "forbidden",
            )

    def stats(self) -> dict:
        return {"kv_cancels_in_flight": len(self._cancels)}

    async def generate(self, job: Job) -> AsyncIterator[TokenEvent]:
        self.check(job)
        stream = self.submit(job, "remote_kv", self.eos_token_ids)
        finished = False
        url = bootstrap_url(job.bootstrap_host, job.bootstrap_port)
        registered = False  # from here on, the prefill may be writing into our pages
        settled = False  # the KV arrived, or we know no write into the pages is under way
        try:
            ev = await stream.next_raw()
            if ev.kind != "kv_pages":
                finished = True
                yield TokenEvent(finished=True, finish_reason=ev.finish_reason, error=ev.error or "aborted")
                return
            n = self.prompt_pages(len(job.prompt_ids))
            registration = DecodeRegistration(
                room=job.bootstrap_room,
                session_id=self.session_id,
                layout=self.layout,
                page_ids=list(ev.page_ids[:n]),
                prompt_len=len(job.prompt_ids),
            )
            registered = True
            try:
                result = await self.client.register_and_wait(
                    url, job.bootstrap_room, registration, PAIRING_TIMEOUT_S + self.config.timeout_s
                )
            except KvTransferError as e:
                # Before the pages are reused, the prefill must prove nothing of its still writes there;
                # when it cannot, the engine quarantines them.
                safe = await self.client.cancel(url, job.bootstrap_room)
                settled = True
                self.engine.kv_failed(job.rid, e.reason, late_writes=not safe)
            else:
                settled = True
                self.engine.kv_arrived(job.rid, result.first_token, result.logprob or 0.0)
            while not finished:
                ev = await stream.next()
                finished = ev.finished
                yield ev
        finally:
            if not finished:  # client gone or server stopping
                if registered and not settled:
                    self._settle_later(job.rid, url, job.bootstrap_room)
                else:
                    self.engine.abort(job.rid, late_writes=False)

    def _settle_later(self, rid: str, url: str, room: int) -> None:
        """Abort a request whose KV may be on its way: ask the prefill to end the room first (off the
        cancelled handler), and free the pages at once only if it proves no write is under way."""

        async def settle() -> None:
            safe = False
            try:
                safe = await self.client.cancel(url, room)
            finally:
                self.engine.abort(rid, late_writes=not safe)

        task = asyncio.ensure_future(settle())
        self._cancels.add(task)
        task.add_done_callback(self._cancels.discard)


def normal_host(host: str) -> str:
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def prefill_bootstraps(values: list[str] | None) -> set[tuple[str, int]]:
    """`--prefill-bootstrap HOST:PORT` values (IPv6 as [addr]:port) -> {(host, port)}. ValueError if malformed."""
    out = set()
    for value in values or []:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"--prefill-bootstrap wants HOST:PORT, got {value!r}")
        out.add((normal_host(host), int(port)))
    return out


def decode_peers(values: list[str] | None) -> dict[str, str]:
    """`--decode-peer NAME=URL` values -> {name: url}. ValueError if malformed."""
    out = {}
    for value in values or []:
        name, sep, url = value.partition("=")
        if not sep or not name or not url.startswith(("http://", "https://")):
            raise ValueError(f"--decode-peer wants NAME=http://HOST:PORT, got {value!r}")
        out[name] = url
    return out
