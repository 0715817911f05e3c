"""The random-image dataset of `disaggctl bench`: PNGs made without an image library (read back with PIL),
seeded, sent as `/generate` image_data or chat image_url parts; the encoder time a server reports."""

from __future__ import annotations

import base64
import io
import random

import numpy as np
import pytest
from PIL import Image

from disaggctl.bench import client, metrics, workload
from disaggctl.bench.metrics import RequestRecord


def _decode(url: str) -> Image.Image:
    head, _, payload = url.partition(",")
    assert head == "data:image/png;base64"
    return Image.open(io.BytesIO(base64.b64decode(payload)))


@pytest.mark.parametrize(("width", "height"), [(1, 1), (7, 3), (64, 48)])
def test_png_reads_back_as_the_pixels_written(width, height):
    rgb = random.Random(width).randbytes(width * height * 3)
    image = Image.open(io.BytesIO(workload.png(width, height, rgb)))
    image.load()
    assert (image.format, image.mode, image.size) == ("PNG", "RGB", (width, height))
    want = np.frombuffer(rgb, dtype=np.uint8).reshape(height, width, 3)
    assert np.array_equal(np.asarray(image), want)
    with pytest.raises(ValueError):
        workload.png(width, height, rgb[:-1])


def test_images_are_seeded_and_sized():
    a = workload.random_image_url(random.Random(5), 40, 30)
    assert a == workload.random_image_url(random.Random(5), 40, 30)
    assert a != workload.random_image_url(random.Random(6), 40, 30)
    assert _decode(a).size == (40, 30)


def test_add_images_to_text_prompts():
    rng = random.Random(0)
    items = workload.random_text(rng, 4, 20, 3, 0.0)
    workload.add_images(rng, items, 2, 16, 8)
    assert all(len(it.images) == 2 for it in items)
    assert len({u for it in items for u in it.images}) == 8  # no two alike
    assert {_decode(u).size for it in items for u in it.images} == {(16, 8)}
    for bad in (0, workload.MAX_IMAGES_PER_REQUEST + 1):
        with pytest.raises(workload.WorkloadError, match="--image-count"):
            workload.add_images(rng, items, bad, 16, 8)
    ids = workload.random_ids(rng, 1, 5, 3, 0.0, vocab_size=10)
    with pytest.raises(workload.WorkloadError, match="text prompts"):
        workload.add_images(rng, ids, 1, 16, 8)


def test_parse_image_size():
    assert workload.parse_image_size("336x224") == (336, 224)
    assert workload.parse_image_size("64") == (64, 64)
    for bad in ("x", "0x10", "10x", "big", f"{workload.MAX_IMAGE_SIDE + 1}x1"):
        with pytest.raises(workload.WorkloadError, match="--image-size"):
            workload.parse_image_size(bad)


def test_image_request_bodies():
    item = workload.WorkItem(prompt_len=3, output_len=2, prompt="a b c", images=["data:x1", "data:x2"])
    path, body = client._request(client.Target(url="u", backend="generate"), item)
    assert path == "/generate"
    assert body["text"] == "<image><image> a b c" and body["image_data"] == ["data:x1", "data:x2"]
    path, body = client._request(client.Target(url="u", backend="openai-chat", model="m"), item)
    assert path == "/v1/chat/completions"
    assert body["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "data:x1"}},
                {"type": "image_url", "image_url": {"url": "data:x2"}},
                {"type": "text", "text": "a b c"},
            ],
        }
    ]
    with pytest.raises(ValueError, match="openai-chat"):
        client._request(client.Target(url="u", backend="openai", model="m"), item)


def test_server_timing_encode():
    assert client.encode_seconds("encode;dur=12.5") == pytest.approx(0.0125)
    assert client.encode_seconds('db;dur=3, encode;desc="x";dur="40"') == pytest.approx(0.04)
    for none in (None, "", "db;dur=3", "encode", "encode;dur=soon"):
        assert client.encode_seconds(none) is None


def test_encode_time_summary():
    rng = np.random.default_rng(0)
    recs = []
    for i in range(30):
        rec = RequestRecord(prompt_len=5, output_len=2, send_time=0.0, end_time=1.0)
        rec.chunk_times, rec.output_tokens = [0.5, 0.9], 2
        rec.encode_time = float(rng.uniform(0.01, 0.2)) if i % 3 else None
        if i == 1:
            rec.error = "timeout"  # failed requests count nowhere
        recs.append(rec)
    out = metrics.summarize(recs, 2.0)
    values = [r.encode_time for r in recs if r.ok and r.encode_time is not None]
    assert out["encoded_requests"] == len(values) == 19
    assert out["mean_encode_ms"] == pytest.approx(np.mean(values) * 1000)
    assert out["p99_encode_ms"] == pytest.approx(np.percentile(values, 99) * 1000)
    none = metrics.summarize([RequestRecord(prompt_len=1, output_len=1, end_time=1.0)], 1.0)
    assert none["encoded_requests"] == 0 and none["mean_encode_ms"] is None
