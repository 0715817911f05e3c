"""The runtime HTTP server over real loopback HTTP with the real engine, against `transformers` greedy."""

from __future__ import annotations

import asyncio
import http.client
import itertools
import json
import os
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import free_port
from hf_reference import hf_greedy, save_random_model

from disaggctl.runtime.builtin import resolve_model
from disaggctl.runtime.server import build_parser, serve

TIMEOUT = 60


# ---- a server in a thread of this process, and a tiny HTTP client ----


class ServerThread:
    def __init__(self, model_dir: str, *extra: str):
        self.port = free_port()
        argv = ["--model", model_dir, "--port", str(self.port), "--page-size", "4", *extra]
        self.args = build_parser("colocated").parse_args(argv)
        self.model_dir = model_dir
        self.loop = asyncio.new_event_loop()
        self.stop_event: asyncio.Event | None = None
        self.rc = None
        ready = threading.Event()

        def run():
            asyncio.set_event_loop(self.loop)
            self.stop_event = asyncio.Event()
            ready.set()
            self.rc = self.loop.run_until_complete(serve("colocated", self.args, model_dir, self.stop_event))

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        ready.wait(10)
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            try:
                if get(self.port, "/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError("server did not become healthy")

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(30)
        assert not self.thread.is_alive() and self.rc == 0


def _conn(port: int) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)


def get(port: int, path: str):
    c = _conn(port)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read().decode()
    finally:
        c.close()


def post(port: int, path: str, body, raw: bytes | None = None):
    c = _conn(port)
    try:
        c.request(
            "POST",
            path,
            body=raw if raw is not None else json.dumps(body),
            headers={"Content-Type": "application/json"},
        )
        r = c.getresponse()
        data = r.read()
        return r.status, json.loads(data)
    finally:
        c.close()


def post_stream(port: int, path: str, body) -> list:
    """SSE events as parsed JSON; the final `[DONE]` as the string."""
    c = _conn(port)
    try:
        c.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        r = c.getresponse()
        assert r.status == 200, r.read()
        assert r.getheader("Content-Type").startswith("text/event-stream")
        events = []
        for line in r:
            line = line.decode().rstrip("\r\n")
            if line.startswith("data: "):
                data = line[len("data: ") :]
                events.append(data if data == "[DONE]" else json.loads(data))
        return events
    finally:
        c.close()


def metrics(port: int) -> dict[str, float]:
    status, text = get(port, "/metrics")
    assert status == 200
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name.split("{")[0].removeprefix("disaggctl_")] = float(value)
    return out


# ---- models and the reference ----


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("DISAGGCTL_CACHE", str(tmp_path_factory.mktemp("cache")))
    try:
        yield resolve_model("builtin:tiny")
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tiny_dir):
    """A random tied-embedding Llama saved by transformers, with builtin:tiny's tokenizer files."""
    from transformers import LlamaConfig

    d = tmp_path_factory.mktemp("llama")
    cfg = LlamaConfig(
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.2,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=0,
    )
    return save_random_model(cfg, d, tiny_dir)


@pytest.fixture(scope="module", params=["llama", "tiny"])
def server(request, llama_dir, tiny_dir):
    srv = ServerThread(llama_dir if request.param == "llama" else tiny_dir)
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def tiny_server(tiny_dir):
    srv = ServerThread(tiny_dir, "--served-model-name", "tiny")
    yield srv
    srv.close()


def _prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 1024, (n,), generator=g).tolist()


def _greedy_body(ids, n, **extra):
    return {
        "input_ids": ids,
        "sampling_params": {"max_new_tokens": n, "temperature": 0, "ignore_eos": True},
        **extra,
    }


# ---- /generate ----


def test_generate_greedy_matches_transformers(server):
    ids = _prompt(11, 0)
    status, body = post(server.port, "/generate", _greedy_body(ids, 16))
    assert status == 200, body
    assert body["output_ids"] == hf_greedy(server.model_dir, ids, 16)
    meta = body["meta_info"]
    assert meta["prompt_tokens"] == 11 and meta["completion_tokens"] == 16
    assert meta["finish_reason"] == {"type": "length"}


def test_concurrent_mixed_lengths_match_transformers(server):
    prompts = [_prompt(n, seed) for seed, n in enumerate([1, 5, 17, 33, 64, 9])]
    lengths = [8, 20, 3, 12, 6, 15]
    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(
            pool.map(
                lambda a: post(server.port, "/generate", _greedy_body(*a)), zip(prompts, lengths, strict=True)
            )
        )
    for ids, n, (status, body) in zip(prompts, lengths, results, strict=True):
        assert status == 200, body
        assert body["output_ids"] == hf_greedy(server.model_dir, ids, n)


def test_stream_equals_non_stream(server):
    ids = _prompt(7, 3)
    _, whole = post(server.port, "/generate", _greedy_body(ids, 12))
    events = post_stream(server.port, "/generate", _greedy_body(ids, 12, stream=True))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len(chunks) >= 2
    last = chunks[-1]
    assert last["output_ids"] == whole["output_ids"] and last["text"] == whole["text"]
    for a, b in itertools.pairwise(chunks):  # cumulative: every event extends the previous one
        assert b["output_ids"][: len(a["output_ids"])] == a["output_ids"]
        assert b["text"].startswith(a["text"])
    assert last["meta_info"]["finish_reason"] == {"type": "length"}


def test_generate_from_text_uses_the_tokenizer(tiny_server, tiny_dir):
    from transformers import AutoTokenizer

    text = "The lighthouse keeper climbed the steps."
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    ids = tok(text)["input_ids"]
    _, body = post(
        tiny_server.port,
        "/generate",
        {"text": text, "sampling_params": {"max_new_tokens": 10, "temperature": 0, "ignore_eos": True}},
    )
    want = hf_greedy(tiny_dir, ids, 10)
    assert body["output_ids"] == want
    assert body["text"] == tok.decode(want, skip_special_tokens=True)


# ---- OpenAI ----


def test_completions_and_stream(tiny_server, tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    prompt = "A garden teaches you to wait"
    want = tok.decode(hf_greedy(tiny_dir, tok(prompt)["input_ids"], 9), skip_special_tokens=True)
    req = {"model": "tiny", "prompt": prompt, "max_tokens": 9, "temperature": 0, "ignore_eos": True}
    status, body = post(tiny_server.port, "/v1/completions", req)
    assert status == 200, body
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == want
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {
        "prompt_tokens": len(tok(prompt)["input_ids"]),
        "completion_tokens": 9,
        "total_tokens": len(tok(prompt)["input_ids"]) + 9,
    }
    events = post_stream(
        tiny_server.port,
        "/v1/completions",
        {**req, "stream": True, "stream_options": {"include_usage": True}},
    )
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"] == [] and events[-2]["usage"] == body["usage"]
    chunks = events[:-2]
    assert "".join(c["choices"][0]["text"] for c in chunks) == want
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_chat_applies_the_template_like_transformers(tiny_server, tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Why is the sky blue?"},
    ]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    want = tok.decode(hf_greedy(tiny_dir, ids, 8), skip_special_tokens=True)
    req = {"messages": messages, "max_completion_tokens": 8, "temperature": 0, "ignore_eos": True}
    status, body = post(tiny_server.port, "/v1/chat/completions", req)
    assert status == 200, body
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": want}
    assert body["usage"]["prompt_tokens"] == len(ids)
    events = post_stream(tiny_server.port, "/v1/chat/completions", {**req, "stream": True})
    assert events[-1] == "[DONE]"
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == want
    assert events[-2]["choices"][0]["finish_reason"] == "length"


def test_info_endpoints(tiny_server):
    status, text = get(tiny_server.port, "/v1/models")
    assert status == 200 and json.loads(text)["data"][0]["id"] == "tiny"
    status, text = get(tiny_server.port, "/server_info")
    info = json.loads(text)
    assert status == 200 and info["role"] == "colocated" and info["page_size"] == 4
    assert info["max_model_len"] == 2048 and info["model"] == "tiny"
    with open(os.path.join(tiny_server.model_dir, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    assert info["vocab_size"] == vocab
    assert json.loads(get(tiny_server.port, "/v1/models")[1])["data"][0]["vocab_size"] == vocab
    assert get(tiny_server.port, "/health")[0] == 200
    m = metrics(tiny_server.port)
    for key in (
        "num_requests_running",
        "num_requests_waiting",
        "kv_pages_used",
        "kv_pages_free",
        "prompt_tokens_total",
        "generation_tokens_total",
        "request_success_total",
        "request_failure_total",
    ):
        assert key in m


# ---- bad input ----

BAD = [
    ("/generate", b"{not json", "not valid JSON"),
    ("/generate", b"[1, 2]", "JSON object"),
    ("/generate", {"sampling_params": {}}, "exactly one of 'text' or 'input_ids'"),
    ("/generate", {"text": "a", "input_ids": [1]}, "exactly one"),
    ("/generate", {"text": ""}, "'text' is empty"),
    ("/generate", {"input_ids": []}, "'input_ids' is empty"),
    ("/generate", {"input_ids": [1, "x"]}, "list of integers"),
    ("/generate", {"input_ids": [5000]}, "out of range"),
    (
        "/generate",
        {"text": "a", "sampling_params": {"max_new_tokens": "5"}},
        "'max_new_tokens' must be an integer",
    ),
    ("/generate", {"text": "a", "sampling_params": {"temperature": -1}}, "'temperature' must be between"),
    ("/generate", {"text": "a", "sampling_params": {"top_k": 0}}, "top_k"),
    (
        "/generate",
        {"text": "a", "sampling_params": {"best_of": 2}},
        "unsupported sampling_params field(s): best_of",
    ),
    ("/generate", {"text": "a", "stream": "yes"}, "'stream' must be true or false"),
    ("/generate", {"text": "a", "sampling_params": {"stop": [1]}}, "'stop' must be a string or a list"),
    ("/generate", {"text": "a", "bogus": 1}, "unsupported request field(s): bogus"),
    ("/v1/completions", {"prompt": "a", "n": 2}, "only 'n': 1"),
    ("/v1/completions", {"prompt": "a", "logprobs": 2}, "logprobs are not supported"),
    ("/v1/completions", {"max_tokens": 3}, "'prompt' is required"),
    ("/v1/completions", {"prompt": ["a", "b"]}, "'prompt' must be a string"),
    ("/v1/chat/completions", {"messages": []}, "'messages' must be a non-empty list"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "role must be"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, "content must be a string"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True}, "logprobs"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "model": "gpt-9"},
        "not served",
    ),
]


@pytest.mark.parametrize("path,body,message", BAD, ids=[f"{p}-{m}" for p, _, m in BAD])
def test_bad_requests_get_a_clear_error(tiny_server, path, body, message):
    raw = body if isinstance(body, bytes) else None
    status, out = post(tiny_server.port, path, body, raw=raw)
    assert 400 <= status < 500
    err = out["error"]
    assert message in err["message"] and err["code"] == status and err["type"]


def test_prompt_longer_than_context_is_rejected(llama_dir):
    srv = ServerThread(llama_dir, "--max-model-len", "64")
    try:
        status, out = post(srv.port, "/generate", _greedy_body(_prompt(64, 0), 1))
        assert status == 400 and "context is 64 tokens" in out["error"]["message"]
        status, out = post(srv.port, "/generate", _greedy_body(_prompt(60, 0), 10))
        assert status == 400 and "exceeds" in out["error"]["message"]
        status, out = post(srv.port, "/generate", _greedy_body(_prompt(60, 0), 4))
        assert status == 200 and out["output_ids"] == hf_greedy(llama_dir, _prompt(60, 0), 4)
    finally:
        srv.close()


# ---- stop strings, disconnects ----


def test_stop_strings(tiny_server):
    ids = _prompt(6, 42)
    _, full = post(tiny_server.port, "/generate", _greedy_body(ids, 40))
    text = full["text"]
    # A stop string from the middle of the greedy text, at its first occurrence.
    start = next(
        i
        for i in range(len(text) // 3, len(text) - 3)
        if text[i : i + 3].isascii() and text[i : i + 3].strip()
    )
    stop = text[start : start + 3]
    cut = text.index(stop)
    body = _greedy_body(ids, 40)
    body["sampling_params"]["stop"] = [stop, "never-appears-xyz"]
    _, got = post(tiny_server.port, "/generate", body)
    assert got["text"] == text[:cut]
    assert got["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert got["output_ids"] == full["output_ids"][: len(got["output_ids"])]
    events = post_stream(tiny_server.port, "/generate", {**body, "stream": True})
    assert all(stop not in e["text"] for e in events[:-1])
    assert events[-2]["text"] == text[:cut]


def _wait_for(pred, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_frees_pages(tiny_server, stream):
    before = metrics(tiny_server.port)
    body = json.dumps(_greedy_body(_prompt(40, 1), 1500, stream=stream)).encode()
    sock = socket.create_connection(("127.0.0.1", tiny_server.port), timeout=TIMEOUT)
    sock.sendall(
        b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    if stream:
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    assert _wait_for(lambda: metrics(tiny_server.port)["kv_pages_used"] > 0), "the request never started"
    assert metrics(tiny_server.port)["num_requests_running"] >= 1
    sock.close()
    assert _wait_for(lambda: metrics(tiny_server.port)["kv_pages_used"] == 0), metrics(tiny_server.port)
    after = metrics(tiny_server.port)
    assert after["num_requests_running"] == 0
    assert after["request_aborted_total"] == before["request_aborted_total"] + 1
    assert after["generation_tokens_total"] < before["generation_tokens_total"] + 1500


# ---- the process: argv, SIGTERM ----


@pytest.mark.slow
def test_bad_command_lines(cli, tmp_path):
    env = {**os.environ, "DISAGGCTL_CACHE": str(tmp_path)}
    cases = [
        (["serve", "colocated", "--model", "builtin:huge"], "unknown builtin model"),
        (["serve", "colocated", "--model", str(tmp_path / "none")], "does not exist"),
        (["serve", "colocated"], "--model"),
        (
            ["serve", "colocated", "--model", "builtin:tiny", "--page-size", "0"],
            "--page-size must be a positive",
        ),
        # the engine's knobs are checked before the model is even looked for
        (
            ["serve", "colocated", "--model", str(tmp_path / "none"), "--page-size", "-1"],
            "--page-size must be",
        ),
        (
            ["serve", "colocated", "--model", "builtin:tiny", "--device", "tpu"],
            "--device 'tpu' is not one of",
        ),
        (
            ["serve", "colocated", "--model", "builtin:tiny", "--tp-size", "2", "--ep-size", "3"],
            "--ep-size must be 1",
        ),
        (["serve", "colocated", "--model", "builtin:tiny", "--port", "70000"], "--port must be in 1..65535"),
    ]
    for argv, message in cases:
        r = subprocess.run([*cli, *argv], capture_output=True, text=True, timeout=TIMEOUT, env=env)
        assert r.returncode == 2, (argv, r.stderr)
        assert message in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_serve_process_answers_and_stops_on_sigterm(cli, tmp_path):
    port = free_port()
    env = {**os.environ, "DISAGGCTL_CACHE": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [*cli, "serve", "colocated", "--model", "builtin:tiny", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        assert _wait_for(lambda: _health(port) == 200, TIMEOUT), "never healthy"
        # One request in flight while SIGTERM arrives: it finishes (drain), then the process exits 0.
        result = {}
        t = threading.Thread(
            target=lambda: result.update(r=post(port, "/generate", _greedy_body([5, 6, 7], 64)))
        )
        t.start()
        assert _wait_for(lambda: metrics(port)["num_requests_running"] == 1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, proc.stdout.read()
        t.join(10)
        status, body = result["r"]
        assert status == 200 and len(body["output_ids"]) == 64
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _health(port: int) -> int | None:
    try:
        return get(port, "/health")[0]
    except OSError:
        return None


# ---- request parsing alone ----


def test_parse_generate_fields():
    from disaggctl.runtime.protocol import parse_generate

    job = parse_generate(
        {
            "text": "hi",
            "stream": True,
            "rid": "r1",
            "bootstrap_host": "10.0.0.1",
            "bootstrap_port": 8998,
            "bootstrap_room": 2**62,
            "sampling_params": {
                "max_new_tokens": 5,
                "temperature": 0,
                "top_k": 3,
                "stop": "x",
                "stop_token_ids": [7],
                "seed": 9,
            },
        }
    )
    s = job.sampling
    assert (job.text, job.stream, job.rid, job.bootstrap_room) == ("hi", True, "r1", 2**62)
    assert (s.max_new_tokens, s.temperature, s.top_k, s.stop, s.stop_token_ids, s.seed) == (
        5,
        0.0,
        3,
        ["x"],
        [7],
        9,
    )


def test_parse_openai_limits():
    from disaggctl.runtime.protocol import InvalidRequest, check_prompt, parse_chat, parse_completion

    chat = parse_chat(
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
            ],
            "max_completion_tokens": 4,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    assert chat.messages == [{"role": "user", "content": "ab"}] and chat.include_usage
    assert chat.sampling.max_new_tokens == 4
    unbounded = parse_chat({"messages": [{"role": "user", "content": "a"}]})
    check_prompt([5, 6, 7], 1024, 10, unbounded.sampling)
    assert unbounded.sampling.max_new_tokens == 7  # the rest of the context
    assert parse_completion({"prompt": [[1, 2, 3]]}).input_ids == [1, 2, 3]
    with pytest.raises(
        InvalidRequest, match="'bootstrap_host', 'bootstrap_port' and 'bootstrap_room' go together"
    ):
        from disaggctl.runtime.protocol import parse_generate

        parse_generate({"text": "a", "bootstrap_room": 1})
