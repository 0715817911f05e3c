"""What a Mooncake agent's writing threads do when the memory they move lives on a CUDA device."""

from __future__ import annotations

import torch


def cuda_agent_hooks(device: str) -> dict:
    """Keyword arguments for `MooncakeAgent` serving memory on `device` (none on the CPU).

    Each worker thread makes the pool's device its own, so Mooncake's copies are queued on that device.
    After a same-host NVLink write the thread waits for its device: the copy is a `cudaMemcpy` between
    device buffers, which CUDA allows to return before the bytes land, and the peer reads them from another
    process.
    The wait covers this server's kernels queued before the copy as well, which the copy waits for anyway
    (both on the device's default stream).
    """
    if not device.startswith("cuda"):
        return {}
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index

    def thread_setup() -> None:
        torch.cuda.set_device(index)

    return {"thread_setup": thread_setup, "nvlink_settle": torch.cuda.synchronize}
