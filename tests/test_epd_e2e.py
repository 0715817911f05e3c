"""EPD end to end: `disaggctl up` of encoders, a prefill and a decode on loopback (embeddings and KV
through Mooncake TCP), image requests through the proxy against transformers' LLaVA; images by http URL
from a local server; `disaggctl bench` image requests; encoders killed (between requests, and inside an
`/encode` call) and bad images."""

from __future__ import annotations

import base64
import http.server
import io
import json
import os
import queue
import signal
import struct
import sys
import threading
import urllib.request
import zlib
from pathlib import Path

import pytest
import yaml
from conftest import free_block, wait_for
from hf_reference import hf_llava_greedy, save_random_llava, tiny_tokenizer_dir
from test_bench_e2e import run_bench
from test_llava import random_image
from test_pd_e2e import Deployment, metrics, post

from disaggctl.runtime.builtin_llava import IMAGE_TOKEN
from disaggctl.runtime.vision.images import (
    MAX_IMAGE_BYTES,
    MAX_IMAGE_PIXELS,
    ImageError,
    ImageSource,
    read_image,
)
from disaggctl.trust import HEADER

N = 6


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    tok = tiny_tokenizer_dir(tmp_path_factory.mktemp("cache"))
    return save_random_llava(tmp_path_factory.mktemp("llava"), tok)


def png_b64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def reference(model_dir: str, text: str, images: list, chat: bool) -> list[int]:
    """transformers: the HF tokenizer (and chat template), `<image>` expanded as its processor does, CLIP
    pixels from its image processor, greedy LLaVA generate."""
    from transformers import AutoTokenizer, CLIPImageProcessorPil

    from disaggctl.runtime.config import ModelConfig
    from disaggctl.runtime.vision.embeds import expand_image_tokens

    tok = AutoTokenizer.from_pretrained(model_dir)
    if chat:
        ids = tok.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
        )
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    else:
        ids = tok(text, add_special_tokens=True)["input_ids"]
    v = ModelConfig.from_hf_dir(model_dir).vision
    ids, _ = expand_image_tokens(list(ids), v.image_token_id, v.tokens_per_image, len(images))
    pixels = CLIPImageProcessorPil.from_pretrained(model_dir)(images=images, return_tensors="pt")[
        "pixel_values"
    ]
    return hf_llava_greedy(model_dir, ids, pixels, N)


class EpdDeployment(Deployment):
    """`encoders` -> 1P -> 1D on `model`, with embedding buffers of the sizes the topology sets."""

    def __init__(self, cli, home, tmp, model: str, encoders: int, buffer_mb: int = 2):
        super().__init__(cli, home, tmp, model, 1, 1, timeout_s=10)
        enc = f"encoder: {{replicas: {encoders}, port: {free_block(encoders)}, embed_buffer_mb: {buffer_mb + 1}}}\n"
        text = self.file.read_text().replace(
            "prefill: {", f"{enc}prefill: {{embed_buffer_mb: {buffer_mb}, ", 1
        )
        self.file.write_text(text)


@pytest.fixture
def epd(cli, tmp_path, llava):
    home = tmp_path / "home"
    home.mkdir()
    d = EpdDeployment(cli, home, tmp_path, llava, encoders=2)
    try:
        d.up()
        yield d
    finally:
        d.down()


def sampling() -> dict:
    return {"max_new_tokens": N, "temperature": 0, "ignore_eos": True}


def test_epd_equals_transformers_and_survives_a_dead_encoder(epd, llava):
    red, other = random_image(40, 30, seed=3), random_image(30, 50, mode="RGBA", seed=4)
    # /generate with image_data: two images, split over the two encoders
    text = f"a {IMAGE_TOKEN} and b {IMAGE_TOKEN} c"
    status, body = post(
        epd.proxy + "/generate",
        {"text": text, "image_data": [png_b64(red), png_b64(other)], "sampling_params": sampling()},
    )
    assert status == 200, body
    assert body["output_ids"] == reference(llava, text, [red, other], chat=False)
    served = [metrics(epd.proxy).get("proxy_worker_served_total")]  # noqa: F841 (read below per worker)
    enc_urls = [epd.url("encoder-0"), epd.url("encoder-1")]
    text_m = urllib_metrics(epd.proxy)
    assert all(text_m[("served", u)] >= 1 for u in enc_urls), text_m
    assert text_m["encode_requests"] == 1

    # the prefill registered the embedding buffer the topology asked for (embed_buffer_mb: 2)
    key, path = epd.key(), "/internal/embed_layout"
    req = urllib.request.Request(epd.url("prefill-0") + path, headers=key.headers("GET", path))
    with urllib.request.urlopen(req, timeout=10) as r:
        layout = r.read()
        key.verify_answer(path, r.status, layout, r.headers.get(HEADER))
    assert json.loads(layout)["size"] == 2 << 20

    # OpenAI chat with a data URL
    chat_text = f"{IMAGE_TOKEN} what is it?"
    msg = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + png_b64(red)}},
                {"type": "text", "text": " what is it?"},
            ],
        }
    ]
    want = reference(llava, chat_text, [red], chat=True)
    status, body = post(
        epd.proxy + "/v1/chat/completions",
        {"messages": msg, "max_tokens": N, "temperature": 0, "ignore_eos": True},
    )
    assert status == 200, body
    from transformers import AutoTokenizer

    assert body["choices"][0]["message"]["content"] == AutoTokenizer.from_pretrained(llava).decode(
        want, skip_special_tokens=True
    )

    # a malformed image: 400 from the encoder, before the prefill or decode see the request
    status, body = post(
        epd.proxy + "/generate",
        {"text": f"{IMAGE_TOKEN} x", "image_data": "bm90IGFuIGltYWdl", "sampling_params": sampling()},
    )
    assert status == 400 and "not a readable image" in body["error"]["message"], body
    # more images than image tokens: 400
    status, body = post(
        epd.proxy + "/generate",
        {"text": "no image token", "image_data": png_b64(red), "sampling_params": sampling()},
    )
    assert status == 400 and "image token" in body["error"]["message"], body
    # text-only requests skip the encoders
    status, body = post(epd.proxy + "/generate", {"text": "plain text", "sampling_params": sampling()})
    assert status == 200 and len(body["output_ids"]) == N

    # encoder-0 killed: its requests go to encoder-1, every later request still answers
    os.killpg(epd.procs["encoder-0"]["pid"], signal.SIGKILL)
    for i in range(3):
        status, body = post(
            epd.proxy + "/generate",
            {"text": text, "image_data": [png_b64(red), png_b64(other)], "sampling_params": sampling()},
        )
        assert status == 200, (i, body, epd.logs())
        assert body["output_ids"] == reference(llava, text, [red, other], chat=False)


def urllib_metrics(proxy: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(proxy + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("disaggctl_proxy_worker_served_total{"):
            url = line.split('url="', 1)[1].split('"', 1)[0]
            out[("served", url)] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("disaggctl_proxy_encode_requests_total "):
            out["encode_requests"] = float(line.rsplit(" ", 1)[1])
    return out


# ---- one encoder: output, images by URL, bench, an encoder killed inside /encode ----


class ImageServer:
    """http.server on 127.0.0.1 for images by URL. `/img/NAME`: a PNG put in `images`; `/big`: one byte over
    the size cap; `/hold`: puts its path in `arrivals`, then answers only once `release` is set (a fetch
    the test knows is in progress)."""

    def __init__(self):
        self.images: dict[str, bytes] = {}
        self.arrivals: queue.Queue = queue.Queue()
        self.release = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path == "/hold":
                    server.arrivals.put(self.path)
                    server.release.wait(60)
                    data = b"released"
                elif self.path == "/big":
                    data = bytes(MAX_IMAGE_BYTES + 1)
                else:
                    data = server.images.get(self.path.removeprefix("/img/"))
                    if data is None:
                        self.send_error(404)
                        return
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the reader is gone (a timeout, a killed encoder)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


@pytest.fixture(scope="module")
def image_server():
    s = ImageServer()
    try:
        yield s
    finally:
        s.close()


class ExampleEpd(Deployment):
    """topologies/local-epd.yaml as shipped (1 encoder -> 1P -> 1D on builtin:tiny-llava), but for free
    ports, this interpreter, a private model cache, and a keeper that restarts a killed process at once."""

    def __init__(self, cli, home: Path, tmp: Path, cache: Path):
        raw = yaml.safe_load((Path(__file__).parent.parent / "topologies" / "local-epd.yaml").read_text())
        raw["hosts"][0]["python"] = sys.executable
        raw["encoder"]["port"] = free_block(1)
        raw["prefill"].update(port=free_block(1), bootstrap_port=free_block(1))
        raw["decode"]["port"] = free_block(1)
        raw["proxy"]["port"] = port = free_block(1)
        raw["keeper"] = {"backoff_s": 0, "backoff_max_s": 1}
        self.cli = cli
        self.env = {**os.environ, "DISAGGCTL_HOME": str(home), "DISAGGCTL_CACHE": str(cache)}
        self.proxy = f"http://127.0.0.1:{port}"
        self.file = tmp / "local-epd.yaml"
        self.file.write_text(yaml.safe_dump(raw))
        self.model = raw["model"]["path"]


@pytest.fixture(scope="module")
def epd1(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("epd1")
    (tmp / "home").mkdir()
    d = ExampleEpd([sys.executable, "-m", "disaggctl"], tmp / "home", tmp, tmp / "cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("DISAGGCTL_CACHE", str(tmp / "cache"))
    try:
        from disaggctl.runtime.builtin import resolve_model

        d.model_dir = resolve_model(d.model)  # generated once, before the processes look for it
    finally:
        mp.undo()
    try:
        d.up()
        yield d
    finally:
        d.down()


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_one_encoder_equals_transformers_by_data_and_by_url(epd1, image_server):
    """local-epd.yaml comes up and answers image requests with transformers' tokens on its checkpoint."""
    a, b = random_image(36, 44, seed=11), random_image(32, 32, seed=12)
    image_server.images["b.png"] = png_bytes(b)
    text = f"x {IMAGE_TOKEN} y {IMAGE_TOKEN}"
    status, body = post(
        epd1.proxy + "/generate",
        {
            "text": text,
            "image_data": [png_b64(a), image_server.url + "/img/b.png"],  # inline, and fetched by the encoder
            "sampling_params": sampling(),
        },
    )
    assert status == 200, (body, epd1.logs())
    assert body["output_ids"] == reference(epd1.model_dir, text, [a, b], chat=False)


def test_oversized_images_are_400_end_to_end(epd1, image_server):
    # a PNG whose header says more pixels than accepted: refused from the header, nothing decoded
    w = h = int(MAX_IMAGE_PIXELS**0.5) + 1
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    huge = (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )

    def seen() -> list[float]:
        """Requests the prefill and the decode accepted or refused."""
        m = [metrics(epd1.url(n)) for n in ("prefill-0", "decode-0")]
        return [x[k] for x in m for k in ("request_success_total", "request_failure_total")]

    before = seen()
    for image, message in (
        (base64.b64encode(huge).decode(), f"at most {MAX_IMAGE_PIXELS} pixels"),
        (image_server.url + "/big", f"larger than {MAX_IMAGE_BYTES} bytes"),  # the fetch is capped
    ):
        status, body = post(
            epd1.proxy + "/generate",
            {"text": f"{IMAGE_TOKEN} x", "image_data": image, "sampling_params": sampling()},
        )
        assert status == 400 and message in body["error"]["message"], body
    assert seen() == before  # refused at the encoder: neither the prefill nor the decode saw them
    workers = {w["url"]: w for w in _workers(epd1.proxy)}
    assert workers[epd1.url("encoder-0")]["healthy"]  # a bad image is the client's fault, not the encoder's


def test_image_fetch_times_out(image_server):
    """The http(s) fetch's timeout (10 s in servers; shortened here) ends in a clear error."""
    image_server.release.clear()
    try:
        with pytest.raises(ImageError, match="cannot fetch .*/hold: .*timed out"):
            read_image(image_server.url + "/hold", ImageSource(http_timeout_s=0.5), "image_data[0]")
    finally:
        image_server.release.set()
    assert image_server.arrivals.get(timeout=10) == "/hold"


def test_bench_image_requests_report_encoder_time(epd1, tmp_path):
    cli = [sys.executable, "-m", "disaggctl"]
    n, count = 3, 2
    for backend, images in (("generate", count), ("openai-chat", 1)):
        rc, stdout, stderr, doc = run_bench(
            cli, epd1.proxy, tmp_path, "--dataset", "random-image", "--backend", backend,
            "--image-count", str(images), "--image-size", "48x40", "--num-prompts", str(n),
            "--input-len", "12", "--output-len", "3", "--warmup", "0",
        )  # fmt: skip
        assert rc == 0, (stderr, epd1.logs())
        assert doc["completed"] == n and doc["failed"] == 0, doc["errors"]
        assert doc["context"]["image_count"] == images and doc["context"]["image_size"] == "48x40"
        # every request went through the encoder, and said how long it took there: part of its TTFT
        assert doc["encoded_requests"] == n
        assert 0 < doc["mean_encode_ms"]
        assert doc["max_encode_ms"] <= doc["max_ttft_ms"]
        # the server's prompt count holds each image's 16 tokens
        assert doc["total_input_tokens"] >= n * images * 16
        assert "Encoder time" in stdout


def test_encoder_killed_inside_encode_fails_that_request_only(epd1, image_server):
    """The encoder is killed while it fetches an image (the test's server holds the fetch): that request
    fails with an error naming the encoder; once the keeper has restarted it, requests succeed again."""
    enc_url = epd1.url("encoder-0")
    pid = _status(epd1)["encoder-0"]["pid"]
    image_server.release.clear()
    result: dict = {}

    def send():
        result["answer"] = post(
            epd1.proxy + "/generate",
            {
                "text": f"{IMAGE_TOKEN} x",
                "image_data": image_server.url + "/hold",
                "sampling_params": sampling(),
            },
        )

    t = threading.Thread(target=send, daemon=True)
    t.start()
    try:
        assert image_server.arrivals.get(timeout=60) == "/hold"  # the encoder is inside /encode now
        os.killpg(pid, signal.SIGKILL)
        t.join(60)
    finally:
        image_server.release.set()
    status, body = result["answer"]
    assert status == 502, body
    assert f"encoder {enc_url}" in body["error"]["message"], body

    # the keeper starts it again; the proxy takes it back once its health probe answers
    wait_for(lambda: _status(epd1)["encoder-0"]["pid"] != pid, 60, "the encoder's restart")
    wait_for(
        lambda: {w["url"]: w for w in _workers(epd1.proxy)}[enc_url]["healthy"],
        120,
        "the encoder back in the proxy",
    )
    img = random_image(30, 40, seed=21)
    text = f"{IMAGE_TOKEN} again"
    status, body = post(
        epd1.proxy + "/generate", {"text": text, "image_data": png_b64(img), "sampling_params": sampling()}
    )
    assert status == 200, (body, epd1.logs())
    assert body["output_ids"] == reference(epd1.model_dir, text, [img], chat=False)


def _status(d: Deployment) -> dict:
    res = d.run("status", "--json")
    assert res.returncode in (0, 3), res.stderr  # 3: a process is down (the one the test killed)
    return {p["name"]: p for p in json.loads(res.stdout)["processes"]}


def _workers(proxy: str) -> list[dict]:
    with urllib.request.urlopen(proxy + "/workers", timeout=10) as r:
        body = json.loads(r.read())
    return body["workers"] if isinstance(body, dict) else body
