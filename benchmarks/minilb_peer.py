"""A peer for the proxy benchmark: a PD proxy built the way SGLang's mini_lb is built (comparison only).

The design points it keeps from mini_lb: FastAPI on uvicorn; the JSON body parsed into a dict by the
framework; a random prefill and decode per request; a fresh aiohttp ClientSession per request (total
timeout 3600 s); the prefill and decode requests sent together and awaited with gather; the decode answer
returned as an ORJSON response, or streamed with StreamingResponse in 64 KiB reads.

Needs fastapi, uvicorn and orjson (benchmark-only dependencies; uvloop and httptools are used when
installed, as in a usual SGLang environment).

    python benchmarks/minilb_peer.py --port 8100 --prefill http://127.0.0.1:8200 --bootstrap-port 9000 \\
        --decode http://127.0.0.1:8300
"""

from __future__ import annotations

import argparse
import asyncio
import random
from urllib.parse import urlsplit

import aiohttp
import uvicorn
from fastapi import FastAPI
from fastapi.responses import ORJSONResponse, Response, StreamingResponse

READ_CHUNK = 64 * 1024


def build_app(prefills: list[tuple[str, int]], decodes: list[str]) -> FastAPI:
    app = FastAPI()

    def pick() -> tuple[str, int, str]:
        url, port = random.choice(prefills)
        return url, port, random.choice(decodes)

    async def forward(body: dict, path: str):
        p_url, port, d_url = pick()
        body = dict(body)
        body.update(
            bootstrap_host=urlsplit(p_url).hostname,
            bootstrap_port=port,
            bootstrap_room=random.getrandbits(63),
        )
        if body.get("stream", False):

            async def chunks():
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as s:
                    _, d = await _both(s, p_url, d_url, path, body)
                    async for c in d.content.iter_chunked(READ_CHUNK):
                        yield c

            return StreamingResponse(chunks(), media_type="text/event-stream")
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as s:
            _, d = await _both(s, p_url, d_url, path, body)
            return ORJSONResponse(content=await d.json(), status_code=d.status)

    @app.get("/health")
    async def health():
        return Response(status_code=200)

    @app.post("/generate")
    async def generate(body: dict):
        return await forward(body, "/generate")

    @app.post("/v1/completions")
    async def completions(body: dict):
        return await forward(body, "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat(body: dict):
        return await forward(body, "/v1/chat/completions")

    return app


async def _both(s: aiohttp.ClientSession, p_url: str, d_url: str, path: str, body: dict):
    return await asyncio.gather(s.post(p_url + path, json=body), s.post(d_url + path, json=body))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8100)
    ap.add_argument("--prefill", action="append", required=True)
    ap.add_argument("--bootstrap-port", action="append", type=int, required=True)
    ap.add_argument("--decode", action="append", required=True)
    args = ap.parse_args()
    if len(args.prefill) != len(args.bootstrap_port):
        ap.error("give one --bootstrap-port per --prefill")
    app = build_app(list(zip(args.prefill, args.bootstrap_port, strict=True)), args.decode)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
