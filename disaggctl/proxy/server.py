"""The built-in proxy (`disaggctl serve proxy`): one HTTP front for prefill/decode pairs or colocated workers.

PD mode: every request goes to a prefill P and a decode D at once, with the same `bootstrap_room` so that D
can fetch its KV from P; the client gets D's answer, streamed through chunk by chunk. P's answer only says
whether the prefill worked: if it fails while D is still busy, D's request is closed (the runtime server
aborts a request whose client went away) and the client gets the reason. Colocated mode: one worker per
request, answers passed through unchanged.

One aiohttp ClientSession carries all traffic (pooled keep-alive connections); health probes use a small
session of their own so that they never queue behind a saturated request pool.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import secrets
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from disaggctl.proxy.policy import POLICIES, make_policy
from disaggctl.proxy.workers import (
    NoHealthyWorker,
    Pool,
    Worker,
    describe,
    health_loop,
    in_flight,
    probe_all,
)

log = logging.getLogger("disaggctl.proxy")

MAX_BODY_BYTES = 32 * 1024 * 1024
GENERATE_PATHS = ("/generate", "/v1/completions", "/v1/chat/completions")
# A request to a worker that ends in one of these never got a whole answer: the worker is taken out of
# rotation until a health probe succeeds.
UPSTREAM_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, OSError)


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
    ap.add_argument("--health-interval", type=float, default=2.0, help="seconds between health probes")
    ap.add_argument(
        "--request-timeout", type=float, default=600.0, help="seconds a request may take end to end"
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
    for name in ("health_interval", "request_timeout", "connect_timeout"):
        if not getattr(args, name) > 0:
            ap.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.max_connections < 1:
        ap.error(f"--max-connections must be >= 1, got {args.max_connections}")
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
    for flag, urls in (("--prefill", args.prefill), ("--decode", args.decode), ("--worker", args.worker)):
        dup = {u for u in urls if urls.count(u) > 1}
        if dup:
            ap.error(f"{flag} {sorted(dup)[0]} is given twice")
    return args


@dataclass
class Proxy:
    args: argparse.Namespace
    pools: dict[str, Pool]
    session: aiohttp.ClientSession | None = None
    probe_session: aiohttp.ClientSession | None = None
    # Prefill answers still being read after the client already has its answer.
    background: set[asyncio.Task] = field(default_factory=set)
    requests: Counter = field(default_factory=Counter)  # (path, status) -> count
    duration_sum: float = 0.0
    started_at: float = field(default_factory=time.time)

    @property
    def pd(self) -> bool:
        return "decode" in self.pools

    @property
    def workers(self) -> list[Worker]:
        return [w for pool in self.pools.values() for w in pool.workers]

    def post(self, worker: Worker, path: str, payload: bytes):
        assert self.session is not None
        return self.session.post(
            worker.url + path, data=payload, headers={"Content-Type": "application/json"}
        )


PROXY = web.AppKey("proxy", Proxy)


def make_proxy(args: argparse.Namespace) -> Proxy:
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
    return Proxy(args=args, pools=pools)


def error_body(message: str, status: int, type_: str = "proxy_error") -> dict:
    return {"error": {"message": message, "type": type_, "code": status}}


def json_error(message: str, status: int, type_: str = "proxy_error") -> web.Response:
    return web.json_response(error_body(message, status, type_), status=status)


def sse_error(message: str, status: int) -> bytes:
    return b"data: " + json.dumps(error_body(message, status)).encode() + b"\n\ndata: [DONE]\n\n"


# ---- app ----


def create_app(args: argparse.Namespace) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[PROXY] = make_proxy(args)
    app.router.add_get("/health", health)
    app.router.add_get("/health_generate", health_generate)
    app.router.add_get("/workers", workers)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/server_info", server_info)
    for path in GENERATE_PATHS:
        app.router.add_post(path, generate)
    app.cleanup_ctx.append(_sessions)
    return app


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
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")

    family("disaggctl_proxy_requests_total", "counter", "Requests answered, by route and HTTP status.")
    for (path, status), n in sorted(px.requests.items()):
        lines.append(f'disaggctl_proxy_requests_total{{path="{path}",status="{status}"}} {n}')
    family("disaggctl_proxy_request_duration_seconds_sum", "counter", "Total time spent answering requests.")
    lines.append(f"disaggctl_proxy_request_duration_seconds_sum {px.duration_sum:.6f}")
    per_worker = (
        ("healthy", "gauge", "1 if the worker is in rotation.", lambda w: int(w.healthy)),
        ("in_flight", "gauge", "Requests sent to the worker and not finished.", lambda w: w.in_flight),
        ("served_total", "counter", "Requests the worker finished successfully.", lambda w: w.served),
        ("failures_total", "counter", "Requests to the worker that failed.", lambda w: w.failures),
    )
    for name, kind, help_, value in per_worker:
        family(f"disaggctl_proxy_worker_{name}", kind, help_)
        for w in px.workers:
            lines.append(f'disaggctl_proxy_worker_{name}{{url="{w.url}",role="{w.role}"}} {value(w)}')
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain", charset="utf-8")


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
    pass


async def read_body(request: web.Request) -> tuple[bytes, dict]:
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as e:
        raise BadRequest(f"request body too large (limit {MAX_BODY_BYTES} bytes)") from e
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"request body is not valid JSON: {e}") from e
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    if not isinstance(body.get("stream", False), bool):
        raise BadRequest("'stream' must be true or false")
    return raw, body


async def generate(request: web.Request) -> web.StreamResponse:
    px = request.app[PROXY]
    t0 = time.perf_counter()
    resp: web.StreamResponse | None = None
    try:
        try:
            raw, body = await read_body(request)
        except BadRequest as e:
            resp = json_error(str(e), 400, "invalid_request_error")
            return resp
        if px.pd:
            resp = await PDRequest(px, request, body).run()
        else:
            resp = await forward_colocated(px, request, raw)
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


async def relay(
    request: web.Request, upstream: aiohttp.ClientResponse, on_prepared=None
) -> web.StreamResponse:
    """Hand the worker's answer to the client: JSON whole, a stream chunk by chunk as it arrives.

    SSE is forwarded up to the last complete event of each chunk (a blank line), so that an error event the
    proxy may have to add later never lands in the middle of one of the worker's events.
    """
    if not _is_sse(upstream) and upstream.headers.get("Transfer-Encoding") != "chunked":
        body = await upstream.read()
        return web.Response(body=body, status=upstream.status, content_type=upstream.content_type)
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
    if not _is_sse(upstream):
        async for chunk in upstream.content.iter_any():
            await _write(out, chunk)
    else:
        pending = b""
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


async def forward_colocated(px: Proxy, request: web.Request, raw: bytes) -> web.StreamResponse:
    pool = px.pools["colocated"]
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
                async with px.post(w, request.path, raw) as up:
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
            except aiohttp.ClientConnectorError as e:
                w.request_failed(describe(e), unreachable=True)
                tried.append(f"{w.url}: {describe(e)}")
            except UPSTREAM_ERRORS as e:
                reason = f"worker {w.url} failed: {describe(e, px.args.request_timeout)}"
                w.request_failed(reason, unreachable=True)
                return await _end_with_error(opened[0], reason, 502) if opened else json_error(reason, 502)
    return json_error("every worker refused the connection: " + "; ".join(tried), 502)


@dataclass
class PrefillResult:
    ok: bool
    status: int  # HTTP status to give the client when not ok
    reason: str = ""


class PDRequest:
    """One request through a prefill/decode pair."""

    def __init__(self, px: Proxy, request: web.Request, body: dict) -> None:
        self.px = px
        self.request = request
        self.body = body
        self.out: web.StreamResponse | None = None  # the client's stream, once D's headers came back

    def _prepared(self, out: web.StreamResponse) -> None:
        self.out = out

    async def run(self) -> web.StreamResponse:
        px = self.px
        try:
            p = px.pools["prefill"].pick()
            d = px.pools["decode"].pick()
        except NoHealthyWorker as e:
            return json_error(str(e), 503)
        room = secrets.randbits(63)
        payload = json.dumps(
            {
                **self.body,
                "bootstrap_host": p.host,
                "bootstrap_port": p.bootstrap_port,
                "bootstrap_room": room,
            }
        ).encode()
        p_task = asyncio.create_task(self._prefill(p, payload))
        d_task = asyncio.create_task(self._decode(d, payload))
        try:
            done, _ = await asyncio.wait({p_task, d_task}, return_when=asyncio.FIRST_COMPLETED)
            if p_task in done and not p_task.result().ok and not d_task.done():
                # P failed while D still waits for the KV (or streams): close D's request and say why.
                d_task.cancel()
                await asyncio.gather(d_task, return_exceptions=True)
                return await self._fail(p_task.result())
            out, d_ok = await d_task
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
        if self.out is None:
            if 400 <= res.status < 500:
                return json_error(res.reason, res.status, "invalid_request_error")
            return json_error(res.reason, 502)
        return await _end_with_error(self.out, res.reason, 502)

    async def _prefill(self, p: Worker, payload: bytes) -> PrefillResult:
        timeout_s = self.px.args.request_timeout
        with in_flight(p):
            try:
                async with self.px.post(p, self.request.path, payload) as up:
                    body = await up.read()
                    status = up.status
                    sse = _is_sse(up)
            except UPSTREAM_ERRORS as e:
                reason = f"prefill {p.url} failed: {describe(e, timeout_s)}"
                p.request_failed(reason, unreachable=True)
                return PrefillResult(False, 502, reason)
        if status >= 400:
            msg = _error_message(body) or f"HTTP {status}"
            if status < 500:
                # The request itself is bad; P is fine.
                return PrefillResult(False, status, msg)
            reason = f"prefill {p.url} answered {status}: {msg}"
            p.request_failed(reason, unreachable=False)
            return PrefillResult(False, 502, reason)
        if sse:
            for line in body.split(b"\n"):
                if line.startswith(b"data:") and b'"error"' in line:
                    msg = _error_message(line[5:]) or line[5:].decode(errors="replace").strip()
                    reason = f"prefill {p.url} failed: {msg}"
                    p.request_failed(reason, unreachable=False)
                    return PrefillResult(False, 502, reason)
        p.served += 1
        return PrefillResult(True, status)

    async def _decode(self, d: Worker, payload: bytes) -> tuple[web.StreamResponse, bool]:
        timeout_s = self.px.args.request_timeout
        with in_flight(d):
            try:
                async with self.px.post(d, self.request.path, payload) as up:
                    try:
                        out = await relay(self.request, up, self._prepared)
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
            except UPSTREAM_ERRORS as e:
                reason = f"decode {d.url} failed: {describe(e, timeout_s)}"
                d.request_failed(reason, unreachable=True)
                if self.out is None:
                    return json_error(reason, 502), False
                return await _end_with_error(self.out, reason, 502), False


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


async def serve(args: argparse.Namespace) -> int:
    app = create_app(args)
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
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info(
        "proxy on http://%s:%d (%s, policy %s): %s",
        args.host,
        args.port,
        "PD" if px.pd else "colocated",
        args.policy,
        ", ".join(f"{w.role} {w.url}" for w in px.workers),
    )
    await stop.wait()
    log.info("proxy stopping")
    await runner.cleanup()
    return 0


def main(argv: list[str]) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    return asyncio.run(serve(args))
