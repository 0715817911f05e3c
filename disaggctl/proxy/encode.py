"""EPD in the proxy: a request with images goes to the encoders first.

The images are split over the available encoders (whole images: a CLIP tower attends over all patches of
an image at once, so one image's patches cannot be split without changing the result); each encoder gets
`POST /encode {"room", "image_data"}` (signed) and answers once it holds the embeddings. The request then
goes to prefill and decode as usual, with `embed_parts` saying which encoder holds which images under
which room; the prefill pulls them from there. An encoder that cannot be reached is ejected (its breaker)
and its images go to another; an encoder's 4xx (a bad image) is the client's answer, before any prefill
or decode sees the request.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field

import aiohttp

from disaggctl.proxy.workers import NoHealthyWorker, Pool, Worker, describe, in_flight

ENCODE_PATH = "/encode"


@dataclass
class EncodeFailed(Exception):
    status: int
    message: str


@dataclass
class EncodeStats:
    requests: int = 0
    images: int = 0
    seconds: float = 0.0  # wall time from the first /encode sent to the last answer, summed over requests
    failures: dict = field(default_factory=dict)


def images_of(body: dict) -> list[str] | None:
    """The request's images in prompt order: SGLang's `image_data`, or OpenAI chat image_url parts."""
    data = body.get("image_data")
    if data is not None:
        return [data] if isinstance(data, str) else data if isinstance(data, list) else None
    out = []
    for m in body.get("messages") or []:
        content = m.get("content") if isinstance(m, dict) else None
        for part in content if isinstance(content, list) else []:
            if isinstance(part, dict) and part.get("type") == "image_url":
                url = part.get("image_url")
                out.append(url.get("url") if isinstance(url, dict) else url)
    return out or None


async def encode(px, pool: Pool, body: dict, images: list, stats: EncodeStats) -> list[dict]:
    """Send the images to the encoders; the `embed_parts` for the prefill. EncodeFailed otherwise."""
    t0 = time.perf_counter()
    workers = pool.available()
    if not workers:
        raise EncodeFailed(
            503, f"no encoder available ({'; '.join(w.last_error or w.url for w in pool.workers)})"
        )
    # images split over as many encoders as are available, in prompt order, whole images each
    k = min(len(workers), len(images))
    groups = [list(range(len(images)))[i::k] for i in range(k)]
    import asyncio

    parts = await asyncio.gather(*(_one(px, pool, images, g) for g in groups))
    stats.requests += 1
    stats.images += len(images)
    stats.seconds += time.perf_counter() - t0
    return parts


async def _one(px, pool: Pool, images: list, group: list[int]) -> dict:
    tried: set[Worker] = set()
    reasons = []
    while True:
        try:
            w = pool.pick(exclude=tried)
        except NoHealthyWorker:
            raise EncodeFailed(502, "every encoder failed: " + "; ".join(reasons)) from None
        tried.add(w)
        room = secrets.randbits(63)
        payload = json.dumps({"room": room, "image_data": [images[i] for i in group]}).encode()
        try:
            with in_flight(w):
                async with px.post(w, ENCODE_PATH, payload, stream=True) as up:
                    data = await up.read()
                    w.answered()
                    status = up.status
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            reason = f"{w.name}: {describe(e, px.args.request_timeout)}"
            w.request_failed(reason, unreachable=True)  # ejected for a while; the images go elsewhere
            reasons.append(reason)
            continue
        if status == 200:
            w.served += 1
            return {"encoder": w.url, "room": room, "images": group}
        try:
            message = json.loads(data)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = data[:300].decode(errors="replace")
        if 400 <= status < 500 and status != 429:
            raise EncodeFailed(status, message)  # the request's fault: no other encoder would take it
        w.request_failed(f"answered HTTP {status}: {message}", unreachable=False)
        reasons.append(f"{w.name} answered {status}: {message}")
