"""Images of a request in a language-model server (colocated, prefill, decode).

Every role expands the prompt's image tokens (one per embedding row) so that prefill and decode agree on
the prompt. Then: a decode needs nothing more (the KV comes from the prefill); a request with
`embed_parts` (added and signed by the proxy) pulls its embeddings from the encoders that hold them; any
other request is encoded here, when this server loaded the vision tower.
"""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp

from disaggctl.runtime.protocol import InvalidRequest, Job
from disaggctl.runtime.vision.embeds import ImageEmbeds, expand_image_tokens
from disaggctl.runtime.vision.handoff import EmbedError, EmbedLayout, SlotAllocator, claim
from disaggctl.runtime.vision.images import ImageError, ImageSource, ProcessorConfig

log = logging.getLogger("disaggctl.runtime.vision.inputs")

DEFAULT_BUFFER_MB = 64


class VisionInputs:
    def __init__(self, role_name: str, engine, model_dir: str, args, key):
        self.role_name = role_name
        self.engine = engine
        self.vision = engine.model_config.vision
        self.key = key
        self.processor = ProcessorConfig.from_dir(model_dir)
        self.source = ImageSource(local_dir=getattr(args, "allowed_local_media_path", None))
        # the plan's encoders, by URL (how the proxy names them in `embed_parts`) -> plan name
        self.encoders = {
            u.rstrip("/"): n for n, u in (p.split("=", 1) for p in getattr(args, "encoder_peer", None) or [])
        }
        self.timeout_s = float(getattr(args, "transfer_timeout", 30.0))
        self.layout: EmbedLayout | None = None
        self.http: aiohttp.ClientSession | None = None
        self.counters = {"images": 0, "embed_wait_s": 0.0}
        if self.encoders:
            import torch

            agent = engine.runner.agent
            if agent is None:
                raise ValueError("a server that takes embeddings from encoders needs a Mooncake agent")
            # a request's slot is held from its claim until the bytes are copied out: size it for the
            # claims in flight x images a request x tokens an image x hidden x dtype bytes
            size = int(getattr(args, "embed_buffer_mb", None) or DEFAULT_BUFFER_MB) << 20
            self.buffer = torch.empty(size, dtype=torch.uint8, device=engine.device)
            agent.register(self.buffer.data_ptr(), size)
            self.slots = SlotAllocator(size)
            self.layout = EmbedLayout(agent.session_id, self.buffer.data_ptr(), size)

    @property
    def local(self) -> bool:
        return getattr(self.engine.model, "vision_tower", None) is not None

    async def prepare(self, job: Job) -> None:
        """Expand the image tokens of `job.prompt_ids` and (but on a decode) set `job.mm`. InvalidRequest
        for what the client got wrong (400) or an encoder that failed (502)."""
        images = job.images or []
        parts = job.embed_parts or []
        count = len(images) if images else sum(len(p["images"]) for p in parts)
        v = self.vision
        try:
            ids, positions = expand_image_tokens(job.prompt_ids, v.image_token_id, v.tokens_per_image, count)
        except ValueError as e:
            raise InvalidRequest(str(e)) from None
        job.prompt_ids = ids
        if self.role_name == "decode" or not count:
            return
        t0 = time.perf_counter()
        if parts:
            values = await self._pull(parts, count)
        elif self.local:
            values = await asyncio.to_thread(self._encode, images)
        else:
            raise InvalidRequest(
                "this server runs the language model only and the request names no encoder", 503, "no_encoder"
            )
        self.counters["images"] += count
        self.counters["embed_wait_s"] += time.perf_counter() - t0
        job.mm = ImageEmbeds(positions, values.reshape(len(positions), -1))

    def _encode(self, images: list[str]):
        import numpy as np
        import torch

        from disaggctl.runtime.vision.images import preprocess, read_image

        try:
            arrays = [
                preprocess(read_image(ref, self.source, f"image {i}"), self.processor)
                for i, ref in enumerate(images)
            ]
        except ImageError as e:
            raise InvalidRequest(str(e)) from None
        return self.engine.model.encode(torch.from_numpy(np.stack(arrays)).to(self.engine.device))

    async def _pull(self, parts: list[dict], count: int):
        import torch

        if not self.encoders:
            raise InvalidRequest("this server takes no embeddings from encoders", 400)
        if self.http is None:
            self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
        hidden = self.engine.model_config.hidden_size
        itemsize = torch.empty((), dtype=self.engine.dtype).element_size()
        order = [i for p in parts for i in p["images"]]
        if sorted(order) != list(range(count)):
            raise InvalidRequest("'embed_parts' must cover every image once", 400)
        taken: list[int] = []
        done = False
        try:
            calls = []
            for p in parts:
                url = p["encoder"].rstrip("/")
                name = self.encoders.get(url)
                if name is None:
                    raise InvalidRequest(f"encoder {url!r} is not one of this deployment's", 400)
                nbytes = len(p["images"]) * self.vision.tokens_per_image * hidden * itemsize
                off = self.slots.alloc(nbytes)
                if off is None:
                    raise InvalidRequest(
                        f"the embedding buffer ({self.slots.size >> 20} MiB, --embed-buffer-mb) has no room "
                        f"for {nbytes} bytes now; retry later",
                        503,
                        "service_unavailable",
                    )
                taken.append(off)
                calls.append(
                    claim(
                        self.http,
                        self.key,
                        name,
                        url,
                        p["room"],
                        self.layout.session_id,
                        off,
                        nbytes,
                        self.timeout_s,
                    )
                )
            try:
                await asyncio.gather(*calls)
            except EmbedError as e:
                raise InvalidRequest(str(e), 502, "encoder_error") from None
            per_image = self.vision.tokens_per_image * hidden
            chunks: dict[int, torch.Tensor] = {}
            for p, off in zip(parts, taken, strict=True):
                n = len(p["images"]) * per_image
                values = self.buffer[off : off + n * itemsize].view(self.engine.dtype).clone()
                for j, i in enumerate(p["images"]):
                    chunks[i] = values[j * per_image : (j + 1) * per_image]
            done = True
            return torch.cat([chunks[i] for i in range(count)])
        finally:
            for off in taken:
                if done:
                    self.slots.free(off)
                else:  # an encoder may still be writing there: the slot is reused only after its deadline
                    asyncio.get_running_loop().call_later(self.timeout_s + 5, self.slots.free, off)

    async def close(self) -> None:
        if self.http is not None:
            await self.http.close()


def parse_embed_parts(v) -> list[dict]:
    """`embed_parts` as the proxy writes it: [{"encoder": NAME, "room": R, "images": [i, ...]}, ...]."""
    if not isinstance(v, list) or not v:
        raise InvalidRequest("'embed_parts' must be a non-empty list")
    out = []
    for p in v:
        if not isinstance(p, dict) or set(p) != {"encoder", "room", "images"}:
            raise InvalidRequest("'embed_parts' items must be {encoder, room, images}")
        if not isinstance(p["encoder"], str) or not isinstance(p["room"], int) or isinstance(p["room"], bool):
            raise InvalidRequest("'embed_parts' items need a string encoder and an integer room")
        if (
            not isinstance(p["images"], list)
            or not p["images"]
            or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 64 for i in p["images"])
        ):
            raise InvalidRequest("'embed_parts' images must be image indexes")
        out.append(p)
    return out
