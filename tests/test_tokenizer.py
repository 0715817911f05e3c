"""Tokenizer wrapper, chat template and incremental detokenizer, checked against `transformers`."""

from __future__ import annotations

import json
import random
import shutil

import pytest

from disaggctl.runtime.builtin import resolve_model
from disaggctl.runtime.protocol import MAX_STOP_CHARS, MAX_STOP_STRINGS
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


# ---- stop strings against a brute-force reference ----


def _first_stop(text, stops):
    """(start, string) of the stop string that completes first in `text`, the longest if several do at once."""
    for end in range(1, len(text) + 1):
        hits = [s for s in stops if len(s) <= end and text.startswith(s, end - len(s))]
        if hits:
            s = max(hits, key=len)
            return end - len(s), s
    return None


def _held(text, stops):
    """Length of the longest tail of `text` that is a proper prefix of some stop string."""
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


def _expected(text, stops):
    hit = _first_stop(text, stops)
    if hit is not None:
        return text[: hit[0]], hit[1]
    return text[: len(text) - _held(text, stops)], None


def _char_by_char_ids(tok, text):
    """Another tokenization of the same text: every character encoded on its own."""
    return [i for c in text for i in tok.encode(c, add_special_tokens=False)]


def _chunks(rng, ids):
    out, i = [], 0
    while i < len(ids):
        n = rng.choice([1, 1, 2, 3, 7, len(ids)])
        out.append(ids[i : i + n])
        i += n
    return out


def _check_stream(tok, ids, stops, chunks):
    """Feed `chunks` of `ids`; after every call the visible text and the match are what the reference says."""
    d, plain = tok.detokenizer(stops), tok.detokenizer()
    shown = ""
    for chunk in chunks:
        shown += d.add(chunk)
        plain.add(chunk)  # the same decoded characters, no stop strings
        assert (d.text, d.matched) == _expected(plain.text, stops)
        assert shown == d.text
    shown += d.finish()
    plain.finish()
    want = _expected(plain.text, stops)
    assert (d.text, d.matched) == (want if want[1] is not None else (plain.text, None))
    assert shown == d.text
    return d.text, d.matched


PIECES = ["a", "b", "ab", "ba", " ", "\n", "é", "🎉", "aab", "abc", "c"]


def test_stop_strings_equal_brute_force_reference_on_random_streams(tok):
    rng = random.Random(1)
    for _ in range(400):
        text = "".join(rng.choice(PIECES) for _ in range(rng.randrange(1, 30)))
        stops = []
        for _ in range(rng.randrange(1, 5)):
            if rng.random() < 0.6:  # a piece of the text, so that matches do happen
                i = rng.randrange(len(text))
                stops.append(text[i : i + rng.randrange(1, 7)])
            else:
                stops.append("".join(rng.choice(PIECES) for _ in range(rng.randrange(1, 4))))
        results = set()
        for ids in (tok.encode(text, add_special_tokens=False), _char_by_char_ids(tok, text)):
            for chunks in ([[i] for i in ids], [ids], _chunks(rng, ids)):
                results.add(_check_stream(tok, ids, stops, chunks))
        # However the text is cut into tokens and the tokens into calls: one answer.
        assert len(results) == 1, (text, stops, results)


@pytest.mark.parametrize(
    "stops,want",
    [
        (["abcd", "bc"], ("xa", "bc")),  # "bc" completes first although "abcd" starts earlier
        (["cd", "bcd"], ("xa", "bcd")),  # both complete at "d": the longest
        (["bcd", "cd"], ("xa", "bcd")),
        (["y", "dy", "zz"], ("xabc", "dy")),
    ],
)
def test_first_completed_stop_string_wins_whatever_the_tokens(tok, stops, want):
    text = "xabcdyz"
    for ids in (tok.encode(text), _char_by_char_ids(tok, text)):
        for step in (1, 2, len(ids)):
            d, deltas = _stream(tok, ids, stop=stops, step=step)
            assert (d.text, d.matched) == want
            assert "".join(deltas) == d.text


def test_tail_that_could_become_a_stop_string_is_held(tok):
    d = tok.detokenizer(stop=["hello world", "lo!"])
    assert d.add(tok.encode("say hello")) == "say "  # "hello" may become "hello world", "lo" "lo!"
    assert d.add(tok.encode(" wor")) == ""
    assert d.add(tok.encode("m")) == "hello worm"  # no stop string can start inside it any more
    assert d.add(tok.encode(" hello")) == " "
    assert d.add(tok.encode(" world, bye")) == ""
    assert (d.text, d.matched) == ("say hello worm ", "hello world")


def test_held_tail_is_released_at_the_end(tok):
    d = tok.detokenizer(stop=["the end."])
    d.add(tok.encode("this is the end"))
    assert d.text == "this is "
    assert d.finish() == "the end" and d.matched is None


class _CountingList(list):
    count = 0

    def __getitem__(self, i):
        self.count += 1
        return super().__getitem__(i)


@pytest.mark.timeout(120)
def test_stop_check_is_linear_in_the_text(tok):
    """The largest stop strings allowed, built to make a window search or prefix hold-back loop quadratic."""
    body = MAX_STOP_CHARS - 1
    stops = [("a" * body) + chr(ord("c") + i) for i in range(MAX_STOP_STRINGS // 2)]
    stops += [("ab" * body)[:body] + chr(ord("m") + i) for i in range(MAX_STOP_STRINGS // 2 - 1)]
    stops.append("ab" * (MAX_STOP_CHARS // 2))  # the one that finally matches
    assert len(stops) == MAX_STOP_STRINGS and all(len(s) <= MAX_STOP_CHARS for s in stops)
    rng = random.Random(2)
    ids = []
    while len(ids) < 4000:
        ids += tok.encode(rng.choice(["a" * rng.randrange(1, 600), "ab" * rng.randrange(1, 200), "b"]))
    ids += tok.encode("ab" * (MAX_STOP_CHARS // 2) + " and more")
    full = tok.decode(ids)
    d = tok.detokenizer(stops)
    fail = d._matcher._fail = _CountingList(d._matcher._fail)
    for i in ids:
        d.add([i])
        if d.matched is None:
            assert len(d.text) >= len(d._decoded) - MAX_STOP_CHARS
    pos, s = _first_stop(full, stops)
    assert (d.text, d.matched) == (full[:pos], s)
    # Failure links taken never outnumber the characters read: each moves back up the trie by one at least.
    assert fail.count <= pos + len(s)


# ---- the size of a token ----


def test_max_token_bytes_bounds_every_token(tok):
    sizes = [len(tok.decode([i], skip_special_tokens=False).encode()) for i in range(tok.vocab_size)]
    assert max(sizes) <= tok.max_token_bytes
    # Tight for a byte-level vocabulary without a normalizer: the longest token (a special one here) sets it.
    assert max(sizes) == tok.max_token_bytes == len("<|endoftext|>")


def test_no_text_needs_fewer_tokens_than_its_size_implies(tok):
    rng = random.Random(3)
    pieces = [*PIECES, "<|im_start|>", "<|endoftext|>", " lighthouse", "你好", "\x00", "\U0010ffff"]
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randrange(1, 60)))
        ids = tok.encode(text)
        assert len(text.encode()) <= len(ids) * tok.max_token_bytes


def _variant(tiny_dir, tmp_path, change):
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer.from_file(f"{tiny_dir}/tokenizer.json")
    change(hf)
    d = tmp_path / "variant"
    d.mkdir(exist_ok=True)
    hf.save(str(d / "tokenizer.json"))
    return Tokenizer(d).max_token_bytes


def test_max_token_bytes_follows_what_the_tokenizer_does_to_text(tiny_dir, tmp_path, tok):
    from tokenizers import AddedToken, models, normalizers, pre_tokenizers

    def set_normalizer(n):
        return lambda hf: setattr(hf, "normalizer", n)

    base = tok.max_token_bytes
    # Unicode normalization can shrink a text up to 4 times (NFKC: a 4-byte mathematical letter to ASCII).
    assert _variant(tiny_dir, tmp_path, set_normalizer(normalizers.NFKC())) == 4 * base
    # A replacement by something shorter shrinks by their ratio; by a longer one not at all.
    assert _variant(tiny_dir, tmp_path, set_normalizer(normalizers.Replace("abc", "x"))) == 3 * base
    assert _variant(tiny_dir, tmp_path, set_normalizer(normalizers.Replace(" ", "▁"))) == base
    # Whatever can delete text, or fold any amount of it into one token, leaves no bound.
    for n in (normalizers.Strip(), normalizers.StripAccents(), normalizers.BertNormalizer()):
        assert _variant(tiny_dir, tmp_path, set_normalizer(n)) is None
    assert _variant(tiny_dir, tmp_path, set_normalizer(normalizers.Replace(" ", ""))) is None
    no_spaces = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.ByteLevel()])
    assert _variant(tiny_dir, tmp_path, lambda hf: setattr(hf, "pre_tokenizer", no_spaces)) is None
    absorbing = AddedToken("<tool>", rstrip=True, special=True)
    assert _variant(tiny_dir, tmp_path, lambda hf: hf.add_special_tokens([absorbing])) is None
    wordpiece = models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]")
    assert _variant(tiny_dir, tmp_path, lambda hf: setattr(hf, "model", wordpiece)) is None
