"""What a runtime server does with a request, per role: the server parses and formats, a role runs.

A role turns a `Job` (prompt ids, sampling, rid, the request body) into a stream of `TokenEvent`s. The
engine calls back on its own thread; `EngineStream` carries those calls onto the event loop, so the loop
never blocks on the engine. Roles are registered by name in `registry.py`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from disaggctl.runtime.protocol import Job

if TYPE_CHECKING:
    from disaggctl.runtime.engine import RequestEvent


@dataclass
class TokenEvent:
    """New token ids of one request; the last event has `finished` set (and `error` if it failed)."""

    token_ids: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    matched: int | str | None = None  # the stop token id that ended it, if any
    error: str | None = None


class Role:
    """Base of the runtime roles; `generate` is the only thing the HTTP server needs besides stats."""

    name = "base"

    def __init__(self, engine):
        self.engine = engine

    @classmethod
    def create(cls, engine, tokenizer, args, key=None) -> Role:
        """Build the role from the started engine, the model's tokenizer, the parsed command line and the
        deployment key (a `trust.DeploymentKey`, or None when the server was started without one)."""
        return cls(engine)

    def stats(self) -> dict:
        """Role-specific gauges and counters for /metrics (name -> number)."""
        return {}

    async def generate(self, job: Job) -> AsyncIterator[TokenEvent]:
        raise TypeError(f"role {self.name!r} does not generate")
        yield TokenEvent()  # makes this an async generator for type checkers and callers alike

    def check(self, job: Job) -> None:
        """Refuse a request this role cannot serve (raise protocol.InvalidRequest) before it runs."""

    async def start(self) -> None:
        """Set up what needs the event loop (transfer agents, listeners); runs before the first request."""

    async def close(self) -> None:
        """Undo `start`, on the event loop, before the engine stops."""

    def abort(self, rid: str) -> None:
        self.engine.abort(rid)

    def submit(self, job: Job, mode: str, eos_token_ids: list[int]) -> EngineStream:
        """Hand the job to the engine in `mode`; its events arrive on the returned stream."""
        from disaggctl.runtime.engine import Request

        stream = EngineStream(asyncio.get_running_loop())
        self.engine.add_request(
            Request(
                rid=job.rid,
                prompt_ids=list(job.prompt_ids),
                sampling=engine_sampling(job, eos_token_ids),
                mode=mode,
                on_event=stream.on_event,
                embeds=job.mm,
            )
        )
        return stream

    def alive(self) -> bool:
        return self.engine.alive()

    def stop(self) -> None:
        self.engine.stop()


def engine_config(role: str, args, model_dir: str):
    """The EngineConfig of a `role` server's command line (server.build_parser); options left out take
    the engine's defaults."""
    from disaggctl.runtime.config import EngineConfig

    given = {
        "dtype": args.dtype,
        "device": args.device,
        "page_size": args.page_size,
        "max_pages": args.max_pages,
        "max_batch": args.max_batch,
        "chunk_size": args.chunk_size,
        "max_model_len": args.max_model_len,
        "tp_size": args.tp_size,
        "ep_size": args.ep_size,
        "moe_a2a_backend": args.moe_a2a_backend,
        "cuda_graph": args.cuda_graph,
        "overlap_schedule": args.overlap_schedule,
        # a decode takes the KV of image tokens, and a server with encoders their embeddings: neither
        # runs the vision tower (only prefill and colocated parsers have --encoder-peer)
        "vision": role != "decode" and not args.encoder_peer,
    }
    return EngineConfig(model=model_dir, **{k: v for k, v in given.items() if v is not None})


def make_engine(role: str, args, model_dir: str, transfer=None):
    """The engine for a `role` server's command line (not started); `transfer`: the ranks' Mooncake
    settings (`model_runner.TransferSettings`) for the PD roles."""
    from disaggctl.runtime.engine import Engine

    return Engine(engine_config(role, args, model_dir), transfer=transfer)


class EngineStream:
    """An asyncio queue fed from the engine thread with `RequestEvent`s of one request."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()

    def on_event(self, ev) -> None:  # engine thread
        self._loop.call_soon_threadsafe(self._queue.put_nowait, ev)

    async def next(self) -> TokenEvent:
        return to_token_event(await self._queue.get())

    async def next_raw(self):
        """The engine's own RequestEvent (with page ids and logprobs), for the PD roles."""
        return await self._queue.get()


def to_token_event(ev: RequestEvent) -> TokenEvent:
    """The engine's RequestEvent, as the server sees it."""
    error, reason = ev.error, ev.finish_reason
    return TokenEvent(
        token_ids=list(ev.token_ids),
        finished=ev.finished or reason is not None or error is not None,
        finish_reason=reason if reason is not None else ("abort" if error is not None else None),
        matched=ev.matched,
        error=str(error) if error is not None else None,
    )


def engine_sampling(job: Job, eos_token_ids: list[int]):
    from disaggctl.runtime.sampling import SamplingParams

    s = job.sampling
    return SamplingParams(
        max_new_tokens=s.max_new_tokens,
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        seed=s.seed,
        stop_token_ids=list(s.stop_token_ids) + ([] if s.ignore_eos else list(eos_token_ids)),
        ignore_eos=s.ignore_eos,
    )


class ColocatedRole(Role):
    """Prefill and decode in one engine (mode "normal")."""

    name = "colocated"
    mode = "normal"

    def __init__(self, engine, eos_token_ids: list[int]):
        super().__init__(engine)
        self.eos_token_ids = eos_token_ids

    @classmethod
    def create(cls, engine, tokenizer, args, key=None) -> ColocatedRole:
        return cls(engine, tokenizer.eos_token_ids)

    async def generate(self, job: Job) -> AsyncIterator[TokenEvent]:
        stream = self.submit(job, self.mode, self.eos_token_ids)
        finished = False
        try:
            while not finished:
                ev = await stream.next()
                finished = ev.finished
                yield ev
        finally:
            if not finished:  # the client went away or the server is stopping
                self.abort(job.rid)
