"""Parsing and validation of request bodies: `/generate` (SGLang's shape) and the OpenAI completions APIs.

Everything a client can get wrong becomes an `InvalidRequest` with a message that names the field; the
server turns it into HTTP 400 with `{"error": {"message", "type", "code"}}`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from disaggctl import httpkit
from disaggctl.httpkit import MAX_JSON_DEPTH

SAMPLING_KEYS = {
    "max_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "seed",
    "skip_special_tokens",
}
GENERATE_KEYS = {
    "text",
    "input_ids",
    "sampling_params",
    "stream",
    "rid",
    "bootstrap_host",
    "bootstrap_port",
    "bootstrap_room",
    "model",
    "image_data",
    "embed_parts",
}
# Keys of the OpenAI APIs that are accepted and ignored, or accepted only at their neutral value.
OPENAI_COMMON = {
    "model",
    "stream",
    "stream_options",
    "n",
    "seed",
    "stop",
    "temperature",
    "top_p",
    "top_k",
    "user",
}
OPENAI_NEUTRAL = {"presence_penalty": 0, "frequency_penalty": 0, "echo": False, "best_of": 1}
# added by the PD proxy; `embed_parts` (EPD) names the encoders holding a request's image embeddings
BOOTSTRAP_KEYS = {"bootstrap_host", "bootstrap_port", "bootstrap_room", "embed_parts"}
IMAGE_PLACEHOLDER = "<image>"  # what an image part of a chat message becomes in the prompt text
EXTENSION_KEYS = {"ignore_eos", "stop_token_ids", "skip_special_tokens", "rid"} | BOOTSTRAP_KEYS
COMPLETION_KEYS = OPENAI_COMMON | EXTENSION_KEYS | set(OPENAI_NEUTRAL) | {"prompt", "max_tokens", "logprobs"}
CHAT_KEYS = (
    OPENAI_COMMON
    | EXTENSION_KEYS
    | {"presence_penalty", "frequency_penalty"}
    | {"messages", "max_tokens", "max_completion_tokens", "logprobs", "top_logprobs"}
)
# Stop strings are matched on the event loop as text streams out; these bound the matcher's automaton.
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 512


class InvalidRequest(ValueError):
    def __init__(self, message: str, status: int = 400, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type_

    def body(self) -> dict:
        return error_body(self.message, self.status, self.type)


def error_body(message: str, status: int, type_: str = "invalid_request_error") -> dict:
    return httpkit.error_body(message, status, type_)


@dataclass
class Sampling:
    max_new_tokens: int | None = None  # None: up to the model's context length
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    skip_special_tokens: bool = True


# One request has a name per layer it crosses, each layer's own so that none imports the one above it:
# a Job here (the HTTP API's parse), a Request in engine.py (what the engine accepts, with its event
# callback), a Sequence in scheduler.py (what continuous batching schedules: tokens, pages, status).
@dataclass
class Job:
    """One parsed request: what the role needs to run it, whatever API it came through."""

    api: str  # "generate" | "completion" | "chat"
    sampling: Sampling
    stream: bool = False
    include_usage: bool = False
    text: str | None = None
    input_ids: list[int] | None = None
    messages: list[dict] | None = None
    rid: str | None = None
    model: str | None = None
    bootstrap_host: str | None = None
    bootstrap_port: int | None = None
    bootstrap_room: int | None = None
    body: dict = field(default_factory=dict)
    prompt_ids: list[int] = field(default_factory=list)  # set by the server after tokenizing
    images: list[str] | None = None  # image references (data URL, base64, URL, path), in prompt order
    embed_parts: list[dict] | None = None  # EPD: which encoder holds which images' embeddings
    mm: Any = None  # vision.embeds.ImageEmbeds, set by the server before the job runs


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except RecursionError as e:
        raise InvalidRequest(f"request body is nested too deeply (at most {MAX_JSON_DEPTH} levels)") from e
    except Exception as e:  # whatever the bytes are, failing to parse them is the client's error, not a 500
        raise InvalidRequest(f"request body is not valid JSON: {e}") from e
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    if httpkit.nested_deeper(body):
        raise InvalidRequest(f"request body is nested too deeply (at most {MAX_JSON_DEPTH} levels)")
    return body


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(name: str, v: Any, lo: int | None = None, hi: int | None = None) -> int:
    if not _is_int(v):
        raise InvalidRequest(f"'{name}' must be an integer, got {json.dumps(v)}")
    if lo is not None and v < lo:
        raise InvalidRequest(f"'{name}' must be >= {lo}, got {v}")
    if hi is not None and v > hi:
        raise InvalidRequest(f"'{name}' must be <= {hi}, got {v}")
    return v


def _float(name: str, v: Any, lo: float, hi: float) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise InvalidRequest(f"'{name}' must be a number, got {json.dumps(v)}")
    if not lo <= v <= hi:
        raise InvalidRequest(f"'{name}' must be between {lo} and {hi}, got {v}")
    return float(v)


def _bool(name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise InvalidRequest(f"'{name}' must be true or false, got {json.dumps(v)}")
    return v


def _str(name: str, v: Any) -> str:
    if not isinstance(v, str):
        raise InvalidRequest(f"'{name}' must be a string, got {json.dumps(v)}")
    return v


def _stop(v: Any) -> list[str]:
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise InvalidRequest("'stop' must be a string or a list of strings")
    if len(stops) > MAX_STOP_STRINGS:
        raise InvalidRequest(f"'stop' has {len(stops)} strings; at most {MAX_STOP_STRINGS} are allowed")
    if any(s == "" for s in stops):
        raise InvalidRequest("'stop' strings must not be empty")
    long = next((i for i, s in enumerate(stops) if len(s) > MAX_STOP_CHARS), None)
    if long is not None:
        raise InvalidRequest(
            f"'stop' string {long} has {len(stops[long])} characters; at most {MAX_STOP_CHARS} are allowed"
        )
    return stops


def _token_ids(name: str, v: Any) -> list[int]:
    if not isinstance(v, list) or not all(_is_int(i) for i in v):
        raise InvalidRequest(f"'{name}' must be a list of integers")
    if any(i < 0 for i in v):
        raise InvalidRequest(f"'{name}' must not contain negative ids")
    return list(v)


def _unknown(where: str, keys, allowed: set[str]) -> None:
    extra = sorted(set(keys) - allowed)
    if extra:
        raise InvalidRequest(
            f"unsupported {where} field(s): {', '.join(extra)}; supported: {', '.join(sorted(allowed))}"
        )


def _sampling(d: dict, max_key: str | None) -> Sampling:
    s = Sampling()
    if max_key is not None and d.get(max_key) is not None:
        s.max_new_tokens = _int(max_key, d[max_key], lo=1)
    if d.get("temperature") is not None:
        s.temperature = _float("temperature", d["temperature"], 0.0, 100.0)
    if d.get("top_p") is not None:
        s.top_p = _float("top_p", d["top_p"], 0.0, 1.0)
        if s.top_p == 0.0:
            raise InvalidRequest("'top_p' must be > 0")
    if d.get("top_k") is not None:
        s.top_k = _int("top_k", d["top_k"], lo=-1)
        if s.top_k == 0:
            raise InvalidRequest("'top_k' must be -1 (disabled) or >= 1")
    s.stop = _stop(d.get("stop"))
    if d.get("stop_token_ids") is not None:
        s.stop_token_ids = _token_ids("stop_token_ids", d["stop_token_ids"])
    if d.get("ignore_eos") is not None:
        s.ignore_eos = _bool("ignore_eos", d["ignore_eos"])
    if d.get("seed") is not None:
        s.seed = _int("seed", d["seed"], lo=0, hi=2**63 - 1)
    if d.get("skip_special_tokens") is not None:
        s.skip_special_tokens = _bool("skip_special_tokens", d["skip_special_tokens"])
    return s


def _rid(v: Any) -> str | None:
    if v is None:
        return None
    rid = _str("rid", v)
    if not rid or len(rid) > 256 or not rid.isprintable():  # streams write it as UTF-8; logs show it
        raise InvalidRequest("'rid' must be a non-empty string of at most 256 printable characters")
    return rid


def parse_generate(body: dict) -> Job:
    _unknown("request", body, GENERATE_KEYS)
    sp = body.get("sampling_params") or {}
    if not isinstance(sp, dict):
        raise InvalidRequest("'sampling_params' must be an object")
    _unknown("sampling_params", sp, SAMPLING_KEYS)
    job = Job(api="generate", sampling=_sampling(sp, "max_new_tokens"), body=body)
    if job.sampling.max_new_tokens is None:
        job.sampling.max_new_tokens = 128
    has_text, has_ids = body.get("text") is not None, body.get("input_ids") is not None
    if has_text == has_ids:
        raise InvalidRequest("give exactly one of 'text' or 'input_ids'")
    if has_text:
        job.text = _str("text", body["text"])
        if not job.text:
            raise InvalidRequest("'text' is empty")
    else:
        job.input_ids = _token_ids("input_ids", body["input_ids"])
        if not job.input_ids:
            raise InvalidRequest("'input_ids' is empty")
    job.stream = _bool("stream", body.get("stream", False))
    job.rid = _rid(body.get("rid"))
    job.model = body.get("model")
    if body.get("image_data") is not None:
        images = body["image_data"]
        images = [images] if isinstance(images, str) else images
        if not isinstance(images, list) or not images or not all(isinstance(i, str) for i in images):
            raise InvalidRequest("'image_data' must be a string or a non-empty list of strings")
        job.images = images
    _bootstrap(job, body)
    return job


def _bootstrap(job: Job, body: dict) -> None:
    present = [k for k in ("bootstrap_host", "bootstrap_port", "bootstrap_room") if body.get(k) is not None]
    if body.get("embed_parts") is not None:
        from disaggctl.runtime.vision.inputs import parse_embed_parts

        job.embed_parts = parse_embed_parts(body["embed_parts"])
    if not present:
        return
    if len(present) != 3:
        raise InvalidRequest("'bootstrap_host', 'bootstrap_port' and 'bootstrap_room' go together")
    job.bootstrap_host = _str("bootstrap_host", body["bootstrap_host"])
    job.bootstrap_port = _int("bootstrap_port", body["bootstrap_port"], lo=1, hi=65535)
    job.bootstrap_room = _int("bootstrap_room", body["bootstrap_room"], lo=0, hi=2**64 - 1)


def _openai_common(job: Job, body: dict) -> None:
    if body.get("n") is not None and _int("n", body["n"]) != 1:
        raise InvalidRequest("only 'n': 1 is supported")
    job.stream = _bool("stream", body.get("stream", False))
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict):
            raise InvalidRequest("'stream_options' must be an object")
        _unknown("stream_options", opts, {"include_usage", "continuous_usage_stats"})
        job.include_usage = _bool("stream_options.include_usage", opts.get("include_usage", False))
    if body.get("model") is not None:
        job.model = _str("model", body["model"])
    job.rid = _rid(body.get("rid"))
    for key in ("presence_penalty", "frequency_penalty"):
        if body.get(key) not in (None, 0, 0.0):
            raise InvalidRequest(f"'{key}' is not supported (only 0)")


def _no_logprobs(body: dict) -> None:
    if body.get("logprobs") not in (None, False, 0) or body.get("top_logprobs") not in (None, 0):
        raise InvalidRequest("logprobs are not supported by this server")


def parse_completion(body: dict) -> Job:
    _unknown("request", body, COMPLETION_KEYS)
    _no_logprobs(body)
    for key, neutral in OPENAI_NEUTRAL.items():
        if body.get(key) not in (None, neutral):
            raise InvalidRequest(f"'{key}' is not supported (only {json.dumps(neutral)})")
    job = Job(api="completion", sampling=_sampling(body, "max_tokens"), body=body)
    if job.sampling.max_new_tokens is None:
        job.sampling.max_new_tokens = 16  # the OpenAI default
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidRequest("'prompt' is empty")
        job.text = prompt
    elif isinstance(prompt, list) and prompt and all(_is_int(i) for i in prompt):
        job.input_ids = _token_ids("prompt", prompt)
    elif prompt is None or prompt == []:
        raise InvalidRequest("'prompt' is required and must not be empty")
    else:
        raise InvalidRequest(
            "'prompt' must be a string or a list of token ids (batches of several prompts: n/a)"
        )
    _openai_common(job, body)
    _bootstrap(job, body)
    return job


def parse_chat(body: dict) -> Job:
    _unknown("request", body, CHAT_KEYS)
    _no_logprobs(body)
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    job = Job(api="chat", sampling=_sampling(body, key), body=body)
    images: list[str] = []
    job.messages = _messages(body.get("messages"), images)
    job.images = images or None
    _openai_common(job, body)
    _bootstrap(job, body)
    return job


def _messages(v: Any, images: list[str] | None = None) -> list[dict]:
    if not isinstance(v, list) or not v:
        raise InvalidRequest("'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(v):
        if not isinstance(m, dict):
            raise InvalidRequest(f"messages[{i}] must be an object")
        role = m.get("role")
        if role not in ("system", "user", "assistant", "developer", "tool"):
            raise InvalidRequest(
                f"messages[{i}].role must be system, user, assistant or tool, got {json.dumps(role)}"
            )
        content = m.get("content")
        if isinstance(content, list):  # content parts: text, and images where the caller takes them
            texts = []
            for part in content:
                if images is not None and isinstance(part, dict) and part.get("type") == "image_url":
                    url = part.get("image_url")
                    url = url.get("url") if isinstance(url, dict) else url
                    if not isinstance(url, str) or not url:
                        raise InvalidRequest(f"messages[{i}].content: an image_url part needs a url")
                    images.append(url)
                    texts.append(IMAGE_PLACEHOLDER)
                    continue
                if (
                    not isinstance(part, dict)
                    or part.get("type") != "text"
                    or not isinstance(part.get("text"), str)
                ):
                    raise InvalidRequest(f"messages[{i}].content: only text and image_url parts are supported")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise InvalidRequest(f"messages[{i}].content must be a string or a list of text parts")
        msg = {"role": role, "content": content}
        if isinstance(m.get("name"), str):
            msg["name"] = m["name"]
        out.append(msg)
    return out


def check_prompt(ids: list[int], vocab_size: int, max_model_len: int, sampling: Sampling) -> None:
    """The prompt fits the context and the vocabulary; fill in the default number of new tokens."""
    if not ids:
        raise InvalidRequest("the prompt is empty after tokenization")
    if len(ids) >= max_model_len:
        raise InvalidRequest(
            f"the prompt has {len(ids)} tokens; this model's context is {max_model_len} tokens "
            "(the prompt must leave room for at least one new token)"
        )
    bad = next((i for i in ids if i >= vocab_size), None)
    if bad is not None:
        raise InvalidRequest(f"token id {bad} is out of range (vocabulary size {vocab_size})")
    room = max_model_len - len(ids)
    if sampling.max_new_tokens is None:
        sampling.max_new_tokens = room
    elif sampling.max_new_tokens > room:
        raise InvalidRequest(
            f"the prompt ({len(ids)} tokens) plus max new tokens ({sampling.max_new_tokens}) exceeds this model's "
            f"context of {max_model_len} tokens"
        )


def check_text_size(job: Job, max_model_len: int, max_token_bytes: int | None) -> None:
    """Refuse, before any tokenizing, a prompt too large for the context; sizes only, no tokenizer call.

    Call it right after parsing, with the tokenizer's bound:
    `check_text_size(job, st.max_model_len, st.tokenizer.max_token_bytes)`. No token covers more than
    `max_token_bytes` bytes of text, so a text of more than `max_model_len * max_token_bytes` UTF-8 bytes
    needs more than `max_model_len` tokens. That holds exactly for `text` and a completion's `prompt`; for
    chat it is applied to the messages' contents together, since chat templates place each content in the prompt (it is
    not a proof for a template that drops content, but the bound is loose enough, hundreds of bytes per
    token against a few in practice, that only absurd requests meet it). `max_token_bytes` None (a
    tokenizer that can fold unbounded text into a token) leaves only the token id count checked.
    `check_prompt` still checks the exact count after tokenizing.
    """
    ids_field, text_field = ("prompt", "prompt") if job.api == "completion" else ("input_ids", "text")
    if job.input_ids is not None and len(job.input_ids) >= max_model_len:
        raise InvalidRequest(
            f"'{ids_field}' has {len(job.input_ids)} tokens; this model's context is {max_model_len} tokens "
            "(the prompt must leave room for at least one new token)"
        )
    if max_token_bytes is None:
        return
    limit = max_model_len * max_token_bytes
    if job.text is not None:
        size, what = _text_size(job.text, limit), f"'{text_field}'"
    elif job.messages is not None:
        size, what = 0, "'messages' (contents together)"
        for m in job.messages:
            size += _text_size(m["content"], limit - size)
            if size > limit:
                break
    else:
        return
    if size > limit:
        raise InvalidRequest(
            f"{what} is longer than {limit} bytes of UTF-8, the most that this model's context of "
            f"{max_model_len} tokens can hold (no token covers more than {max_token_bytes} bytes)"
        )


def _text_size(s: str, limit: int) -> int:
    """The UTF-8 size of `s`, or its length in characters where that alone is over `limit`."""
    if len(s) > limit or s.isascii():  # at least a byte per character: no need to encode a huge text
        return len(s)
    # surrogatepass: JSON lets a client send lone surrogates ("\\ud800"), which plain encode() refuses.
    return len(s.encode("utf-8", "surrogatepass"))
