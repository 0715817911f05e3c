"""EPD end to end: `disaggctl up` of two encoders, a prefill and a decode on loopback (embeddings and KV
through Mooncake TCP), image requests through the proxy against transformers' LLaVA; a killed encoder
and bad images."""

from __future__ import annotations

import base64
import io
import os
import signal

import pytest
from hf_reference import IMAGE_TOKEN, hf_llava_greedy, save_random_llava, tiny_tokenizer_dir
from test_llava import random_image
from test_pd_e2e import Deployment, free_block, metrics, post

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
    def __init__(self, cli, home, tmp, model: str, encoders: int):
        super().__init__(cli, home, tmp, model, 1, 1, timeout_s=10)
        enc = f"encoder: {{replicas: {encoders}, port: {free_block(encoders)}}}\n"
        self.file.write_text(self.file.read_text().replace("prefill:", enc + "prefill:", 1))


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
