"""LLaVA in the runtime against transformers: image preprocessing equal to the CLIP image processor, and
greedy generation (vision tower, projector, image tokens spliced into chunked prefills) equal to
`LlavaForConditionalGeneration.generate` on a tiny random model."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from hf_reference import hf_llava_greedy, save_random_llava, tiny_tokenizer_dir
from PIL import Image
from test_engine_modes import Events

from disaggctl.runtime.config import EngineConfig, ModelConfig
from disaggctl.runtime.engine import Engine, Request
from disaggctl.runtime.sampling import SamplingParams
from disaggctl.runtime.vision.embeds import ImageEmbeds, expand_image_tokens
from disaggctl.runtime.vision.images import ImageError, ImageSource, ProcessorConfig, preprocess, read_image


def random_image(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    bands = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    data = rng.integers(0, 256, size=(h, w, bands), dtype=np.uint8)
    return Image.fromarray(data[..., 0] if bands == 1 else data, mode)


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    tok = tiny_tokenizer_dir(tmp_path_factory.mktemp("cache"))
    return save_random_llava(tmp_path_factory.mktemp("llava"), tok)


@pytest.mark.parametrize(
    "size,mode,processor",
    [
        ((50, 37), "RGB", {"size": {"shortest_edge": 32}, "crop_size": 32}),
        ((20, 64), "RGBA", {"size": {"shortest_edge": 32}, "crop_size": 32}),
        ((33, 33), "L", {}),
        ((640, 480), "RGB", {"size": {"shortest_edge": 336}, "crop_size": 336}),
        ((16, 12), "RGB", {"size": {"shortest_edge": 24}, "crop_size": {"height": 30, "width": 20}}),
    ],
)
def test_preprocess_equals_hf_clip_processor(size, mode, processor):
    from transformers import CLIPImageProcessorPil

    image = random_image(*size, mode=mode, seed=size[0])
    hf = CLIPImageProcessorPil(**processor)
    want = hf(images=image, return_tensors="np")["pixel_values"][0]
    got = preprocess(image, ProcessorConfig.from_dict(hf.to_dict()))
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_read_image_sources_and_errors(tmp_path):
    import base64

    buf = io.BytesIO()
    random_image(7, 5).save(buf, format="PNG")
    b64 = base64.b64encode(buf.getvalue()).decode()
    src = ImageSource()
    assert read_image("data:image/png;base64," + b64, src).size == (7, 5)
    assert read_image(b64, src).size == (7, 5)
    (tmp_path / "a.png").write_bytes(buf.getvalue())
    with pytest.raises(ImageError, match="local files are not accepted"):
        read_image(str(tmp_path / "a.png"), src)
    assert read_image(str(tmp_path / "a.png"), ImageSource(local_dir=str(tmp_path))).size == (7, 5)
    with pytest.raises(ImageError, match="outside the directory"):
        read_image("/etc/passwd", ImageSource(local_dir=str(tmp_path)))
    with pytest.raises(ImageError, match="not a readable image"):
        read_image("data:image/png;base64," + base64.b64encode(b"not a png").decode(), src)
    with pytest.raises(ImageError, match="not valid base64"):
        read_image("%%%", src)
    with pytest.raises(ImageError, match="pixels"):
        read_image(b64, ImageSource(max_pixels=20))
    with pytest.raises(ImageError, match="larger than"):
        read_image(b64, ImageSource(max_bytes=10))


def test_llava_greedy_equals_transformers(llava):
    """Two images in one prompt, prefilled in chunks that cut through the image tokens."""
    from transformers import CLIPImageProcessorPil

    cfg = ModelConfig.from_hf_dir(llava)
    v = cfg.vision
    images = [random_image(40, 30, seed=1), random_image(30, 45, seed=2)]
    pixels = torch.from_numpy(np.stack([preprocess(im, ProcessorConfig.from_dir(llava)) for im in images]))
    prompt = [5, 17, v.image_token_id, 300, 301, 9, v.image_token_id, 44, 45]
    ids, positions = expand_image_tokens(prompt, v.image_token_id, v.tokens_per_image, len(images))
    assert len(positions) == 2 * v.tokens_per_image == 32
    hf_pixels = CLIPImageProcessorPil.from_pretrained(llava)(images=images, return_tensors="pt")[
        "pixel_values"
    ]
    want = hf_llava_greedy(llava, ids, hf_pixels, 8)

    engine = Engine(
        EngineConfig(model=llava, device="cpu", dtype="float32", max_pages=64, page_size=4, chunk_size=7)
    )
    engine.start()
    try:
        values = engine.model.encode(pixels).reshape(-1, cfg.hidden_size)
        events = Events()
        engine.add_request(
            Request(
                "a",
                ids,
                SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True),
                on_event=events,
                embeds=ImageEmbeds(positions, values),
            )
        )
        events.finish("a")
        assert events.tokens("a") == want
        # the same prompt without the images' embeddings is another prompt: the test can tell
        engine.add_request(
            Request(
                "b", ids, SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True), on_event=events
            )
        )
        events.finish("b")
        assert events.tokens("b") != want
    finally:
        engine.stop()


def test_expand_image_tokens_counts():
    assert expand_image_tokens([1, 9, 2], 9, 3, 1) == ([1, 9, 9, 9, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="1 image token"):
        expand_image_tokens([1, 9, 2], 9, 3, 2)
