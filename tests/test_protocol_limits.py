"""Bounds on what a request may ask of the server: stop strings, JSON nesting, prompt size before tokenizing."""

from __future__ import annotations

import json
import random

import pytest

from disaggctl.runtime.builtin import resolve_model
from disaggctl.runtime.protocol import (
    MAX_JSON_DEPTH,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    InvalidRequest,
    check_text_size,
    parse_chat,
    parse_completion,
    parse_generate,
    parse_json,
)
from disaggctl.runtime.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("DISAGGCTL_CACHE", str(tmp_path_factory.mktemp("cache")))
    try:
        yield Tokenizer(resolve_model("builtin:tiny"))
    finally:
        mp.undo()


def _with_stop(api: str, stop) -> dict:
    if api == "generate":
        return {"text": "a", "sampling_params": {"stop": stop}}
    if api == "completion":
        return {"prompt": "a", "stop": stop}
    return {"messages": [{"role": "user", "content": "a"}], "stop": stop}


PARSERS = {"generate": parse_generate, "completion": parse_completion, "chat": parse_chat}


def _refused(call, *args) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as e:
        call(*args)
    assert e.value.status == 400
    return e.value


# ---- stop strings ----


@pytest.mark.parametrize("api", PARSERS)
def test_stop_strings_at_the_limits_are_accepted(api):
    stop = [chr(ord("a") + i) * MAX_STOP_CHARS for i in range(MAX_STOP_STRINGS)]
    assert PARSERS[api](_with_stop(api, stop)).sampling.stop == stop


@pytest.mark.parametrize("api", PARSERS)
def test_too_many_stop_strings_are_refused(api):
    err = _refused(PARSERS[api], _with_stop(api, ["x"] * (MAX_STOP_STRINGS + 1)))
    assert "'stop'" in err.message and str(MAX_STOP_STRINGS) in err.message


@pytest.mark.parametrize("api", PARSERS)
@pytest.mark.parametrize("stop", [["ok", "x" * (MAX_STOP_CHARS + 1)], "x" * 20_000])
def test_too_long_stop_string_is_refused(api, stop):
    err = _refused(PARSERS[api], _with_stop(api, stop))
    assert "'stop'" in err.message and f"at most {MAX_STOP_CHARS}" in err.message


# ---- JSON bodies ----


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"a": ' + b'{"a": ' * 100_000 + b"1" + b"}" * 100_001,
        b'{"text": ' + b"[" * 100_000,  # deep and unterminated
    ],
    ids=["array", "array-in-object", "objects", "unterminated"],
)
def test_deep_nesting_is_a_400(raw):
    assert "nested too deeply" in _refused(parse_json, raw).message


def test_nesting_up_to_the_limit_is_accepted():
    def nested(depth):  # the body object is the first level
        return b'{"a": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"

    assert parse_json(nested(MAX_JSON_DEPTH))["a"] is not None
    assert "nested too deeply" in _refused(parse_json, nested(MAX_JSON_DEPTH + 1)).message
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    assert parse_chat(parse_json(json.dumps(body).encode())).messages[0]["content"] == "hi"


@pytest.mark.parametrize(
    "raw",
    [b"{not json", b"\xff\xfe\x00", b'{"a": ' + b"1" * 5000 + b"}", b"", b'{"a": NaN', b"\x00" * 10],
    ids=["syntax", "bad-utf", "huge-int", "empty", "truncated", "nul"],
)
def test_any_parse_failure_is_a_400(raw):
    assert "not valid JSON" in _refused(parse_json, raw).message


def test_body_must_be_an_object():
    assert "JSON object" in _refused(parse_json, b"[1, 2]").message


# ---- prompt size before tokenizing ----

CONTEXT, PER_TOKEN = 8, 10  # 80 bytes of text at most


def test_text_up_to_the_limit_passes_and_one_byte_more_is_refused():
    check_text_size(parse_generate({"text": "x" * 80}), CONTEXT, PER_TOKEN)
    err = _refused(check_text_size, parse_generate({"text": "x" * 81}), CONTEXT, PER_TOKEN)
    assert "'text'" in err.message and "80 bytes" in err.message and "8 tokens" in err.message


def test_text_size_is_counted_in_utf8_bytes():
    check_text_size(parse_generate({"text": "é" * 40}), CONTEXT, PER_TOKEN)
    _refused(
        check_text_size, parse_generate({"text": "é" * 41}), CONTEXT, PER_TOKEN
    )  # 41 characters, 82 bytes
    _refused(check_text_size, parse_generate({"text": "🎉" * 21}), CONTEXT, PER_TOKEN)
    # JSON may carry lone surrogates; they are sized, not a crash.
    job = parse_generate(parse_json(b'{"text": "' + b"\\ud800" * 27 + b'"}'))
    _refused(check_text_size, job, CONTEXT, PER_TOKEN)


def test_huge_text_is_refused_without_encoding_it():
    job = parse_generate({"text": "é" * 30_000_000})
    err = _refused(check_text_size, job, 32_768, 16)
    assert "'text'" in err.message and str(32_768 * 16) in err.message


def test_completion_prompt_is_named_as_sent():
    err = _refused(check_text_size, parse_completion({"prompt": "x" * 81}), CONTEXT, PER_TOKEN)
    assert "'prompt'" in err.message
    err = _refused(check_text_size, parse_completion({"prompt": list(range(CONTEXT))}), CONTEXT, PER_TOKEN)
    assert "'prompt' has 8 tokens" in err.message


def test_chat_contents_are_counted_together():
    def chat(*contents):
        return parse_chat({"messages": [{"role": "user", "content": c} for c in contents]})

    check_text_size(chat("x" * 40, "y" * 40), CONTEXT, PER_TOKEN)
    err = _refused(check_text_size, chat("x" * 40, "y" * 40, "z"), CONTEXT, PER_TOKEN)
    assert "'messages'" in err.message and "80 bytes" in err.message
    parts = parse_chat({"messages": [{"role": "user", "content": [{"type": "text", "text": "x" * 81}]}]})
    _refused(check_text_size, parts, CONTEXT, PER_TOKEN)


def test_input_ids_must_leave_room_for_a_new_token():
    check_text_size(parse_generate({"input_ids": [1] * (CONTEXT - 1)}), CONTEXT, PER_TOKEN)
    err = _refused(check_text_size, parse_generate({"input_ids": [1] * CONTEXT}), CONTEXT, PER_TOKEN)
    assert "'input_ids' has 8 tokens" in err.message and "context is 8 tokens" in err.message


def test_no_byte_bound_leaves_only_the_id_count():
    check_text_size(parse_generate({"text": "x" * 10_000}), CONTEXT, None)
    _refused(check_text_size, parse_generate({"input_ids": [1] * CONTEXT}), CONTEXT, None)


def test_what_is_refused_really_would_not_fit(tok):
    """With the real tokenizer: any text over the limit does tokenize to more tokens than the context."""
    rng = random.Random(4)
    pieces = ["a", " lighthouse", "<|im_end|>", "é", "你好", "🎉", "\n", "ab", "x" * 5]
    for context in (1, 2, 3, 8, 20):
        limit = context * tok.max_token_bytes
        for _ in range(50):
            text = ""
            while len(text.encode()) <= limit:
                text += rng.choice(pieces)
            _refused(check_text_size, parse_generate({"text": text}), context, tok.max_token_bytes)
            assert len(tok.encode(text)) > context
