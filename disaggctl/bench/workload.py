"""What the benchmark sends and when: prompts (random, random with images, ShareGPT, a prompts file) and
arrival times.

Everything is drawn from one `random.Random(seed)`, so a seed reproduces the same workload.
Lengths are token counts. Random prompts are token ids for servers that take `input_ids`; for
text-only APIs they are words, sized with a words-per-token ratio measured against the server.
Random images are noise PNGs made here (no image library on the client), sent as data URLs.
"""

from __future__ import annotations

import base64
import json
import random
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

# Common short English words: each is usually one or two tokens in a BPE vocabulary.
WORDS = (
    "the of and to in is was for on that with as by at from his it an were are which this be or "
    "has had not first one their its new after but who they have her she two been other when there "
    "all during into school time may years more most only over city some world would where later up "
    "such used many can state about national out known university united then made team people war "
    "season since also between back long home game house water light river north south east west"
).split()


class WorkloadError(ValueError):
    """Bad workload input (a file that cannot be read or has no usable prompts): a one-line message."""


@dataclass
class WorkItem:
    """One request to send. Exactly one of `prompt` / `input_ids` is set."""

    prompt_len: int  # tokens: exact for input_ids, an estimate for text
    output_len: int
    prompt: str | None = None
    input_ids: list[int] | None = None
    images: list[str] | None = None  # data URLs, in prompt order (before the text)


def sample_lengths(rng: random.Random, n: int, mean_len: int, range_ratio: float) -> list[int]:
    """`n` lengths uniform in [mean*(1-r), mean*(1+r)] (vLLM's --random-range-ratio), at least 1."""
    if not 0 <= range_ratio < 1:
        raise WorkloadError(f"--range-ratio must be in [0, 1), got {range_ratio}")
    lo = max(1, round(mean_len * (1 - range_ratio)))
    hi = max(lo, round(mean_len * (1 + range_ratio)))
    return [rng.randint(lo, hi) for _ in range(n)]


def random_ids(
    rng: random.Random, n: int, input_len: int, output_len: int, range_ratio: float, vocab_size: int
) -> list[WorkItem]:
    """Prompts of random token ids in [0, vocab_size): exact lengths, no tokenizer needed."""
    if vocab_size < 2:
        raise WorkloadError(f"vocabulary size must be at least 2, got {vocab_size}")
    in_lens = sample_lengths(rng, n, input_len, range_ratio)
    out_lens = sample_lengths(rng, n, output_len, range_ratio)
    return [
        WorkItem(prompt_len=i, output_len=o, input_ids=[rng.randrange(vocab_size) for _ in range(i)])
        for i, o in zip(in_lens, out_lens, strict=True)
    ]


def words_for_tokens(tokens: int, tokens_per_word: float, overhead: float) -> int:
    """How many words make a prompt of about `tokens` tokens, given a measured linear fit."""
    return max(1, round((tokens - overhead) / tokens_per_word))


def random_text(
    rng: random.Random,
    n: int,
    input_len: int,
    output_len: int,
    range_ratio: float,
    tokens_per_word: float = 1.0,
    overhead: float = 0.0,
) -> list[WorkItem]:
    """Prompts of random words sized to about `input_len` tokens (the server reports the exact count)."""
    in_lens = sample_lengths(rng, n, input_len, range_ratio)
    out_lens = sample_lengths(rng, n, output_len, range_ratio)
    items = []
    for i, o in zip(in_lens, out_lens, strict=True):
        words = [rng.choice(WORDS) for _ in range(words_for_tokens(i, tokens_per_word, overhead))]
        items.append(WorkItem(prompt_len=i, output_len=o, prompt=" ".join(words)))
    return items


MAX_IMAGE_SIDE = 4096
MAX_IMAGES_PER_REQUEST = 16


def parse_image_size(text: str) -> tuple[int, int]:
    """`WxH` (or a single N for NxN) -> (width, height)."""
    w, sep, h = text.lower().partition("x")
    try:
        width, height = int(w), int(h if sep else w)
    except ValueError:
        raise WorkloadError(f"--image-size must be WIDTHxHEIGHT (e.g. 336x336), got {text!r}") from None
    if not (1 <= width <= MAX_IMAGE_SIDE and 1 <= height <= MAX_IMAGE_SIDE):
        raise WorkloadError(f"--image-size: each side must be 1..{MAX_IMAGE_SIDE} pixels, got {text!r}")
    return width, height


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(width: int, height: int, rgb: bytes) -> bytes:
    """An 8-bit RGB PNG of `rgb` (row-major, 3 bytes a pixel). Noise does not compress, so level 1."""
    if len(rgb) != width * height * 3:
        raise ValueError(f"{width}x{height} RGB needs {width * height * 3} bytes, got {len(rgb)}")
    stride = width * 3
    raw = b"".join(b"\x00" + rgb[y * stride : (y + 1) * stride] for y in range(height))  # filter: none
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, truecolour
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(raw, 1))
        + _png_chunk(b"IEND", b"")
    )


def random_image_url(rng: random.Random, width: int, height: int) -> str:
    """A PNG of uniform random pixels as a data URL: every image differs, so no cache can serve it."""
    data = png(width, height, rng.randbytes(width * height * 3))
    return "data:image/png;base64," + base64.b64encode(data).decode()


def add_images(
    rng: random.Random, items: list[WorkItem], count: int, width: int, height: int
) -> list[WorkItem]:
    """`count` random images for each item (which then must be a text prompt)."""
    if not 1 <= count <= MAX_IMAGES_PER_REQUEST:
        raise WorkloadError(f"--image-count must be 1..{MAX_IMAGES_PER_REQUEST}, got {count}")
    for item in items:
        if item.prompt is None:
            raise WorkloadError("image requests need text prompts (the image placeholders go in the text)")
        item.images = [random_image_url(rng, width, height) for _ in range(count)]
    return items


def _pick(rng: random.Random, prompts: list[str], n: int) -> list[str]:
    """`n` prompts in a seeded random order; cycles through the list when it is shorter than n."""
    order = prompts[:]
    rng.shuffle(order)
    return [order[i % len(order)] for i in range(n)]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise WorkloadError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise WorkloadError(f"{path}: cannot read: {e}") from None


def load_sharegpt(path: Path) -> list[str]:
    """First human turn of each conversation of a ShareGPT-style JSON file:
    `[{"conversations": [{"from": "human", "value": "..."}, ...]}, ...]`."""
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise WorkloadError(f"{path}: not JSON: {e}") from None
    if not isinstance(data, list):
        raise WorkloadError(f"{path}: expected a JSON list of {{conversations: [...]}} objects")
    prompts = []
    for entry in data:
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if not isinstance(turns, list):
            continue
        for turn in turns:
            if isinstance(turn, dict) and turn.get("from") in ("human", "user") and turn.get("value"):
                prompts.append(str(turn["value"]))
                break
    if not prompts:
        raise WorkloadError(f"{path}: no conversation with a human turn (from: human, value: ...)")
    return prompts


def load_prompts(path: Path) -> list[str]:
    """A prompts file: `.jsonl` holds one JSON string or {"prompt"|"text": ...} object per line;
    any other file holds one prompt per non-empty line."""
    text = _read_text(path)
    prompts = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            prompts.append(line)
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise WorkloadError(f"{path}:{lineno}: not JSON: {e}") from None
        value = obj.get("prompt", obj.get("text")) if isinstance(obj, dict) else obj
        if not isinstance(value, str) or not value:
            raise WorkloadError(f"{path}:{lineno}: expected a string or an object with a 'prompt' string")
        prompts.append(value)
    if not prompts:
        raise WorkloadError(f"{path}: no prompts")
    return prompts


def file_prompts(
    rng: random.Random, prompts: list[str], n: int, output_len: int, range_ratio: float
) -> list[WorkItem]:
    """Items from dataset prompts; prompt_len is a rough estimate (words) until the server reports."""
    chosen = _pick(rng, prompts, n)
    out_lens = sample_lengths(rng, n, output_len, range_ratio)
    return [
        WorkItem(prompt_len=len(p.split()), output_len=o, prompt=p)
        for p, o in zip(chosen, out_lens, strict=True)
    ]


def arrival_times(rng: random.Random, n: int, rate: float) -> list[float]:
    """Offsets (seconds from the start) at which to send each of `n` requests: all at 0 for an
    infinite rate, else a Poisson process (exponential gaps with mean 1/rate), first at 0."""
    if rate <= 0:
        raise WorkloadError(f"--request-rate must be positive (or inf), got {rate}")
    if rate == float("inf"):
        return [0.0] * n
    t, out = 0.0, []
    for i in range(n):
        if i:
            t += rng.expovariate(rate)
        out.append(t)
    return out
