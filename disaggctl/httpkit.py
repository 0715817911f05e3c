"""What every HTTP endpoint of disaggctl does alike: the error body, a bounded body read, the JSON nesting
bound, Prometheus text, and stopping on SIGTERM/SIGINT. The proxy, the runtime servers and the
prefill's bootstrap all use it; no torch, no runtime.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from typing import Any

from aiohttp import web

# Far more than any request shape needs (chat messages with content parts are 4-5 deep), and far below
# where recursive JSON handling anywhere downstream could overflow.
MAX_JSON_DEPTH = 64


def error_body(message: str, status: int, type_: str) -> dict:
    """The error object of every answer that is not a success, OpenAI's shape."""
    return {"error": {"message": message, "type": type_, "code": status}}


class TooLarge(ValueError):
    """The body is larger than `limit` bytes (answer 413)."""

    def __init__(self, limit: int):
        super().__init__(f"request body too large (limit {limit} bytes)")
        self.limit = limit


async def read_limited(request: web.Request, limit: int) -> bytes:
    """The whole body, refused (`TooLarge`) as soon as it is known to exceed `limit`: from Content-Length
    before reading anything, else while reading a chunked body."""
    if request.content_length is not None and request.content_length > limit:
        raise TooLarge(limit)
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as e:  # the application's own hard cap
        raise TooLarge(limit) from e
    if len(raw) > limit:
        raise TooLarge(limit)
    return raw


def nested_deeper(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether arrays and objects nest deeper than `limit` (the top level counts 1). Iterative: no
    recursion to exhaust on the very input it guards against."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if not isinstance(node, dict | list):
            continue
        if depth > limit:
            return True
        for child in node.values() if isinstance(node, dict) else node:
            if isinstance(child, dict | list):
                stack.append((child, depth + 1))
    return False


def family(lines: list[str], name: str, kind: str, help_: str) -> None:
    """A Prometheus metric family's HELP and TYPE lines; its samples follow."""
    lines.append(f"# HELP {name} {help_}")
    lines.append(f"# TYPE {name} {kind}")


def prometheus(lines: list[str]) -> web.Response:
    """The answer of a /metrics endpoint (Prometheus text format)."""
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain", charset="utf-8")


def stop_on_signals(stop: asyncio.Event) -> None:
    """SIGTERM and SIGINT set `stop`, for a server to end gracefully. Outside the main thread (a test
    running a server in a thread) there are no signals to handle, and nothing is set up."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
