"""A small synchronous health probe (http.client: no aiohttp, no environment proxies, a hard timeout)."""

from __future__ import annotations

import http.client
from dataclasses import dataclass
from urllib.parse import urlsplit

DEFAULT_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class Health:
    ok: bool  # HTTP 200
    status: int | None  # HTTP status, None when nothing answered
    detail: str  # one short phrase for tables and error messages


def probe(url: str, path: str = "/health", timeout_s: float = DEFAULT_TIMEOUT_S) -> Health:
    """GET url+path once; never raises for network trouble, never waits longer than about `timeout_s`."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "") or not parts.hostname:
        return Health(False, None, f"cannot probe {url!r}: not an http:// URL")
    try:
        port = parts.port or 80
    except ValueError:
        return Health(False, None, f"cannot probe {url!r}: bad port")
    conn = http.client.HTTPConnection(parts.hostname, port, timeout=timeout_s)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        resp = conn.getresponse()
        resp.read(4096)
        status = resp.status
    except ConnectionRefusedError:
        return Health(False, None, "not listening")
    except TimeoutError:
        return Health(False, None, f"no answer in {timeout_s:g} s")
    except (OSError, http.client.HTTPException) as e:
        return Health(False, None, f"{type(e).__name__}: {e}".strip())
    finally:
        conn.close()
    if status == 200:
        return Health(True, 200, "healthy")
    return Health(False, status, "loading" if status == 503 else f"HTTP {status}")
