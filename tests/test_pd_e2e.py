"""Prefill/decode disaggregation end to end: `disaggctl up` of real processes on loopback, KV through
Mooncake TCP, requests through the proxy, output against `transformers` and the colocated runtime; faults."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import free_block, free_port, wait_for
from hf_reference import hf_greedy, save_random_model, tiny_tokenizer_dir

HTTP_TIMEOUT_S = 60
CLI_TIMEOUT_S = 240
PAGE_SIZE = 4  # small pages: every prompt spans several, most end in a partial one
CHUNK = 8  # small prefill chunks: long prompts prefill in several steps on the prefill side


# ---- model and references ----


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random Qwen2 (QKV biases, untied) saved by transformers, with builtin:tiny's tokenizer files.

    Init std 0.2 and perturbed norms and biases: the default init hides RoPE and bias mistakes."""
    from transformers import Qwen2Config

    tiny = tiny_tokenizer_dir(tmp_path_factory.mktemp("cache"))
    d = tmp_path_factory.mktemp("qwen2")
    cfg = Qwen2Config(
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        initializer_range=0.2,
        tie_word_embeddings=False,
        rope_theta=10000.0,
        bos_token_id=0,
        eos_token_id=2,
    )
    return save_random_model(cfg, d, tiny, perturb_biases=True)


def prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 1024, (n,), generator=g).tolist()


def greedy(ids: list[int], n: int, **extra) -> dict:
    return {
        "input_ids": ids,
        "sampling_params": {"max_new_tokens": n, "temperature": 0, "ignore_eos": True},
        **extra,
    }


# ---- HTTP ----


def post(url: str, body: dict, timeout: float = HTTP_TIMEOUT_S) -> tuple[int, dict]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def get_json(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def metrics(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name.split("{")[0].removeprefix("disaggctl_")] = float(value)
    return out


# ---- deployments ----


class Deployment:
    def __init__(
        self,
        cli,
        home: Path,
        tmp: Path,
        model: str,
        prefills: int,
        decodes: int,
        timeout_s=10,
        decode_extra="",
        proxy_extra="",
    ):
        self.cli = cli
        self.env = {**os.environ, "DISAGGCTL_HOME": str(home)}
        self.proxy = f"http://127.0.0.1:{free_port()}"
        self.file = tmp / f"pd-{prefills}p{decodes}d.yaml"
        self.file.write_text(
            f"""\
name: pd{prefills}p{decodes}d
model: {{path: {json.dumps(model)}}}
hosts:
  - {{name: local, address: 127.0.0.1, gpus: 0, python: {json.dumps(sys.executable)}}}
transfer: {{protocol: tcp, timeout_s: {timeout_s}}}
prefill: {{replicas: {prefills}, port: {free_block(prefills)}, bootstrap_port: {free_block(prefills)},
          page_size: {PAGE_SIZE}, chunk_size: {CHUNK}}}
decode: {{replicas: {decodes}, port: {free_block(decodes)}, page_size: {PAGE_SIZE}{decode_extra}}}
proxy: {{host: local, port: {self.proxy.rsplit(":", 1)[1]}, policy: round_robin{proxy_extra}}}
"""
        )

    def run(self, *args: str, timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*self.cli, *args], capture_output=True, text=True, timeout=timeout, env=self.env
        )

    def up(self) -> None:
        res = self.run("up", str(self.file), "--timeout", "180")
        assert res.returncode == 0, f"up failed:\n{res.stdout}\n{res.stderr}"
        res = self.run("status", "--json")
        assert res.returncode == 0, res.stderr
        self.procs = {p["name"]: p for p in json.loads(res.stdout)["processes"]}

    def url(self, name: str) -> str:
        return self.procs[name]["url"]

    def down(self) -> None:
        res = self.run("down", timeout=120)
        assert res.returncode == 0, f"down failed:\n{res.stdout}\n{res.stderr}"

    def logs(self) -> str:
        return self.run("logs", timeout=60).stdout[-8000:]

    def key(self):
        """The deployment's secret, as only its processes (and its operator) can read it."""
        from disaggctl.trust import DeploymentKey

        (path,) = Path(self.env["DISAGGCTL_HOME"]).rglob("secret")
        return DeploymentKey.read(path)


def signed_post(url: str, body: dict, key, timeout: float = HTTP_TIMEOUT_S) -> tuple[int, dict]:
    """`post` as the deployment's proxy sends it: with a proof of the exact bytes."""
    data = json.dumps(body).encode()
    path = "/" + url.split("/", 3)[3]
    headers = {"Content-Type": "application/json", **key.headers("POST", path, data)}
    req = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture
def deploy(cli, tmp_path, model_dir):
    made: list[Deployment] = []

    def make(prefills: int, decodes: int, **kw) -> Deployment:
        home = tmp_path / f"home{len(made)}"
        home.mkdir()
        d = Deployment(cli, home, tmp_path, model_dir, prefills, decodes, **kw)
        made.append(d)
        d.up()
        return d

    yield make
    for d in made:
        d.down()


def serve_colocated(model: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    argv = [sys.executable, "-m", "disaggctl", "serve", "colocated", "--model", model]
    argv += ["--port", str(port), "--page-size", str(PAGE_SIZE), "--chunk-size", str(CHUNK)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"

    def healthy():
        try:
            return get_json(url + "/health")[0] == 200
        except OSError:
            return False

    wait_for(healthy, 120, "the colocated server")
    return proc, url


# ---- correctness ----


@pytest.mark.parametrize("shape", [(1, 1), (2, 2)], ids=["1p1d", "2p2d"])
def test_pd_greedy_equals_transformers_and_colocated(deploy, model_dir, shape):
    d = deploy(*shape)
    lens = [1, 3, 4, 5, 17, 33, 64, 130]  # one token, exact pages, partial pages, several chunks
    news = [9, 20, 5, 12, 16, 7, 10, 6]
    cases = [(prompt(n, seed), m) for seed, (n, m) in enumerate(zip(lens, news, strict=True))]
    with ThreadPoolExecutor(len(cases)) as pool:
        pd = list(pool.map(lambda c: post(d.proxy + "/generate", greedy(*c)), cases))
    colo, colo_url = serve_colocated(model_dir)
    try:
        with ThreadPoolExecutor(len(cases)) as pool:
            co = list(pool.map(lambda c: post(colo_url + "/generate", greedy(*c)), cases))
    finally:
        colo.terminate()
        colo.wait(30)
    for (ids, n), (status, body), (cstatus, cbody) in zip(cases, pd, co, strict=True):
        assert status == 200, f"{body}\n{d.logs()}"
        assert cstatus == 200, cbody
        want = hf_greedy(model_dir, ids, n)
        assert body["output_ids"] == want, f"PD differs from transformers for a {len(ids)}-token prompt"
        assert cbody["output_ids"] == want, f"colocated differs for a {len(ids)}-token prompt"
        assert body["meta_info"]["finish_reason"] == {"type": "length"}
    # every process took part, and every page went back to its pool
    for name, proc in d.procs.items():
        if proc["role"] in ("prefill", "decode"):
            m = metrics(d.url(name))
            assert m["request_success_total"] >= 1, name
            assert m["kv_pages_used"] == 0, name


def test_pd_streams_openai_chat_and_completions(deploy, model_dir):
    d = deploy(1, 1)
    ids = prompt(12, 7)
    want = hf_greedy(model_dir, ids, 10)
    body = {"prompt": ids, "max_tokens": 10, "temperature": 0, "ignore_eos": True, "stream": True}
    req = urllib.request.Request(
        d.proxy + "/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    events = []
    with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as r:
        for line in r:
            line = line.decode().strip()
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    # the text streamed is the detokenized greedy continuation
    status, gen = post(d.proxy + "/generate", greedy(ids, 10))
    assert status == 200 and gen["output_ids"] == want
    assert "".join(c["choices"][0]["text"] for c in chunks) == gen["text"]
    # what bench asks the proxy to size its prompts: answered by a worker
    status, info = get_json(d.proxy + "/server_info")
    with open(os.path.join(model_dir, "config.json")) as f:
        assert status == 200 and info["vocab_size"] == json.load(f)["vocab_size"]
    assert info["role"] == "decode"
    status, chat = post(
        d.proxy + "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 5, "temperature": 0},
    )
    assert status == 200, chat
    assert chat["usage"]["completion_tokens"] <= 5


# ---- faults ----


def proc_pid(d: Deployment, name: str) -> int:
    return int(d.procs[name]["pid"])


def test_decode_killed_mid_request(deploy):
    d = deploy(1, 2)
    decodes = [n for n in d.procs if n.startswith("decode")]
    long = greedy(prompt(20, 1), 900)
    with ThreadPoolExecutor(4) as pool:
        victims = [pool.submit(post, d.proxy + "/generate", long) for _ in range(2)]  # one per decode

        def running_on(name):
            return metrics(d.url(name))["num_requests_running"] >= 1

        wait_for(lambda: all(running_on(n) for n in decodes), 60, "a request decoding on each decode")
        killed = decodes[0]
        t0 = time.monotonic()
        os.killpg(proc_pid(d, killed), signal.SIGKILL)
        results = [f.result(timeout=HTTP_TIMEOUT_S) for f in victims]
        elapsed = time.monotonic() - t0
    failed = [b for s, b in results if s != 200 or "error" in b]
    ok = [b for s, b in results if s == 200 and "error" not in b]
    # the client of the killed decode hears at once, with a reason; the other request finishes
    assert len(failed) == 1 and len(ok) == 1, results
    assert "decode" in json.dumps(failed[0]).lower()
    assert len(ok[0]["output_ids"]) == 900
    assert elapsed < 30
    assert metrics(d.url("prefill-0"))["kv_pages_used"] == 0
    # the proxy takes the dead decode out of rotation; later requests succeed on the other one
    wait_for(
        lambda: any(not w["healthy"] for w in get_json(d.proxy + "/workers")[1]["workers"]),
        20,
        "the proxy to mark the killed decode unhealthy",
    )
    for i in range(3):
        status, body = post(d.proxy + "/generate", greedy(prompt(9, 50 + i), 4))
        assert status == 200, body


def test_prefill_frozen_then_killed(deploy):
    d = deploy(2, 1, timeout_s=5)
    victim = "prefill-0"
    os.killpg(proc_pid(d, victim), signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with ThreadPoolExecutor(2) as pool:  # round robin: one of the two goes to the frozen prefill
            results = list(
                pool.map(lambda i: post(d.proxy + "/generate", greedy(prompt(11, i), 5)), range(2))
            )
        elapsed = time.monotonic() - t0
        statuses = sorted(s for s, _ in results)
        assert statuses[0] == 200 and statuses[1] >= 500, results
        err = next(b for s, b in results if s != 200)
        assert "error" in err
        # bounded by the decode's heartbeat on the prefill, well before any transfer timeout piles up
        assert elapsed < 45, elapsed

        # the decode gives back the pages of the failed hand-off: it asks the frozen prefill to cancel the
        # room, gets no proof that no write is under way, and quarantines them (never leaked, never reused)
        def settled():
            m = metrics(d.url("decode-0"))
            return m["kv_pages_used"] == 0 and m["num_requests_running"] == 0 and m

        m = wait_for(settled, 30, "the decode to settle the failed hand-off")
        assert m["kv_pages_quarantined"] > 0

        # `status` shows them per worker, as the workers report them (the quarantine lasts 30 s)
        procs = {p["name"]: p for p in json.loads(d.run("status", "--json").stdout)["processes"]}
        for name in ("decode-0", "prefill-1"):
            assert procs[name]["kv_pages_quarantined"] == metrics(d.url(name))["kv_pages_quarantined"]
        assert procs["decode-0"]["kv_pages_quarantined"] > 0
        assert procs[victim]["kv_pages_quarantined"] is None  # frozen: no health, so not asked
        assert procs["proxy"]["kv_pages_quarantined"] is None
        lines = d.run("status").stdout.splitlines()
        header = [c.strip() for c in re.split("[│┃]", next(x for x in lines if "KV quarantined" in x))]
        row = [c.strip() for c in re.split("[│┃]", next(x for x in lines if "decode-0" in x))]
        assert row[header.index("KV quarantined")] == str(procs["decode-0"]["kv_pages_quarantined"])
    finally:
        os.killpg(proc_pid(d, victim), signal.SIGKILL)
    wait_for(
        lambda: any(
            w["url"] == d.url(victim) and not w["healthy"]
            for w in get_json(d.proxy + "/workers")[1]["workers"]
        ),
        20,
        "the proxy to mark the killed prefill unhealthy",
    )
    for i in range(4):
        status, body = post(d.proxy + "/generate", greedy(prompt(9, 70 + i), 4))
        assert status == 200, body


def test_bogus_and_replayed_rooms_are_refused(deploy):
    d = deploy(1, 1)
    prefill, decode = d.url("prefill-0"), d.url("decode-0")
    boot_port = d.procs["prefill-0"]["bootstrap_port"]
    boot = f"http://127.0.0.1:{boot_port}"
    # a room that is not a 63-bit integer never gets past the bootstrap endpoint
    status, body = post(boot + "/v1/kv/not-a-room", {})
    assert status == 400 and "room" in body["error"]["message"]
    status, body = post(boot + f"/v1/kv/{2**64}", {})
    assert status == 400
    # a request without the bootstrap fields is refused by both roles
    for url in (prefill, decode):
        status, body = post(url + "/generate", greedy(prompt(5, 1), 3))
        assert status == 400 and "bootstrap" in body["error"]["message"]
    # play the proxy (with the deployment's key) once, then replay the same room
    key = d.key()
    room = random.getrandbits(63)
    ids = prompt(10, 3)
    fields = {"bootstrap_host": "127.0.0.1", "bootstrap_port": boot_port, "bootstrap_room": room}
    with ThreadPoolExecutor(2) as pool:
        p = pool.submit(signed_post, prefill + "/generate", greedy(ids, 4, **fields), key)
        dd = pool.submit(signed_post, decode + "/generate", greedy(ids, 4, **fields), key)
        assert p.result()[0] == 200 and dd.result()[0] == 200, (p.result(), dd.result())
    t0 = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        p = pool.submit(signed_post, prefill + "/generate", greedy(ids, 4, **fields), key)
        dd = pool.submit(signed_post, decode + "/generate", greedy(ids, 4, **fields), key)
        (ps, pb), (ds, db) = p.result(), dd.result()
    assert ps >= 400 and "already finished" in pb["error"]["message"], pb
    assert ds >= 400 and "already finished" in db["error"]["message"], db
    assert time.monotonic() - t0 < 20
    for url in (prefill, decode):
        assert metrics(url)["kv_pages_used"] == 0


def test_a_stream_waiting_for_its_kv_stays_alive_through_the_proxy(deploy):
    """A decode's stream is silent until its KV arrives; keep-alive comments stop the proxy's idle timer from
    cutting it, and a frozen prefill is still reported (by health checks), not waited on forever."""
    d = deploy(1, 1, decode_extra=", extra_args: [--sse-keepalive, '0.3']", proxy_extra=", read_timeout_s: 1")
    os.killpg(proc_pid(d, "prefill-0"), signal.SIGSTOP)
    try:
        body = json.dumps({**greedy(prompt(9, 5), 4), "stream": True}).encode()
        req = urllib.request.Request(
            d.proxy + "/generate", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as r:
            lines = [line.decode().strip() for line in r if line.strip()]
    finally:
        os.killpg(proc_pid(d, "prefill-0"), signal.SIGCONT)
    comments = [line for line in lines if line.startswith(":")]
    assert len(comments) >= 3, lines  # several read timeouts' worth of silence survived
    assert "stopped answering health checks" in lines[-2] and lines[-1] == "data: [DONE]", lines
