"""PD on a GPU: the KV pool in device memory, registered with Mooncake, written by the prefill process
into the decode process's pool on the same GPU. Skipped where there is no CUDA device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import free_port, wait_for
from hf_reference import hf_greedy
from test_pd_e2e import get_json, greedy, model_dir, post, prompt  # noqa: F401

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# Started by hand, not by `up`: the deployment secret comes from the environment.
ENV = {**os.environ, "DISAGGCTL_SECRET": "5e" * 32}


class Procs:
    def __init__(self):
        self.procs: list[subprocess.Popen] = []

    def serve(self, role: str, model: str, dtype: str, *extra: str, port: int | None = None) -> str:
        port = port or free_port()
        argv = [sys.executable, "-m", "disaggctl", "serve", role, "--model", model, "--device", "cuda"]
        argv += ["--dtype", dtype, "--port", str(port), "--page-size", "16", "--max-pages", "512", *extra]
        self.procs.append(subprocess.Popen(argv, env=ENV))
        url = f"http://127.0.0.1:{port}"

        def healthy():
            if self.procs[-1].poll() is not None:
                raise AssertionError(f"{role} exited with {self.procs[-1].returncode}")
            try:
                return get_json(url + "/health")[0] == 200
            except OSError:
                return False

        wait_for(healthy, 180, f"the {role} server")
        return url

    def close(self):
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture
def procs():
    p = Procs()
    yield p
    p.close()


def pd(procs: Procs, model: str, dtype: str, protocol: str = "tcp") -> str:
    boot, decode_port = free_port(), free_port()
    peer = f"decode-0=http://127.0.0.1:{decode_port}"
    prefill = procs.serve(
        "prefill",
        model,
        dtype,
        "--bootstrap-port",
        str(boot),
        "--transfer-protocol",
        protocol,
        "--decode-peer",
        peer,
    )
    decode = procs.serve(
        "decode",
        model,
        dtype,
        "--transfer-protocol",
        protocol,
        "--prefill-bootstrap",
        f"127.0.0.1:{boot}",
        port=decode_port,
    )
    proxy_port = free_port()
    argv = [sys.executable, "-m", "disaggctl", "serve", "proxy", "--port", str(proxy_port)]
    argv += ["--prefill", prefill, "--bootstrap-port", str(boot), "--decode", decode]
    procs.procs.append(subprocess.Popen(argv, env=ENV))
    url = f"http://127.0.0.1:{proxy_port}"
    wait_for(lambda: _ok(url), 60, "the proxy")
    return url


def _ok(url: str) -> bool:
    try:
        return get_json(url + "/health")[0] == 200
    except OSError:
        return False


def nvlink_supported() -> bool:
    try:
        from mooncake import engine
    except ImportError:
        return False
    return bool(getattr(engine, "SUPPORT_INTRA_NVLINK", False))


@pytest.mark.parametrize("protocol", ["tcp", "nvlink"])
def test_pd_on_gpu_equals_transformers_fp32(procs, model_dir, protocol):  # noqa: F811
    if protocol == "nvlink" and not nvlink_supported():
        pytest.skip("this Mooncake build has no intra-node NVLink transport")
    url = pd(procs, model_dir, "float32", protocol)
    cases = [(prompt(n, seed), m) for seed, (n, m) in enumerate([(1, 8), (17, 12), (100, 6), (300, 10)])]
    with ThreadPoolExecutor(len(cases)) as pool:
        got = list(pool.map(lambda c: post(url + "/generate", greedy(*c)), cases))
    for (ids, n), (status, body) in zip(cases, got, strict=True):
        assert status == 200, body
        assert body["output_ids"] == hf_greedy(model_dir, ids, n), f"{len(ids)}-token prompt"


def test_pd_on_gpu_equals_colocated_bf16(procs, model_dir):  # noqa: F811
    url = pd(procs, model_dir, "bfloat16")
    colo = procs.serve("colocated", model_dir, "bfloat16")
    # one request at a time: the same batch shapes on both sides, so bf16 results are bit-identical
    for seed, n in enumerate([5, 40, 257]):
        body = greedy(prompt(n, 100 + seed), 16)
        s1, a = post(url + "/generate", body)
        s2, b = post(colo + "/generate", body)
        assert s1 == 200 and s2 == 200, (a, b)
        assert a["output_ids"] == b["output_ids"], json.dumps([a["output_ids"], b["output_ids"]])
