"""Same-host NVLink writes on a GPU: when a write returns, the bytes are in the peer's memory.

Mooncake's same-host NVLink copy is a device-to-device `cudaMemcpy`, which CUDA allows to return before
the copy is done (on an H200 it returned when done), and the peer process reads with nothing ordering its
reads after our copy: the agent waits for the device, and this is the contract it keeps. Skipped without
CUDA or without Mooncake's NVLink transport."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

MIB = 1 << 20
SIZE = 512 * MIB  # about 0.3 ms of copying on an H100/H200: far longer than returning from a call

PEER = textwrap.dedent(
    """
    import json, sys, torch
    from disaggctl.transfer.mooncake import MooncakeAgent
    agent = MooncakeAgent("127.0.0.1", "nvlink", timeout_s=10)
    buf = torch.zeros(int(sys.argv[1]), dtype=torch.uint8, device="cuda")
    agent.register(buf.data_ptr(), buf.numel())
    print(json.dumps({"session": agent.session_id, "ptr": buf.data_ptr()}), flush=True)
    for line in sys.stdin:
        if line.strip() != "sum":
            break
        # no synchronisation with the writer is possible from here: what is there now is what counts
        print(int(buf.view(torch.int64).sum()), flush=True)
    agent.close()
    """
)


def nvlink_available() -> bool:
    try:
        import mooncake.engine as engine
    except ImportError:
        return False
    return bool(getattr(engine, "SUPPORT_INTRA_NVLINK", False))


@pytest.mark.skipif(not nvlink_available(), reason="needs Mooncake's CUDA build (same-host NVLink)")
def test_an_nvlink_write_has_landed_when_it_returns():
    from disaggctl.runtime.transfer_hooks import cuda_agent_hooks
    from disaggctl.transfer.mooncake import MooncakeAgent

    peer = subprocess.Popen(
        [sys.executable, "-c", PEER, str(SIZE)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    agent = None
    try:
        hello = json.loads(peer.stdout.readline())
        agent = MooncakeAgent("127.0.0.1", "nvlink", timeout_s=10, **cuda_agent_hooks("cuda:0"))
        assert agent.transport == "nvlink"
        src = torch.empty(SIZE // 8, dtype=torch.int64, device="cuda")
        agent.register(src.data_ptr(), SIZE)
        for value in range(1, 6):
            src.fill_(value)
            torch.cuda.synchronize()
            agent.write(hello["session"], [src.data_ptr()], [hello["ptr"]], [SIZE])
            # nothing is left queued on this device: the copy is done, not merely started
            done = torch.cuda.Event()
            done.record(torch.cuda.default_stream())
            assert done.query(), f"round {value}: the write returned before its copy finished"
            peer.stdin.write("sum\n")
            peer.stdin.flush()
            assert int(peer.stdout.readline()) == value * (SIZE // 8), f"round {value}"
    finally:
        if agent is not None:
            agent.close()
        peer.stdin.close()
        peer.wait(30)
