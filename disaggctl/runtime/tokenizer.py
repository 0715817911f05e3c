"""Tokenizer of a model directory: `tokenizer.json` through `tokenizers`, special tokens from the configs,
the chat template through jinja2, and an incremental detokenizer with stop strings.

No transformers here; the behaviour mirrors it (tests compare against `transformers` on the same files).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path

# A UTF-8 character is at most 4 bytes; byte-level tokens carry at least one byte each, so 4 held tokens
# that still decode to U+FFFD are really invalid bytes and not the start of a character.
MAX_HELD_TOKENS = 4
REPLACEMENT = "\ufffd"

# How many times a normalizer can shrink a text's UTF-8 size. 4 for the Unicode forms and lowercasing: no code
# point or canonical composition of the Unicode tables shrinks more (NFKC turns 4-byte mathematical letters
# into ASCII; NFC composes three 2-byte code points into one). Normalizers not listed here can delete text
# (Strip, StripAccents, BertNormalizer's control characters, Precompiled), so no size bound holds for them.
NORMALIZER_SHRINK = {"NFC": 4, "NFD": 4, "NFKC": 4, "NFKD": 4, "Lowercase": 4, "Prepend": 1, "ByteLevel": 1}
# Pre-tokenizers that keep every character of the text (Whitespace and friends drop the whitespace).
LOSSLESS_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Digits", "UnicodeScripts", "Split", "Punctuation"}


def _gpt2_byte_chars() -> frozenset[str]:
    """The 256 characters that byte-level BPE vocabularies write bytes with (GPT-2's bytes_to_unicode)."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    shifted = [0x100 + n for n in range(256 - len(printable))]
    return frozenset(map(chr, printable + shifted))


BYTE_LEVEL_CHARS = _gpt2_byte_chars()


class TokenizerError(ValueError):
    """A tokenizer directory or a chat request that cannot be used."""


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TokenizerError(f"cannot read {path.name}: {e}") from e
    return data if isinstance(data, dict) else {}


def _token_content(value) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _ids(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


class Tokenizer:
    def __init__(self, model_dir: str | Path):
        from tokenizers import Tokenizer as HFTokenizer

        d = Path(model_dir)
        path = d / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"{d} has no tokenizer.json (only fast tokenizers are supported)")
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad files
            raise TokenizerError(f"cannot load {path}: {e}") from e
        cfg = _read_json(d / "tokenizer_config.json")
        gen = _read_json(d / "generation_config.json")
        model_cfg = _read_json(d / "config.json")

        self.bos_token = _token_content(cfg.get("bos_token"))
        self.eos_token = _token_content(cfg.get("eos_token"))
        self.pad_token = _token_content(cfg.get("pad_token"))
        self.bos_token_id = self._id_of(self.bos_token)
        if self.bos_token_id is None:
            bos = _ids(gen.get("bos_token_id", model_cfg.get("bos_token_id")))
            self.bos_token_id = bos[0] if bos else None
        # generation_config.json is what `generate` stops on; it may list several ids (Qwen: im_end, endoftext).
        eos = _ids(gen.get("eos_token_id")) or _ids(model_cfg.get("eos_token_id"))
        eos_tok = self._id_of(self.eos_token)
        if eos_tok is not None and eos_tok not in eos:
            eos.append(eos_tok)
        self.eos_token_ids: list[int] = eos
        self.chat_template = self._find_template(d, cfg)
        self.special_ids = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        self._template = None
        # Once, here: a pass over the vocabulary that request handlers must not pay for on the event loop.
        self._max_token_bytes = self._text_bytes_per_token()

    @property
    def max_token_bytes(self) -> int | None:
        """At most how many UTF-8 bytes of text one token stands for; None where no such bound exists.

        It bounds both what any single token decodes to (added and special tokens included) and how much of
        an input text one token can cover, so a text of more than `n * max_token_bytes` bytes needs more than
        `n` tokens and can be refused before tokenizing it. None for tokenizers that can fold unbounded text
        into one token: an unknown-token fallback without byte fallback, normalizers or pre-tokenizers that
        delete characters, added tokens that swallow the whitespace around them.
        """
        return self._max_token_bytes

    def _text_bytes_per_token(self) -> int | None:
        model = self._tok.model
        try:
            pre, norm = (
                None if c is None else json.loads(c.__getstate__())
                for c in (self._tok.pre_tokenizer, self._tok.normalizer)
            )
            shrink = _shrink_factor(model, pre, norm)
        except (ValueError, KeyError, TypeError, AttributeError):  # a component this code does not know
            return None
        added = self._tok.get_added_tokens_decoder()
        if shrink is None or any(t.lstrip or t.rstrip for t in added.values()):
            return None
        vocab = self._tok.get_vocab(with_added_tokens=True)
        byte_level = _has_type(pre, "ByteLevel") or _has_type(norm, "ByteLevel")
        most = 1
        if type(model).__name__ == "BPE" and model.unk_token is not None and not model.byte_fallback:
            if model.fuse_unk and not (byte_level and BYTE_LEVEL_CHARS <= vocab.keys()):
                return None  # a run of unknown characters becomes one token
            most = 4  # the unknown token stands for one character
        for token, i in vocab.items():
            if byte_level and i not in added and all(c in BYTE_LEVEL_CHARS for c in token):
                most = max(most, len(token))  # one character of the byte alphabet per byte
            else:
                most = max(most, len(token.encode("utf-8", "surrogatepass")))
        # Decoding can be longer than the bytes: a token holding part of a character decodes to U+FFFD.
        for text in self._tok.decode_batch([[i] for i in vocab.values()], skip_special_tokens=False):
            most = max(most, len(text.encode("utf-8", "surrogatepass")))
        return most * shrink

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    @staticmethod
    def _find_template(d: Path, cfg: dict) -> str | None:
        tmpl = cfg.get("chat_template")
        if isinstance(tmpl, list):  # named templates: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in tmpl if isinstance(t, dict)}
            tmpl = named.get("default")
        if isinstance(tmpl, str) and tmpl:
            return tmpl
        jinja = d / "chat_template.jinja"
        if jinja.is_file():
            return jinja.read_text(encoding="utf-8")
        return None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Like `transformers`' `tokenizer(text)`: the tokenizer's own post-processor adds BOS if it should."""
        if not text.isascii():
            text.encode()  # a lone surrogate ("\ud800" is valid JSON): a ValueError, not tokenizers' TypeError
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self.chat_template is None:
            raise TokenizerError(
                "this model has no chat template (tokenizer_config.json 'chat_template' or chat_template.jinja); "
                "use /v1/completions or /generate with a plain prompt"
            )
        import jinja2

        if self._template is None:
            self._template = _jinja_env().from_string(self.chat_template)
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                pad_token=self.pad_token or "",
                tools=None,
                documents=None,
            )
        except jinja2.TemplateError as e:
            raise TokenizerError(f"chat template failed: {e}") from e

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered conversation; the template places any BOS itself, as in transformers."""
        return self.encode(self.render_chat(messages, add_generation_prompt), add_special_tokens=False)

    def detokenizer(
        self, stop: Iterable[str] = (), skip_special_tokens: bool = True
    ) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, stop, skip_special_tokens)


def _shrink_factor(model, pre: dict | None, norm: dict | None) -> int | None:
    """How many times smaller normalizing and pre-tokenizing can make a text; None when unbounded."""
    kind = type(model).__name__
    if kind in ("WordPiece", "WordLevel"):
        return None  # a whole unknown word becomes one token
    if kind == "Unigram" and not json.loads(model.__getstate__()).get("byte_fallback"):
        return None  # runs of unknown characters fuse into one token
    if pre is not None and not _keeps_text(pre):
        return None
    return 1 if norm is None else _normalizer_shrink(norm)


def _has_type(component: dict | None, kind: str) -> bool:
    if component is None:
        return False
    parts = component.get("pretokenizers") or component.get("normalizers") or []
    return component["type"] == kind or any(_has_type(p, kind) for p in parts)


def _keeps_text(pre: dict) -> bool:
    if pre["type"] == "Sequence":
        return all(_keeps_text(p) for p in pre["pretokenizers"])
    return pre["type"] in LOSSLESS_PRE_TOKENIZERS and pre.get("behavior") != "Removed"


def _normalizer_shrink(norm: dict) -> int | None:
    kind = norm["type"]
    if kind == "Sequence":
        factor = 1
        for n in norm["normalizers"]:
            f = _normalizer_shrink(n)
            if f is None:
                return None
            factor *= f
        return factor
    if kind == "Replace":
        pattern, content = norm["pattern"].get("String"), norm["content"]
        if pattern is None or not content:  # a regex can match any length; empty content deletes
            return None
        return max(1, math.ceil(len(pattern.encode()) / len(content.encode())))
    return NORMALIZER_SHRINK.get(kind)


def _jinja_env():
    """The sandbox and helpers that `transformers` gives chat templates, so the same templates render alike."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


class StopMatcher:
    """Finds the first of several stop strings in a text that arrives in pieces (Aho-Corasick).

    `feed` costs O(len(piece)) amortized whatever the number and length of the stop strings: each character
    moves one step deeper in the trie and each failure link taken moves back up, so failure links never
    outnumber the characters fed, and the state carries over between calls.

    Which stop string wins depends only on the characters, never on how they were cut into pieces (tokens):
    the one that completes first; of those completing at the same character, the longest (earliest start).
    """

    def __init__(self, stops: Iterable[str]):
        self._goto: list[dict[str, int]] = [{}]
        self._depth = [0]
        self._word: list[str | None] = [None]
        for s in stops:
            node = 0
            for ch in s:
                nxt = self._goto[node].get(ch)
                if nxt is None:
                    nxt = len(self._goto)
                    self._goto[node][ch] = nxt
                    self._goto.append({})
                    self._depth.append(self._depth[node] + 1)
                    self._word.append(None)
                node = nxt
            self._word[node] = s
        # _fail: the node of the longest proper suffix that is also in the trie; _out: the longest stop string
        # ending at a node, its own if it is one or else its failure node's. Breadth first, so parents first.
        self._fail = [0] * len(self._goto)
        self._out = list(self._word)
        queue = list(self._goto[0].values())
        for node in queue:
            for ch, child in self._goto[node].items():
                f = self._fail[node]
                while f and ch not in self._goto[f]:
                    f = self._fail[f]
                self._fail[child] = self._goto[f].get(ch, 0)
                if self._out[child] is None:
                    self._out[child] = self._out[self._fail[child]]
                queue.append(child)
        self._state = 0

    @property
    def held(self) -> int:
        """Length of the longest tail of the text fed so far that could still grow into a stop string."""
        return self._depth[self._state]

    def feed(self, piece: str) -> tuple[int, str] | None:
        """Advance over `piece`; on the first stop string completed, (its end offset in `piece`, the string)."""
        goto, fail, out = self._goto, self._fail, self._out
        state = self._state
        for i, ch in enumerate(piece):
            while state and ch not in goto[state]:
                state = fail[state]
            state = goto[state].get(ch, 0)
            if out[state] is not None:
                self._state = state
                return i + 1, out[state]
        self._state = state
        return None


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text that only ever grows and is always whole characters.

    `text` is what may be shown now: it holds back a trailing partial UTF-8 character and any tail that could
    still become a stop string. After a stop string appears, `matched` is set and `text` ends just before it.
    With several stop strings, the one that completes first in the text wins, and of those completing at the
    same character the longest: the result is the same however the text is split into tokens.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Iterable[str] = (), skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self._prefix = 0  # ids[_prefix:_read] decode to the context needed to decode the next token alike
        self._read = 0
        self._decoded = ""  # everything decoded so far (whole characters only)
        self._safe = 0  # length of _decoded that can no longer turn into a stop string
        self._matcher = StopMatcher(self.stop) if self.stop else None
        self._scanned = 0  # length of _decoded the matcher has seen
        self.matched: str | None = None

    @property
    def text(self) -> str:
        return self._decoded[: self._safe]

    def add(self, new_ids: Iterable[int]) -> str:
        """Feed new token ids; returns the newly visible text (may be empty). Ignored once a stop matched."""
        if self.matched is not None:
            return ""
        before = self._safe
        for i in new_ids:
            self.ids.append(int(i))
            self._decode_step(final=False)
            if self._check_stop():
                break
        return self._decoded[before : self._safe]

    def finish(self) -> str:
        """The request ended: flush held-back text (a trailing invalid byte sequence shows as U+FFFD)."""
        before = self._safe
        if self.matched is None:
            self._decode_step(final=True)
            if not self._check_stop():
                self._safe = len(self._decoded)
        return self._decoded[before : self._safe]

    def _decode_step(self, final: bool) -> None:
        prefix_text = self._tok.decode(self.ids[self._prefix : self._read], self._skip)
        full = self._tok.decode(self.ids[self._prefix :], self._skip)
        held = len(self.ids) - self._read
        complete = not full.endswith(REPLACEMENT) or held >= MAX_HELD_TOKENS or final
        if complete and len(full) > len(prefix_text):
            self._decoded += full[len(prefix_text) :]
            self._prefix, self._read = self._read, len(self.ids)

    def _check_stop(self) -> bool:
        """Run the matcher over the text decoded since the last call only."""
        if self._matcher is None:
            self._safe = len(self._decoded)
            return False
        start = self._scanned
        hit = self._matcher.feed(self._decoded[start:])
        if hit is not None:
            end, s = hit
            self._decoded = self._decoded[: start + end - len(s)]
            self._safe = len(self._decoded)
            self.matched = s
            return True
        self._scanned = len(self._decoded)
        self._safe = self._scanned - self._matcher.held
        return False
