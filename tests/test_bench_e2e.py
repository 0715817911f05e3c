"""`disaggctl bench` end to end: against a real aiohttp server that fails in the ways servers fail, and
against a real colocated runtime server on builtin:tiny."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from aiohttp import web
from conftest import free_port
from typer.testing import CliRunner

from disaggctl.cli import app


class FaultServer:
    """An aiohttp server on its own thread and loop. `mode` picks how /generate answers:
    http500, broken (connection cut mid-stream), no-done (stream ends without [DONE]), error-event,
    hang (never answers), alternate (every other request a 500, the rest a well-formed stream)."""

    def __init__(self, mode: str):
        self.mode = mode
        self.calls = 0
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._release = asyncio.Event()
        web_app = web.Application()
        web_app.router.add_get("/health", self._health)
        web_app.router.add_get("/server_info", self._server_info)
        web_app.router.add_post("/generate", self._generate)
        # A short shutdown: the "hang" handler never returns by itself.
        self._runner = web.AppRunner(web_app, shutdown_timeout=0.5)
        self._loop.run_until_complete(self._runner.setup())
        self._loop.run_until_complete(web.TCPSite(self._runner, "127.0.0.1", self.port).start())
        self._ready.set()
        self._loop.run_forever()

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _server_info(self, request: web.Request) -> web.Response:
        return web.json_response({"vocab_size": 100})

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.calls += 1
        mode = self.mode
        if mode == "alternate":
            mode = "http500" if self.calls % 2 else "ok"
        if mode == "http500":
            return web.json_response(
                {"error": {"message": "boom", "type": "internal_error", "code": 500}}, status=500
            )
        if mode == "hang":
            await self._release.wait()
            return web.json_response({"error": {"message": "released"}}, status=500)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)

        async def event(obj) -> None:
            await resp.write(f"data: {json.dumps(obj) if not isinstance(obj, str) else obj}\n\n".encode())

        def cumulative(n: int) -> dict:
            meta = {"prompt_tokens": len(body["input_ids"]), "completion_tokens": n, "finish_reason": None}
            return {"text": "x" * n, "output_ids": [7] * n, "meta_info": meta}

        if mode == "error-event":
            await event({"error": {"message": "engine failed", "type": "engine_error", "code": 500}})
            await event("[DONE]")
        elif mode == "broken":
            await event(cumulative(1))
            await asyncio.sleep(0.05)
            request.transport.close()
            return resp
        elif mode == "no-done":
            await event(cumulative(1))
        else:
            for n in range(1, body["sampling_params"]["max_new_tokens"] + 1):
                await asyncio.sleep(0.005)
                await event(cumulative(n))
            await event("[DONE]")
        await resp.write_eof()
        return resp

    def __enter__(self) -> FaultServer:
        self._thread.start()
        assert self._ready.wait(10), "test server did not start"
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._release.set)
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def run_bench(
    cli, url: str, tmp_path, *extra: str, timeout: float = 120
) -> tuple[int, str, str, dict | None]:
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [*cli, "bench", "--url", url, "--json", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200"},
    )
    doc = json.loads(out.read_text()) if out.exists() else None
    return proc.returncode, proc.stdout, proc.stderr, doc


SMALL = ("--num-prompts", "6", "--input-len", "8", "--output-len", "4", "--warmup", "0")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mode", "error"),
    [
        ("http500", "HTTP 500: boom"),
        ("broken", "broken stream: ClientPayloadError"),
        ("no-done", "stream ended before [DONE]"),
        ("error-event", "error in stream: engine failed"),
    ],
)
def test_every_request_failing_is_counted_and_exits_nonzero(cli, tmp_path, mode, error):
    with FaultServer(mode) as server:
        rc, stdout, stderr, doc = run_bench(cli, server.url, tmp_path, *SMALL)
    assert rc == 1, stderr
    assert "all 6 requests failed" in stderr
    assert doc is not None and doc["completed"] == 0 and doc["failed"] == 6
    assert doc["errors"] == {error: 6}
    assert error in stdout  # the error table
    assert doc["mean_ttft_ms"] is None


@pytest.mark.slow
def test_timeouts_are_errors_not_hangs(cli, tmp_path):
    with FaultServer("hang") as server:
        t0 = time.monotonic()
        rc, _, stderr, doc = run_bench(cli, server.url, tmp_path, *SMALL, "--timeout", "1")
    assert time.monotonic() - t0 < 30
    assert rc == 1, stderr
    assert doc["errors"] == {"timeout": 6}


@pytest.mark.slow
def test_partial_failures_are_reported_with_the_successes(cli, tmp_path):
    with FaultServer("alternate") as server:
        rc, _, stderr, doc = run_bench(cli, server.url, tmp_path, *SMALL, "--max-concurrency", "1")
    assert rc == 0, stderr
    assert (doc["completed"], doc["failed"]) == (3, 3)
    assert doc["errors"] == {"HTTP 500: boom": 3}
    assert doc["total_output_tokens"] == 3 * 4 and doc["total_input_tokens"] == 3 * 8
    assert doc["max_concurrent_requests"] == 1
    assert doc["context"]["prompt_format"] == "token_ids"  # vocab_size came from /server_info


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dataset", "sharegpt"], "needs --dataset-path"),
        (["--dataset", "nope"], "--dataset must be one of"),
        (["--request-rate", "0"], "--request-rate must be positive"),
        (["--slo", "ttft=soon"], "--slo: cannot read"),
        (["--num-prompts", "0"], "--num-prompts must be at least 1"),
        (["--compare", "missing-a.json", "missing-b.json"], "no such file"),
        (["--dataset", "prompts", "--dataset-path", "missing.txt"], "no such file"),
        (["--dataset", "random-image", "--image-size", "big"], "--image-size must be WIDTHxHEIGHT"),
        (["--dataset", "random-image", "--image-count", "0"], "--image-count must be 1..16"),
        (["--dataset", "random-image", "--backend", "openai"], "random-image needs --backend generate"),
    ],
)
def test_bad_input_is_one_clear_line(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    server_url = f"http://127.0.0.1:{free_port()}"
    result = CliRunner().invoke(app, ["bench", "--url", server_url, *args])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


# ---- a real colocated runtime server on builtin:tiny ----



def _wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"server not healthy after {timeout_s}s")


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("server") / "server.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "disaggctl", "serve", "colocated", "--model", "builtin:tiny",
             "--host", "127.0.0.1", "--port", str(port)],
            stdout=f, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        try:
            _wait_healthy(url, proc, 180)
        except AssertionError as e:
            raise AssertionError(f"{e}; log:\n{log.read_text()[-3000:]}") from None
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _tiny_vocab_size() -> int:
    from disaggctl.runtime.builtin import TINY_CONFIG

    return TINY_CONFIG["vocab_size"]


def _check_sane(doc: dict, n: int, output_len: int) -> None:
    assert doc["completed"] == n and doc["failed"] == 0, doc["errors"]
    assert doc["total_output_tokens"] == n * output_len  # ignore_eos: exactly what was asked
    for stat in ("mean", "median", "p99", "max"):
        assert 0 < doc[f"{stat}_ttft_ms"] <= doc[f"{stat}_e2e_latency_ms"]
    assert 0 < doc["mean_tpot_ms"] < doc["max_e2e_latency_ms"]
    assert doc["mean_itl_ms"] > 0
    assert doc["duration"] * 1000 >= doc["max_e2e_latency_ms"]
    assert doc["request_throughput"] == pytest.approx(n / doc["duration"])
    assert 1 <= doc["max_concurrent_requests"] <= n


@pytest.mark.slow
def test_generate_backend_against_the_runtime(cli, tiny_server, tmp_path):
    n, input_len, output_len = 8, 40, 12
    rc, stdout, stderr, doc = run_bench(
        cli, tiny_server, tmp_path,
        "--num-prompts", str(n), "--input-len", str(input_len), "--output-len", str(output_len),
        "--request-rate", "20", "--vocab-size", str(_tiny_vocab_size()), "--slo", "ttft=60s",
        "--plot", str(tmp_path / "p.png"),
    )  # fmt: skip
    assert rc == 0, stderr
    assert doc["context"]["backend"] == "generate"  # auto-detected
    assert doc["context"]["prompt_format"] == "token_ids"
    _check_sane(doc, n, output_len)
    assert doc["total_input_tokens"] == n * input_len  # the server's count of the ids sent
    assert doc["mean_tokens_per_chunk"] >= 1
    assert doc["slo_attainment"]["all"] == 1.0 and doc["request_goodput"] > 0
    assert "Time to first token" in stdout
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["openai", "openai-chat"])
def test_openai_backends_against_the_runtime(cli, tiny_server, tmp_path, backend):
    n, input_len, output_len = 6, 64, 10
    rc, _, stderr, doc = run_bench(
        cli, tiny_server, tmp_path, "--backend", backend,
        "--num-prompts", str(n), "--input-len", str(input_len), "--output-len", str(output_len),
        "--max-concurrency", "3",
    )  # fmt: skip
    assert rc == 0, stderr
    assert doc["context"]["model"]  # from /v1/models
    _check_sane(doc, n, output_len)
    # Text prompts are sized from two measured requests: within a tenth of the target.
    assert doc["total_input_tokens"] == pytest.approx(n * input_len, rel=0.1)
    assert doc["max_concurrent_requests"] <= 3


@pytest.mark.slow
def test_compare_two_results(cli, tmp_path):
    # Two results written by the CLI itself, one run with more concurrency than the other.
    a = tmp_path / "a"
    b = tmp_path / "b"
    a.mkdir()
    b.mkdir()
    with FaultServer("alternate") as server:
        assert run_bench(cli, server.url, a, *SMALL, "--max-concurrency", "1")[0] == 0
        assert run_bench(cli, server.url, b, *SMALL, "--max-concurrency", "2")[0] == 0
    proc = subprocess.run(
        [*cli, "bench", "--compare", str(a / "result.json"), str(b / "result.json")],
        capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "B/A" in proc.stdout and "p99 ttft ms" in proc.stdout and "1.00x" in proc.stdout


@pytest.mark.slow
def test_warns_when_requests_go_out_slower_than_requested(cli, tmp_path):
    with FaultServer("ok") as server:
        rc, _, stderr, doc = run_bench(
            cli, server.url, tmp_path, *SMALL, "--request-rate", "1000", "--max-concurrency", "1"
        )
    assert rc == 0, stderr
    assert "below the requested 1000 req/s" in stderr and "--max-concurrency held requests back" in stderr
    assert doc["context"]["achieved_send_rate"] < 1000


def test_without_url_or_deployment_says_what_to_do(disaggctl_home):
    result = CliRunner().invoke(app, ["bench", "--num-prompts", "1"])
    assert result.exit_code == 2
    assert "--url" in result.output and "Traceback" not in result.output


def test_plot_without_matplotlib_fails_before_the_run(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with FaultServer("ok") as server:
        result = CliRunner().invoke(app, ["bench", "--url", server.url, "--plot", str(tmp_path / "p.png")])
        assert server.calls == 0  # nothing was sent
    assert result.exit_code == 2
    assert "--plot needs matplotlib" in result.output
