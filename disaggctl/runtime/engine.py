"""The engine: model + KV pool + scheduler, stepped by one thread.

Other threads talk to it only through thread-safe calls that queue a command (`add_request`, `abort`,
`release`, `kv_arrived`, `kv_failed`); the step thread applies them between steps, so the scheduler and
the allocator have a single owner. Results go back through `Request.on_event(RequestEvent)`, called on the
step thread (keep it cheap: the server hops to its event loop with `call_soon_threadsafe`).

Modes, all behaviours of this one engine:
- `normal`: prefill then decode; events carry new token ids, the last one a finish reason.
- `prefill_only`: prefill, sample the first token, emit `kind="prefilled"` with the page ids, the first
  token and its logprob; the pages stay allocated (for the transfer to read) until `release(rid)`.
- `remote_kv`: allocate the prompt's pages, emit `kind="kv_pages"` with their ids, then wait (without
  blocking anyone) for `kv_arrived(rid, first_token, logprob)`, after which it decodes as if it had
  prefilled itself; or `kv_failed(rid, reason)`: error event, pages quarantined (late writes may land).
"""

from __future__ import annotations

import concurrent.futures
import logging
import socket
import threading
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from disaggctl.runtime.config import ConfigError, EngineConfig, ModelConfig
from disaggctl.runtime.model_runner import ModelRunner, StepBatch, TransferSettings
from disaggctl.runtime.parallel import (
    TensorParallel,
    check_divisible,
    destroy_process_group,
    init_process_group,
)
from disaggctl.runtime.sampling import SamplingParams, make_generator, sample
from disaggctl.runtime.scheduler import Scheduler, Sequence, Status
from disaggctl.runtime.tp_worker import Ranks, worker_spec

log = logging.getLogger("disaggctl.runtime.engine")

MODES = ("normal", "prefill_only", "remote_kv")


@dataclass
class RequestEvent:
    rid: str
    kind: str  # "tokens" | "prefilled" | "kv_pages" | "error"
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    matched: int | None = None  # the stop token that ended the request
    error: str | None = None
    page_ids: list[int] | None = None  # prefilled / kv_pages
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Request:
    rid: str | None
    prompt_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    mode: str = "normal"
    on_event: Callable[[RequestEvent], None] | None = None
    embeds: Any = None  # vision.embeds.ImageEmbeds: image embeddings in place of the image tokens

    def __post_init__(self):
        if self.rid is None:
            self.rid = uuid.uuid4().hex


class Engine:
    """Rank 0 of a server: the command queue, the modes and the step loop over a `ModelRunner` (and, with
    tensor parallelism, the other ranks' runners, which follow its steps)."""

    def __init__(self, config: EngineConfig, transfer: TransferSettings | None = None):
        config.validate()
        self.device = config.resolve_device()
        self.dtype = config.resolve_dtype(self.device)
        self.model_config = ModelConfig.from_hf_dir(config.model)
        mc = self.model_config
        if mc.vision is not None:
            mc.load_vision = config.vision
            if config.tp_size > 1:
                raise ConfigError(f"{config.model}: a vision-language model runs with tp_size 1 only")
        max_len = config.max_model_len or mc.max_position_embeddings
        if mc.sliding_window:
            max_len = min(max_len, mc.sliding_window)
        ep = config.ep_size > 1
        if ep and not mc.num_experts:
            raise ConfigError(f"{config.model}: ep_size {config.ep_size} needs a mixture-of-experts model")
        why = check_divisible(mc, config.tp_size, ep)
        if why:
            raise ConfigError(f"{config.model}: cannot split over {config.tp_size} ranks: {why}")
        tp = TensorParallel(0, config.tp_size, ep)
        self.runner = ModelRunner(config, mc, self.device, self.dtype, max_len, tp)
        self.model = self.runner.model
        self.kv_cache = self.runner.kv_cache
        self.config = replace(config, max_model_len=max_len, max_pages=self.kv_cache.num_pages)
        self.ranks: Ranks | None = None
        self._writer = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="kv-write")
        try:
            if tp.enabled:
                self._start_ranks(tp, max_len, transfer)
            if transfer is not None:
                self.runner.attach_agent(transfer)
            # every rank's KV pool, rank order: where a peer writes (or reads) this server's KV
            self.pools = [self.runner.pool()] + (self.ranks.wait_ready() if self.ranks else [])
            self.runner.capture_graphs()  # the other ranks capture theirs at the same time
        except BaseException:
            self._close_ranks()
            raise
        self.scheduler = Scheduler(
            self.kv_cache.allocator, config.page_size, config.max_batch, config.chunk_size
        )
        self.seqs: dict[str, Sequence] = {}
        # events wait here until `_flush`; on CUDA a step's events go out while the GPU runs the next
        # step, off the host's critical path (the GPU idles whenever the step thread is busy)
        self._outbox: list[tuple[Sequence, RequestEvent]] = []
        self._overlap = self.device.startswith("cuda")
        self._commands: deque = deque()
        self._wake = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seed_source = torch.Generator().manual_seed(config.seed)
        self.counters = {"prompt_tokens": 0, "generation_tokens": 0, "steps": 0, "step_errors": 0}

    def _start_ranks(self, tp: TensorParallel, max_len: int, transfer: TransferSettings | None) -> None:
        with socket.socket() as s:  # the rendezvous port: free now, taken by the store right below
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        spec = worker_spec(
            self.config, tp.size, self.kv_cache.num_pages, max_len, port, transfer, self.config.dist_timeout_s
        )
        self.ranks = Ranks.spawn(spec, tp.size)
        init_process_group(
            tp, "127.0.0.1", port, self.device, self.config.dist_timeout_s, self.config.moe_a2a_backend
        )
        log.info("tensor parallel: %d ranks, KV heads %d per rank", tp.size, self.kv_cache.num_kv_heads)

    def _close_ranks(self) -> None:
        if self.ranks is not None:
            self.ranks.close()
        self.runner.close()
        destroy_process_group()

    # ---- thread-safe API ----

    def add_request(self, req: Request) -> None:
        self._command(("add", req))

    def abort(self, rid: str, late_writes: bool | None = None) -> None:
        """The request leaves the batch. `late_writes`: may a peer still write into its pages (they are then
        quarantined)? None: assume so while it waits for remote KV."""
        self._command(("abort", rid, late_writes))

    def release(self, rid: str) -> None:
        """prefill_only: the pages were read; free them."""
        self._command(("release", rid))

    def kv_arrived(self, rid: str, first_token: int, logprob: float = 0.0) -> None:
        self._command(("kv_arrived", rid, int(first_token), float(logprob)))

    def kv_failed(self, rid: str, reason: str, late_writes: bool = True) -> None:
        """The remote KV will not come. `late_writes=False` once the peer proved no write is under way:
        the pages are then free at once instead of quarantined."""
        self._command(("kv_failed", rid, str(reason), bool(late_writes)))

    def stats(self) -> dict:
        sch, alloc = self.scheduler, self.kv_cache.allocator
        parked = list(sch.parked.values())
        return {
            "running": len(sch.running),
            "waiting": len(sch.waiting),
            "waiting_kv": sum(1 for s in parked if s.status == Status.WAITING_KV),
            "held": sum(1 for s in parked if s.status == Status.HELD),
            "pages_total": alloc.num_pages,
            "pages_free": alloc.num_free,
            "pages_used": alloc.num_pages - alloc.num_free - alloc.num_quarantined,
            "pages_quarantined": alloc.num_quarantined,
            "preemptions": sch.num_preemptions,
            **self.counters,
        }

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="engine-step", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        with self._wake:
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        self._writer.shutdown(wait=True)
        self._close_ranks()

    def alive(self) -> bool:
        ranks_ok = self.ranks is None or self.ranks.death is None
        return self._thread is not None and self._thread.is_alive() and ranks_ok

    def failure(self) -> str | None:
        """Why this server cannot serve any more (a rank died), or None."""
        return self.ranks.death if self.ranks is not None else None

    def write_kv(self, rank: int, session_id: str, srcs, dsts, lens) -> concurrent.futures.Future:
        """Have `rank` write from its KV pool into a peer's (the PD hand-off); thread-safe. The future ends
        with None or raises with the reason."""
        if rank == 0:
            return self._writer.submit(self.runner.write, session_id, srcs, dsts, lens)
        return self.ranks.write(rank, session_id, srcs, dsts, lens)

    def _command(self, cmd: tuple) -> None:
        with self._wake:
            self._commands.append(cmd)
            self._wake.notify()

    # ---- step thread ----

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                worked = self.step()
            except Exception:  # a bug outside the forward pass; keep serving the others
                log.exception("engine step failed")
                worked = False
            if not worked:
                with self._wake:
                    if not self._commands and not self._stop.is_set():
                        self._wake.wait(0.05)
        self._shutdown()

    def _shutdown(self) -> None:
        self.apply_commands()
        for seq in list(self.seqs.values()):
            self._fail(seq, "engine stopped", reason="abort")
        self._flush()

    def step(self) -> bool:
        """Apply queued commands, then run one batch. False when there was nothing to run (and no
        event left to send)."""
        self.apply_commands()
        if not self.scheduler.has_work():
            return self._flush()
        step = self.scheduler.schedule()
        for seq, why in step.failed:
            self._fail(seq, why)
        for seq in step.kv_waits:
            self._emit(seq, RequestEvent(seq.rid, "kv_pages", page_ids=list(seq.pages)))
        if not step.rows:
            self._flush()
            return bool(step.kv_waits or step.failed)
        try:
            logits, samplers = self._forward(step.rows)
            self._flush()  # the previous step's events, while the device computes this one
            tokens, logprobs = sample(logits, [s.params for s in samplers], [s.generator for s in samplers])
        except Exception as e:  # fail this step's requests only; the engine goes on
            log.exception("forward pass failed")
            self.counters["step_errors"] += 1
            for seq, _ in step.rows:
                self._fail(seq, f"engine error: {type(e).__name__}: {e}")
            self._flush()
            return True
        self.counters["steps"] += 1
        for seq, n in step.rows:
            seq.num_computed += n
        for seq, tok, lp in zip(samplers, tokens, logprobs, strict=True):
            self._on_sample(seq, tok, lp)
        if not self._overlap:
            self._flush()
        return True

    def _forward(self, rows: list[tuple[Sequence, int]]):
        ids, positions, slices, logit_rows, samplers = [], [], [], [], []
        embed_rows, embeds = [], []
        for seq, n in rows:
            start = seq.num_computed
            mm = getattr(seq.request, "embeds", None)
            if mm is not None:  # the image tokens of this chunk take the image's embeddings
                offsets, values = mm.within(start, n)
                embed_rows += [len(ids) + o for o in offsets]
                embeds.append(values)
            ids += seq.tokens[start : start + n]
            positions += range(start, start + n)
            slices.append((n, start + n, list(seq.pages)))
            if start + n == len(seq.tokens):
                logit_rows.append(len(ids) - 1)
                samplers.append(seq)
        if not logit_rows:  # only partial prefill chunks: no logits needed, but the KV still is
            logit_rows = [len(ids) - 1]
        batch = StepBatch(ids, positions, slices, logit_rows)
        if embed_rows:
            batch.embed_rows, batch.embeds = embed_rows, torch.cat(embeds)
        if self.ranks is not None:
            self.ranks.step(batch)  # the other ranks run the same step and meet us in its all-reduces
        logits = self.runner.forward(batch)
        return logits[: len(samplers)], samplers

    def _on_sample(self, seq: Sequence, token: int, logprob: float) -> None:
        if seq.mode == "prefill_only":
            self.counters["prompt_tokens"] += seq.prompt_len
            self.scheduler.hold(seq)
            self._emit(
                seq,
                RequestEvent(
                    seq.rid,
                    "prefilled",
                    token_ids=[token],
                    logprobs=[logprob],
                    page_ids=list(seq.pages),
                    prompt_tokens=seq.prompt_len,
                ),
            )
            return
        if seq.num_output == 0 and seq.preemptions == 0:
            self.counters["prompt_tokens"] += seq.prompt_len
        self._append(seq, token, logprob)

    def _append(self, seq: Sequence, token: int, logprob: float) -> None:
        seq.tokens.append(token)
        self.counters["generation_tokens"] += 1
        p = seq.params
        reason, matched = None, None
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.model_config.eos_token_ids):
            reason, matched = "stop", token
        elif (p.max_new_tokens is not None and seq.num_output >= p.max_new_tokens) or len(
            seq.tokens
        ) >= self.config.max_model_len:
            reason = "length"
        ev = RequestEvent(
            seq.rid,
            "tokens",
            token_ids=[token],
            logprobs=[logprob],
            finished=reason is not None,
            finish_reason=reason,
            matched=matched,
            prompt_tokens=seq.prompt_len,
            completion_tokens=seq.num_output,
        )
        if reason is not None:
            self._drop(seq)
        self._emit(seq, ev)

    # ---- commands (step thread) ----

    def apply_commands(self) -> None:
        while True:
            with self._wake:
                if not self._commands:
                    return
                cmd = self._commands.popleft()
            try:
                getattr(self, "_cmd_" + cmd[0])(*cmd[1:])
            except Exception:
                log.exception("engine command %s failed", cmd[0])

    def _cmd_add(self, req: Request) -> None:
        why = self._invalid(req)
        seq = Sequence(
            rid=req.rid,
            tokens=list(req.prompt_ids),
            prompt_len=len(req.prompt_ids),
            params=req.sampling,
            mode=req.mode,
            request=req,
        )
        if why is not None:
            self._emit(seq, _error(seq, why))
            return
        if not req.sampling.greedy:
            seed = req.sampling.seed
            if seed is None:
                seed = int(torch.randint(0, 2**62, (1,), generator=self._seed_source))
            seq.generator = make_generator(seed, self.device)
        self.seqs[seq.rid] = seq
        self.scheduler.add(seq)

    def _invalid(self, req: Request) -> str | None:
        if req.rid in self.seqs:
            return f"a request with rid {req.rid!r} is already in the engine"
        if req.mode not in MODES:
            return f"unknown mode {req.mode!r}; one of {', '.join(MODES)}"
        if not isinstance(req.sampling, SamplingParams):
            return "sampling must be a SamplingParams"
        why = req.sampling.validate()
        if why:
            return why
        ids, vocab = req.prompt_ids, self.model_config.vocab_size
        if not ids:
            return "the prompt is empty"
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in ids):
            return f"prompt token ids must be integers in [0, {vocab})"
        if len(ids) >= self.config.max_model_len:
            return (
                f"the prompt has {len(ids)} tokens; the context is {self.config.max_model_len} "
                "tokens and must leave room for one new token"
            )
        need = self.scheduler.pages_needed(len(ids) + 1)
        if need > self.kv_cache.num_pages:
            return f"the prompt needs {need} KV pages but the pool has {self.kv_cache.num_pages}"
        return None

    def _cmd_abort(self, rid: str, late_writes: bool | None = None) -> None:
        seq = self.seqs.get(rid)
        if seq is None:
            return
        # pages a peer may still be writing into are quarantined, not reused at once
        late_writes = seq.status == Status.WAITING_KV and late_writes is not False
        self._drop(seq, self.config.quarantine_s if late_writes else None)
        self._emit(seq, RequestEvent(rid, "tokens", finished=True, finish_reason="abort"))

    def _cmd_release(self, rid: str) -> None:
        seq = self.seqs.get(rid)
        if seq is not None and seq.status == Status.HELD:
            self._drop(seq)

    def _cmd_kv_arrived(self, rid: str, first_token: int, logprob: float) -> None:
        seq = self.seqs.get(rid)
        if seq is None or seq.status != Status.WAITING_KV:
            log.warning("kv_arrived for %s, which is not waiting for KV", rid)
            return
        if not 0 <= first_token < self.model_config.vocab_size:
            self._fail(seq, f"remote prefill sent an invalid first token {first_token}", quarantine=True)
            return
        self.scheduler.kv_arrived(seq)
        self.counters["prompt_tokens"] += seq.prompt_len
        self._append(seq, first_token, logprob)

    def _cmd_kv_failed(self, rid: str, reason: str, late_writes: bool = True) -> None:
        seq = self.seqs.get(rid)
        if seq is not None:
            quarantine = late_writes and seq.status == Status.WAITING_KV
            self._fail(seq, f"KV transfer failed: {reason}", quarantine=quarantine)

    # ---- helpers ----

    def _drop(self, seq: Sequence, quarantine_s: float | None = None) -> None:
        self.scheduler.remove(seq, quarantine_s)
        self.seqs.pop(seq.rid, None)

    def _fail(self, seq: Sequence, why: str, quarantine: bool = False, reason: str | None = None) -> None:
        self._drop(seq, self.config.quarantine_s if quarantine else None)
        ev = _error(seq, why)
        if reason is not None:
            ev.finish_reason = reason
        self._emit(seq, ev)

    def _emit(self, seq: Sequence, ev: RequestEvent) -> None:
        self._outbox.append((seq, ev))

    def _flush(self) -> bool:
        """Send the queued events, in order. Whether there were any."""
        if not self._outbox:
            return False
        out, self._outbox = self._outbox, []
        for seq, ev in out:
            cb = getattr(seq.request, "on_event", None)
            if cb is None:
                continue
            try:
                cb(ev)
            except Exception:
                log.exception("on_event callback of request %s failed", seq.rid)
        return True


def _error(seq: Sequence, why: str) -> RequestEvent:
    return RequestEvent(
        seq.rid,
        "error",
        finished=True,
        error=why,
        prompt_tokens=seq.prompt_len,
        completion_tokens=max(seq.num_output, 0),
    )
