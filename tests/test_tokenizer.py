"""Tokenizer wrapper, chat template and incremental detokenizer, checked against `transformers`."""

from __future__ import annotations

import json
import random
import shutil

import pytest

from disaggctl.runtime.builtin import resolve_model
from disaggctl.runtime.tokenizer import Tokenizer, TokenizerError

SAMPLES = [
    "Hello, world!",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n",
    "Café naïve Zürich — “quotes” … ✓",
    "你好，世界 こんにちは привет",
    "emoji 🎉🚀👩‍👩‍👧 and flags 🇫🇷",
    "numbers 3.14159 2**63 -42 0x1F",
    "<|im_start|>user\nhi<|im_end|>",
    "\x00\x01 control \x7f bytes",
]
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi 👋"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Ça va?"},
    ],
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("DISAGGCTL_CACHE", str(cache))
    try:
        yield resolve_model("builtin:tiny")
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return Tokenizer(tiny_dir)


@pytest.fixture(scope="module")
def hf_tok(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


@pytest.mark.parametrize("text", SAMPLES)
def test_byte_level_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids, skip_special_tokens=False) == text


@pytest.mark.parametrize("text", SAMPLES)
def test_encode_decode_same_as_transformers(tok, hf_tok, text):
    ids = hf_tok(text)["input_ids"]
    assert tok.encode(text) == ids
    assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)


def test_special_tokens(tok):
    assert [tok._tok.token_to_id(s) for s in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    assert tok.special_ids == {0, 1, 2}
    # generation_config.json lists both turn ends; the config's eos is one of them.
    assert sorted(tok.eos_token_ids) == [0, 2]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_same_ids_as_transformers(tok, hf_tok, messages, add_generation_prompt):
    want = hf_tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    want = want["input_ids"] if hasattr(want, "keys") else want
    assert tok.apply_chat_template(messages, add_generation_prompt) == list(want)
    text = hf_tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert tok.render_chat(messages, add_generation_prompt) == text


def test_chat_template_from_jinja_file_and_missing(tiny_dir, tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    for name in ("tokenizer.json", "generation_config.json", "config.json"):
        shutil.copy(f"{tiny_dir}/{name}", d / name)
    cfg = json.loads(open(f"{tiny_dir}/tokenizer_config.json").read())
    template = cfg.pop("chat_template")
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(TokenizerError, match="no chat template"):
        Tokenizer(d).apply_chat_template(CONVERSATIONS[0])
    (d / "chat_template.jinja").write_text(template)
    assert Tokenizer(d).apply_chat_template(CONVERSATIONS[0]) == Tokenizer(tiny_dir).apply_chat_template(
        CONVERSATIONS[0]
    )


def test_template_error_is_a_clear_error(tiny_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{{ raise_exception('roles must alternate') }}"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(TokenizerError, match="roles must alternate"):
        Tokenizer(d).apply_chat_template(CONVERSATIONS[0])


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        Tokenizer(tmp_path)


def _stream(tok, ids, stop=(), step=1):
    d = tok.detokenizer(stop)
    deltas = []
    for i in range(0, len(ids), step):
        deltas.append(d.add(ids[i : i + step]))
        assert d.text == "".join(deltas)  # visible text only grows, by exactly the deltas
    deltas.append(d.finish())
    return d, deltas


@pytest.mark.parametrize("text", SAMPLES)
@pytest.mark.parametrize("step", [1, 3])
def test_incremental_detokenizer_equals_full_decode(tok, text, step):
    ids = tok.encode(text)
    d, deltas = _stream(tok, ids, step=step)
    assert "".join(deltas) == tok.decode(ids)
    # Valid text in, so no delta may carry a replacement character from a split multi-byte character.
    assert all("\ufffd" not in x for x in deltas)


def test_incremental_detokenizer_random_ids(tok):
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(3, tok.vocab_size) for _ in range(rng.randrange(1, 40))]
        d, deltas = _stream(tok, ids)
        assert "".join(deltas) == tok.decode(ids)


def test_multibyte_character_split_over_tokens_is_held(tok):
    ids = tok.encode("a🎉")
    assert len(ids) >= 3, "the emoji should be several byte tokens in a 1k vocabulary"
    d = tok.detokenizer()
    seen = [d.add([i]) for i in ids]
    assert seen[-1].endswith("🎉") and "".join(seen) == "a🎉"


def test_stop_string_truncates_and_reports_match(tok):
    text = "The sea is grey, the sea is wide. STOP here and never print this."
    ids = tok.encode(text)
    for step in (1, 2, 5):
        d, deltas = _stream(tok, ids, stop=["never", "STOP"], step=step)
        assert d.matched == "STOP"
        assert d.text == "The sea is grey, the sea is wide. "
        assert "".join(deltas) == d.text
        assert d.add(tok.encode(" more")) == ""  # ignored after the match


def test_partial_stop_string_is_held_then_released(tok):
    d = tok.detokenizer(stop=["wide open"])
    d.add(tok.encode("the sea is wide"))
    assert d.text == "the sea is "  # "wide" could still become "wide open"
    d.add(tok.encode(" and deep"))
    assert d.text == "the sea is wide and deep"
    assert d.matched is None
