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
from disaggctl.runtime.model_runner import LateTokens, ModelRunner, StepBatch, TransferSettings
from disaggctl.runtime.parallel import (
    TensorParallel,
    check_divisible,
    destroy_process_group,
    init_process_group,
)
from disaggctl.runtime.sampling import SamplingParams, make_generator, sample_on_device
from disaggctl.runtime.scheduler import PLACEHOLDER, Scheduler, Sequence, Status
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
        # events wait here until `_flush`, which runs while the device computes a step when overlapping
        self._outbox: list[tuple[Sequence, RequestEvent]] = []
        self.overlap = config.overlap_schedule
        if self.overlap is None:  # on by default where the device runs apart from the host
            self.overlap = self.device.startswith("cuda") and config.tp_size == 1
        self._inflight: Launched | None = None  # the step queued on the device, not settled yet
        self._step_id = 0
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
            "pages_free": alloc.available(),
            "pages_used": alloc.num_pages - alloc.available() - alloc.num_quarantined,
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
        self._settle_inflight()
        self.apply_commands()
        for seq in list(self.seqs.values()):
            self._fail(seq, "engine stopped", reason="abort")
        self._flush()

    def step(self) -> bool:
        """Apply queued commands, then run one batch. False when there was nothing to run (and no
        event left to send).

        A step is launched, then settled: its samples read back and applied. Without overlap a step is
        settled at once. With overlap the step is queued on the device first and the previous one settled
        while the device runs it, so the host's per-request work (sampling results, events, scheduling
        the next step) no longer leaves the device idle between steps."""
        self.apply_commands()
        if not self.scheduler.has_work():
            settled = self._settle_inflight()
            return self._flush() or settled
        step = self.scheduler.schedule()
        for seq, why in step.failed:
            self._fail(seq, why)
        for seq in step.kv_waits:
            self._emit(seq, RequestEvent(seq.rid, "kv_pages", page_ids=list(seq.pages)))
        if not step.rows:
            settled = self._settle_inflight()
            self._flush()
            return bool(step.kv_waits or step.failed) or settled
        previous, self._inflight = self._inflight, None
        try:
            launched = self._launch(step.rows, previous)
        except Exception as e:  # fail this step's requests only; the engine goes on
            log.exception("forward pass failed")
            self.counters["step_errors"] += 1
            self._settle(previous)
            self._drain_device()  # what the failed step queued must not write into the pages freed below
            for seq, _ in step.rows:
                self._fail(seq, f"engine error: {type(e).__name__}: {e}")
            self._flush()
            return True
        self.counters["steps"] += 1
        if self.overlap:
            self._inflight = launched
            self.kv_cache.allocator.fence = launched.step  # pages freed from here on may get its writes
            self._flush()  # the events so far, while the device computes this step
            self._settle(previous)
        else:
            self._settle(launched)
        self._flush()
        return True

    def _launch(self, rows: list[tuple[Sequence, int]], previous: Launched | None) -> Launched:
        """Queue one step's forward pass and sampling; each sampling sequence gets a placeholder token
        that `_settle` replaces."""
        ids, positions, slices, logit_rows, samplers = [], [], [], [], []
        embed_rows, embeds = [], []
        late_rows, late_sources = [], []
        for seq, n in rows:
            start = seq.num_computed
            mm = getattr(seq.request, "embeds", None)
            if mm is not None:  # the image tokens of this chunk take the image's embeddings
                offsets, values = mm.within(start, n)
                embed_rows += [len(ids) + o for o in offsets]
                embeds.append(values)
            if previous is not None:  # a token the previous step sampled and the host has not read
                late = previous.placeholder_of.get(seq)
                if late is not None and start <= late[0] < start + n:
                    late_rows.append(len(ids) + late[0] - start)
                    late_sources.append(late[1])
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
        late = LateTokens(late_rows, late_sources, previous.tokens) if late_rows else None
        logits = self.runner.forward(batch, late=late)[: len(samplers)]
        tokens, logprobs = sample_on_device(
            logits, [s.params for s in samplers], [s.generator for s in samplers]
        )
        self._step_id += 1
        launched = Launched(self._step_id, samplers, tokens, logprobs, on_device=tokens.is_cuda)
        for seq, n in rows:
            seq.num_computed += n
        for i, seq in enumerate(samplers):
            if seq.mode == "prefill_only":  # out of the batch now; its first token goes out when settled
                self.scheduler.hold(seq)
                continue
            launched.placeholder_of[seq] = (len(seq.tokens), i)
            if not self._ends_by_length(seq, len(seq.tokens)):  # else nothing more to schedule for it
                seq.tokens.append(PLACEHOLDER)
        return launched

    def _drain_device(self) -> None:
        if not self.device.startswith("cuda"):
            return
        try:
            torch.cuda.synchronize(self.device)
        except Exception:  # a device fault: the next step will report it as well
            log.exception("waiting for the device after a failed step")

    def _settle_inflight(self) -> bool:
        launched, self._inflight = self._inflight, None
        return self._settle(launched)

    def _settle(self, launched: Launched | None) -> bool:
        """Read a launched step's samples (waiting for the device if need be) and apply them."""
        if launched is None:
            return False
        tokens, logprobs = launched.read()
        alloc = self.kv_cache.allocator
        alloc.unfence(launched.step)  # that step is done: pages freed while it ran are free
        if self._inflight is None:
            alloc.fence = None
        for i, seq in enumerate(launched.samplers):
            if seq.status == Status.DONE:  # finished, aborted or failed while this step ran
                continue
            token, logprob = tokens[i], logprobs[i]
            if seq.mode == "prefill_only":
                self.counters["prompt_tokens"] += seq.prompt_len
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
                continue
            at = launched.placeholder_of[seq][0]
            if at < len(seq.tokens):
                seq.tokens[at] = token
            else:
                seq.tokens.append(token)
            self._accept(seq, at, token, logprob)
        return True

    def _ends_by_length(self, seq: Sequence, at: int) -> bool:
        """Whether the token at index `at` of `seq` is its last by length (not by a stop token)."""
        limit = seq.params.max_new_tokens
        return (limit is not None and at + 1 - seq.prompt_len >= limit) or at + 1 >= self.config.max_model_len

    def _append(self, seq: Sequence, token: int, logprob: float) -> None:
        seq.tokens.append(token)
        self._accept(seq, len(seq.tokens) - 1, token, logprob)

    def _accept(self, seq: Sequence, at: int, token: int, logprob: float) -> None:
        """`token`, now at index `at` of the sequence, is generated: count it, end the request if it
        stops here, and send it."""
        if at == seq.prompt_len and seq.preemptions == 0:
            self.counters["prompt_tokens"] += seq.prompt_len
        self.counters["generation_tokens"] += 1
        p = seq.params
        reason, matched = None, None
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.model_config.eos_token_ids):
            reason, matched = "stop", token
        elif self._ends_by_length(seq, at):
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
            completion_tokens=at + 1 - seq.prompt_len,
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


class Launched:
    """A step queued on the device: its sampled tokens and logprobs, on their way to host memory."""

    def __init__(self, step: int, samplers: list[Sequence], tokens, logprobs, on_device: bool):
        self.step = step
        self.samplers = samplers
        self.tokens = tokens  # on the device: the next step's late inputs read from here
        # sequence -> (index of its placeholder token, its row in `tokens`)
        self.placeholder_of: dict[Sequence, tuple[int, int]] = {}
        self._host = (tokens, logprobs)
        self._ready = None
        if on_device:  # copy back without waiting; `read` waits for the copy only
            self._host = (tokens.to("cpu", non_blocking=True), logprobs.to("cpu", non_blocking=True))
            self._ready = torch.cuda.Event()
            self._ready.record()

    def read(self) -> tuple[list[int], list[float]]:
        if self._ready is not None:
            self._ready.synchronize()
        return self._host[0].tolist(), self._host[1].tolist()


def _error(seq: Sequence, why: str) -> RequestEvent:
    return RequestEvent(
        seq.rid,
        "error",
        finished=True,
        error=why,
        prompt_tokens=seq.prompt_len,
        completion_tokens=max(seq.num_output, 0),
    )
