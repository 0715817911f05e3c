"""Expert parallelism on CPU ranks: MoE decode tok/s at one rank, tp 2 with every expert split (ep 1) and
tp 2 with whole experts per rank (ep 2), and the time rank 0 spends in all-reduces per decode step, the
MoE layers' combine apart from attention's.

The model is a random DeepSeek-V3-architecture model built with transformers (MLA, `--experts` routed
experts in 4 groups, 2 groups kept, `--top-k` a token, one shared expert, layer 0 dense). `--batch`
requests of `--prompt-len` tokens decode `--new-tokens` each, greedy; tok/s is new tokens over the wall
time of the run, median of `--repeats` after a warm-up. The all-reduce times are rank 0's wall time inside
`TensorParallel.all_reduce` (the collective plus any wait for the slower rank), over the engine's steps.
On CPU the ranks share the host's cores, so 2 ranks split the same cores rather than adding any.

    python benchmarks/moe.py                      # markdown on stdout
    python benchmarks/moe.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

# the decode loop benchmarks/tp.py measures TP with (this script's folder is on sys.path when it runs)
from tp import decode_run  # noqa: E402

from disaggctl.runtime.config import EngineConfig
from disaggctl.runtime.engine import Engine
from disaggctl.runtime.models.deepseek import DeepseekMoE
from disaggctl.runtime.parallel import TensorParallel

LAYOUTS = [("tp1", 1, 1), ("tp2-ep1", 2, 1), ("tp2-ep2", 2, 2)]


def build_model(out: Path, args) -> None:
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = DeepseekV3Config(
        vocab_size=4096,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        moe_intermediate_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        n_routed_experts=args.experts,
        n_shared_experts=1,
        n_group=4,
        topk_group=2,
        num_experts_per_tok=args.top_k,
        first_k_dense_replace=1,
        kv_lora_rank=128,
        q_lora_rank=None,
        qk_rope_head_dim=32,
        qk_nope_head_dim=32,
        v_head_dim=32,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    DeepseekV3ForCausalLM(cfg).save_pretrained(out)
    (out / "tokenizer.json").write_text("{}")  # the engine alone reads no tokenizer


class AllReduceClock:
    """Wall time of rank 0's all-reduces, the MoE layers' apart (a flag set while a mixture runs)."""

    def __init__(self) -> None:
        self.total = self.moe = 0.0
        self.in_moe = False
        self._reduce, self._moe = TensorParallel.all_reduce, DeepseekMoE.forward
        clock = self

        def all_reduce(tp, t):
            t0 = time.perf_counter()
            out = clock._reduce(tp, t)
            dt = time.perf_counter() - t0
            clock.total += dt
            clock.moe += dt if clock.in_moe else 0.0
            return out

        def moe_forward(module, x):
            clock.in_moe = True
            try:
                return clock._moe(module, x)
            finally:
                clock.in_moe = False

        TensorParallel.all_reduce, DeepseekMoE.forward = all_reduce, moe_forward

    def reset(self) -> None:
        self.total = self.moe = 0.0


def bench(model: str, args) -> list[dict]:
    clock = AllReduceClock()
    rows, tokens = [], {}
    for name, tp, ep in LAYOUTS:
        config = EngineConfig(
            model=model,
            device="cpu",
            dtype="float32",
            page_size=16,
            max_batch=args.batch,
            tp_size=tp,
            ep_size=ep,
        )
        engine = Engine(config)
        engine.start()
        try:
            decode_run(engine, args.batch, args.prompt_len, 4, 999, timeout_s=900)  # warm-up
            rates, per_step, moe_step, step_ms = [], [], [], []
            for r in range(args.repeats):
                clock.reset()
                steps0 = engine.counters["steps"]
                t0 = time.perf_counter()
                rate, out = decode_run(
                    engine, args.batch, args.prompt_len, args.new_tokens, 100 + r, timeout_s=900
                )
                wall = time.perf_counter() - t0
                steps = engine.counters["steps"] - steps0
                rates.append(rate)
                per_step.append(clock.total / steps * 1e3)
                moe_step.append(clock.moe / steps * 1e3)
                step_ms.append(wall / steps * 1e3)
                tokens[name] = out
        finally:
            engine.stop()
        rows.append(
            {
                "layout": name,
                "tok_s": statistics.median(rates),
                "step_ms": statistics.median(step_ms),
                "all_reduce_ms_per_step": statistics.median(per_step),
                "moe_combine_ms_per_step": statistics.median(moe_step),
                "same_tokens_as_tp1": tokens[name] == tokens["tp1"],
            }
        )
    return rows


def markdown(rows: list[dict], args) -> str:
    out = [
        f"DeepSeek-V3-architecture random model: hidden {args.hidden}, {args.layers} layers (1 dense), "
        f"{args.experts} experts (top {args.top_k}, 4 groups / 2 kept) + 1 shared; batch {args.batch}, "
        f"prompt {args.prompt_len}, {args.new_tokens} new tokens, float32, median of {args.repeats}.",
        "",
        "| layout | decode tok/s | ms / step | all-reduce ms / step | of it MoE combine | same tokens as tp1 |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['layout']} | {r['tok_s']:.1f} | {r['step_ms']:.1f} | {r['all_reduce_ms_per_step']:.2f} | "
            f"{r['moe_combine_ms_per_step']:.2f} | {r['same_tokens_as_tp1']} |"
        )
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        build_model(Path(d), args)
        rows = bench(d, args)
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    )
    print(f"machine: {machine}\n")
    print(markdown(rows, args))
    if args.json:
        Path(args.json).write_text(
            json.dumps({"machine": machine, "args": vars(args), "rows": rows}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
