"""Image input: where an image comes from (data URL, base64, a local file, http(s)), its size caps, and
preprocessing equal to the checkpoint's Hugging Face image processor (CLIP's: convert to RGB, resize the
shortest edge with PIL, center crop, rescale, normalize), in PIL and numpy only.

Everything a client can get wrong raises `ImageError` (the server answers 400) before any model work.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MAX_IMAGE_BYTES = 20 * 1024 * 1024  # an encoded image (after base64 decoding, or fetched)
MAX_IMAGE_PIXELS = 8192 * 8192  # decoded; PIL's own bomb check stops at about twice its default
MAX_IMAGES = 16  # per request
HTTP_TIMEOUT_S = 10.0

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


class ImageError(ValueError):
    """An image the server cannot use; the message says which and why."""


@dataclass
class ProcessorConfig:
    """preprocessor_config.json of a CLIP-style image processor (the defaults are CLIP's)."""

    shortest_edge: int | None = 224
    size_hw: tuple[int, int] | None = None  # resize to exactly (height, width) instead
    crop_hw: tuple[int, int] | None = (224, 224)
    resample: int = 3  # PIL bicubic
    rescale_factor: float | None = 1 / 255
    mean: list[float] | None = field(default_factory=lambda: list(OPENAI_CLIP_MEAN))
    std: list[float] | None = field(default_factory=lambda: list(OPENAI_CLIP_STD))
    convert_rgb: bool = True

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ProcessorConfig:
        path = Path(model_dir) / "preprocessor_config.json"
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: cannot read JSON: {e}") from e
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict) -> ProcessorConfig:
        c = cls()
        size = raw.get("size", {"shortest_edge": 224})
        if isinstance(size, int):
            size = {"shortest_edge": size}
        if not raw.get("do_resize", True):
            c.shortest_edge = None
        elif "shortest_edge" in size:
            c.shortest_edge = int(size["shortest_edge"])
        else:
            c.shortest_edge, c.size_hw = None, (int(size["height"]), int(size["width"]))
        crop = raw.get("crop_size", {"height": 224, "width": 224})
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        c.crop_hw = (int(crop["height"]), int(crop["width"])) if raw.get("do_center_crop", True) else None
        c.resample = int(raw.get("resample", 3))
        c.rescale_factor = float(raw.get("rescale_factor", 1 / 255)) if raw.get("do_rescale", True) else None
        if raw.get("do_normalize", True):
            c.mean = [float(x) for x in raw.get("image_mean", OPENAI_CLIP_MEAN)]
            c.std = [float(x) for x in raw.get("image_std", OPENAI_CLIP_STD)]
        else:
            c.mean = c.std = None
        c.convert_rgb = bool(raw.get("do_convert_rgb", True))
        return c


def preprocess(image, cfg: ProcessorConfig) -> np.ndarray:
    """A PIL image -> float32 [3, H, W], as the Hugging Face CLIP image processor computes it."""
    from PIL import Image

    if cfg.convert_rgb:
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")  # transparency is composited onto white, as transformers does
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        image = image.convert("RGB")
    w, h = image.size
    if cfg.shortest_edge is not None:
        short, long = min(w, h), max(w, h)
        new_short, new_long = cfg.shortest_edge, int(cfg.shortest_edge * long / short)
        size = (new_short, new_long) if w <= h else (new_long, new_short)  # PIL wants (width, height)
        image = image.resize(size, resample=cfg.resample)
    elif cfg.size_hw is not None:
        image = image.resize((cfg.size_hw[1], cfg.size_hw[0]), resample=cfg.resample)
    x = np.moveaxis(np.array(image), -1, 0)  # [C, H, W] uint8
    if cfg.crop_hw is not None:
        x = _center_crop(x, *cfg.crop_hw)
    if cfg.rescale_factor is not None:
        x = (x.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    else:
        x = x.astype(np.float32)
    if cfg.mean is not None:
        mean, std = np.array(cfg.mean, dtype=np.float32), np.array(cfg.std, dtype=np.float32)
        x = ((x.T - mean) / std).T
    return np.ascontiguousarray(x, dtype=np.float32)


def _center_crop(x: np.ndarray, ch: int, cw: int) -> np.ndarray:
    _, h, w = x.shape
    top, left = (h - ch) // 2, (w - cw) // 2
    if top >= 0 and left >= 0:
        return x[:, top : top + ch, left : left + cw]
    # smaller than the crop: zero-padded around the centre (transformers does the same)
    nh, nw = max(ch, h), max(cw, w)
    out = np.zeros((x.shape[0], nh, nw), dtype=x.dtype)
    tp, lp = -(-(nh - h) // 2), -(-(nw - w) // 2)
    out[:, tp : tp + h, lp : lp + w] = x
    top, left = (nh - ch) // 2, (nw - cw) // 2
    return out[:, top : top + ch, left : left + cw]


@dataclass
class ImageSource:
    """Where images may come from, as the server was started."""

    local_dir: str | None = None  # local files only under this directory (none: no local files)
    allow_http: bool = True
    max_bytes: int = MAX_IMAGE_BYTES
    max_pixels: int = MAX_IMAGE_PIXELS
    http_timeout_s: float = HTTP_TIMEOUT_S


def read_image(ref: str, src: ImageSource, what: str = "image"):
    """The decoded PIL image `ref` names: a data URL, bare base64, file://PATH or a path, http(s)://URL."""
    if not isinstance(ref, str) or not ref:
        raise ImageError(f"{what} must be a non-empty string (a data URL, base64, a URL or a path)")
    if ref.startswith("data:"):
        head, sep, payload = ref.partition(",")
        if not sep or not head.endswith(";base64"):
            raise ImageError(f"{what}: a data URL must be data:image/...;base64,<data>")
        data = _b64(payload, src, what)
    elif ref.startswith(("http://", "https://")):
        data = _fetch(ref, src, what)
    elif ref.startswith("file://") or ref.startswith("/") or ref.startswith("."):
        data = _local(ref.removeprefix("file://"), src, what)
    else:
        data = _b64(ref, src, what)
    return decode(data, src, what)


def decode(data: bytes, src: ImageSource, what: str = "image"):
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
        w, h = image.size
        if w * h > src.max_pixels:
            raise ImageError(f"{what} is {w}x{h} pixels; at most {src.max_pixels} pixels are accepted")
        if w < 1 or h < 1:
            raise ImageError(f"{what} has no pixels")
        image.load()
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"{what} is not a readable image: {e}") from None
    return image


def _b64(payload: str, src: ImageSource, what: str) -> bytes:
    if len(payload) > src.max_bytes * 4 // 3 + 4:
        raise ImageError(f"{what} is larger than {src.max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(f"{what} is not valid base64 (nor a data URL, URL or path)") from None


def _local(path: str, src: ImageSource, what: str) -> bytes:
    if src.local_dir is None:
        raise ImageError(
            f"{what}: local files are not accepted by this server (see --allowed-local-media-path)"
        )
    real, root = os.path.realpath(path), os.path.realpath(src.local_dir)
    if os.path.commonpath([real, root]) != root:
        raise ImageError(f"{what}: {path} is outside the directory this server reads images from")
    try:
        size = os.path.getsize(real)
        if size > src.max_bytes:
            raise ImageError(f"{what}: {path} is larger than {src.max_bytes} bytes")
        with open(real, "rb") as f:
            return f.read(src.max_bytes + 1)
    except OSError as e:
        raise ImageError(f"{what}: cannot read {path}: {e.strerror or e}") from None


def _fetch(url: str, src: ImageSource, what: str) -> bytes:
    if not src.allow_http:
        raise ImageError(f"{what}: http(s) URLs are not accepted by this server")
    try:
        with urllib.request.urlopen(url, timeout=src.http_timeout_s) as r:  # noqa: S310 (http(s) only, above)
            data = r.read(src.max_bytes + 1)
    except (OSError, ValueError) as e:
        raise ImageError(f"{what}: cannot fetch {url}: {e}") from None
    if len(data) > src.max_bytes:
        raise ImageError(f"{what}: {url} is larger than {src.max_bytes} bytes")
    return data
