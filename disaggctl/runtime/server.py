"""HTTP server of a runtime process (`disaggctl serve colocated|prefill|decode`), on aiohttp.

The server listens at once and answers `/health` with 503 while the model loads on a worker thread; the
engine steps on its own thread, so the event loop only parses, tokenizes and formats. What happens to a
request is up to the role object (roles.py); the server is the same for every role.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
import time
import uuid
from dataclasses import dataclass, field

from aiohttp import web

from disaggctl import __version__, httpkit
from disaggctl.runtime.config import ConfigError, EngineConfig
from disaggctl.runtime.protocol import (
    BOOTSTRAP_KEYS,
    InvalidRequest,
    Job,
    check_prompt,
    check_text_size,
    error_body,
    parse_chat,
    parse_completion,
    parse_generate,
    parse_json,
)
from disaggctl.trust import HEADER, AuthError, DeploymentKey

log = logging.getLogger("disaggctl.runtime.server")

# Seconds a stopping server waits for in-flight requests before aborting them.
DEFAULT_DRAIN_S = 5.0
# A decode's stream is silent until its KV arrives (pairing, a queued prefill, the transfer): a comment line
# every so often tells the proxy and the client the server is alive (SSE clients ignore comments).
SSE_KEEPALIVE_S = 15.0
# The hard cap aiohttp enforces; once the model is loaded, `ServerState.max_body_bytes` (what its context
# can use, as JSON) is the limit that applies.
MAX_BODY_BYTES = 16 * 1024 * 1024
MIN_BODY_BYTES = 1024 * 1024


def body_limit(max_model_len: int, max_token_bytes: int | None) -> int:
    """The largest body a request that fits the context can need: every token's text, JSON-escaped (a
    `\\u` escape with its four hex digits is 6 bytes), plus room for chat structure and sampling parameters."""
    per_token = 6 * (max_token_bytes or 16) + 8
    return max(MIN_BODY_BYTES, min(MAX_BODY_BYTES, max_model_len * per_token))


def build_parser(role: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=f"disaggctl serve {role}", description=f"Run a {role} runtime server.")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    ap.add_argument("--port", type=int, default=30000)
    ap.add_argument(
        "--model", required=True, help="a local HF model directory or builtin:tiny / builtin:smollm2"
    )
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ap.add_argument(
        "--page-size",
        type=int,
        default=None,
        help=f"tokens per KV page (default: the engine's, {EngineConfig.page_size})",
    )
    ap.add_argument(
        "--max-pages", type=int, default=None, help="KV pages in the pool (default: sized by the engine)"
    )
    ap.add_argument("--max-batch", type=int, default=None, help="most requests running at once")
    ap.add_argument("--chunk-size", type=int, default=None, help="prefill chunk, in tokens")
    ap.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    ap.add_argument(
        "--no-cuda-graph",
        dest="cuda_graph",
        action="store_false",
        help="run decode steps eagerly instead of replaying CUDA graphs (CUDA only)",
    )
    ap.add_argument(
        "--no-overlap-schedule",
        dest="overlap_schedule",
        action="store_const",
        const=False,
        default=None,
        help="read each step's tokens back before queueing the next (default: overlap on CUDA at tp 1)",
    )
    ap.add_argument("--served-model-name", default=None)
    ap.add_argument(
        "--tp-size", type=int, default=1, help="tensor-parallel ranks (one process each; rank 0 serves HTTP)"
    )
    ap.add_argument(
        "--ep-size",
        type=int,
        default=1,
        help="expert parallelism for MoE models: 1 (experts split like the MLP) or the tp size (whole experts per rank)",
    )
    ap.add_argument(
        "--moe-a2a-backend",
        choices=["none", "mooncake"],
        default=None,
        help="mooncake: the ranks' collectives over Mooncake's process group (its CUDA build)",
    )
    ap.add_argument(
        "--drain-timeout", type=float, default=DEFAULT_DRAIN_S, help="seconds to finish requests on stop"
    )
    ap.add_argument(
        "--sse-keepalive",
        type=float,
        default=SSE_KEEPALIVE_S,
        help="seconds of silence after which a stream gets an SSE comment (keeps proxies' idle timers quiet)",
    )
    ap.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    if role == "prefill":
        ap.add_argument(
            "--bootstrap-port", type=int, required=True, help="the hand-off endpoint decode talks to"
        )
    if role == "prefill":
        ap.add_argument(
            "--decode-peer",
            action="append",
            default=[],
            metavar="NAME=URL",
            help="a decode of this deployment (repeat): the only KV pools this prefill writes into",
        )
        ap.add_argument(
            "--max-open-rooms", type=int, default=None, help="registrations held at once (default 4x batch)"
        )
    if role == "decode":
        ap.add_argument(
            "--prefill-bootstrap",
            action="append",
            default=[],
            metavar="HOST:PORT",
            help="a prefill bootstrap of this deployment (repeat): the only ones this decode contacts",
        )
    ap.add_argument(
        "--allowed-local-media-path", default=None, help="directory that local image files may be read from"
    )
    if role in ("prefill", "colocated"):
        ap.add_argument(
            "--encoder-peer",
            action="append",
            default=[],
            metavar="NAME=URL",
            help="an encoder of this deployment (repeat): image embeddings come from these; the vision tower is not loaded",
        )
        ap.add_argument(
            "--embed-buffer-mb",
            type=int,
            default=64,
            help="with --encoder-peer: registered memory the encoders write image embeddings into (MiB)",
        )
    if role in ("prefill", "decode"):
        ap.add_argument("--advertise-host", default=None, help="address peers use to reach this process")
        ap.add_argument("--transfer-protocol", default="tcp", choices=["tcp", "rdma", "nvlink"])
        ap.add_argument("--ib-device", default="", help="RDMA devices, comma separated (mlx5_0,mlx5_1)")
        ap.add_argument("--transfer-timeout", type=float, default=30.0, help="seconds a KV hand-off may take")
    return ap


def check_args(ap: argparse.ArgumentParser, args: argparse.Namespace, role: str) -> None:
    """What argparse cannot check, before anything is loaded; `args` is `build_parser(role)`'s, so a
    role's own options are checked under the same role test that adds them."""
    from disaggctl.runtime.disagg import decode_peers, prefill_bootstraps
    from disaggctl.runtime.roles import engine_config

    if not 0 < args.port < 65536:
        ap.error(f"--port must be in 1..65535, got {args.port}")
    # the engine's own check of its knobs, here so that a bad one is a usage error before any model load
    try:
        engine_config(role, args, args.model).validate(spell=lambda name: "--" + name.replace("_", "-"))
    except ConfigError as e:
        ap.error(str(e))
    if args.sse_keepalive <= 0:
        ap.error("--sse-keepalive must be > 0")
    try:
        if role == "prefill":
            if not 0 < args.bootstrap_port < 65536:
                ap.error(f"--bootstrap-port must be in 1..65535, got {args.bootstrap_port}")
            if args.max_open_rooms is not None and args.max_open_rooms < 1:
                ap.error("--max-open-rooms must be >= 1")
            decode_peers(args.decode_peer)
        if role == "decode":
            prefill_bootstraps(args.prefill_bootstrap)
    except ValueError as e:
        ap.error(str(e))
    if role in ("prefill", "colocated") and args.embed_buffer_mb < 1:
        ap.error(f"--embed-buffer-mb must be >= 1, got {args.embed_buffer_mb}")
    if role in ("prefill", "decode") and args.transfer_timeout <= 0:
        ap.error("--transfer-timeout must be > 0")


@dataclass
class Counters:
    prompt_tokens: int = 0
    generation_tokens: int = 0
    success: int = 0
    failure: int = 0
    aborted: int = 0


@dataclass
class ServerState:
    role_name: str
    args: argparse.Namespace
    model_name: str
    key: DeploymentKey | None = None  # proves internal calls (docs/security.md)
    role: object | None = None  # a roles.Role once the model is loaded
    tokenizer: object | None = None
    max_model_len: int = 0
    vocab_size: int = 0
    page_size: int | None = None  # the engine's, once loaded
    load_error: str | None = None
    vision: object | None = None  # vision.inputs.VisionInputs of a multimodal model
    max_body_bytes: int = MAX_BODY_BYTES
    stopping: bool = False
    counters: Counters = field(default_factory=Counters)
    in_flight: dict[str, asyncio.Task] = field(default_factory=dict)

    def ready(self) -> bool:
        return self.role is not None and not self.stopping and self.role.alive()


STATE = web.AppKey("state", ServerState)


def json_error(message: str, status: int, type_: str = "invalid_request_error") -> web.Response:
    return web.json_response(error_body(message, status, type_), status=status)


def create_app(state: ServerState) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[STATE] = state
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/server_info", server_info)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/generate", generate)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/internal/kv_layout", kv_layout)
    app.router.add_get("/internal/embed_layout", embed_layout)
    return app


async def embed_layout(request: web.Request) -> web.Response:
    """EPD: where encoders write this server's image embeddings (signed both ways, like kv_layout)."""
    st: ServerState = request.app[STATE]
    layout = getattr(st.vision, "layout", None)
    if st.key is None or layout is None:
        return json_error("this server takes no embeddings from encoders", 404)
    try:
        check_proof(st, request, b"")
    except InvalidRequest as e:
        return web.json_response(e.body(), status=e.status)
    from disaggctl.runtime.vision.handoff import LAYOUT_PATH, signed_json

    data, headers = signed_json(st.key, LAYOUT_PATH, 200, layout.to_dict())
    return web.Response(body=data, headers=headers)


def check_proof(st: ServerState, request: web.Request, raw: bytes) -> None:
    """InvalidRequest(401) unless the request proves it comes from this deployment."""
    if st.key is None:
        raise InvalidRequest(
            "this server was started without a deployment secret, so it takes no internal calls",
            401,
            "unauthorized",
        )
    try:
        st.key.verify(request.method, request.raw_path, raw, request.headers.get(HEADER))
    except AuthError as e:
        raise InvalidRequest(f"internal call refused: {e}", 401, "unauthorized") from e


async def kv_layout(request: web.Request) -> web.Response:
    """A decode's Mooncake session and KV pool layout, for the prefills of its deployment (signed)."""
    st: ServerState = request.app[STATE]
    try:
        check_proof(st, request, b"")
    except InvalidRequest as e:
        return web.json_response(e.body(), status=e.status)
    announce = getattr(st.role, "announcement", None) if st.ready() else None
    if announce is None:
        message = "not ready" if not st.ready() else f"a {st.role_name} server has no KV pool to announce"
        return json_error(message, 503 if not st.ready() else 404, "not_available")
    body, headers = announce()
    return web.Response(body=body, headers=headers)


async def health(request: web.Request) -> web.Response:
    st: ServerState = request.app[STATE]
    if st.ready():
        return web.json_response({"status": "ok"})
    failure = st.role.engine.failure() if st.role is not None else None
    reason = st.load_error or (
        "stopping" if st.stopping else "loading" if st.role is None else failure or "engine stopped"
    )
    return web.json_response({"status": reason}, status=503)


async def server_info(request: web.Request) -> web.Response:
    st: ServerState = request.app[STATE]
    return web.json_response(
        {
            "model": st.model_name,
            "model_path": st.args.model,
            "role": st.role_name,
            "page_size": st.page_size,
            "max_model_len": st.max_model_len,
            "vocab_size": st.vocab_size,
            "version": __version__,
            "ready": st.ready(),
        }
    )


async def models(request: web.Request) -> web.Response:
    st: ServerState = request.app[STATE]
    card = {
        "id": st.model_name,
        "object": "model",
        "created": 0,
        "owned_by": "disaggctl",
        "max_model_len": st.max_model_len,
        "vocab_size": st.vocab_size,
    }
    return web.json_response({"object": "list", "data": [card]})


async def metrics(request: web.Request) -> web.Response:
    st: ServerState = request.app[STATE]
    stats = engine_stats(st)
    c = st.counters
    lines = []

    def metric(name: str, kind: str, help_: str, value) -> None:
        httpkit.family(lines, f"disaggctl_{name}", kind, help_)
        lines.append(f'disaggctl_{name}{{role="{st.role_name}"}} {value}')

    metric("num_requests_running", "gauge", "Requests in the running batch.", stats.get("running", 0))
    metric("num_requests_waiting", "gauge", "Requests waiting to be scheduled.", stats.get("waiting", 0))
    metric("kv_pages_used", "gauge", "KV cache pages in use.", stats.get("pages_used", 0))
    metric("kv_pages_free", "gauge", "KV cache pages free.", stats.get("pages_free", 0))
    metric(
        "kv_pages_quarantined",
        "gauge",
        "KV pages held back after a failed hand-off (a late write may still land in them).",
        stats.get("pages_quarantined", 0),
    )
    for name, value in role_stats(st).items():
        kind = "gauge" if name.endswith(("_in_flight", "_rooms")) else "counter"
        metric(name if kind == "gauge" else name + "_total", kind, f"{st.role_name} role: {name}.", value)
    metric("prompt_tokens_total", "counter", "Prompt tokens of accepted requests.", c.prompt_tokens)
    metric("generation_tokens_total", "counter", "Tokens generated.", c.generation_tokens)
    metric("request_success_total", "counter", "Requests that finished normally.", c.success)
    metric("request_failure_total", "counter", "Requests that failed (rejected, engine error).", c.failure)
    metric("request_aborted_total", "counter", "Requests aborted (client gone, server stopping).", c.aborted)
    metric("in_flight_requests", "gauge", "Requests the HTTP server is serving.", len(st.in_flight))
    return httpkit.prometheus(lines)


def role_stats(st: ServerState) -> dict:
    try:
        return dict(st.role.stats()) if st.role is not None else {}
    except Exception:  # stats must never break /metrics
        log.exception("role stats failed")
        return {}


def engine_stats(st: ServerState) -> dict:
    if st.role is None:
        return {}
    try:
        stats = st.role.engine.stats()
    except Exception:  # stats must never break /metrics
        log.exception("engine stats failed")
        return {}
    return stats if isinstance(stats, dict) else vars(stats)


# ---- request handling shared by the three APIs ----


async def _read_job(request: web.Request, parse) -> Job:
    st: ServerState = request.app[STATE]
    if not st.ready():
        raise InvalidRequest(
            "the server is not ready (model loading or stopping); retry later", 503, "service_unavailable"
        )
    try:
        raw = await httpkit.read_limited(request, st.max_body_bytes)
    except httpkit.TooLarge as e:
        raise InvalidRequest(str(e), 413) from e
    body = parse_json(raw)
    if BOOTSTRAP_KEYS & body.keys():
        # Only the deployment's proxy may point a worker at a bootstrap (and thereby at KV memory).
        check_proof(st, request, raw)
    job = parse(body)
    # Sizes only, before any tokenizing: a text longer than the context can hold is refused at once.
    check_text_size(job, st.max_model_len, st.tokenizer.max_token_bytes)
    if job.model is not None and job.api != "generate" and job.model != st.model_name:
        raise InvalidRequest(
            f"model {job.model!r} is not served here; this server serves {st.model_name!r}",
            404,
            "model_not_found",
        )
    tok = st.tokenizer
    try:
        if job.messages is not None:
            job.prompt_ids = await asyncio.to_thread(tok.apply_chat_template, job.messages)
        elif job.text is not None:
            job.prompt_ids = await asyncio.to_thread(tok.encode, job.text)
        else:
            job.prompt_ids = list(job.input_ids)
    except ValueError as e:  # tokenizer errors (no chat template, template failure) are the client's
        raise InvalidRequest(str(e)) from e
    if job.images or job.embed_parts:
        if st.vision is None:
            raise InvalidRequest(f"model {st.model_name!r} does not take images")
        await st.vision.prepare(job)
    check_prompt(job.prompt_ids, st.vocab_size, st.max_model_len, job.sampling)
    st.role.check(job)
    job.rid = job.rid or uuid.uuid4().hex
    if job.rid in st.in_flight:
        raise InvalidRequest(f"a request with rid {job.rid!r} is already running", 409, "conflict")
    return job


@dataclass
class Progress:
    """What a request produced so far: ids, visible text, and how it ended."""

    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    matched: int | str | None = None
    error: str | None = None
    started: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None


async def run_job(st: ServerState, job: Job):
    """Run a job through the role; yields (Progress, new_text) after each engine event, last one finished.

    Stop strings are found here (they need text): the role is told to abort and the request ends with
    finish reason "stop" and the matched string.
    """
    st.in_flight[job.rid] = asyncio.current_task()
    st.counters.prompt_tokens += len(job.prompt_ids)
    detok = st.tokenizer.detokenizer(job.sampling.stop, job.sampling.skip_special_tokens)
    p = Progress()
    # Whatever ends this generator early (client gone, handler cancelled, server stopping) is an abort.
    outcome = "aborted"
    async with contextlib.aclosing(st.role.generate(job)) as events:
        try:
            async for ev in events:
                if ev.token_ids and p.first_token_at is None:
                    p.first_token_at = time.monotonic()
                p.output_ids.extend(ev.token_ids)
                st.counters.generation_tokens += len(ev.token_ids)
                delta = detok.add(ev.token_ids)
                if ev.finished and detok.matched is None:
                    p.error = ev.error
                    p.finish_reason = ev.finish_reason or ("abort" if ev.error else "stop")
                    p.matched = ev.matched
                    delta += detok.finish()
                if detok.matched is not None:
                    p.finish_reason, p.matched = "stop", detok.matched
                p.text = detok.text
                if p.finish_reason is None:
                    yield p, delta
                    continue
                if p.error is not None:
                    outcome = "failure"
                elif p.finish_reason != "abort":
                    outcome = "success"
                await events.aclose()  # a stop string: the role aborts the request in the engine
                yield p, delta
                return
            p.error, p.finish_reason, outcome = (
                "the engine ended the request without a result",
                "abort",
                "failure",
            )
            yield p, ""
        finally:
            st.in_flight.pop(job.rid, None)
            if outcome == "success":
                st.counters.success += 1
            elif outcome == "failure":
                st.counters.failure += 1
            else:
                st.counters.aborted += 1


async def run_to_end(st: ServerState, job: Job) -> Progress:
    last = Progress()
    async with contextlib.aclosing(run_job(st, job)) as events:
        async for progress, _ in events:
            last = progress
    return last


def _meta(job: Job, p: Progress) -> dict:
    finish = None
    if p.finish_reason is not None:
        finish = {"type": p.finish_reason}
        if p.matched is not None:
            finish["matched"] = p.matched
        if p.error is not None:
            finish["message"] = p.error
    return {
        "id": job.rid,
        "prompt_tokens": len(job.prompt_ids),
        "completion_tokens": len(p.output_ids),
        "finish_reason": finish,
        "e2e_latency": round(time.monotonic() - p.started, 6),
    }


def _error_status(p: Progress) -> int:
    return 503 if p.finish_reason == "abort" and p.error is None else 500


async def keepalive(events, interval_s: float):
    """The items of `events`, and None each time `interval_s` passes without one."""
    pending = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(events.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=interval_s)
            if not done:
                yield None
                continue
            task, pending = pending, None
            try:
                item = task.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
        await events.aclose()


async def _sse_start(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    return resp


async def _sse(resp: web.StreamResponse, obj) -> None:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    try:
        line = f"data: {data}\n\n".encode()
    except UnicodeEncodeError:  # a lone surrogate echoed from the request: escaped, the JSON stays valid
        line = f"data: {json.dumps(obj)}\n\n".encode()
    await resp.write(line)


async def _guard(handler, request: web.Request) -> web.StreamResponse:
    """Turns client mistakes into 4xx and anything unexpected into a 500, both with an error body."""
    st: ServerState = request.app[STATE]
    try:
        return await handler(request)
    except InvalidRequest as e:
        st.counters.failure += 1
        return web.json_response(e.body(), status=e.status)
    except (ConnectionResetError, asyncio.CancelledError):
        raise
    except Exception as e:
        log.exception("request failed")
        st.counters.failure += 1
        return json_error(f"internal error: {type(e).__name__}: {e}", 500, "internal_error")


# ---- /generate ----


async def generate(request: web.Request) -> web.StreamResponse:
    return await _guard(_generate, request)


async def _generate(request: web.Request) -> web.StreamResponse:
    st: ServerState = request.app[STATE]
    job = await _read_job(request, parse_generate)
    if not job.stream:
        p = await run_to_end(st, job)
        body = {"text": p.text, "output_ids": p.output_ids, "meta_info": _meta(job, p)}
        if p.error is not None or p.finish_reason == "abort":
            msg = p.error or "request aborted (server stopping)"
            return web.json_response(
                {**error_body(msg, _error_status(p), "engine_error"), **body}, status=_error_status(p)
            )
        return web.json_response(body)
    resp = await _sse_start(request)
    async with contextlib.aclosing(keepalive(run_job(st, job), st.args.sse_keepalive)) as events:
        async for item in events:
            if item is None:
                await resp.write(b": keep-alive\n\n")
                continue
            p, _ = item
            if p.error is not None:
                await _sse(resp, error_body(p.error, 500, "engine_error"))
                break
            await _sse(resp, {"text": p.text, "output_ids": list(p.output_ids), "meta_info": _meta(job, p)})
    await _sse(resp, "[DONE]")
    await resp.write_eof()
    return resp


# ---- OpenAI ----


def _usage(job: Job, p: Progress) -> dict:
    n = len(p.output_ids)
    return {
        "prompt_tokens": len(job.prompt_ids),
        "completion_tokens": n,
        "total_tokens": len(job.prompt_ids) + n,
    }


async def completions(request: web.Request) -> web.StreamResponse:
    return await _guard(lambda r: _openai(r, parse_completion), request)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _guard(lambda r: _openai(r, parse_chat), request)


async def _openai(request: web.Request, parse) -> web.StreamResponse:
    st: ServerState = request.app[STATE]
    job = await _read_job(request, parse)
    chat = job.api == "chat"
    rid = ("chatcmpl-" if chat else "cmpl-") + job.rid
    created = int(time.time())
    head = {
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": st.model_name,
    }
    if not job.stream:
        p = await run_to_end(st, job)
        if p.error is not None or p.finish_reason == "abort":
            return json_error(
                p.error or "request aborted (server stopping)", _error_status(p), "engine_error"
            )
        if chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": p.text},
                "logprobs": None,
                "finish_reason": p.finish_reason,
            }
        else:
            choice = {"index": 0, "text": p.text, "logprobs": None, "finish_reason": p.finish_reason}
        if p.matched is not None:
            choice["matched_stop"] = p.matched
        return web.json_response({**head, "choices": [choice], "usage": _usage(job, p)})

    head["object"] = "chat.completion.chunk" if chat else "text_completion"
    resp = await _sse_start(request)

    def chunk(delta: str | None, finish: str | None, first: bool = False) -> dict:
        if chat:
            d = (
                {"role": "assistant", "content": ""}
                if first
                else ({"content": delta} if delta is not None else {})
            )
            choice = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
        out = {**head, "choices": [choice]}
        if job.include_usage:
            out["usage"] = None
        return out

    if chat:
        await _sse(resp, chunk(None, None, first=True))
    p = Progress()
    async with contextlib.aclosing(keepalive(run_job(st, job), st.args.sse_keepalive)) as events:
        async for item in events:
            if item is None:
                await resp.write(b": keep-alive\n\n")
                continue
            p, delta = item
            if p.error is not None:
                await _sse(resp, error_body(p.error, 500, "engine_error"))
                break
            if delta:
                await _sse(resp, chunk(delta, None))
            if p.finish_reason is not None:
                await _sse(resp, chunk(None if chat else "", p.finish_reason))
    if job.include_usage and p.error is None:
        await _sse(resp, {**head, "choices": [], "usage": _usage(job, p)})
    await _sse(resp, "[DONE]")
    await resp.write_eof()
    return resp


# ---- process ----


def load(st: ServerState, model_dir: str):
    """Load the model and start the engine (worker thread: this takes seconds to minutes).

    Returns the role; the caller starts it on the event loop and only then publishes it as `st.role`,
    so /health says ok only once the role can take requests."""
    from disaggctl.runtime.disagg import TransferConfig
    from disaggctl.runtime.registry import ROLES
    from disaggctl.runtime.roles import make_engine
    from disaggctl.runtime.tokenizer import Tokenizer

    tok = Tokenizer(model_dir)
    transfer = None
    if st.role_name in ("prefill", "decode"):
        transfer = TransferConfig.from_args(st.args).settings()
    engine = make_engine(st.role_name, st.args, model_dir, transfer)
    engine.start()
    try:
        role = ROLES[st.role_name].create(engine, tok, st.args, key=st.key)
    except BaseException:
        engine.stop()
        raise
    if engine.model_config.vision is not None:
        from disaggctl.runtime.vision.inputs import VisionInputs

        try:
            st.vision = VisionInputs(st.role_name, engine, model_dir, st.args, st.key)
        except BaseException:
            engine.stop()
            raise
    st.tokenizer = tok
    st.max_model_len = engine.config.max_model_len
    st.vocab_size = engine.model_config.vocab_size
    st.page_size = engine.config.page_size
    st.max_body_bytes = body_limit(st.max_model_len, tok.max_token_bytes)
    if st.vision is not None:  # images travel inline, base64
        st.max_body_bytes = MAX_BODY_BYTES
    return role


class Server:
    """One runtime server: bind, load in the background, serve, drain on stop."""

    def __init__(
        self, role_name: str, args: argparse.Namespace, model_dir: str, key: DeploymentKey | None = None
    ):
        name = args.served_model_name or args.model
        self.state = ServerState(role_name=role_name, args=args, model_name=name, key=key)
        self.model_dir = model_dir
        self.runner: web.AppRunner | None = None
        self.loaded = asyncio.Event()

    async def start(self) -> None:
        # handler_cancellation: a client that disconnects cancels its handler, which aborts its request.
        self.runner = web.AppRunner(
            create_app(self.state), handler_cancellation=True, access_log=None, shutdown_timeout=1.0
        )
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.state.args.host, self.state.args.port)
        await site.start()
        asyncio.get_running_loop().create_task(self._load())

    async def _load(self) -> None:
        try:
            role = await asyncio.to_thread(load, self.state, self.model_dir)
            try:
                await role.start()
            except BaseException:
                await asyncio.to_thread(role.stop)
                raise
            self.state.role = role
            log.info("model loaded: %s (%s)", self.state.model_name, self.model_dir)
        except Exception as e:
            log.exception("model load failed")
            self.state.load_error = f"model load failed: {type(e).__name__}: {e}"
        finally:
            self.loaded.set()

    async def stop(self, drain_s: float) -> None:
        st = self.state
        st.stopping = True
        if self.runner is not None:
            for site in list(self.runner.sites):
                await site.stop()  # stop accepting connections; open ones go on
        deadline = time.monotonic() + drain_s
        while st.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for rid in list(st.in_flight):
            log.warning("aborting request %s on shutdown", rid)
            st.role.abort(rid)
        deadline = time.monotonic() + 2.0
        while st.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for task in list(st.in_flight.values()):
            task.cancel()
        if self.runner is not None:
            await self.runner.cleanup()
        await self.loaded.wait()
        if st.role is not None:
            try:
                await st.role.close()
            finally:
                await asyncio.to_thread(st.role.stop)


async def serve(
    role_name: str, args: argparse.Namespace, model_dir: str, stop: asyncio.Event | None = None
) -> int:
    stop = stop or asyncio.Event()
    httpkit.stop_on_signals(stop)
    try:
        key = DeploymentKey.for_server(f"a {role_name} server", required=role_name in ("prefill", "decode"))
    except AuthError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    server = Server(role_name, args, model_dir, key)
    try:
        await server.start()
    except OSError as e:
        print(f"error: cannot listen on {args.host}:{args.port}: {e.strerror or e}", file=sys.stderr)
        return 1
    log.info("%s server listening on http://%s:%d", role_name, args.host, args.port)
    stop_task = asyncio.ensure_future(stop.wait())
    await asyncio.wait(
        [stop_task, asyncio.ensure_future(server.loaded.wait())], return_when=asyncio.FIRST_COMPLETED
    )
    if server.state.load_error is not None and not stop.is_set():
        print(f"error: {server.state.load_error}", file=sys.stderr)
        await server.stop(0.0)
        return 1
    # A server whose engine died (a tensor-parallel rank exited, say) cannot serve again: stop, so that the
    # launcher and the proxy see it gone, instead of answering 503 forever.
    while not stop.is_set():
        await asyncio.wait([stop_task], timeout=1.0)
        st = server.state
        if st.role is not None and not st.stopping and not st.role.alive() and not stop.is_set():
            why = st.role.engine.failure() or "the engine stopped"
            print(f"error: {why}; shutting down", file=sys.stderr)
            await server.stop(0.0)
            return 1
    log.info("stopping: draining for up to %.1fs", args.drain_timeout)
    await server.stop(args.drain_timeout)
    return 0


def main(role: str, argv: list[str]) -> int:
    from disaggctl.runtime.registry import ROLES

    if role not in ROLES:
        print(
            f"error: the {role!r} role is not available in this version; available: {', '.join(ROLES)}",
            file=sys.stderr,
        )
        return 2
    ap = build_parser(role)
    try:
        args = ap.parse_args(argv)
        check_args(ap, args, role)
    except SystemExit as e:  # argparse already printed the usage and the message
        return int(e.code or 0)
    return run(role, args, lambda model_dir: serve(role, args, model_dir))


def run(label: str, args: argparse.Namespace, serve_model) -> int:
    """What every server process does once its arguments are good: log as `label`, resolve the model
    (`builtin:` names, hub ids) and run `serve_model(model_dir)` (a coroutine) until it ends."""
    logging.basicConfig(level=args.log_level, format=f"%(asctime)s {label} %(levelname)s %(message)s")
    from disaggctl.runtime.builtin import ModelError, resolve_model

    try:
        model_dir = resolve_model(args.model)
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(serve_model(model_dir))
    except KeyboardInterrupt:
        return 130
