"""Tokenizer of a model directory: `tokenizer.json` through `tokenizers`, special tokens from the configs,
the chat template through jinja2, and an incremental detokenizer with stop strings.

No transformers here; the behaviour mirrors it (tests compare against `transformers` on the same files).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path

# A UTF-8 character is at most 4 bytes; byte-level tokens carry at least one byte each, so 4 held tokens
# that still decode to U+FFFD are really invalid bytes and not the start of a character.
MAX_HELD_TOKENS = 4
REPLACEMENT = "\ufffd"


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


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text that only ever grows and is always whole characters.

    `text` is what may be shown now: it holds back a trailing partial UTF-8 character and any tail that could
    still become a stop string. After a stop string appears, `matched` is set and `text` ends just before it.
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
        if not self.stop:
            self._safe = len(self._decoded)
            return False
        text = self._decoded
        longest = max(len(s) for s in self.stop)
        start = max(0, self._safe - longest + 1)
        hits = [(text.find(s, start), s) for s in self.stop]
        hits = [(pos, s) for pos, s in hits if pos >= 0]
        if hits:
            pos, s = min(hits)
            self._decoded = text[:pos]
            self._safe = pos
            self.matched = s
            return True
        # Hold back the longest tail that is a proper prefix of some stop string.
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:k]):
                    hold = k
                    break
        self._safe = max(self._safe, len(text) - hold)
        return False
