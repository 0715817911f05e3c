"""The built-in proxy (`disaggctl serve proxy`): one HTTP front for prefill/decode pairs or colocated workers.

PD mode: every request goes to a prefill P and a decode D at once, with the same `bootstrap_room` so that D
can fetch its KV from P; the client gets D's answer, streamed through chunk by chunk. P's answer only says
whether the prefill worked: if it fails while D is still busy, D's request is closed (the runtime server
aborts a request whose client went away, and frees its pages). If the client has not received a byte yet,
the request is then sent again (--retries, with jitter) to another prefill and a newly picked decode, under
a new room: D registered its pages for the old room, so nothing of the failed pair is reused. Once a byte went
out, the client gets the reason instead: a retry could not take back what it has seen. To keep that window
open, D's response headers and SSE comments (keep-alives while D waits for its KV) are held back until P
has answered or D sends its first event. Colocated mode: one worker per request, answers passed through
unchanged.

One aiohttp ClientSession carries all traffic (pooled keep-alive connections); health probes use a small
session of their own so that they never queue behind a saturated request pool.

Every request the proxy sends to a worker carries the deployment key's proof over exactly the bytes and
path sent (disaggctl.trust): workers refuse bootstrap fields without one, so only the deployment can make a
worker take part in a KV hand-off, and PD mode cannot run without the key. Since the proof vouches for the
whole body, clients never choose bootstrap fields (the proxy sets or removes them) and no client header is
forwarded.

What a client sends is bounded before it reaches a worker (--max-body-bytes, JSON nesting depth, finite
numbers), and what a worker holds is bounded too: --request-timeout end to end, --read-timeout of silence
inside a streamed answer, and a worker that stops answering health probes has its requests ended.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import logging
import random
import secrets
import sys
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NoReturn
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from disaggctl import httpkit
from disaggctl.httpkit import MAX_JSON_DEPTH
from disaggctl.proxy.breaker import DEFAULT_COOLDOWN_S, DEFAULT_FAILURES, STATE_VALUES, Breaker
from disaggctl.proxy.encode import EncodeFailed, EncodeStats, encode, images_of
from disaggctl.proxy.policy import POLICIES, make_policy
from disaggctl.proxy.workers import (
    NoHealthyWorker,
    Pool,
    Worker,
    WorkerLost,
    describe,
    health_loop,
    in_flight,
    probe_all,
    until_lost,
)
from disaggctl.trust import ENV_FILE, ENV_HEX, AuthError, DeploymentKey

log = logging.getLogger("disaggctl.proxy")

# Several times what a 128k-token context takes (under 1 MB as token ids, about 0.5 MB as text), while
# bounding what one client can make the proxy buffer, parse and re-encode.
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
# CPython's default limit on int() of a string, applied whatever the interpreter's setting, so that a
# client gets the same answer everywhere, worded for a client rather than a programmer.
MAX_INT_DIGITS = 4300
TOO_DEEP = f"request body is nested too deeply (at most {MAX_JSON_DEPTH} levels of arrays and objects)"
GENERATE_PATHS = ("/generate", "/v1/completions", "/v1/chat/completions")
BOOTSTRAP_FIELDS = ("bootstrap_host", "bootstrap_port", "bootstrap_room")
# A request to a worker that ends in one of these never got a whole answer: the worker is taken out of
# rotation until a health probe succeeds.
UPSTREAM_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, OSError)
# aiohttp >= 3.10 raises this for sock_read alone; older versions raise its parent class.
READ_TIMEOUT_ERROR = getattr(aiohttp, "SocketTimeoutError", aiohttp.ServerTimeoutError)
# Why a request was refused before reaching a worker (the label of disaggctl_proxy_rejected_requests_total).
REJECT_REASONS = ("too_large", "not_json", "too_deep", "bad_fields")
DEFAULT_RETRIES = 2
# Full jitter over a doubling base: requests that failed together (a prefill died under them) do not all
# land on the next prefill in the same instant.
RETRY_BACKOFF_S = 0.05
# Why a failed PD attempt was not sent again (the label of disaggctl_proxy_not_retried_total):
# the client already had bytes, the failure says nothing another prefill would do better (a 4xx, a
# refused proof, a worker that went silent: timeouts and health checks mostly mean overload, which retries
# would multiply), no other worker was available, or --retries were used up.
NOT_RETRIED = ("client_had_bytes", "not_retryable", "no_other_worker", "retries_used")
# D's SSE comments held back while P works are few and small; past this, they go out anyway.
MAX_HELD_BYTES = 64 * 1024


class ClientGone(Exception):
    """Writing to the proxy's own client failed: it disconnected. Not the worker's fault."""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="disaggctl serve proxy",
        description="Route requests to prefill/decode pairs (PD) or to colocated workers.",
    )
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--policy", default="round_robin", choices=POLICIES)
    ap.add_argument("--prefill", action="append", default=[], metavar="URL", help="prefill server (repeat)")
    ap.add_argument(
        "--bootstrap-port",
        action="append",
        type=int,
        default=[],
        metavar="PORT",
        help="bootstrap port of the prefill server given in the same position (repeat)",
    )
    ap.add_argument("--decode", action="append", default=[], metavar="URL", help="decode server (repeat)")
    ap.add_argument("--worker", action="append", default=[], metavar="URL", help="colocated server (repeat)")
    ap.add_argument(
        "--encoder", action="append", default=[], metavar="URL", help="vision encoder (repeat; EPD)"
    )
    ap.add_argument("--health-interval", type=float, default=2.0, help="seconds between health probes")
    ap.add_argument(
        "--request-timeout", type=float, default=600.0, help="seconds a request may take end to end"
    )
    ap.add_argument(
        "--read-timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="longest silence between bytes of a streamed answer from a worker (default 60); "
        "non-streamed answers are bounded by --request-timeout and health probes instead",
    )
    ap.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        metavar="N",
        help=f"largest request body accepted; larger ones get 413 (default {DEFAULT_MAX_BODY_BYTES})",
    )
    ap.add_argument(
        "--retries",
        type=int,
        default=DEFAULT_RETRIES,
        metavar="N",
        help="PD: times a request whose prefill failed (connection refused or reset, or a 5xx) before the "
        f"client got a byte is sent again to another prefill (default {DEFAULT_RETRIES}; 0: never)",
    )
    ap.add_argument(
        "--breaker-failures",
        type=int,
        default=DEFAULT_FAILURES,
        metavar="N",
        help="a worker that leaves N requests in a row unanswered is taken out of rotation "
        f"(circuit breaker; default {DEFAULT_FAILURES})",
    )
    ap.add_argument(
        "--breaker-cooldown",
        type=float,
        default=DEFAULT_COOLDOWN_S,
        metavar="S",
        help=f"seconds an open breaker keeps its worker out before one trial request (default {DEFAULT_COOLDOWN_S:g})",
    )
    ap.add_argument("--connect-timeout", type=float, default=5.0, help="seconds to connect to a worker")
    ap.add_argument(
        "--max-connections", type=int, default=1024, help="open connections to workers, all together"
    )
    ap.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return ap


def _url(ap: argparse.ArgumentParser, flag: str, url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        ap.error(f"{flag} {url!r}: expected http://HOST:PORT")
    try:
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        ap.error(f"{flag} {url!r}: the port is not a number in 0..65535")
    if parts.query or parts.fragment or parts.path not in ("", "/"):
        ap.error(f"{flag} {url!r}: give the server's base URL only (no path)")
    return url.rstrip("/")


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse and check the command line; a bad one exits with status 2 and a message that names the flag."""
    ap = build_parser()
    args = ap.parse_args(argv)
    if not 0 < args.port < 65536:
        ap.error(f"--port must be in 1..65535, got {args.port}")
    if not 0 <= args.retries <= 10:
        ap.error(f"--retries must be in 0..10, got {args.retries}")
    if args.breaker_failures < 1:
        ap.error(f"--breaker-failures must be >= 1, got {args.breaker_failures}")
    for name in ("health_interval", "request_timeout", "connect_timeout", "read_timeout", "breaker_cooldown"):
        if not getattr(args, name) > 0:
            ap.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.max_connections < 1:
        ap.error(f"--max-connections must be >= 1, got {args.max_connections}")
    if args.max_body_bytes < 1:
        ap.error(f"--max-body-bytes must be >= 1, got {args.max_body_bytes}")
    pd = bool(args.prefill or args.decode or args.bootstrap_port)
    if pd and args.worker:
        ap.error("give either --prefill/--bootstrap-port/--decode (PD) or --worker (colocated), not both")
    if not pd and not args.worker:
        ap.error("no workers: give --prefill URL --bootstrap-port B and --decode URL (PD), or --worker URL")
    if pd:
        if not args.prefill or not args.decode:
            ap.error("PD mode needs at least one --prefill and one --decode")
        if len(args.bootstrap_port) != len(args.prefill):
            ap.error(
                f"every --prefill needs its --bootstrap-port (same order): "
                f"got {len(args.prefill)} --prefill and {len(args.bootstrap_port)} --bootstrap-port"
            )
        for b in args.bootstrap_port:
            if not 0 < b < 65536:
                ap.error(f"--bootstrap-port must be in 1..65535, got {b}")
    args.prefill = [_url(ap, "--prefill", u) for u in args.prefill]
    args.decode = [_url(ap, "--decode", u) for u in args.decode]
    args.worker = [_url(ap, "--worker", u) for u in args.worker]
    args.encoder = [_url(ap, "--encoder", u) for u in args.encoder]
    for flag, urls in (("--prefill", args.prefill), ("--decode", args.decode), ("--worker", args.worker)):
        dup = {u for u in urls if urls.count(u) > 1}
        if dup:
            ap.error(f"{flag} {sorted(dup)[0]} is given twice")
    return args


def load_key(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> DeploymentKey | None:
    """The deployment key from the environment. AuthError when PD mode has none, or it cannot be read."""
    key = DeploymentKey.from_env(environ)
    if key is None and (args.prefill or args.decode or args.encoder):
        raise AuthError(
            "PD mode needs the deployment secret (workers refuse bootstrap requests without its proof) "
            f"and none was given: `disaggctl up` provides it ({ENV_FILE}); for a deployment started by "
            f"hand, set {ENV_HEX} to the hex secret its workers were started with"
        )
    return key


@dataclass
class Proxy:
    args: argparse.Namespace
    pools: dict[str, Pool]
    key: DeploymentKey | None = None
    session: aiohttp.ClientSession | None = None
    probe_session: aiohttp.ClientSession | None = None
    # Prefill answers still being read after the client already has its answer.
    background: set[asyncio.Task] = field(default_factory=set)
    requests: Counter = field(default_factory=Counter)  # (path, status) -> count
    rejected: Counter = field(default_factory=Counter)  # one of REJECT_REASONS -> count
    retries: int = 0  # PD attempts sent again after a failure before the client's first byte
    not_retried: Counter = field(default_factory=Counter)  # one of NOT_RETRIED -> count
    duration_sum: float = 0.0
    encode: EncodeStats = field(default_factory=EncodeStats)  # EPD: time the encoders took, apart
    started_at: float = field(default_factory=time.time)

    @property
    def pd(self) -> bool:
        return "decode" in self.pools

    @property
    def workers(self) -> list[Worker]:
        return [w for pool in self.pools.values() for w in pool.workers]

    def post(self, worker: Worker, path: str, payload: bytes, stream: bool = False):
        """POST `payload` to `worker`; `stream`: the answer is relayed as it comes, so silence is bounded."""
        assert self.session is not None
        headers = {"Content-Type": "application/json"}
        if self.key is not None:
            headers.update(self.key.headers("POST", path, payload))
        kw = {}
        if stream:
            a = self.args
            kw["timeout"] = aiohttp.ClientTimeout(
                total=a.request_timeout, connect=a.connect_timeout, sock_read=a.read_timeout
            )
        return self.session.post(worker.url + path, data=payload, headers=headers, **kw)

    def upstream_failed(self, w: Worker, e: BaseException) -> str:
        """Account a request to `w` that got no whole answer (`e`), and say why for the client."""
        if isinstance(e, WorkerLost):
            w.lost_requests += 1
            reason = str(e)
        elif isinstance(e, READ_TIMEOUT_ERROR):
            w.read_timeouts += 1
            reason = f"{w.name} sent nothing for {self.args.read_timeout:g} s (--read-timeout)"
        else:
            reason = f"{w.name} failed: {describe(e, self.args.request_timeout)}"
        w.request_failed(reason, unreachable=True)
        return reason


PROXY = web.AppKey("proxy", Proxy)


def make_proxy(args: argparse.Namespace, key: DeploymentKey | None = None) -> Proxy:
    px = _make_proxy(args, key)
    for w in px.workers:
        w.breaker = Breaker(w.name, args.breaker_failures, args.breaker_cooldown)
    return px


def _make_proxy(args: argparse.Namespace, key: DeploymentKey | None = None) -> Proxy:
    if args.worker:
        pools = {
            "colocated": Pool(
                "colocated", [Worker(u, "colocated") for u in args.worker], make_policy(args.policy)
            )
        }
    else:
        prefills = [Worker(u, "prefill", b) for u, b in zip(args.prefill, args.bootstrap_port, strict=True)]
        pools = {
            "prefill": Pool("prefill", prefills, make_policy(args.policy)),
            "decode": Pool("decode", [Worker(u, "decode") for u in args.decode], make_policy(args.policy)),
        }
    if args.encoder:
        pools["encoder"] = Pool("encoder", [Worker(u, "encoder") for u in args.encoder], make_policy(args.policy))
    return Proxy(args=args, pools=pools, key=key)


def error_body(message: str, status: int, type_: str = "proxy_error") -> dict:
    return httpkit.error_body(message, status, type_)


def json_error(message: str, status: int, type_: str = "proxy_error") -> web.Response:
    return web.json_response(error_body(message, status, type_), status=status)


def sse_error(message: str, status: int) -> bytes:
    return b"data: " + json.dumps(error_body(message, status)).encode() + b"\n\ndata: [DONE]\n\n"


# ---- app ----


def create_app(args: argparse.Namespace, key: DeploymentKey | None = None) -> web.Application:
    # One byte over the limit, so that a body of exactly --max-body-bytes is read whole and accepted
    # whichever way this aiohttp version compares; read_body enforces the limit itself.
    app = web.Application(client_max_size=args.max_body_bytes + 1)
    app[PROXY] = make_proxy(args, key)
    app.router.add_get("/health", health)
    app.router.add_get("/health_generate", health_generate)
    app.router.add_get("/workers", workers)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/server_info", server_info)
    for path in GENERATE_PATHS:
        app.router.add_post(path, generate)
    app.on_response_prepare.append(_server_timing)
    app.cleanup_ctx.append(_sessions)
    return app


ENCODE_SECONDS = "disaggctl.encode_s"  # request key: the time this request's images took at the encoders


async def _server_timing(request: web.Request, response: web.StreamResponse) -> None:
    """EPD: the encoders' time for this request in the answer's `Server-Timing: encode;dur=MS` header
    (the standard header for a server's own breakdown of a request). Per request rather than only the
    /metrics counter: a benchmark then gets a distribution for exactly the requests it sent, not a sum
    that lumps in warm-up and everyone else's traffic between two scrapes."""
    seconds = request.get(ENCODE_SECONDS)
    if seconds is not None:
        response.headers["Server-Timing"] = f"encode;dur={seconds * 1000:.3f}"


async def _sessions(app: web.Application):
    px = app[PROXY]
    a = px.args
    px.session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=a.max_connections, limit_per_host=0, keepalive_timeout=15),
        timeout=aiohttp.ClientTimeout(total=a.request_timeout, connect=a.connect_timeout),
        auto_decompress=False,
    )
    px.probe_session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=32, force_close=True),
        timeout=aiohttp.ClientTimeout(total=probe_timeout(a)),
    )
    task = asyncio.create_task(health_loop(px.probe_session, px.workers, a.health_interval, probe_timeout(a)))
    yield
    task.cancel()
    for t in (task, *px.background):
        t.cancel()
    await asyncio.gather(task, *px.background, return_exceptions=True)
    await px.session.close()
    await px.probe_session.close()


def probe_timeout(args: argparse.Namespace) -> float:
    # Short, but never longer than the interval: probes of one round must not overlap the next.
    return max(0.5, min(2.0, args.health_interval, args.connect_timeout))


# ---- informational routes ----


async def health(request: web.Request) -> web.Response:
    if request.query.get("deep") in ("1", "true", "yes"):
        return await health_generate(request)
    return web.json_response({"status": "ok"})


async def health_generate(request: web.Request) -> web.Response:
    """200 when every pool has a healthy worker, after probing all of them now."""
    px = request.app[PROXY]
    assert px.probe_session is not None
    await probe_all(px.probe_session, px.workers, probe_timeout(px.args))
    missing = [role for role, pool in px.pools.items() if not pool.healthy()]
    pools = {role: {"healthy": len(p.healthy()), "total": len(p.workers)} for role, p in px.pools.items()}
    if missing:
        return web.json_response(
            {"status": f"no healthy {' or '.join(missing)} worker", "pools": pools}, status=503
        )
    return web.json_response({"status": "ok", "pools": pools})


async def workers(request: web.Request) -> web.Response:
    px = request.app[PROXY]
    return web.json_response(
        {"mode": "pd" if px.pd else "colocated", "workers": [w.as_dict() for w in px.workers]}
    )


async def metrics(request: web.Request) -> web.Response:
    px = request.app[PROXY]
    lines: list[str] = []

    def family(name: str, kind: str, help_: str) -> None:
        httpkit.family(lines, name, kind, help_)

    family("disaggctl_proxy_requests_total", "counter", "Requests answered, by route and HTTP status.")
    for (path, status), n in sorted(px.requests.items()):
        lines.append(f'disaggctl_proxy_requests_total{{path="{path}",status="{status}"}} {n}')
    family("disaggctl_proxy_request_duration_seconds_sum", "counter", "Total time spent answering requests.")
    lines.append(f"disaggctl_proxy_request_duration_seconds_sum {px.duration_sum:.6f}")
    family(
        "disaggctl_proxy_rejected_requests_total",
        "counter",
        "Requests refused before reaching a worker: body over --max-body-bytes (too_large), not JSON or "
        "not finite (not_json), nested too deeply (too_deep), not an object or a bad field (bad_fields).",
    )
    for reason in REJECT_REASONS:
        lines.append(f'disaggctl_proxy_rejected_requests_total{{reason="{reason}"}} {px.rejected[reason]}')
    family(
        "disaggctl_proxy_retries_total",
        "counter",
        "PD requests sent again to a new prefill/decode pair after their prefill failed before the client "
        "got a byte.",
    )
    lines.append(f"disaggctl_proxy_retries_total {px.retries}")
    family(
        "disaggctl_proxy_not_retried_total",
        "counter",
        "PD attempts that failed and were not sent again: the client had bytes already (client_had_bytes), "
        "the failure was not one to retry (not_retryable), no other worker (no_other_worker), --retries "
        "used up (retries_used).",
    )
    for reason in NOT_RETRIED:
        lines.append(f'disaggctl_proxy_not_retried_total{{reason="{reason}"}} {px.not_retried[reason]}')
    family("disaggctl_proxy_encode_seconds_sum", "counter", "EPD: time from sending images to the encoders to their last answer.")
    lines.append(f"disaggctl_proxy_encode_seconds_sum {px.encode.seconds:.6f}")
    family("disaggctl_proxy_encode_requests_total", "counter", "EPD: requests whose images went to the encoders.")
    lines.append(f"disaggctl_proxy_encode_requests_total {px.encode.requests}")
    per_worker = (
        ("healthy", "gauge", "1 if the worker is in rotation.", lambda w: int(w.healthy)),
        ("in_flight", "gauge", "Requests sent to the worker and not finished.", lambda w: w.in_flight),
        ("served_total", "counter", "Requests the worker finished successfully.", lambda w: w.served),
        ("failures_total", "counter", "Requests to the worker that failed.", lambda w: w.failures),
        (
            "read_timeouts_total",
            "counter",
            "Streamed answers from the worker cut after --read-timeout seconds of silence.",
            lambda w: w.read_timeouts,
        ),
        (
            "lost_requests_total",
            "counter",
            "Requests ended because the worker stopped answering health checks.",
            lambda w: w.lost_requests,
        ),
        (
            "breaker_state",
            "gauge",
            "The worker's circuit breaker: 0 closed (in rotation), 1 open (out), 2 half-open (one trial).",
            lambda w: STATE_VALUES[w.breaker.state],
        ),
        (
            "breaker_opens_total",
            "counter",
            "Times the worker's circuit breaker opened (--breaker-failures unanswered requests in a row).",
            lambda w: w.breaker.opens,
        ),
    )
    for name, kind, help_, value in per_worker:
        family(f"disaggctl_proxy_worker_{name}", kind, help_)
        for w in px.workers:
            lines.append(f'disaggctl_proxy_worker_{name}{{url="{w.url}",role="{w.role}"}} {value(w)}')
    return httpkit.prometheus(lines)


async def models(request: web.Request) -> web.Response:
    return await _from_any_worker(request, "/v1/models")


async def server_info(request: web.Request) -> web.Response:
    return await _from_any_worker(request, "/server_info")


async def _from_any_worker(request: web.Request, path: str) -> web.Response:
    """Every worker serves the same model: ask the healthy ones (decode first) in turn until one answers."""
    px = request.app[PROXY]
    assert px.session is not None
    reasons = []
    pool = px.pools.get("decode") or px.pools.get("colocated")
    candidates = pool.healthy() + [w for w in px.workers if w not in pool.healthy()]
    timeout = aiohttp.ClientTimeout(total=min(10.0, px.args.request_timeout))
    for w in candidates:
        try:
            async with px.session.get(w.url + path, timeout=timeout) as resp:
                body = await resp.read()
                if resp.status == 200:
                    return web.Response(body=body, content_type="application/json")
                reasons.append(f"{w.url}: HTTP {resp.status}")
        except UPSTREAM_ERRORS as e:
            reasons.append(f"{w.url}: {describe(e, timeout.total)}")
    return json_error(f"no worker answered {path} (" + "; ".join(reasons) + ")", 502)


# ---- generation ----


class BadRequest(Exception):
    def __init__(self, message: str, reason: str, status: int = 400) -> None:
        super().__init__(message)
        self.reason = reason  # one of REJECT_REASONS
        self.status = status


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON number (numbers must be finite)")


def _bounded_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {digits} digits is out of range (at most {MAX_INT_DIGITS})")
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    # 1e999 parses as inf, which json.dumps would send on as `Infinity`: not JSON to any worker.
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"the number {text[:40]} is out of range (numbers must be finite)")
    return value


async def read_body(request: web.Request, limit: int) -> tuple[bytes, dict]:
    try:
        raw = await httpkit.read_limited(request, limit)
    except httpkit.TooLarge as e:
        message = f"request body too large: more than {limit} bytes (the proxy's --max-body-bytes)"
        raise BadRequest(message, "too_large", 413) from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequest(
            f"request body is not valid JSON: it is not UTF-8 ({e.reason} at byte {e.start})", "not_json"
        ) from e
    try:
        body = json.loads(
            text, parse_constant=_reject_constant, parse_float=_finite_float, parse_int=_bounded_int
        )
    except RecursionError as e:
        raise BadRequest(TOO_DEEP, "too_deep") from e
    except ValueError as e:  # JSONDecodeError, and the hooks' refusals
        raise BadRequest(f"request body is not valid JSON: {e}", "not_json") from e
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object", "bad_fields")
    # Fewer brackets than the limit cannot nest past it: the walk is skipped for almost every request.
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and httpkit.nested_deeper(body):
        raise BadRequest(TOO_DEEP, "too_deep")
    if not isinstance(body.get("stream", False), bool):
        raise BadRequest("'stream' must be true or false", "bad_fields")
    return raw, body


async def generate(request: web.Request) -> web.StreamResponse:
    px = request.app[PROXY]
    t0 = time.perf_counter()
    resp: web.StreamResponse | None = None
    try:
        try:
            raw, body = await read_body(request, px.args.max_body_bytes)
        except BadRequest as e:
            px.rejected[e.reason] += 1
            resp = json_error(str(e), e.status, "invalid_request_error")
            return resp
        given_parts = body.pop("embed_parts", None)  # only the proxy names encoders to a worker
        images = images_of(body) if "encoder" in px.pools else None
        if images:
            t_enc = time.perf_counter()
            try:
                body["embed_parts"] = await encode(px, px.pools["encoder"], body, images, px.encode)
                request[ENCODE_SECONDS] = time.perf_counter() - t_enc
                # the workers need the images' count only, which embed_parts carries: not megabytes of
                # base64 to sign, send and parse twice more (chat keeps its parts: they place the images)
                body.pop("image_data", None)
            except EncodeFailed as e:
                resp = json_error(e.message, e.status, "invalid_request_error" if e.status < 500 else "proxy_error")
                return resp
        if images or given_parts is not None:
            raw = json.dumps(body).encode()
        if px.pd:
            resp = await PDRequest(px, request, body).run()
        else:
            resp = await forward_colocated(px, request, raw, body)
        return resp
    finally:
        px.requests[(request.path, resp.status if resp is not None else 499)] += 1
        px.duration_sum += time.perf_counter() - t0


def _is_sse(resp: aiohttp.ClientResponse) -> bool:
    return resp.content_type == "text/event-stream"


async def _write(out: web.StreamResponse, data: bytes) -> None:
    try:
        await out.write(data)
    except ConnectionError as e:
        raise ClientGone() from e


@dataclass
class Hold:
    """A decode's streamed answer held back from the client while a retry may still replace it: its
    status and content type, and the SSE comments it sent meanwhile. `gate` is set once the prefill
    answered: no retry can come any more, and the stream goes out."""

    gate: asyncio.Event = field(default_factory=asyncio.Event)
    status: int | None = None  # set once D's headers came
    content_type: str = "text/event-stream"
    data: bytes = b""


def _only_comments(events: bytes) -> bool:
    """Whether these complete SSE events are comments only (`: keep-alive`): nothing a client reads."""
    return all(not line.strip() or line.startswith(b":") for line in events.split(b"\n"))


async def _hold_back(upstream: aiohttp.ClientResponse, hold: Hold) -> bytes:
    """Read D's stream into `hold` while it carries comments only and the gate is shut. Returns what was
    read past the held comments (the first event, or part of it); b"" at the end of the stream."""
    buf = b""
    while not hold.gate.is_set() and len(hold.data) <= MAX_HELD_BYTES:
        read = asyncio.ensure_future(upstream.content.readany())
        gate = asyncio.ensure_future(hold.gate.wait())
        try:
            await asyncio.wait({read, gate}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (read, gate):
                if not t.done():
                    t.cancel()
            await asyncio.gather(gate, return_exceptions=True)
            if not read.done():
                await asyncio.gather(read, return_exceptions=True)
        if read.cancelled():
            continue  # the gate opened: nothing was consumed
        chunk = read.result()
        if not chunk:
            break
        buf += chunk
        cut = buf.rfind(b"\n\n")
        if cut < 0:
            continue
        if not _only_comments(buf[: cut + 2]):
            break
        hold.data += buf[: cut + 2]
        buf = buf[cut + 2 :]
    return buf


async def relay(
    request: web.Request, upstream: aiohttp.ClientResponse, on_prepared=None, hold: Hold | None = None
) -> web.StreamResponse:
    """Hand the worker's answer to the client: JSON whole, a stream chunk by chunk as it arrives.

    SSE is forwarded up to the last complete event of each chunk (a blank line), so that an error event the
    proxy may have to add later never lands in the middle of one of the worker's events. With `hold`, an
    SSE answer's headers and leading comments wait for `hold.gate` or the first event (see Hold).
    """
    if not _is_sse(upstream) and upstream.headers.get("Transfer-Encoding") != "chunked":
        body = await upstream.read()
        return web.Response(body=body, status=upstream.status, content_type=upstream.content_type)
    pending = b""
    if hold is not None and _is_sse(upstream):
        hold.status = upstream.status
        hold.content_type = upstream.headers.get("Content-Type", "text/event-stream")
        pending = await _hold_back(upstream, hold)
    out = web.StreamResponse(
        status=upstream.status,
        headers={
            "Content-Type": upstream.headers.get("Content-Type", "text/event-stream"),
            "Cache-Control": "no-cache",
        },
    )
    try:
        await out.prepare(request)
    except ConnectionError as e:
        raise ClientGone() from e
    if on_prepared is not None:
        on_prepared(out)
    if hold is not None and hold.data:
        await _write(out, hold.data)
        hold.data = b""
    cut = pending.rfind(b"\n\n")
    if cut >= 0:
        await _write(out, pending[: cut + 2])
        pending = pending[cut + 2 :]
    if not _is_sse(upstream):
        async for chunk in upstream.content.iter_any():
            await _write(out, chunk)
    else:
        async for chunk in upstream.content.iter_any():
            pending += chunk
            cut = pending.rfind(b"\n\n")
            if cut >= 0:
                await _write(out, pending[: cut + 2])
                pending = pending[cut + 2 :]
        if pending:
            await _write(out, pending)
    with contextlib.suppress(ConnectionError):
        await out.write_eof()
    return out


async def _end_with_error(out: web.StreamResponse, reason: str, status: int) -> web.StreamResponse:
    with contextlib.suppress(ConnectionError, RuntimeError):
        await out.write(sse_error(reason, status))
        await out.write_eof()
    return out


async def _refused_proof(w: Worker, up: aiohttp.ClientResponse) -> str | None:
    """The reason to give when a worker refused the proxy's proof (401). Clients cannot send proofs, so it
    is the deployment that is misconfigured, not the request: the client gets a 502 that says so."""
    if up.status != 401:
        return None
    msg = _error_message(await up.read()) or "HTTP 401"
    reason = (
        f"{w.name} refused the proxy's proof ({msg}): the proxy and its workers must be started with "
        "the same deployment secret"
    )
    w.request_failed(reason, unreachable=False)
    return reason


def _without_bootstrap(raw: bytes, body: dict) -> bytes:
    """The client's bytes unchanged, unless it sent bootstrap fields: only the proxy may choose those, and
    the proof the proxy adds would otherwise vouch for them."""
    if not any(k in body for k in BOOTSTRAP_FIELDS):
        return raw
    return json.dumps({k: v for k, v in body.items() if k not in BOOTSTRAP_FIELDS}).encode()


async def forward_colocated(px: Proxy, request: web.Request, raw: bytes, body: dict) -> web.StreamResponse:
    pool = px.pools["colocated"]
    payload = _without_bootstrap(raw, body)
    stream = bool(body.get("stream"))
    tried: list[str] = []
    # A worker that refuses the connection never saw the request, so another may take it.
    for _ in range(len(pool.workers)):
        try:
            w = pool.pick()
        except NoHealthyWorker as e:
            return json_error(f"{e}; tried: {'; '.join(tried)}" if tried else str(e), 503)
        opened: list[web.StreamResponse] = []
        with in_flight(w):
            try:
                return await until_lost(w, _colocated_call(px, request, w, payload, stream, opened))
            except aiohttp.ClientConnectorError as e:
                w.request_failed(describe(e), unreachable=True)
                tried.append(f"{w.url}: {describe(e)}")
            except (*UPSTREAM_ERRORS, WorkerLost) as e:
                reason = px.upstream_failed(w, e)
                return await _end_with_error(opened[0], reason, 502) if opened else json_error(reason, 502)
    return json_error("every worker refused the connection: " + "; ".join(tried), 502)


async def _colocated_call(
    px: Proxy, request: web.Request, w: Worker, payload: bytes, stream: bool, opened: list
) -> web.StreamResponse:
    async with px.post(w, request.path, payload, stream=stream) as up:
        w.answered()
        refused = await _refused_proof(w, up)
        if refused is not None:
            return json_error(refused, 502)
        try:
            out = await relay(request, up, opened.append)
        except ClientGone:
            up.close()  # so that the worker aborts the request
            return opened[0]
        if up.status < 500:
            w.served += 1
        else:
            w.request_failed(f"answered HTTP {up.status}", unreachable=False)
        return out


@dataclass
class PrefillResult:
    ok: bool
    status: int  # HTTP status to give the client when not ok
    reason: str = ""
    # a failure another prefill may well not have: the connection refused or reset, or a 5xx answer
    retryable: bool = False


@dataclass
class Failed:
    """An attempt that failed before the client got a byte: a retry may replace it."""

    worker: Worker
    result: PrefillResult


class DecodeDeclined(Exception):
    """D did not take the request (it refused the connection, or answered 503: loading or stopping), so
    the pair may be retried like one whose P failed."""


def _retryable(e: BaseException) -> bool:
    # aiohttp's timeouts are connection errors too; silence is not retried (see NOT_RETRIED)
    return isinstance(e, aiohttp.ClientConnectionError) and not isinstance(e, asyncio.TimeoutError)


def _open_gate(hold: Hold | None, p_task: asyncio.Task) -> None:
    if hold is not None and not p_task.cancelled() and p_task.exception() is None and p_task.result().ok:
        hold.gate.set()


class PDRequest:
    """One request through a prefill/decode pair, or several pairs when a retry replaces a failed one."""

    def __init__(self, px: Proxy, request: web.Request, body: dict) -> None:
        self.px = px
        self.request = request
        self.body = body
        self.stream = bool(body.get("stream"))
        self.out: web.StreamResponse | None = None  # the client's stream, once D's answer went out
        self.hold: Hold | None = None  # the current attempt's held stream (streamed requests)
        self.earlier: list[str] = []  # why the attempts before the current one failed

    def _prepared(self, out: web.StreamResponse) -> None:
        self.out = out

    async def run(self) -> web.StreamResponse:
        px = self.px
        failed: set[Worker] = set()
        last: Failed | None = None
        while True:
            try:
                p = px.pools["prefill"].pick(exclude=failed)
                d = px.pools["decode"].pick(exclude=failed)
            except NoHealthyWorker as e:
                if last is None:
                    return json_error(str(e), 503)
                px.not_retried["no_other_worker"] += 1
                return await self._fail(last.result)
            outcome = await self._attempt(p, d)
            if not isinstance(outcome, Failed):
                return outcome
            last = outcome
            failed.add(outcome.worker)
            why = self._no_retry(outcome, failed)
            if why is not None:
                px.not_retried[why] += 1
                return await self._fail(outcome.result)
            self.earlier.append(outcome.result.reason)
            px.retries += 1
            log.warning(
                "retrying a request on another prefill/decode pair (%d of --retries %d): %s",
                len(self.earlier),
                px.args.retries,
                outcome.result.reason,
            )
            await asyncio.sleep(random.uniform(0, RETRY_BACKOFF_S * 2 ** (len(self.earlier) - 1)))

    def _no_retry(self, f: Failed, failed: set[Worker]) -> str | None:
        if not f.result.retryable:
            return "not_retryable"
        if len(self.earlier) >= self.px.args.retries:
            return "retries_used"
        if not all(pool.available(exclude=failed) for pool in self.px.pools.values()):
            return "no_other_worker"
        return None

    async def _attempt(self, p: Worker, d: Worker) -> web.StreamResponse | Failed:
        px = self.px
        room = secrets.randbits(63)
        # The client's own bootstrap fields, if any, are overwritten here: only the proxy chooses them.
        payload = json.dumps(
            {
                **self.body,
                "bootstrap_host": p.host,
                "bootstrap_port": p.bootstrap_port,
                "bootstrap_room": room,
            }
        ).encode()
        self.out = None
        self.hold = Hold() if self.stream else None
        p_task = asyncio.create_task(self._prefill(p, payload))
        p_task.add_done_callback(functools.partial(_open_gate, self.hold))
        d_task = asyncio.create_task(self._decode(d, payload))
        try:
            while not d_task.done():
                await asyncio.wait(
                    {d_task} if p_task.done() else {p_task, d_task}, return_when=asyncio.FIRST_COMPLETED
                )
                if d_task.done() or not p_task.done():
                    continue
                res = p_task.result()
                if res.ok:
                    continue  # D's stream is let through (the gate); wait for its end
                # P failed while D still waits for the KV (or streams): close D's request, which frees its
                # pages, and retry or say why.
                d_task.cancel()
                await asyncio.gather(d_task, return_exceptions=True)
                if self.out is None:
                    return Failed(p, res)
                px.not_retried["client_had_bytes"] += 1
                return await self._fail(res)
            if isinstance(d_task.exception(), DecodeDeclined):
                p_task.cancel()
                await asyncio.gather(p_task, return_exceptions=True)
                return Failed(d, PrefillResult(False, 502, str(d_task.exception()), retryable=True))
            out, d_ok = d_task.result()
            if not d_ok and not p_task.done():
                p_task.cancel()
            elif not p_task.done():
                # D is done; P's answer only updates its counters, the client need not wait for it.
                px.background.add(p_task)
                p_task.add_done_callback(px.background.discard)
            return out
        except BaseException:
            # Client gone (handler cancelled) or the proxy stopping: nothing may outlive the request.
            for t in (p_task, d_task):
                t.cancel()
            raise

    async def _fail(self, res: PrefillResult) -> web.StreamResponse:
        reason = res.reason
        if self.earlier:
            reason += f" (after {len(self.earlier)} retried attempt(s): {'; '.join(self.earlier)})"
        hold = self.hold
        if self.out is None and hold is not None and hold.status is not None:
            # D's stream had begun, held back: the client gets it as it was, then the reason
            out = web.StreamResponse(
                status=hold.status, headers={"Content-Type": hold.content_type, "Cache-Control": "no-cache"}
            )
            try:
                await out.prepare(self.request)
                if hold.data:
                    await out.write(hold.data)
            except ConnectionError:
                return out
            self.out = out
        if self.out is None:
            if 400 <= res.status < 500:
                return json_error(reason, res.status, "invalid_request_error")
            return json_error(reason, 502)
        return await _end_with_error(self.out, reason, 502)

    async def _prefill(self, p: Worker, payload: bytes) -> PrefillResult:
        with in_flight(p):
            try:
                status, body, sse, refused = await until_lost(p, self._prefill_call(p, payload))
            except (*UPSTREAM_ERRORS, WorkerLost) as e:
                return PrefillResult(False, 502, self.px.upstream_failed(p, e), retryable=_retryable(e))
        if refused is not None:
            return PrefillResult(False, 502, refused)
        if status >= 400:
            msg = _error_message(body) or f"HTTP {status}"
            if status < 500:
                # The request itself is bad; P is fine.
                return PrefillResult(False, status, msg)
            reason = f"prefill {p.url} answered {status}: {msg}"
            p.request_failed(reason, unreachable=False)
            if status == 503:  # not ready (loading, or draining on its way out): until a probe says so
                p.set_health(False, reason)
            return PrefillResult(False, 502, reason, retryable=True)
        if sse:
            for line in body.split(b"\n"):
                if line.startswith(b"data:") and b'"error"' in line:
                    msg = _error_message(line[5:]) or line[5:].decode(errors="replace").strip()
                    reason = f"prefill {p.url} failed: {msg}"
                    p.request_failed(reason, unreachable=False)
                    return PrefillResult(False, 502, reason, retryable=True)
        p.served += 1
        return PrefillResult(True, status)

    async def _prefill_call(self, p: Worker, payload: bytes) -> tuple[int, bytes, bool, str | None]:
        # No --read-timeout here: P's answer is not relayed, and P is silent by design until the KV is
        # written. A hung P is caught by the health probes, and by D's own KV transfer timeout.
        async with self.px.post(p, self.request.path, payload) as up:
            body = await up.read()
            p.answered()
            refused = await _refused_proof(p, up)
            return up.status, body, _is_sse(up), refused

    async def _decode(self, d: Worker, payload: bytes) -> tuple[web.StreamResponse, bool]:
        with in_flight(d):
            try:
                return await until_lost(d, self._decode_call(d, payload))
            except (*UPSTREAM_ERRORS, WorkerLost) as e:
                reason = self.px.upstream_failed(d, e)
                if self.out is None and isinstance(e, aiohttp.ClientConnectorError):
                    raise DecodeDeclined(reason) from e
                if self.out is None:
                    return json_error(reason, 502), False
                return await _end_with_error(self.out, reason, 502), False

    async def _decode_call(self, d: Worker, payload: bytes) -> tuple[web.StreamResponse, bool]:
        async with self.px.post(d, self.request.path, payload, stream=self.stream) as up:
            d.answered()
            refused = await _refused_proof(d, up)
            if refused is not None:
                return json_error(refused, 502), False
            if up.status == 503:
                # Not ready (loading, or draining on its way out): out of rotation until a probe says it
                # is healthy, and, since it took nothing, the request may go to another pair.
                reason = f"decode {d.url} answered 503: {_error_message(await up.read()) or 'not ready'}"
                d.request_failed(reason, unreachable=False)
                d.set_health(False, reason)
                raise DecodeDeclined(reason)
            try:
                out = await relay(self.request, up, self._prepared, self.hold)
            except (asyncio.CancelledError, ClientGone) as e:
                # Closing (not releasing) the connection is what tells D to abort the request.
                up.close()
                if isinstance(e, ClientGone) and self.out is not None:
                    return self.out, False
                raise
            ok = up.status < 400
            if ok:
                d.served += 1
            elif up.status >= 500:
                d.request_failed(f"answered HTTP {up.status}", unreachable=False)
            return out, ok


def _error_message(body: bytes) -> str | None:
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return body.decode(errors="replace").strip()[:500] or None
    if isinstance(obj, dict):
        err = obj.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return err["message"]
        if isinstance(err, str):
            return err
    return None


# ---- process ----


async def serve(args: argparse.Namespace, key: DeploymentKey | None = None) -> int:
    app = create_app(args, key)
    # handler_cancellation: a client that goes away cancels its handler, which closes the upstream requests,
    # so the workers abort them instead of computing answers nobody reads.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=5.0, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port, backlog=1024)
    try:
        await site.start()
    except OSError as e:
        print(f"error: cannot listen on {args.host}:{args.port}: {e.strerror or e}", file=sys.stderr)
        await runner.cleanup()
        return 1
    px = app[PROXY]
    stop = asyncio.Event()
    httpkit.stop_on_signals(stop)
    log.info(
        "proxy on http://%s:%d (%s, policy %s): %s",
        args.host,
        args.port,
        "PD" if px.pd else "colocated",
        args.policy,
        ", ".join(f"{w.role} {w.url}" for w in px.workers),
    )
    if key is not None:
        log.info("requests to workers carry the deployment key's proof (key id %s)", key.key_id)
    await stop.wait()
    log.info("proxy stopping")
    await runner.cleanup()
    return 0


def main(argv: list[str]) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    try:
        key = load_key(args)
    except AuthError as e:
        print(f"disaggctl serve proxy: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    return asyncio.run(serve(args, key))
