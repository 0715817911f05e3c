"""The benchmark run: its settings and their checks, the workload sized against the server, warm-up
and the measured load (bench/client.py sends, bench/metrics.py summarizes, bench/report.py writes).
A library: what it has to say while it runs goes to the caller's `Progress`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

DATASETS = ("random", "random-image", "sharegpt", "prompts")
IMAGE_BACKENDS = ("generate", "openai-chat")
BACKEND_CHOICES = ("auto", "generate", "openai", "openai-chat")
SLO_UNITS = {"ms": 1.0, "s": 1000.0, "us": 0.001}
SLO_ALIASES = {"ttft": "ttft", "tpot": "tpot", "e2e": "e2e", "e2el": "e2e"}


@dataclass
class Settings:
    url: str
    backend: str
    model: str | None
    dataset: str
    dataset_path: Path | None
    input_len: int
    output_len: int
    range_ratio: float
    num_prompts: int
    request_rate: float
    max_concurrency: int | None
    warmup: int
    seed: int
    slo_ms: dict[str, float] | None
    timeout: float
    vocab_size: int | None
    ignore_eos: bool
    deployment: str | None
    prompts: list[str] | None  # the dataset file's prompts, read before any request goes out
    image_count: int = 1  # random-image: images per request
    image_size: tuple[int, int] = (336, 336)  # random-image: (width, height)


class BenchInputError(ValueError):
    """Bad command-line input: printed as one line, exit code 2."""


def parse_slo(text: str) -> dict[str, float]:
    """`ttft=200ms,tpot=50ms,e2e=2s` -> {"ttft": 200.0, "tpot": 50.0, "e2e": 2000.0} (milliseconds;
    a bare number is milliseconds)."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|us)?\s*", value)
        name = SLO_ALIASES.get(key.strip().lower())
        if not sep or m is None or name is None:
            raise BenchInputError(
                f"--slo: cannot read {part!r}; expected KEY=VALUE[ms|s] with KEY one of ttft, tpot, e2e "
                "(e.g. --slo ttft=200ms,tpot=50ms)"
            )
        ms = float(m.group(1)) * SLO_UNITS[m.group(2) or "ms"]
        if ms <= 0:
            raise BenchInputError(f"--slo: {name} must be positive")
        out[name] = ms
    if not out:
        raise BenchInputError("--slo is empty")
    return out


def deployment_url() -> tuple[str, str | None]:
    """The running deployment's proxy URL and deployment name, from the launcher's state file."""
    from disaggctl.launch import state

    found = state.proxy_url()
    if not found:
        raise BenchInputError("no running deployment (see `disaggctl status`): start one or pass --url")
    return found


def check_inputs(
    dataset: str, dataset_path: Path | None, backend: str, num_prompts: int, input_len: int, output_len: int,
    request_rate: float, max_concurrency: int | None, warmup: int, timeout: float,
) -> None:  # fmt: skip
    if dataset not in DATASETS:
        raise BenchInputError(f"--dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
    if backend not in BACKEND_CHOICES:
        raise BenchInputError(f"--backend must be one of {', '.join(BACKEND_CHOICES)}, got {backend!r}")
    if dataset in ("sharegpt", "prompts") and dataset_path is None:
        raise BenchInputError(f"--dataset {dataset} needs --dataset-path FILE")
    if dataset not in ("sharegpt", "prompts") and dataset_path is not None:
        raise BenchInputError("--dataset-path goes with --dataset sharegpt or prompts")
    if dataset == "random-image" and backend not in ("auto", *IMAGE_BACKENDS):
        raise BenchInputError(
            f"--dataset random-image needs --backend {' or '.join(IMAGE_BACKENDS)} (or auto)"
        )
    for name, value in (
        ("--num-prompts", num_prompts),
        ("--input-len", input_len),
        ("--output-len", output_len),
    ):
        if value < 1:
            raise BenchInputError(f"{name} must be at least 1, got {value}")
    if math.isnan(request_rate) or request_rate <= 0:
        raise BenchInputError(f"--request-rate must be positive or inf, got {request_rate}")
    if max_concurrency is not None and max_concurrency < 1:
        raise BenchInputError(f"--max-concurrency must be at least 1, got {max_concurrency}")
    if warmup < 0:
        raise BenchInputError(f"--warmup must be 0 or more, got {warmup}")
    if not timeout > 0:
        raise BenchInputError(f"--timeout must be positive, got {timeout}")


class Progress:
    """What a run reports while it goes; the default says nothing (the command line shows it)."""

    def warn(self, message: str) -> None:
        pass

    def warming_up(self, n: int) -> AbstractContextManager:
        return nullcontext()

    def measuring(self, total: int) -> AbstractContextManager[Callable[[object], None]]:
        """A context whose value is called with each finished request's record."""
        return nullcontext(lambda rec: None)


def raise_fd_limit(needed: int) -> None:
    """Each request in flight holds a socket; a low soft limit would fail requests with EMFILE."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < needed:
            resource.setrlimit(
                resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else needed, hard)
            )
    except (ImportError, ValueError, OSError):
        pass


async def make_workload(session, target, s: Settings, progress: Progress):
    """A function (rng, n) -> items for the chosen dataset, after sizing prompts against the server.
    Returns it and the prompt format ("token_ids" or "text")."""
    from disaggctl.bench import client, workload

    if s.prompts is not None:
        prompts = s.prompts

        def from_file(rng, n):
            return workload.file_prompts(rng, prompts, n, s.output_len, s.range_ratio)

        return from_file, "text"
    if s.dataset == "random-image":
        # Text prompts (the image placeholders go in the text), sized against the server without images.
        if target.backend not in IMAGE_BACKENDS:
            raise BenchInputError(
                f"--dataset random-image needs --backend {' or '.join(IMAGE_BACKENDS)}; "
                f"{target.url} was detected as {target.backend}"
            )
        per_word, overhead = await client.measure_tokens_per_word(session, target, list(workload.WORDS))

        def with_images(rng, n):
            items = workload.random_text(rng, n, s.input_len, s.output_len, s.range_ratio, per_word, overhead)
            return workload.add_images(rng, items, s.image_count, *s.image_size)

        return with_images, "text"
    if target.backend == "generate":
        vocab = s.vocab_size or await client.server_vocab_size(session, target.url)
        if vocab:

            def ids(rng, n):
                return workload.random_ids(rng, n, s.input_len, s.output_len, s.range_ratio, vocab)

            return ids, "token_ids"
        progress.warn(
            "the server reports no vocab_size (/server_info, /v1/models) and no "
            "--vocab-size was given: sending text prompts sized by measurement"
        )
    per_word, overhead = await client.measure_tokens_per_word(session, target, list(workload.WORDS))

    def text(rng, n):
        return workload.random_text(rng, n, s.input_len, s.output_len, s.range_ratio, per_word, overhead)

    return text, "text"


async def measure(s: Settings, progress: Progress | None = None):
    """Probe the server, build the workload, warm up, run. Returns (records, duration, last send
    offset, arrivals, context)."""
    import datetime
    import random
    import socket

    from disaggctl import __version__
    from disaggctl.bench import client, workload

    raise_fd_limit(s.num_prompts + s.warmup + 64)
    url = client.base_url(s.url)
    async with client.new_session(s.timeout) as session:
        await client.check_ready(session, url)
        backend = s.backend if s.backend != "auto" else await client.detect_backend(session, url)
        model = s.model
        if backend != "generate" and model is None:
            model = await client.served_model(session, url)
            if model is None:
                raise BenchInputError(f"{url}/v1/models names no model: pass --model")
        target = client.Target(url=url, backend=backend, model=model, ignore_eos=s.ignore_eos)
        make, prompt_format = await make_workload(session, target, s, progress)
        items = make(random.Random(s.seed), s.num_prompts)
        arrivals = workload.arrival_times(random.Random(s.seed + 1), s.num_prompts, s.request_rate)

        if s.warmup:
            warm = make(random.Random(s.seed + 2), s.warmup)
            with progress.warming_up(s.warmup):
                warm_records, _, _ = await client.run_load(
                    session, target, warm, [0.0] * len(warm), s.max_concurrency
                )
            bad = [r for r in warm_records if not r.ok]
            if bad:
                progress.warn(f"{len(bad)} warm-up request(s) failed: {bad[0].error}")

        with progress.measuring(len(items)) as done:
            records, duration, last_send = await client.run_load(
                session, target, items, arrivals, s.max_concurrency, done
            )

    context = {
        "url": url,
        "deployment": s.deployment,
        "backend": backend,
        "model": model,
        "dataset": s.dataset,
        "dataset_path": str(s.dataset_path) if s.dataset_path else None,
        "prompt_format": prompt_format,
        "input_len": s.input_len if s.dataset.startswith("random") else None,
        "image_count": s.image_count if s.dataset == "random-image" else None,
        "image_size": "{}x{}".format(*s.image_size) if s.dataset == "random-image" else None,
        "output_len": s.output_len,
        "range_ratio": s.range_ratio,
        "num_prompts": s.num_prompts,
        "request_rate": s.request_rate if math.isfinite(s.request_rate) else "inf",
        "max_concurrency": s.max_concurrency,
        "warmup": s.warmup,
        "seed": s.seed,
        "ignore_eos": s.ignore_eos,
        "temperature": target.temperature,
        "timeout_s": s.timeout,
        "slo": s.slo_ms,
        "achieved_send_rate": (len(items) - 1) / last_send if len(items) > 1 and last_send > 0 else None,
        "client_host": socket.gethostname(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "disaggctl_version": __version__,
    }
    return records, duration, last_send, arrivals, context


def rate_warning(s: Settings, arrivals: list[float], last_send: float) -> str | None:
    """Warn when requests went out slower than the Poisson schedule asked (the concurrency cap or the
    client held them back): the offered load was then lower than --request-rate."""
    if not math.isfinite(s.request_rate) or len(arrivals) < 2 or arrivals[-1] <= 0:
        return None
    scheduled = (len(arrivals) - 1) / arrivals[-1]
    achieved = (len(arrivals) - 1) / last_send if last_send > 0 else math.inf
    if achieved < 0.9 * scheduled:
        why = "--max-concurrency held requests back" if s.max_concurrency else "the client could not keep up"
        return (
            f"requests went out at {achieved:.2f} req/s, below the requested "
            f"{s.request_rate:g} req/s (this run's schedule: {scheduled:.2f} req/s): {why}"
        )
    return None
