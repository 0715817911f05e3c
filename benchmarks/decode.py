"""Decode throughput of the embedded engine vs `transformers` generate, same weights, same run.

    python benchmarks/decode.py --device cpu --model builtin:tiny --batch 1,32,128
    python benchmarks/decode.py --device cuda --model qwen2.5-0.5b-shape --batch 1,32,128 --json out.json

`--model`: `builtin:tiny`, `qwen2.5-0.5b-shape` (random weights in the Qwen2.5-0.5B shape, built with
transformers: hidden 896, 24 layers, 14 heads / 2 KV heads, MLP 4864, vocab 151936, tied) or a local model
directory. Decode tok/s for both sides = batch * (new_tokens - 1) / (time of the whole generation minus the
time to the first token), so prefill is left out the same way on both sides. After one full-length
warm-up, each side runs `--repeats` times per batch size (the two alternating, so drift hits both alike)
and the median is reported, with every run's number in the JSON.
`--profile DIR` also writes a torch profiler table and a cProfile listing of one engine run at the
largest batch, to see whether a step waits on the host or on the device.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import platform
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

QWEN25_05B_SHAPE = dict(
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)


def build_shape_model(out: Path, dtype: torch.dtype) -> None:
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    cfg = Qwen2Config(**QWEN25_05B_SHAPE)
    model = AutoModelForCausalLM.from_config(cfg).to(dtype)
    model.save_pretrained(out)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def engine_run(engine, prompts, new_tokens: int) -> tuple[float, float, list[list[int]]]:
    """(seconds to every request's first token, seconds to the end, generated ids), stepping on this thread."""
    from disaggctl.runtime.engine import Request
    from disaggctl.runtime.sampling import SamplingParams

    firsts: dict[str, float] = {}
    outputs: dict[str, list[int]] = {}
    done: set[str] = set()
    errors: list[str] = []

    # the engine swallows exceptions raised by callbacks, so failures are collected and raised below
    def on_event(ev):
        if ev.error:
            errors.append(f"request {ev.rid} failed: {ev.error}")
            done.add(ev.rid)
            return
        firsts.setdefault(ev.rid, time.perf_counter())
        outputs.setdefault(ev.rid, []).extend(ev.token_ids)
        if ev.finished:
            done.add(ev.rid)

    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    _sync(engine.device)
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(Request(f"b{i}", p, params, on_event=on_event))
    while len(done) < len(prompts):
        if not engine.step():
            raise RuntimeError("the engine went idle before every request finished")
    # sampling reads the tokens back to the host every step, so the clock already waits for the device
    end = time.perf_counter()
    if errors:
        raise RuntimeError(errors[0])
    return max(firsts.values()) - t0, end - t0, [outputs[f"b{i}"] for i in range(len(prompts))]


def hf_run(model, prompts, new_tokens: int) -> tuple[float, list[list[int]]]:
    ids = torch.tensor(prompts, device=model.device)
    _sync(str(ids.device))
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    _sync(str(ids.device))
    elapsed = time.perf_counter() - t0
    new = out[:, ids.shape[1] :].tolist()
    if any(len(row) != new_tokens for row in new):
        raise RuntimeError(f"transformers generated {len(new[0])} tokens, not {new_tokens}")
    return elapsed, new


def machine(device: str) -> dict:
    import transformers

    info = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_threads": torch.get_num_threads(),
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def profile_engine(engine, prompts, new_tokens: int, out_dir: Path) -> None:
    """Profile the decode steps of one run (the prefill step runs first, outside the profilers)."""
    from torch.profiler import ProfilerActivity, profile

    from disaggctl.runtime.engine import Request
    from disaggctl.runtime.sampling import SamplingParams

    def start() -> None:
        params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        for i, p in enumerate(prompts):
            engine.add_request(Request(f"p{i}", p, params))
        engine.step()

    def decode() -> int:
        steps = 0
        while engine.step():
            steps += 1
        return steps

    out_dir.mkdir(parents=True, exist_ok=True)
    activities = [ProfilerActivity.CPU]
    if engine.device.startswith("cuda"):
        activities.append(ProfilerActivity.CUDA)
    start()
    with profile(activities=activities, record_shapes=True) as prof:
        decode()
    sort = "cuda_time_total" if len(activities) > 1 else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=40)
    # copies hide behind views and strided inputs; their shapes say which tensor pays for one
    copies = [
        f"{e.count:6d}  {e.key}  {e.input_shapes}"
        for e in prof.key_averages(group_by_input_shape=True)
        if e.key in ("aten::clone", "aten::contiguous", "aten::copy_", "aten::_to_copy")
    ]
    (out_dir / "profile_torch.txt").write_text(table + "\n\n" + "\n".join(copies) + "\n", encoding="utf-8")
    start()
    pr = cProfile.Profile()
    began = time.perf_counter()
    pr.enable()
    steps = decode()
    pr.disable()
    took = time.perf_counter() - began
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("cumulative").print_stats(45)
    head = f"batch {len(prompts)}: {steps} decode steps in {took:.3f} s under cProfile\n"
    (out_dir / "profile_py.txt").write_text(head + buf.getvalue(), encoding="utf-8")


def bench(args) -> tuple[list[dict], dict]:
    from transformers import AutoModelForCausalLM

    from disaggctl.runtime.config import EngineConfig
    from disaggctl.runtime.engine import Engine

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: CUDA is not available on this machine")
    dtype = {"auto": torch.bfloat16 if device == "cuda" else torch.float32}.get(args.dtype) or getattr(
        torch, args.dtype
    )
    tmp = tempfile.TemporaryDirectory(prefix="disaggctl-bench-")
    if args.model == "qwen2.5-0.5b-shape":
        path = Path(tmp.name)
        build_shape_model(path, dtype)
    elif args.model.startswith("builtin:"):
        from disaggctl.runtime.builtin import resolve_model

        path = Path(resolve_model(args.model))
    else:
        path = Path(args.model)
    batches = [int(b) for b in args.batch.split(",")]
    dtype_name = str(dtype).removeprefix("torch.")
    max_len = args.prompt_len + args.new_tokens + 1
    page_size = 16
    engine = Engine(
        EngineConfig(
            model=str(path),
            device=device,
            dtype=dtype_name,
            page_size=page_size,
            # sized for the largest batch: the default would take most of the GPU before transformers loads
            max_pages=max(batches) * -(-max_len // page_size) + 1,
            max_batch=max(batches),
            chunk_size=max(args.prompt_len * max(batches), 512),
            max_model_len=max_len,
            cuda_graph=args.cuda_graph,
            overlap_schedule=None if args.overlap else False,
        )
    )
    graphs = engine.runner.graphs
    capture_s = round(graphs.capture_s, 3) if graphs is not None else None
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    vocab = engine.model_config.vocab_size
    g = torch.Generator().manual_seed(0)
    rows = []
    for batch in batches:
        prompts = torch.randint(0, vocab, (batch, args.prompt_len), generator=g).tolist()
        # a full-length warm-up on both sides: every step's shapes (batch, context length) are new the
        # first time, and a first pass pays for kernel selection and allocator growth at each of them
        engine_run(engine, prompts, args.new_tokens)
        hf_run(hf, prompts, args.new_tokens)
        ours, theirs, ttfts, hf_ttfts = [], [], [], []
        decoded = batch * (args.new_tokens - 1)
        for _ in range(args.repeats):
            ttft, total, engine_ids = engine_run(engine, prompts, args.new_tokens)
            ours.append(decoded / (total - ttft))
            ttfts.append(ttft)
            hf_first, _ = hf_run(hf, prompts, 1)
            hf_total, hf_ids = hf_run(hf, prompts, args.new_tokens)
            theirs.append(decoded / max(hf_total - hf_first, 1e-9))
            hf_ttfts.append(hf_first)
        same = sum(a == b for a, b in zip(engine_ids, hf_ids, strict=True))
        prefix = [
            next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
            for a, b in zip(engine_ids, hf_ids, strict=True)
        ]
        ours_med, theirs_med = statistics.median(ours), statistics.median(theirs)
        rows.append(
            {
                "model": args.model,
                "device": device if device == "cpu" else torch.cuda.get_device_name(),
                "dtype": dtype_name,
                "batch": batch,
                "prompt_len": args.prompt_len,
                "new_tokens": args.new_tokens,
                "repeats": args.repeats,
                "cuda_graphs": graphs is not None,
                "overlap_schedule": engine.overlap,
                "graph_capture_s": capture_s,
                "engine_tok_s": round(ours_med, 1),
                "transformers_tok_s": round(theirs_med, 1),
                "speedup": round(ours_med / theirs_med, 2),
                "engine_tok_s_all": [round(x, 1) for x in ours],
                "transformers_tok_s_all": [round(x, 1) for x in theirs],
                "engine_ttft_s": round(statistics.median(ttfts), 4),
                "transformers_ttft_s": round(statistics.median(hf_ttfts), 4),
                # greedy on both sides: identical outputs show the two really ran the same weights
                "identical_outputs": f"{same}/{batch}",
                "mean_common_prefix": round(statistics.mean(prefix), 1),
            }
        )
        print(_row(rows[-1]), file=sys.stderr, flush=True)
    if args.profile:
        prompts = torch.randint(0, vocab, (max(batches), args.prompt_len), generator=g).tolist()
        profile_engine(engine, prompts, min(args.new_tokens, 16), Path(args.profile))
    engine.stop()
    tmp.cleanup()
    return rows, machine(device)


def _row(r: dict) -> str:
    return (
        f"| {r['model']} | {r['device']} | {r['dtype']} | {r['batch']} | {r['engine_tok_s']} | "
        f"{r['transformers_tok_s']} | {r['speedup']}x | {r['identical_outputs']} |"
    )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    ap.add_argument("--model", default="builtin:tiny")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    ap.add_argument("--batch", default="1,32,128", help="comma-separated batch sizes")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per side and batch; the median counts")
    ap.add_argument(
        "--no-cuda-graph", dest="cuda_graph", action="store_false", help="decode eagerly (CUDA only)"
    )
    ap.add_argument(
        "--no-overlap",
        dest="overlap",
        action="store_false",
        help="read each step's tokens back before queueing the next (the overlap is on by default on CUDA)",
    )
    ap.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    ap.add_argument("--profile", metavar="DIR", help="also profile one engine run at the largest batch")
    args = ap.parse_args(argv)
    if args.new_tokens < 2:
        ap.error("--new-tokens must be >= 2 (decode speed is measured after the first token)")
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    try:
        rows, info = bench(args)
    except Exception as e:  # a clear line, not a traceback, for a bad model path or an OOM
        sys.exit(f"benchmark failed: {type(e).__name__}: {e}")
    print(
        "| model | device | dtype | batch | engine tok/s | transformers tok/s | speedup | identical outputs |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(_row(r))
    print(json.dumps(info))
    if args.json:
        doc = {"machine": info, "rows": rows}
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
