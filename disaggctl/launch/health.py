"""Small synchronous probes of a worker, its health and one metric (http.client: no aiohttp, no environment
proxies, a hard timeout)."""

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


# Enough for a runtime server's /metrics (a few KiB); a larger page (SGLang's histograms) is cut there,
# and a metric past the cut reads as absent.
MAX_METRICS_BYTES = 256 * 1024


def _get(url: str, path: str, timeout_s: float, limit: int) -> tuple[int, bytes] | Health:
    """GET url+path once: (status, at most `limit` bytes of body), or a Health that says why not."""
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
        return resp.status, resp.read(limit)
    except ConnectionRefusedError:
        return Health(False, None, "not listening")
    except TimeoutError:
        return Health(False, None, f"no answer in {timeout_s:g} s")
    except (OSError, http.client.HTTPException) as e:
        return Health(False, None, f"{type(e).__name__}: {e}".strip())
    finally:
        conn.close()


def probe(url: str, path: str = "/health", timeout_s: float = DEFAULT_TIMEOUT_S) -> Health:
    """GET url+path once; never raises for network trouble, never waits longer than about `timeout_s`."""
    got = _get(url, path, timeout_s, 4096)
    if isinstance(got, Health):
        return got
    status = got[0]
    if status == 200:
        return Health(True, 200, "healthy")
    return Health(False, status, "loading" if status == 503 else f"HTTP {status}")


def metric(url: str, name: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> float | None:
    """The value of `name` in url's Prometheus /metrics (its first series), or None when the server does
    not answer 200 or does not expose it; never raises for network trouble."""
    got = _get(url, "/metrics", timeout_s, MAX_METRICS_BYTES)
    if isinstance(got, Health) or got[0] != 200:
        return None
    for line in got[1].decode("utf-8", "replace").splitlines():
        series, _, value = line.rpartition(" ")
        if series.split("{", 1)[0] == name:
            try:
                return float(value)
            except ValueError:
                return None
    return None
