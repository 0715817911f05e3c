"""Decode attention alone, on CUDA: the paged Triton kernel (a few block shapes) against the torch
reference that gathers the keys, and against SDPA over a padded contiguous cache (what a static-cache
CUDA-graph decode does). Qwen2.5-0.5B's attention shape by default: 14 query heads, 2 KV heads, dim 64.

    python benchmarks/paged_attention.py [--dtype bfloat16] [--shapes 1x32,32x32,128x32,1x4096,32x4096]

Times are medians of CUDA-event timings (`triton.testing.do_bench`), one layer, microseconds; GB/s counts
the keys and values read once.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def measure(batch: int, ctx: int, args) -> dict:
    import torch.nn.functional as F
    import triton.testing

    from disaggctl.runtime.attention import SeqSlice, build_meta, paged_attention
    from disaggctl.runtime.triton_attention import decode_attention

    dtype, dev = getattr(torch, args.dtype), "cuda"
    h, kvh, d, page = args.heads, args.kv_heads, args.head_dim, args.page_size
    per_seq = -(-ctx // page)
    num_pages = batch * per_seq + 1
    kc = torch.randn(num_pages, page, kvh, d, device=dev, dtype=dtype)
    vc = torch.randn_like(kc)
    perm = torch.randperm(num_pages - 1).tolist()  # scattered pages, as after a while of serving
    seqs = [SeqSlice(1, ctx, perm[i * per_seq : (i + 1) * per_seq]) for i in range(batch)]
    q = torch.randn(batch, h, d, device=dev, dtype=dtype)
    scale = d**-0.5
    meta = build_meta(seqs, page, scale, dev, paged_decode=True)
    ref_meta = build_meta(seqs, page, scale, dev)
    times = {"torch_gather": triton.testing.do_bench(lambda: paged_attention(q, kc, vc, ref_meta))}
    static_k = torch.randn(batch, kvh, ctx, d, device=dev, dtype=dtype)
    static_v = torch.randn_like(static_k)
    q4 = q[:, :, None, :]
    times["sdpa_static"] = triton.testing.do_bench(
        lambda: F.scaled_dot_product_attention(q4, static_k, static_v, enable_gqa=True)
    )
    for bn in (16, 32, 64, 128):
        for ms in (64, 128, 256):
            for nw in (2, 4):
                times[f"triton_n{bn}_s{ms}_w{nw}"] = triton.testing.do_bench(
                    lambda bn=bn, ms=ms, nw=nw: decode_attention(
                        q,
                        kc,
                        vc,
                        meta.decode_table,
                        meta.decode_lens,
                        scale,
                        block_n=bn,
                        min_split=ms,
                        num_warps=nw,
                    )
                )
    gbytes = 2 * batch * ctx * kvh * d * kc.element_size() / 1e9
    best = min((k for k in times if k.startswith("triton")), key=times.get)
    return {
        "batch": batch,
        "context": ctx,
        "us": {k: round(v * 1000, 1) for k, v in times.items()},
        "best": best,
        "best_GBps": round(gbytes / (times[best] / 1000), 1),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--shapes", default="1x32,32x32,128x32,1x4096,32x4096,128x4096", help="BATCHxCONTEXT,...")
    ap.add_argument("--heads", type=int, default=14)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    rows = []
    for shape in args.shapes.split(","):
        batch, ctx = (int(x) for x in shape.split("x"))
        row = measure(batch, ctx, args)
        rows.append(row)
        us, best = row["us"], row["best"]
        print(
            f"{batch}x{ctx}: gather {us['torch_gather']} us, sdpa static {us['sdpa_static']} us, "
            f"best {best} {us[best]} us ({row['best_GBps']} GB/s), default {us['triton_n32_s128_w4']} us",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "dtype": args.dtype, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
