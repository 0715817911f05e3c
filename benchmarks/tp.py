"""Tensor parallelism: decode tok/s at tp 1 vs tp 2, and the KV hand-off from a tp 2 prefill into a tp 1
decode vs tp 1 -> tp 1 on the same bytes; every ratio from one run on one machine.

Decode: the engine on a random model of a Qwen2.5-0.5B-like shape (built with transformers, --layers of
them), `--batch` requests of `--prompt-len` tokens each decoding `--new-tokens`, greedy; tok/s is new tokens
over the wall time from the first step to the last, median of `--repeats` (after a warm-up run). On CPU the
ranks share the host's cores (each takes cores / tp intra-op threads), so tp 2 there measures the cost of
the split and its all-reduces rather than more compute.

Hand-off: three Mooncake agents on loopback TCP in this process: two prefill-rank pools (each half the KV
heads), one decode pool (all heads), pools shaped as the model's. `tp1->tp1` writes one full-head pool's
pages (merged runs); `tp2->tp1` has both ranks write their heads' share of each token at once (one entry
per token, layer and k/v); `raw` is one write of the same number of bytes in one range (the ceiling).

    python benchmarks/tp.py                      # markdown on stdout
    python benchmarks/tp.py --json out.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from disaggctl.runtime.config import EngineConfig
from disaggctl.runtime.engine import Engine, Request
from disaggctl.runtime.sampling import SamplingParams
from disaggctl.transfer.kv_layout import KvLayout, RankPool, rank_write_batches
from disaggctl.transfer.mooncake import MooncakeAgent


def build_model(out: Path, layers: int) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=4096,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=layers,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(out)
    (out / "tokenizer.json").write_text("{}")  # the engine alone reads no tokenizer


def decode_run(
    engine: Engine, batch: int, prompt_len: int, new_tokens: int, seed: int, timeout_s: float = 600
) -> tuple[float, list]:
    """Decode tok/s of `batch` random prompts run to `new_tokens` each (greedy, EOS ignored), and the outputs."""
    g = torch.Generator().manual_seed(seed)
    done = threading.Event()
    outputs: dict[str, list[int]] = {}
    left = [batch]

    def on_event(ev):
        outputs.setdefault(ev.rid, []).extend(ev.token_ids)
        if ev.finished:
            left[0] -= 1
            if left[0] == 0:
                done.set()

    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    for i in range(batch):
        ids = torch.randint(3, 4000, (prompt_len,), generator=g).tolist()
        engine.add_request(Request(f"{seed}-{i}", ids, params, on_event=on_event))
    if not done.wait(timeout_s):
        raise RuntimeError("decode run did not finish")
    return batch * new_tokens / (time.perf_counter() - t0), [outputs[k] for k in sorted(outputs)]


def bench_decode(model: str, args) -> list[dict]:
    rows = []
    results: dict[tuple[int, int], list[float]] = {}
    tokens: dict[tuple[int, int], list] = {}
    for tp in (1, 2):
        config = EngineConfig(
            model=model, device="cpu", dtype="float32", page_size=16, max_batch=max(args.batch), tp_size=tp
        )
        engine = Engine(config)
        engine.start()
        try:
            decode_run(engine, max(args.batch), args.prompt_len, 4, 999)  # warm-up
            for b in args.batch:
                for r in range(args.repeats):
                    rate, out = decode_run(engine, b, args.prompt_len, args.new_tokens, 100 + r)
                    results.setdefault((tp, b), []).append(rate)
                    tokens[(tp, b)] = out
        finally:
            engine.stop()
    for b in args.batch:
        one, two = statistics.median(results[(1, b)]), statistics.median(results[(2, b)])
        rows.append(
            {
                "batch": b,
                "tp1_tok_s": one,
                "tp2_tok_s": two,
                "ratio": two / one,
                "same_tokens": tokens[(1, b)] == tokens[(2, b)],
            }
        )
    return rows


def pool_tensor(layers: int, pages: int, page_size: int, heads: int, dim: int) -> torch.Tensor:
    return torch.randn(layers, 2, pages, page_size, heads, dim, dtype=torch.bfloat16)


def bench_handoff(args) -> list[dict]:
    layers, heads, dim, page_size = args.layers, 2, 64, 16
    pages = max(args.tokens) // page_size + 8
    agents, tensors = [], []

    def agent_for(t: torch.Tensor) -> tuple[MooncakeAgent, RankPool, int]:
        a = MooncakeAgent("127.0.0.1", "tcp", timeout_s=60)
        a.register(t.data_ptr(), t.numel() * t.element_size())
        agents.append(a)
        tensors.append(t)
        h = t.shape[4]
        return a, h

    try:
        full_src = pool_tensor(layers, pages, page_size, heads, dim)
        half = [pool_tensor(layers, pages, page_size, heads // 2, dim) for _ in range(2)]
        dst = pool_tensor(layers, pages, page_size, heads, dim)
        a_full, _ = agent_for(full_src)
        a_half = [agent_for(t)[0] for t in half]
        a_dst, _ = agent_for(dst)
        head_bytes = dim * 2
        dst_pool = RankPool(a_dst.session_id, KvLayout.from_tensor(dst), 0, heads, head_bytes)
        full_pool = RankPool(a_full.session_id, KvLayout.from_tensor(full_src), 0, heads, head_bytes)
        half_pools = [
            RankPool(a.session_id, KvLayout.from_tensor(t), r, 1, head_bytes)
            for r, (a, t) in enumerate(zip(a_half, half, strict=True))
        ]
        rows = []
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            for tokens in args.tokens:
                n = -(-tokens // page_size)
                src_pages, dst_pages = list(range(n)), list(range(3, 3 + n))
                one = rank_write_batches(full_pool, src_pages, dst_pool, dst_pages, tokens)
                two = [rank_write_batches(p, src_pages, dst_pool, dst_pages, tokens) for p in half_pools]
                nbytes = sum(one[2])
                assert nbytes == sum(sum(b[2]) for b in two)

                def tp1(batches=one):
                    a_full.write(dst_pool.session_id, *batches)

                def tp2(batches=two):
                    futs = [
                        pool.submit(a.write, dst_pool.session_id, *b)
                        for a, b in zip(a_half, batches, strict=True)
                    ]
                    for f in futs:
                        f.result()

                def raw(nb=nbytes):
                    a_full.write(
                        dst_pool.session_id, [full_pool.layout.base_ptr], [dst_pool.layout.base_ptr], [nb]
                    )

                times: dict[str, list[float]] = {"raw": [], "tp1->tp1": [], "tp2->tp1": []}
                for _ in range(args.reps):  # interleaved, so drift hits all three alike
                    for name, fn in (("raw", raw), ("tp1->tp1", tp1), ("tp2->tp1", tp2)):
                        t0 = time.perf_counter()
                        fn()
                        times[name].append(time.perf_counter() - t0)
                # the tp 2 write put exactly the full pool's heads where tp 1 puts them
                tp2()
                for r, t in enumerate(half):
                    got = dst[:, :, 3 : 3 + n, :, r : r + 1].reshape(layers, 2, -1, 1, dim)[:, :, :tokens]
                    want = t[:, :, :n].reshape(layers, 2, -1, 1, dim)[:, :, :tokens]
                    assert torch.equal(got, want), "tp2->tp1 wrote the wrong bytes"
                med = {k: statistics.median(v) for k, v in times.items()}
                rows.append(
                    {
                        "tokens": tokens,
                        "bytes": nbytes,
                        "entries_tp1": len(one[0]),
                        "entries_tp2": sum(len(b[0]) for b in two),
                        **{f"{k}_ms": v * 1e3 for k, v in med.items()},
                        **{f"{k}_gbps": nbytes / v / 1e9 for k, v in med.items()},
                        "tp2_over_tp1": med["tp2->tp1"] / med["tp1->tp1"],
                    }
                )
        return rows
    finally:
        for a in agents:
            a.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=lambda s: [int(x) for x in s.split(",")], default=[1024, 4096])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        build_model(Path(tmp), args.layers)
        decode = bench_decode(tmp, args)
    handoff = bench_handoff(args)
    print(
        f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    )
    print(
        f"model: Qwen2.5-0.5B-like, {args.layers} layers, fp32, CPU; prompt {args.prompt_len}, {args.new_tokens} new\n"
    )
    print("| batch | tp 1 tok/s | tp 2 tok/s | tp 2 / tp 1 | same tokens |\n|---:|---:|---:|---:|---|")
    for r in decode:
        print(
            f"| {r['batch']} | {r['tp1_tok_s']:.1f} | {r['tp2_tok_s']:.1f} | {r['ratio']:.2f} | {r['same_tokens']} |"
        )
    print(
        "\n| tokens | MB | raw ms | tp1->tp1 ms (entries) | tp2->tp1 ms (entries) | tp2 / tp1 |\n|---:|---:|---:|---:|---:|---:|"
    )
    for r in handoff:
        print(
            f"| {r['tokens']} | {r['bytes'] / 1e6:.1f} | {r['raw_ms']:.1f} | {r['tp1->tp1_ms']:.1f} ({r['entries_tp1']}) | "
            f"{r['tp2->tp1_ms']:.1f} ({r['entries_tp2']}) | {r['tp2_over_tp1']:.2f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"decode": decode, "handoff": handoff}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
