"""The benchmark client: streaming request backends, server probes, and the load driver.

Backends (all stream, because TTFT and ITL need it):
- `generate`: SGLang-shaped `POST /generate`; every SSE event holds the cumulative output, so the
  tokens a chunk carries are the growth of `meta_info.completion_tokens` (or of `output_ids`).
- `openai`: `POST /v1/completions`; `openai-chat`: `POST /v1/chat/completions`. Both ask for
  `stream_options.include_usage`, and output tokens come from that final `usage`: a chunk is not a token.
A chunk "carries tokens" when its output grew (generate) or it has a choice with text, or an empty
choice that is not the closing one (a token whose bytes do not yet form a whole character).

Image requests (the random-image dataset): `/generate` gets `image_data` and one `<image>` placeholder
per image before the text; chat gets `image_url` parts before a text part. The encoder's share of a
request comes back in the answer's `Server-Timing: encode;dur=MS` header (the disaggctl proxy sets it
when it sent the images to its encoders).

Every wait is bounded: the session's total timeout covers connect, queueing and the whole stream.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aiohttp

from disaggctl.bench.metrics import RequestRecord
from disaggctl.bench.workload import WorkItem

BACKENDS = ("generate", "openai", "openai-chat")
PROBE_TIMEOUT_S = 30.0
# What a `/generate` prompt holds in place of each image: LLaVA checkpoints' (and the embedded runtime's)
# image token. Chat requests need none: the server's template places the images.
IMAGE_PLACEHOLDER = "<image>"
ERROR_CHARS = 200  # error messages are histogram keys: keep them short


@dataclass
class Target:
    url: str  # base URL, no trailing slash
    backend: str
    model: str | None = None  # OpenAI backends
    ignore_eos: bool = True
    temperature: float = 0.0


class StreamError(Exception):
    """The server reported an error inside the stream, or the stream broke off."""


def base_url(url: str) -> str:
    """Accept `host:port`, `http://host:port/` or an OpenAI-style `.../v1` and return the server root."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    return url


async def sse_events(resp: aiohttp.ClientResponse) -> AsyncIterator[dict]:
    """Decoded `data:` events of a Server-Sent Events body, until `[DONE]`. Raises StreamError for an
    error event or a body that ends before `[DONE]`. Lines are split here rather than by aiohttp's
    readline, which refuses lines over 64 KiB (cumulative outputs grow past that)."""
    buf = b""
    async for chunk in resp.content.iter_any():
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for raw in lines:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue  # blank separators, comments, event:/id: fields
            data = line[len(b"data:") :].strip()
            if data == b"[DONE]":
                return
            try:
                obj = json.loads(data)
            except json.JSONDecodeError:
                raise StreamError(f"malformed event: {data[:80]!r}") from None
            if isinstance(obj, dict) and obj.get("error"):
                raise StreamError(f"error in stream: {_error_message(obj)}")
            yield obj
    raise StreamError("stream ended before [DONE]")


def _error_message(obj: object) -> str:
    if isinstance(obj, dict):
        err = obj.get("error", obj)
        if isinstance(err, dict):
            return str(err.get("message") or err)
        return str(err)
    return str(obj)


async def _http_error(resp: aiohttp.ClientResponse) -> str:
    body = await resp.text()
    try:
        msg = _error_message(json.loads(body))
    except json.JSONDecodeError:
        msg = body.strip() or resp.reason or ""
    return f"HTTP {resp.status}: {msg}"


def _request(target: Target, item: WorkItem) -> tuple[str, dict]:
    """Path and JSON body for one item."""
    if target.backend == "generate":
        sampling = {"max_new_tokens": item.output_len, "temperature": target.temperature}
        if target.ignore_eos:
            sampling["ignore_eos"] = True
        body: dict = {"sampling_params": sampling, "stream": True}
        if item.input_ids is not None:
            body["input_ids"] = item.input_ids
        else:
            body["text"] = item.prompt
        if item.images:
            body["text"] = IMAGE_PLACEHOLDER * len(item.images) + " " + item.prompt
            body["image_data"] = item.images
        return "/generate", body
    body = {
        "model": target.model,
        "max_tokens": item.output_len,
        "temperature": target.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if target.ignore_eos:
        # An extension that vLLM, SGLang and disaggctl accept (min_tokens is not accepted everywhere).
        body["ignore_eos"] = True
    if target.backend == "openai":
        if item.images:
            raise ValueError("the openai (completions) backend takes no images: use openai-chat or generate")
        body["prompt"] = item.prompt if item.input_ids is None else item.input_ids
        return "/v1/completions", body
    if item.input_ids is not None:
        raise ValueError("the openai-chat backend needs text prompts")
    if item.images:
        parts = [{"type": "image_url", "image_url": {"url": u}} for u in item.images]
        body["messages"] = [{"role": "user", "content": [*parts, {"type": "text", "text": item.prompt}]}]
    else:
        body["messages"] = [{"role": "user", "content": item.prompt}]
    return "/v1/chat/completions", body


def encode_seconds(server_timing: str | None) -> float | None:
    """The `encode` metric of a Server-Timing header (`encode;dur=12.5, ...`, dur in ms) in seconds."""
    for metric in (server_timing or "").split(","):
        name, *params = (p.strip() for p in metric.split(";"))
        if name != "encode":
            continue
        for p in params:
            key, _, value = p.partition("=")
            if key.strip() == "dur":
                try:
                    return float(value.strip().strip('"')) / 1000
                except ValueError:
                    return None
    return None


def _generate_progress(event: dict, rec: RequestRecord, produced: int) -> int:
    """Account one /generate event; returns the output tokens produced so far."""
    meta = event.get("meta_info") or {}
    n = meta.get("completion_tokens")
    if n is None:
        n = len(event.get("output_ids") or [])
    if n > produced:
        rec.chunk_times.append(time.perf_counter())
        rec.chunk_tokens.append(n - produced)
    if meta.get("prompt_tokens") is not None:
        rec.prompt_tokens = meta["prompt_tokens"]
    reason = meta.get("finish_reason")
    if isinstance(reason, dict) and reason.get("type") == "abort":
        raise StreamError(f"aborted: {reason.get('message') or reason.get('matched') or 'by the server'}")
    rec.output_tokens = n
    return max(n, produced)


def _openai_progress(event: dict, rec: RequestRecord, chat: bool) -> None:
    usage = event.get("usage")
    if usage:
        rec.prompt_tokens = usage.get("prompt_tokens", rec.prompt_tokens)
        rec.output_tokens = usage.get("completion_tokens", rec.output_tokens)
    choices = event.get("choices") or []
    if not choices:
        return
    choice = choices[0]
    if chat:
        delta = choice.get("delta") or {}
        text = delta.get("content")
        if text is None or (delta.get("role") and not text):
            return  # the role-only opening chunk
    else:
        text = choice.get("text") or ""
    if text or choice.get("finish_reason") is None:
        rec.chunk_times.append(time.perf_counter())
        rec.chunk_tokens.append(None)


async def send(session: aiohttp.ClientSession, target: Target, item: WorkItem) -> RequestRecord:
    """Send one streaming request and record its timeline. Never raises for a failed request: the
    failure is in `record.error`."""
    rec = RequestRecord(prompt_len=item.prompt_len, output_len=item.output_len)
    path, body = _request(target, item)
    rec.send_time = time.perf_counter()
    try:
        async with session.post(target.url + path, json=body) as resp:
            rec.encode_time = encode_seconds(resp.headers.get("Server-Timing"))
            if resp.status != 200:
                rec.error = await _http_error(resp)
            else:
                produced = 0
                async for event in sse_events(resp):
                    if target.backend == "generate":
                        produced = _generate_progress(event, rec, produced)
                    else:
                        _openai_progress(event, rec, chat=target.backend == "openai-chat")
                if rec.output_tokens is None:
                    rec.error = "server reported no output token count (usage / meta_info)"
                elif not rec.chunk_times and rec.output_tokens > 0:
                    rec.error = "stream carried no token chunks"
    except StreamError as e:
        rec.error = str(e)
    except asyncio.TimeoutError:
        rec.error = "timeout"
    except aiohttp.ClientConnectorError as e:
        rec.error = f"cannot connect to {e.host}:{e.port}: {e.os_error.strerror or e.os_error}"
    except aiohttp.ServerDisconnectedError:
        rec.error = "server disconnected"
    except aiohttp.ClientPayloadError as e:
        rec.error = f"broken stream: {e.__class__.__name__}"
    except aiohttp.ClientError as e:
        rec.error = f"{e.__class__.__name__}: {e}"
    rec.end_time = time.perf_counter()
    if rec.error is not None:
        rec.error = rec.error[:ERROR_CHARS]
    return rec


async def run_load(
    session: aiohttp.ClientSession,
    target: Target,
    items: list[WorkItem],
    arrivals: list[float],
    max_concurrency: int | None,
    on_done: Callable[[RequestRecord], None] | None = None,
) -> tuple[list[RequestRecord], float, float]:
    """Send `items[i]` at `arrivals[i]` seconds after the start, at most `max_concurrency` in flight
    (a request whose time has come waits for a slot; its send time is when it goes out).
    Returns (records in item order, duration from start to the last end, seconds of the last send
    after the start)."""
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    start = time.perf_counter()

    async def one(item: WorkItem, at: float) -> RequestRecord:
        delay = start + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if slots is None:
            rec = await send(session, target, item)
        else:
            async with slots:
                rec = await send(session, target, item)
        if on_done is not None:
            on_done(rec)
        return rec

    records = list(await asyncio.gather(*(one(i, t) for i, t in zip(items, arrivals, strict=True))))
    end = max((r.end_time for r in records), default=start)
    last_send = max((r.send_time for r in records), default=start)
    return records, max(end - start, 1e-9), last_send - start


def new_session(timeout_s: float) -> aiohttp.ClientSession:
    """A session without a connection cap (aiohttp's default of 100 would queue requests silently
    and inflate TTFT) and with a total timeout per request."""
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=timeout_s, sock_connect=min(10.0, timeout_s)),
        connector=aiohttp.TCPConnector(limit=0),
    )


def _probe_timeout(session: aiohttp.ClientSession) -> aiohttp.ClientTimeout:
    """Probes wait PROBE_TIMEOUT_S at most, and never longer than a request may (--timeout)."""
    return aiohttp.ClientTimeout(total=min(PROBE_TIMEOUT_S, session.timeout.total or PROBE_TIMEOUT_S))


class Unreachable(Exception):
    """The server cannot be reached or says it is not ready: a one-line message."""


async def check_ready(session: aiohttp.ClientSession, url: str) -> None:
    """Fail fast, before sizing prompts or warming up, when nothing serves at `url`. Servers without
    a /health route (404) are taken as ready."""
    try:
        async with session.get(url + "/health", timeout=_probe_timeout(session)) as resp:
            if resp.status == 503:
                raise Unreachable(
                    f"{url} is not ready yet (/health: 503 {(await resp.text()).strip()[:100]})"
                )
    except aiohttp.ClientConnectorError as e:
        raise Unreachable(f"cannot connect to {url}: {e.os_error.strerror or e.os_error}") from None
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        raise Unreachable(f"{url}/health did not answer: {e.__class__.__name__}") from None


async def _get_json(session: aiohttp.ClientSession, url: str) -> dict | None:
    try:
        async with session.get(url, timeout=_probe_timeout(session)) as resp:
            if resp.status != 200:
                return None
            return await resp.json(content_type=None)
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError):
        return None


def _find_key(obj: object, key: str) -> object:
    """First value of `key` anywhere in nested dicts/lists (servers nest model info differently)."""
    if isinstance(obj, dict):
        if key in obj:
            return obj[key]
        children = obj.values()
    elif isinstance(obj, list):
        children = obj
    else:
        return None
    for child in children:
        found = _find_key(child, key)
        if found is not None:
            return found
    return None


async def server_vocab_size(session: aiohttp.ClientSession, url: str) -> int | None:
    """The served model's vocabulary size from `/server_info` or `/v1/models`, if either reports it."""
    for path in ("/server_info", "/v1/models"):
        info = await _get_json(session, url + path)
        size = _find_key(info, "vocab_size")
        if isinstance(size, int) and size > 1:
            return size
    return None


async def served_model(session: aiohttp.ClientSession, url: str) -> str | None:
    """The first model id `/v1/models` lists."""
    info = await _get_json(session, url + "/v1/models")
    data = info.get("data") if isinstance(info, dict) else None
    if isinstance(data, list) and data and isinstance(data[0], dict):
        return data[0].get("id")
    return None


async def detect_backend(session: aiohttp.ClientSession, url: str) -> str:
    """`generate` when the server has `/generate` (a one-token probe), else `openai` when it lists
    models, else `generate` (whose first request then shows the real error)."""
    probe = {"text": "hi", "sampling_params": {"max_new_tokens": 1}, "stream": False}
    try:
        async with session.post(url + "/generate", json=probe, timeout=_probe_timeout(session)) as resp:
            if resp.status not in (404, 405):
                return "generate"
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return "generate"
    return "openai" if await served_model(session, url) else "generate"


async def measure_tokens_per_word(
    session: aiohttp.ClientSession, target: Target, words: list[str]
) -> tuple[float, float]:
    """Fit prompt tokens = a * words + b from two one-token requests, using the server's own count
    (b absorbs a chat template). The probes draw words the way random prompts do, so the ratio holds
    for them. Raises StreamError when the server does not report prompt tokens."""
    rng = random.Random(0)
    counts = []
    for n in (32, 256):
        text = " ".join(rng.choice(words) for _ in range(n))
        rec = await send(session, target, WorkItem(prompt_len=n, output_len=1, prompt=text))
        if rec.error or rec.prompt_tokens is None:
            raise StreamError(f"cannot size text prompts: {rec.error or 'no prompt token count reported'}")
        counts.append((n, rec.prompt_tokens))
    (w1, t1), (w2, t2) = counts
    slope = max((t2 - t1) / (w2 - w1), 0.05)
    return slope, t1 - slope * w1
