"""`disaggctl serve encoder`: the vision tower and projector of a multimodal model, and nothing else.

`POST /encode` (signed by the proxy) `{"room": R, "image_data": [...]}`: the images are decoded and
checked (400 before any model work), encoded in batches with other requests' images, and the embeddings
kept in this encoder's registered buffer under room R until the prefill claims them (`POST
/internal/embed/R`, see handoff.py) or `--hold-timeout` passes. The answer says how many tokens and how
long the encoding took, so the proxy can go on to the prefill.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from disaggctl import httpkit
from disaggctl.runtime.vision.handoff import PrefillDirectory, SlotAllocator, signed_json
from disaggctl.runtime.vision.images import MAX_IMAGES, ImageError, ImageSource
from disaggctl.trust import HEADER, AuthError, DeploymentKey

log = logging.getLogger("disaggctl.runtime.vision.encoder")

MAX_BODY_BYTES = 64 * 1024 * 1024


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="disaggctl serve encoder", description="Run a vision encoder.")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=30000)
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--max-batch", type=int, default=16, help="images encoded in one forward pass")
    ap.add_argument(
        "--embed-buffer-mb",
        "--buffer-mb",
        dest="buffer_mb",
        type=int,
        default=256,
        help="registered memory for embeddings held until their prefill claims them (MiB)",
    )
    ap.add_argument("--hold-timeout", type=float, default=60.0, help="seconds unclaimed embeddings are kept")
    ap.add_argument("--prefill-peer", action="append", default=[], metavar="NAME=URL")
    ap.add_argument("--advertise-host", default=None)
    ap.add_argument("--transfer-protocol", default="tcp", choices=["tcp", "rdma", "nvlink"])
    ap.add_argument("--ib-device", default="")
    ap.add_argument("--transfer-timeout", type=float, default=30.0)
    ap.add_argument(
        "--allowed-local-media-path", default=None, help="directory local image files may come from"
    )
    ap.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return ap


@dataclass
class Held:
    offset: int
    nbytes: int
    expires: float


class Encoder:
    def __init__(self, args: argparse.Namespace, model_dir: str, key: DeploymentKey):
        self.args = args
        self.model_dir = model_dir
        self.key = key
        self.peers = dict(p.split("=", 1) for p in args.prefill_peer)
        self.directory = PrefillDirectory(self.peers, key)
        self.source = ImageSource(local_dir=args.allowed_local_media_path)
        self.ready = False
        self.load_error: str | None = None
        self.rooms: dict[int, Held] = {}
        self.queue: asyncio.Queue = asyncio.Queue()
        self.http: aiohttp.ClientSession | None = None
        self.counters = {"images": 0, "batches": 0, "claims": 0, "expired": 0, "encode_s": 0.0}

    # ---- loading (worker thread) ----

    def load(self) -> None:
        import torch

        from disaggctl.runtime.config import EngineConfig, ModelConfig
        from disaggctl.runtime.loader import load_model
        from disaggctl.runtime.models.clip import LlavaVision
        from disaggctl.runtime.transfer_hooks import cuda_agent_hooks
        from disaggctl.runtime.vision.images import ProcessorConfig
        from disaggctl.transfer.mooncake import MooncakeAgent

        ec = EngineConfig(model=self.model_dir, dtype=self.args.dtype, device=self.args.device)
        ec.validate()
        self.device = ec.resolve_device()
        self.dtype = ec.resolve_dtype(self.device)
        cfg = ModelConfig.from_hf_dir(self.model_dir)
        if cfg.vision is None:
            raise ValueError(f"{self.model_dir} has no vision tower (config.json has no vision_config)")
        self.cfg = cfg
        self.processor = ProcessorConfig.from_dir(self.model_dir)
        self.model = load_model(self.model_dir, self.dtype, self.device, cfg, cls=LlavaVision)
        self.buffer = torch.empty(self.args.buffer_mb << 20, dtype=torch.uint8, device=self.device)
        self.slots = SlotAllocator(self.buffer.numel())
        self.agent = MooncakeAgent(
            hostname=self.args.advertise_host or self.args.host,
            protocol=self.args.transfer_protocol,
            ib_device=self.args.ib_device or None,
            timeout_s=self.args.transfer_timeout,
            **cuda_agent_hooks(self.device),
        )
        self.agent.register(self.buffer.data_ptr(), self.buffer.numel())

    def _pixels(self, images: list[str]):
        import numpy as np
        import torch

        from disaggctl.runtime.vision.images import preprocess, read_image

        arrays = [
            preprocess(read_image(ref, self.source, f"image_data[{i}]"), self.processor)
            for i, ref in enumerate(images)
        ]
        return torch.from_numpy(np.stack(arrays))

    def _run(self, pixels):
        import torch

        with torch.inference_mode():
            return self.model(pixels.to(self.device)).to(self.dtype)

    # ---- batching ----

    async def batcher(self) -> None:
        """Encode the images of every request waiting, together (fixed-size images: one stacked batch)."""
        import torch

        while True:
            jobs = [await self.queue.get()]
            while not self.queue.empty() and sum(len(p) for p, _ in jobs) < self.args.max_batch:
                jobs.append(self.queue.get_nowait())
            jobs = [(p, f) for p, f in jobs if not f.done()]
            if not jobs:
                continue
            t0 = time.perf_counter()
            try:
                out = await asyncio.to_thread(self._run, torch.cat([p for p, _ in jobs]))
            except Exception as e:
                log.exception("encoding failed")
                for _, f in jobs:
                    if not f.done():
                        f.set_exception(e)
                continue
            self.counters["batches"] += 1
            self.counters["encode_s"] += time.perf_counter() - t0
            start = 0
            for p, f in jobs:
                if not f.done():
                    f.set_result(out[start : start + len(p)])
                start += len(p)

    async def expire(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for room in [r for r, h in self.rooms.items() if h.expires < now]:
                self.slots.free(self.rooms.pop(room).offset)
                self.counters["expired"] += 1

    # ---- HTTP ----

    def _error(self, message: str, status: int, kind: str = "invalid_request_error") -> web.Response:
        return web.json_response(httpkit.error_body(message, status, kind), status=status)

    async def _authentic(self, request: web.Request) -> bytes | web.Response:
        try:
            raw = await httpkit.read_limited(request, MAX_BODY_BYTES)
        except httpkit.TooLarge:
            return self._error(f"request body too large (limit {MAX_BODY_BYTES} bytes)", 413)
        try:
            self.key.verify(request.method, request.raw_path, raw, request.headers.get(HEADER))
        except AuthError as e:
            return self._error(str(e), 401, "unauthorized")
        return raw

    async def health(self, request: web.Request) -> web.Response:
        if not self.ready:
            return web.json_response({"status": "loading", "error": self.load_error}, status=503)
        return web.json_response({"status": "ok", "held_rooms": len(self.rooms)})

    async def metrics(self, request: web.Request) -> web.Response:
        lines = [f"disaggctl_encoder_{k} {v}" for k, v in self.counters.items()]
        lines.append(f"disaggctl_encoder_held_rooms {len(self.rooms)}")
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    async def encode(self, request: web.Request) -> web.Response:
        raw = await self._authentic(request)
        if isinstance(raw, web.Response):
            return raw
        if not self.ready:
            return self._error("the encoder is not ready (loading)", 503, "service_unavailable")
        try:
            body = json.loads(raw)
            room, images = body["room"], body["image_data"]
        except (ValueError, KeyError, TypeError):
            return self._error("the body must be a JSON object with 'room' and 'image_data'", 400)
        if isinstance(images, str):
            images = [images]
        if not isinstance(room, int) or isinstance(room, bool) or not 0 <= room < 2**63:
            return self._error("'room' must be an integer in [0, 2**63)", 400)
        if not isinstance(images, list) or not images or len(images) > MAX_IMAGES:
            return self._error(f"'image_data' must hold 1 to {MAX_IMAGES} images", 400)
        if room in self.rooms:
            return self._error(f"room {room} is already held", 409)
        t0 = time.perf_counter()
        try:
            pixels = await asyncio.to_thread(self._pixels, images)
        except ImageError as e:
            return self._error(str(e), 400)
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put((pixels, fut))
        try:
            values = await fut
        except Exception as e:
            return self._error(f"encoding failed: {type(e).__name__}: {e}", 500, "encoder_error")
        flat = values.reshape(-1).view(-1).contiguous()
        nbytes = flat.numel() * flat.element_size()
        offset = self.slots.alloc(nbytes)
        if offset is None:
            return self._error(
                "the encoder's embedding buffer is full; retry later", 503, "service_unavailable"
            )
        import torch

        self.buffer[offset : offset + nbytes].copy_(flat.view(torch.uint8))
        self.rooms[room] = Held(offset, nbytes, time.monotonic() + self.args.hold_timeout)
        self.counters["images"] += len(images)
        return web.json_response(
            {
                "room": room,
                "images": len(images),
                "tokens": int(values.shape[0] * values.shape[1]),
                "nbytes": nbytes,
                "dtype": str(self.dtype).removeprefix("torch."),
                "encode_s": round(time.perf_counter() - t0, 6),
            }
        )

    async def claim(self, request: web.Request) -> web.Response:
        path = request.raw_path

        def answer(body: dict, status: int) -> web.Response:
            data, headers = signed_json(self.key, path, status, body)
            return web.Response(body=data, status=status, headers=headers)

        raw = await self._authentic(request)
        if isinstance(raw, web.Response):
            return raw
        try:
            room = int(request.match_info["room"])
            body = json.loads(raw)
            session, offset, nbytes = body["session_id"], int(body["offset"]), int(body["nbytes"])
        except (ValueError, KeyError, TypeError):
            return answer(httpkit.error_body("malformed claim", 400, "invalid_request"), 400)
        held = self.rooms.get(room)
        if held is None:
            return answer(httpkit.error_body(f"no embeddings held for room {room} (expired?)", 404), 404)
        try:
            name, layout = await self.directory.resolve(str(session), self.http)
        except KeyError:
            msg = f"session {session} is not one of this deployment's prefills"
            return answer(httpkit.error_body(msg, 403, "forbidden"), 403)
        if nbytes != held.nbytes or offset < 0 or offset + nbytes > layout.size:
            msg = f"slot of {nbytes} bytes at {offset} does not fit room {room} ({held.nbytes} bytes) or the buffer"
            return answer(httpkit.error_body(msg, 400, "invalid_request"), 400)
        del self.rooms[room]
        try:
            src = self.buffer.data_ptr() + held.offset
            await asyncio.to_thread(
                self.agent.write, layout.session_id, [src], [layout.base + offset], [nbytes]
            )
        except Exception as e:
            return answer(httpkit.error_body(f"write to {name} failed: {e}", 502, "transfer_error"), 502)
        finally:
            self.slots.free(held.offset)
        self.counters["claims"] += 1
        return answer({"room": room, "nbytes": nbytes}, 200)


async def serve(args: argparse.Namespace, model_dir: str) -> int:
    stop = asyncio.Event()
    httpkit.stop_on_signals(stop)
    try:
        key = DeploymentKey.for_server("an encoder", required=True)
    except AuthError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    enc = Encoder(args, model_dir, key)
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app.router.add_get("/health", enc.health)
    app.router.add_get("/metrics", enc.metrics)
    app.router.add_post("/encode", enc.encode)
    app.router.add_post("/internal/embed/{room}", enc.claim)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, args.host, args.port).start()
    except OSError as e:
        print(f"error: cannot listen on {args.host}:{args.port}: {e.strerror or e}", file=sys.stderr)
        return 1
    enc.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
    tasks = []
    try:
        await asyncio.to_thread(enc.load)
    except Exception as e:
        log.exception("model load failed")
        print(f"error: model load failed: {type(e).__name__}: {e}", file=sys.stderr)
        await enc.http.close()
        await runner.cleanup()
        return 1
    tasks = [asyncio.ensure_future(enc.batcher()), asyncio.ensure_future(enc.expire())]
    enc.ready = True
    log.info("encoder listening on http://%s:%d", args.host, args.port)
    await stop.wait()
    for t in tasks:
        t.cancel()
    await runner.cleanup()
    await enc.http.close()
    enc.agent.close()
    return 0


def main(argv: list[str]) -> int:
    ap = build_parser()
    try:
        args = ap.parse_args(argv)
        for p in args.prefill_peer:
            if "=" not in p or not p.split("=", 1)[1].startswith("http"):
                ap.error(f"--prefill-peer must be NAME=URL, got {p!r}")
        if args.max_batch < 1 or args.buffer_mb < 1:
            ap.error("--max-batch and --embed-buffer-mb must be >= 1")
    except SystemExit as e:
        return int(e.code or 0)
    from disaggctl.runtime.server import run

    return run("encoder", args, lambda model_dir: serve(args, model_dir))
