"""A second process for transfer tests: owns a registered KV pool that a test writes into over Mooncake.

Prints one JSON line `{"session_id", "layout"}` once ready, then answers commands read from stdin:
`crc` -> JSON list of crc32 per (layer, k/v, page) of the pool bytes; `exit` -> quits.
"""

from __future__ import annotations

import argparse
import json
import sys
import zlib

import torch

from disaggctl.transfer.kv_layout import KvLayout
from disaggctl.transfer.mooncake import MooncakeAgent

FILL_BYTE = 0xA5


def page_crcs(pool: torch.Tensor) -> list[int]:
    layers, _, pages = pool.shape[:3]
    raw = pool.view(torch.uint8).reshape(layers * 2 * pages, -1).numpy()
    return [zlib.crc32(row.tobytes()) for row in raw]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--pages", type=int, default=32)
    parser.add_argument("--page-size", type=int, default=4)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--dim", type=int, default=8)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args()

    agent = MooncakeAgent("127.0.0.1", "tcp", timeout_s=args.timeout)
    shape = (args.layers, 2, args.pages, args.page_size, args.heads, args.dim)
    pool = torch.empty(shape, dtype=getattr(torch, args.dtype))
    pool.view(torch.uint8).fill_(FILL_BYTE)
    agent.register(pool.data_ptr(), pool.numel() * pool.element_size())
    layout = KvLayout.from_tensor(pool)
    print(json.dumps({"session_id": agent.session_id, "layout": layout.to_dict()}), flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "crc":
            print(json.dumps(page_crcs(pool)), flush=True)
        elif command == "exit":
            break
    agent.close()


if __name__ == "__main__":
    main()
