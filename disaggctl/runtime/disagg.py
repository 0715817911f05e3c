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
from collections.abc import AsyncIterator

from disaggctl.runtime.protocol import InvalidRequest, Job
from disaggctl.runtime.roles import Role, TokenEvent
from disaggctl.transfer.bootstrap import (
    DecodeBootstrapClient,
    DecodeRegistration,
    KvTransferError,
    PrefillBootstrap,
    bootstrap_url,
)
from disaggctl.transfer.kv_layout import KvLayout, kv_write_batches

log = logging.getLogger("disaggctl.runtime.disagg")

# How long either side waits for the other to show up for a room (a loaded prefill may queue a while).
PAIRING_TIMEOUT_S = 60.0


class TransferRole(Role):
    """What prefill and decode share: a Mooncake agent with the engine's KV pool registered."""

    def __init__(self, engine, eos_token_ids: list[int], args):
        super().__init__(engine)
        self.eos_token_ids = eos_token_ids
        self.args = args
        self.agent = None
        self.layout: KvLayout | None = None

    @classmethod
    def create(cls, engine, tokenizer, args):
        return cls(engine, tokenizer.eos_token_ids, args)

    def advertised_host(self) -> str:
        host = getattr(self.args, "advertise_host", None) or self.args.host
        if host in ("0.0.0.0", "::", ""):
            raise ValueError(
                f"--host {self.args.host} is not an address peers can reach; give --advertise-host"
            )
        return host

    async def start(self) -> None:
        from disaggctl.transfer.mooncake import MooncakeAgent

        def make_agent():
            agent = MooncakeAgent(
                hostname=self.advertised_host(),
                protocol=self.args.transfer_protocol,
                ib_device=self.args.ib_device or None,
                timeout_s=self.args.transfer_timeout,
            )
            pool = self.engine.kv_cache.tensor
            try:
                agent.register(pool.data_ptr(), pool.numel() * pool.element_size())
            except BaseException:
                agent.close()
                raise
            return agent

        # Engine creation and registration block (and Mooncake busy-waits): keep them off the loop.
        self.agent = await asyncio.to_thread(make_agent)
        self.layout = KvLayout.from_tensor(self.engine.kv_cache.tensor)

    async def close(self) -> None:
        if self.agent is not None:
            await asyncio.to_thread(self.agent.close)
            self.agent = None

    def prompt_pages(self, prompt_len: int) -> int:
        return -(-prompt_len // self.engine.kv_cache.page_size)

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

    def __init__(self, engine, eos_token_ids, args):
        super().__init__(engine, eos_token_ids, args)
        self.bootstrap: PrefillBootstrap | None = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        await super().start()
        self.bootstrap = PrefillBootstrap(
            host=self.args.host,
            port=self.args.bootstrap_port,
            layout=self.layout,
            bootstrap_timeout_s=PAIRING_TIMEOUT_S,
            transfer_timeout_s=self.args.transfer_timeout + PAIRING_TIMEOUT_S,
        )
        try:
            await self.bootstrap.start()
        except OSError as e:
            await super().close()
            raise OSError(
                e.errno, f"cannot listen on bootstrap port {self.args.host}:{self.args.bootstrap_port}: {e}"
            ) from e

    async def close(self) -> None:
        if self.bootstrap is not None:
            await self.bootstrap.stop()
        for task in list(self._tasks):  # writes in flight read our pages: let them end before the agent
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(task), self.args.transfer_timeout)
        await super().close()

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
                    await pairing
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
        if registration.gone.is_set():
            return registration.gone_reason or "decode went away"
        try:
            srcs, dsts, lens = kv_write_batches(
                self.layout, prefilled.page_ids[:n], registration.layout, registration.page_ids, prompt_len
            )
            await self.agent.write_async(registration.session_id, srcs, dsts, lens)
        except Exception as e:  # TransferError, ValueError from a bad registration
            return str(e)
        return None


class DecodeRole(TransferRole):
    name = "decode"

    def __init__(self, engine, eos_token_ids, args):
        super().__init__(engine, eos_token_ids, args)
        self.client = DecodeBootstrapClient()

    async def close(self) -> None:
        await self.client.close()
        await super().close()

    async def generate(self, job: Job) -> AsyncIterator[TokenEvent]:
        self.check(job)
        stream = self.submit(job, "remote_kv", self.eos_token_ids)
        finished = False
        try:
            ev = await stream.next_raw()
            if ev.kind != "kv_pages":
                finished = True
                yield TokenEvent(finished=True, finish_reason=ev.finish_reason, error=ev.error or "aborted")
                return
            n = self.prompt_pages(len(job.prompt_ids))
            registration = DecodeRegistration(
                room=job.bootstrap_room,
                session_id=self.agent.session_id,
                layout=self.layout,
                page_ids=list(ev.page_ids[:n]),
                prompt_len=len(job.prompt_ids),
            )
            url = bootstrap_url(job.bootstrap_host, job.bootstrap_port)
            try:
                result = await self.client.register_and_wait(
                    url, job.bootstrap_room, registration, PAIRING_TIMEOUT_S + self.args.transfer_timeout
                )
            except KvTransferError as e:
                # The engine quarantines the pages: a late write from the prefill may still land in them.
                self.engine.kv_failed(job.rid, e.reason)
            else:
                self.engine.kv_arrived(job.rid, result.first_token, result.logprob or 0.0)
            while not finished:
                ev = await stream.next()
                finished = ev.finished
                yield ev
        finally:
            if not finished:  # client gone or server stopping; pages waiting for KV are quarantined
                self.abort(job.rid)
