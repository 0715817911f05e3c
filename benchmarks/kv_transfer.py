"""KV hand-off throughput: merged page writes vs one raw Mooncake write of the same bytes, same run.

Two processes: this one owns the prefill-side pool and writes; a child (`--serve`) owns the decode-side
pool. For each KV shape and prompt length it times, as the median of `--reps` repetitions:
  raw         one `transfer_sync_write` of all the prompt's KV bytes (one contiguous range, the ceiling)
  merged      kv_write_batches + MooncakeAgent.write, pages contiguous on both sides (a fresh pool)
  fragmented  the same with randomly scattered pages on both sides (merging finds few runs)
  per-page    one batch entry per (layer, k/v, page), nothing merged (the contrast)

    python benchmarks/kv_transfer.py                      # CPU tensors over loopback TCP
    python benchmarks/kv_transfer.py --device cuda --protocol auto --json results.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import select
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from disaggctl.runtime.builtin import TINY_CONFIG
from disaggctl.runtime.transfer_hooks import cuda_agent_hooks
from disaggctl.transfer.kv_layout import KvLayout, kv_write_batches
from disaggctl.transfer.mooncake import MooncakeAgent, load_engine_module

# Mooncake's own protocol name for same-host NVLink (CUDA IPC). MooncakeAgent(protocol="nvlink") hands
# Mooncake "nvlink", which CUDA wheels built without multi-node NVLink refuse; this option measures the
# intra-node path anyway by renaming the protocol on its way into Mooncake.
NVLINK_INTRA = "nvlink_intra"
# the contiguous destination run starts here, so source and destination offsets differ
DST_FIRST_PAGE = 7


class _RenamedProtocol:
    """A TransferEngine whose initialize() passes `nvlink_intra` where it is given `nvlink`."""

    def __init__(self, engine):
        self._engine = engine

    def initialize(self, hostname, metadata, protocol, device):
        return self._engine.initialize(
            hostname, metadata, NVLINK_INTRA if protocol == "nvlink" else protocol, device
        )

    def __getattr__(self, name):
        return getattr(self._engine, name)


def make_agent(args: argparse.Namespace, device: str = "cpu") -> MooncakeAgent:
    """An agent as the runtime makes one for a pool on `device` (its CUDA hooks included)."""
    hooks = cuda_agent_hooks(device)
    if args.protocol != NVLINK_INTRA:
        return MooncakeAgent(args.hostname, args.protocol, args.ib_device, timeout_s=args.timeout, **hooks)
    module = load_engine_module()
    original = module.TransferEngine
    module.TransferEngine = lambda: _RenamedProtocol(original())
    try:
        return MooncakeAgent(args.hostname, "nvlink", None, timeout_s=args.timeout, **hooks)
    finally:
        module.TransferEngine = original


@dataclass(frozen=True)
class Shape:
    name: str
    layers: int
    kv_heads: int
    head_dim: int
    dtype: str
    page_size: int = 16

    def token_bytes(self) -> int:
        return (
            self.layers
            * 2
            * self.kv_heads
            * self.head_dim
            * torch.tensor([], dtype=self.torch_dtype).element_size()
        )

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


SHAPES = {
    "qwen2.5-0.5b": Shape("qwen2.5-0.5b", layers=24, kv_heads=2, head_dim=64, dtype="bfloat16"),
    # read from the recipe so the two cannot drift apart; float32 is the engine's default on CPU
    "builtin-tiny": Shape(
        "builtin-tiny",
        layers=TINY_CONFIG["num_hidden_layers"],
        kv_heads=TINY_CONFIG["num_key_value_heads"],
        head_dim=TINY_CONFIG["head_dim"],
        dtype="float32",
    ),
}


def make_pool(shape: Shape, pages: int, device: str, page_major: bool) -> torch.Tensor:
    """A pool in the runtime's page-major order ([pages, layers, 2, ...]) or the layer-major one."""
    order = (pages, shape.layers, 2) if page_major else (shape.layers, 2, pages)
    pool = torch.empty(
        (*order, shape.page_size, shape.kv_heads, shape.head_dim), dtype=shape.torch_dtype, device=device
    )
    pool.view(torch.uint8).random_(0, 256)
    return pool


def layer_major(pool: torch.Tensor, page_major: bool) -> torch.Tensor:
    return pool.permute(1, 2, 0, 3, 4, 5) if page_major else pool


def pages_digest(pool: torch.Tensor, first_page: int, pages: int, tokens: int, page_major: bool) -> str:
    """Hash of the first `tokens` tokens of every layer's K and V held in pages first_page.. (in order)."""
    part = layer_major(pool, page_major)[:, :, first_page : first_page + pages]
    part = part.reshape(part.shape[0], 2, -1, *part.shape[-2:])[:, :, :tokens]
    return hashlib.sha1(part.contiguous().view(torch.uint8).cpu().numpy().tobytes()).hexdigest()


def serve(args: argparse.Namespace) -> None:
    """Child process: the decode-side pool. Answers `digest FIRST PAGES TOKENS` lines until `exit`."""
    shape = SHAPES[args.shape]
    agent = make_agent(args)
    page_major = args.layout == "page"
    pool = make_pool(shape, args.pool_pages, args.serve_device, page_major)
    agent.register(pool.data_ptr(), pool.numel() * pool.element_size())
    hello = {"session_id": agent.session_id, "layout": KvLayout.from_tensor(pool, page_major).to_dict()}
    print(json.dumps(hello), flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] != "digest":
            break
        if pool.is_cuda:  # a GPU-side copy may still be in flight on another stream
            torch.cuda.synchronize(pool.device)
        print(pages_digest(pool, *map(int, words[1:4]), page_major), flush=True)
    agent.close()


def per_page_batches(src: KvLayout, src_pages, dst: KvLayout, dst_pages):
    srcs, dsts = [], []
    for layer in range(src.num_layers):
        for kv in range(2):
            for s, d in zip(src_pages, dst_pages, strict=True):
                srcs.append(src.page_addr(layer, kv, s))
                dsts.append(dst.page_addr(layer, kv, d))
    return srcs, dsts, [src.page_bytes] * len(srcs)


def interleaved_medians(cases: list[tuple[str, int, object, int]], settle=None) -> dict[str, float]:
    """Median seconds per case, taking the cases in turn each round so drift and noise hit all of them alike.
    `settle`: waits for device work this process issued (a copy still in flight when a call returns would
    otherwise be paid by the next case), inside each timing and before it."""
    times: dict[str, list[float]] = {name: [] for name, *_ in cases}
    settle = settle or (lambda: None)
    for _, _, fn, _ in cases:
        fn()  # warm-up: handshake, descriptor cache, page faults
    for rnd in range(max(reps for *_, reps in cases)):
        for name, _, fn, reps in cases:
            if rnd < reps:
                settle()
                began = time.perf_counter()
                fn()
                settle()
                times[name].append(time.perf_counter() - began)
    return {name: statistics.median(values) for name, values in times.items()}


def bench_shape(args: argparse.Namespace, shape: Shape, agent: MooncakeAgent) -> list[dict]:
    max_pages = math.ceil(max(args.tokens) / shape.page_size)
    # room for the shifted contiguous destination run even when one prompt length is used
    pool_pages = 2 * max_pages + DST_FIRST_PAGE
    child_args = [sys.executable, __file__, "--serve", "--shape", shape.name, "--pool-pages", str(pool_pages)]
    child_args += ["--serve-device", args.peer_device or args.device, "--protocol", args.protocol]
    child_args += ["--hostname", args.hostname, "--timeout", str(args.timeout), "--layout", args.layout]
    if args.ib_device:
        child_args += ["--ib-device", args.ib_device]
    child = subprocess.Popen(child_args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([child.stdout], [], [], 120)
        line = child.stdout.readline() if ready else ""
        if not line:
            raise SystemExit(f"receiver for {shape.name} did not start (exit code {child.poll()})")
        hello = json.loads(line)
        peer, dst = hello["session_id"], KvLayout.from_dict(hello["layout"])
        page_major = args.layout == "page"
        pool = make_pool(shape, pool_pages, args.device, page_major)
        agent.register(pool.data_ptr(), pool.numel() * pool.element_size())
        src = KvLayout.from_tensor(pool, page_major)
        rng = random.Random(0)
        rows = []
        try:
            for tokens in args.tokens:
                pages = math.ceil(tokens / shape.page_size)
                nbytes = tokens * shape.token_bytes()
                contiguous_src, contiguous_dst = (
                    list(range(pages)),
                    list(range(DST_FIRST_PAGE, DST_FIRST_PAGE + pages)),
                )
                scattered_src = rng.sample(range(pool_pages), pages)
                scattered_dst = rng.sample(range(pool_pages), pages)

                def raw(n=nbytes):
                    if agent.engine.transfer_sync_write(peer, src.base_ptr, dst.base_ptr, n) != 0:
                        raise SystemExit("raw Mooncake write failed")

                def merged(s=contiguous_src, d=contiguous_dst, t=tokens):
                    agent.write(peer, *kv_write_batches(src, s, dst, d, t))

                def fragmented(s=scattered_src, d=scattered_dst, t=tokens):
                    agent.write(peer, *kv_write_batches(src, s, dst, d, t))

                unmerged = per_page_batches(src, contiguous_src, dst, contiguous_dst)

                # where the time between raw and merged goes: the agent's worker thread, or the list
                def raw_via_agent(n=nbytes):
                    agent.write(peer, [src.base_ptr], [dst.base_ptr], [n])

                def merged_direct(s=contiguous_src, d=contiguous_dst, t=tokens):
                    for a, b, n in zip(*kv_write_batches(src, s, dst, d, t), strict=True):
                        if agent.engine.transfer_sync_write(peer, a, b, n) != 0:
                            raise SystemExit("Mooncake write failed")

                def per_page(batches=unmerged):
                    agent.write(peer, *batches)

                def raw_at_run(n=nbytes):  # raw, but to where the merged run goes
                    dst_at = dst.page_addr(0, 0, DST_FIRST_PAGE)
                    if agent.engine.transfer_sync_write(peer, src.base_ptr, dst_at, n) != 0:
                        raise SystemExit("raw Mooncake write failed")

                def write_list(s=contiguous_src, d=contiguous_dst, t=tokens):  # the host's share of merged
                    kv_write_batches(src, s, dst, d, t)

                cases = [
                    ("raw", 1, raw, args.reps),
                    (
                        "merged",
                        len(kv_write_batches(src, contiguous_src, dst, contiguous_dst, tokens)[0]),
                        merged,
                        args.reps,
                    ),
                    (
                        "fragmented",
                        len(kv_write_batches(src, scattered_src, dst, scattered_dst, tokens)[0]),
                        fragmented,
                        args.reps,
                    ),
                    ("per-page", len(unmerged[0]), per_page, max(3, args.reps // 2)),
                ]
                if args.diagnose:
                    cases += [("raw-agent", 1, raw_via_agent, args.reps)]
                    cases += [("merged-direct", cases[1][1], merged_direct, args.reps)]
                    cases += [("raw-at-run", 1, raw_at_run, args.reps), ("write-list", 0, write_list, args.reps)]
                on_gpu = args.device.startswith("cuda")
                medians = interleaved_medians(cases, torch.cuda.synchronize if on_gpu else None)
                # a transport that reports success without moving the bytes would make every number a lie
                merged()
                child.stdin.write(f"digest {DST_FIRST_PAGE} {pages} {tokens}\n")
                child.stdin.flush()
                if child.stdout.readline().strip() != pages_digest(pool, 0, pages, tokens, page_major):
                    raise SystemExit(f"{shape.name}, {tokens} tokens: the peer's pages differ after a write")
                raw_s = medians["raw"]
                for case, entries, _, reps in cases:
                    seconds = medians[case]
                    # per-page moves whole pages; for the others the prompt's bytes count (a page-major
                    # pool's last page goes whole, its unused tail is not counted as work done)
                    moved = len(unmerged[0]) * src.page_bytes if case == "per-page" else nbytes
                    rows.append(
                        {
                            "shape": shape.name,
                            "tokens": tokens,
                            "case": case,
                            "entries": entries,
                            "bytes": moved,
                            "median_ms": seconds * 1e3,
                            "gb_per_s": moved / seconds / 1e9,
                            "vs_raw": (moved / seconds) / (nbytes / raw_s),
                            "reps": reps,
                        }
                    )
                    print(
                        f"  {shape.name} {tokens:>6} tokens {case:<10} {seconds * 1e3:8.2f} ms",
                        file=sys.stderr,
                    )
        finally:
            agent.unregister(pool.data_ptr())
        return rows
    finally:
        if child.poll() is None:
            child.stdin.write("exit\n")
            child.stdin.flush()
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait(10)


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"KV hand-off, {meta['device']} tensors, transport {meta['transport']}, median of {meta['reps']} reps",
        "",
        "| shape | prompt tokens | case | entries | MiB | median ms | GB/s | vs raw |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['tokens']} | {r['case']} | {r['entries']} | {r['bytes'] / 2**20:.1f} "
            f"| {r['median_ms']:.2f} | {r['gb_per_s']:.2f} | {r['vs_raw'] * 100:.0f}% |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--shape", action="append", choices=sorted(SHAPES), help="KV shape (repeatable; default all)"
    )
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384], help="prompt lengths")
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] for the sending pool")
    parser.add_argument("--peer-device", help="device of the receiving pool (default: same as --device)")
    parser.add_argument("--protocol", default="tcp", choices=["tcp", "rdma", "nvlink", "auto", NVLINK_INTRA])
    parser.add_argument("--ib-device", help="RDMA NIC(s), e.g. mlx5_0")
    parser.add_argument("--hostname", default="127.0.0.1")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument(
        "--layout",
        default="page",
        choices=["page", "layer"],
        help="pool order: page-major (the runtime's) or layer-major ([layers, 2, pages, ...])",
    )
    parser.add_argument(
        "--diagnose",
        action="store_true",
        help="also time raw bytes through the agent and merged ranges written on this thread",
    )
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pool-pages", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--serve-device", default="cpu", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        args.shape = args.shape[0]
        serve(args)
        return
    if any(t <= 0 for t in args.tokens) or args.reps < 1:
        parser.error("--tokens and --reps must be positive")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA build of torch and a GPU")
    agent = make_agent(args, args.device)
    rows = []
    for name in args.shape or sorted(SHAPES, reverse=True):
        rows += bench_shape(args, SHAPES[name], agent)
    meta = {
        "device": args.device,
        "transport": NVLINK_INTRA if args.protocol == NVLINK_INTRA else agent.transport,
        "reps": args.reps,
        "torch": torch.__version__,
    }
    print(markdown(rows, meta))
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"meta": meta, "results": rows}, out, indent=2)
    agent.close()


if __name__ == "__main__":
    main()
