"""The embedding hand-off between an encoder and a language-only prefill, over Mooncake.

The prefill registers one embedding buffer with its Mooncake agent and announces it (`GET
/internal/embed_layout`, answer signed with the deployment key). For a request whose images an encoder
holds (room R, drawn by the proxy), the prefill takes a slot of its buffer and calls the encoder,
`POST /internal/embed/R` (signed) with its session, the slot's offset and size. The encoder resolves the
session among the prefills its plan started (`--prefill-peer`, never an address from a request), checks the
slot lies inside the announced buffer, writes the embeddings there with one Mooncake write, and answers
(signed) once the bytes are in place. The same shape as the KV hand-off (transfer/bootstrap.py), with the
encoder in the prefill's place and the prefill in the decode's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp

from disaggctl.trust import HEADER, AuthError, DeploymentKey

log = logging.getLogger("disaggctl.runtime.vision.handoff")

LAYOUT_PATH = "/internal/embed_layout"
ALIGN = 64


class EmbedError(RuntimeError):
    """The embeddings of a request did not arrive; the message names the encoder and says why."""


@dataclass
class EmbedLayout:
    session_id: str
    base: int  # address of the registered buffer
    size: int

    def to_dict(self) -> dict:
        return {"session_id": self.session_id, "base": self.base, "size": self.size}

    @classmethod
    def from_dict(cls, d) -> EmbedLayout:
        if not isinstance(d, dict):
            raise ValueError("the embedding buffer announcement is not an object")
        s, base, size = d.get("session_id"), d.get("base"), d.get("size")
        if not isinstance(s, str) or not s or not all(isinstance(v, int) and v > 0 for v in (base, size)):
            raise ValueError(f"malformed embedding buffer announcement: {d!r}")
        return cls(s, base, size)


class SlotAllocator:
    """First-fit byte ranges of one registered buffer (few, short-lived slots: a list is enough)."""

    def __init__(self, size: int):
        self.size = size
        self.free_ranges: list[tuple[int, int]] = [(0, size)]  # (offset, length), by offset
        self.used: dict[int, int] = {}

    def alloc(self, n: int) -> int | None:
        n = -(-n // ALIGN) * ALIGN
        for i, (off, length) in enumerate(self.free_ranges):
            if length >= n:
                rest = (off + n, length - n)
                self.free_ranges[i : i + 1] = [rest] if rest[1] else []
                self.used[off] = n
                return off
        return None

    def free(self, off: int) -> None:
        n = self.used.pop(off)
        ranges = sorted([*self.free_ranges, (off, n)])
        merged: list[tuple[int, int]] = []
        for o, ln in ranges:
            if merged and merged[-1][0] + merged[-1][1] == o:
                merged[-1] = (merged[-1][0], merged[-1][1] + ln)
            else:
                merged.append((o, ln))
        self.free_ranges = merged

    @property
    def bytes_used(self) -> int:
        return sum(self.used.values())


def signed_json(key: DeploymentKey, path: str, status: int, body: dict) -> tuple[bytes, dict]:
    data = json.dumps(body).encode()
    return data, {HEADER: key.sign_answer(path, status, data), "Content-Type": "application/json"}


class PrefillDirectory:
    """The prefills the plan started, by Mooncake session: the only buffers an encoder writes into.
    An unknown session makes it fetch every peer's announcement again (a prefill that restarted has a new
    session)."""

    def __init__(self, peers: Mapping[str, str], key: DeploymentKey, fetch_timeout_s: float = 5.0):
        self.peers = dict(peers)
        self.key = key
        self.fetch_timeout_s = fetch_timeout_s
        self._known: dict[str, tuple[str, EmbedLayout]] = {}
        self._lock = asyncio.Lock()

    async def resolve(self, session_id: str, http: aiohttp.ClientSession) -> tuple[str, EmbedLayout]:
        if session_id not in self._known:
            async with self._lock:
                if session_id not in self._known:
                    await self._fetch_all(http)
        if session_id not in self._known:
            raise KeyError(session_id)
        return self._known[session_id]

    async def _fetch_all(self, http: aiohttp.ClientSession) -> None:
        results = await asyncio.gather(
            *(self._fetch(url, http) for url in self.peers.values()), return_exceptions=True
        )
        for (name, url), r in zip(self.peers.items(), results, strict=True):
            if isinstance(r, BaseException):
                log.warning("prefill %s at %s did not announce its embedding buffer: %s", name, url, r)
                continue
            self._known = {s: v for s, v in self._known.items() if v[0] != name}
            self._known[r.session_id] = (name, r)

    async def _fetch(self, url: str, http: aiohttp.ClientSession) -> EmbedLayout:
        limits = aiohttp.ClientTimeout(total=self.fetch_timeout_s)
        headers = self.key.headers("GET", LAYOUT_PATH)
        async with http.get(url.rstrip("/") + LAYOUT_PATH, headers=headers, timeout=limits) as r:
            body = await r.read()
            if r.status != 200:
                raise RuntimeError(f"answered {r.status}: {body[:200]!r}")
            self.key.verify_answer(LAYOUT_PATH, r.status, body, r.headers.get(HEADER))
        return EmbedLayout.from_dict(json.loads(body))


async def claim(
    http: aiohttp.ClientSession,
    key: DeploymentKey,
    encoder: str,
    url: str,
    room: int,
    session_id: str,
    offset: int,
    nbytes: int,
    timeout_s: float,
) -> dict:
    """Ask encoder `encoder` (at `url`, from the plan) to write room `room`'s embeddings into our buffer at
    `offset`; returns its (verified) answer once the bytes are in place. EmbedError names the encoder."""
    path = f"/internal/embed/{room}"
    payload = json.dumps({"session_id": session_id, "offset": offset, "nbytes": nbytes}).encode()
    headers = {**key.headers("POST", path, payload), "Content-Type": "application/json"}
    try:
        async with http.post(
            url.rstrip("/") + path,
            data=payload,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        ) as r:
            body, status, proof = await r.read(), r.status, r.headers.get(HEADER)
    except asyncio.TimeoutError:
        raise EmbedError(f"encoder {encoder} ({url}) sent no embeddings within {timeout_s:g}s") from None
    except aiohttp.ClientError as e:
        raise EmbedError(f"encoder {encoder} ({url}) is unreachable: {type(e).__name__}: {e}") from None
    text = body.decode(errors="replace")
    if status != 200:
        with contextlib.suppress(ValueError, AttributeError, TypeError):
            text = json.loads(text)["error"]["message"]
        raise EmbedError(f"encoder {encoder} ({url}) answered {status}: {text[:300]}")
    try:
        key.verify_answer(path, status, body, proof)
    except AuthError as e:
        raise EmbedError(f"the answer of encoder {encoder} is not from this deployment: {e}") from None
    answer = json.loads(body)
    if answer.get("room") != room or answer.get("nbytes") != nbytes:
        raise EmbedError(f"encoder {encoder} answered for another room or size: {text[:200]}")
    return answer
