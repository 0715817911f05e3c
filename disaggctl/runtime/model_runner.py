"""One rank of a server: its shard of the model, its KV pool, the forward pass and (on rank 0) sampling.

The engine (rank 0) decides what runs; a `StepBatch` says it in plain lists, so that rank 0 can hand the
same batch to the other ranks (`tp_worker.py`) and every rank runs the same forward pass over its heads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from disaggctl.runtime.attention import SeqSlice, build_meta
from disaggctl.runtime.config import ConfigError, EngineConfig, ModelConfig
from disaggctl.runtime.kv_cache import KVCache, pool_shape
from disaggctl.runtime.loader import load_model
from disaggctl.runtime.parallel import TensorParallel

log = logging.getLogger("disaggctl.runtime.model_runner")

CPU_KV_BYTES_CAP = 4 << 30  # the CPU pool is sized for the batch, capped here, unless max_pages says


@dataclass
class StepBatch:
    """One forward pass: every scheduled token back to back, each sequence's slice, and the rows that
    sample. Plain Python values: it crosses to the other ranks pickled."""

    input_ids: list[int]
    positions: list[int]
    slices: list[tuple[int, int, list[int]]]  # (q_len, kv_len, pages) per sequence
    logit_rows: list[int]
    embed_rows: list[int] | None = None  # rows whose input is an embedding (image tokens), not a token's
    embeds: torch.Tensor | None = None  # [len(embed_rows), hidden]


@dataclass
class LateTokens:
    """Input rows whose token is still on the device: `tokens[sources[i]]` is the input of row `rows[i]`.
    The host queues a step before reading the previous step's samples (the engine's overlap), so these
    ids go from that step's output to this step's input without a round trip through the host."""

    rows: list[int]
    sources: list[int]
    tokens: torch.Tensor  # the previous step's sampled ids, on the device

    @property
    def in_order(self) -> bool:
        """Steady decode: row i takes the previous step's i-th sample, for the first rows."""
        return self.rows == self.sources == list(range(len(self.rows)))

    def fill(self, input_ids: torch.Tensor) -> None:
        n = len(self.rows)
        if self.in_order:
            input_ids[:n].copy_(self.tokens[:n])
            return
        index = torch.tensor([self.rows, self.sources], device=input_ids.device)
        input_ids[index[0]] = self.tokens[index[1]]


@dataclass
class TransferSettings:
    """How a rank's Mooncake agent is made (prefill and decode servers only)."""

    hostname: str
    protocol: str
    ib_device: str | None
    timeout_s: float


class ModelRunner:
    def __init__(
        self,
        config: EngineConfig,
        model_config: ModelConfig,
        device: str,
        dtype: torch.dtype,
        max_len: int,
        tp: TensorParallel | None = None,
        num_pages: int | None = None,
    ):
        self.config = config
        self.model_config = mc = model_config
        self.device = device
        self.dtype = dtype
        self.tp = tp or TensorParallel()
        self.model = load_model(config.model, dtype, device, mc, self.tp)
        on_cuda = device.startswith("cuda")
        # the paged Triton kernel for decode rows on CUDA; the torch reference elsewhere
        self.paged_decode = on_cuda and _have_triton()
        self.use_graphs = config.cuda_graph and self.paged_decode and self.model.cuda_graphs
        shape = pool_shape(mc, self.tp)
        pages = num_pages or config.max_pages or self._default_pages(max_len, shape)
        self.kv_cache = KVCache.of_shape(
            shape, mc.num_layers, pages, config.page_size, dtype, device, scratch=self.use_graphs
        )
        self.scale = mc.head_dim**-0.5
        self.max_len = max_len
        self.graphs = None
        self.agent = None
        if config.cuda_graph and on_cuda and not self.use_graphs:
            why = "Triton is not installed" if not self.paged_decode else "this model's step cannot be a graph"
            log.info("decode steps run eagerly: %s", why)

    def capture_graphs(self, sample_rows: bool = True) -> None:
        """Capture the decode CUDA graphs (after the process group is up: TP ranks capture together)."""
        if not self.use_graphs:
            return
        from disaggctl.runtime.cuda_graph import DecodeGraphs

        self.graphs = DecodeGraphs(
            self.model, self.kv_cache, self.scale, self.config.max_batch, self.max_len, sample_rows
        )
        self.graphs.capture()

    def _default_pages(self, max_len: int, shape) -> int:
        config, mc = self.config, self.model_config
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        per_page = KVCache.page_bytes_all_layers(
            mc.num_layers, config.page_size, shape.num_heads, shape.head_dim, itemsize, shape.parts
        )
        if self.device.startswith("cuda"):
            free, _total = torch.cuda.mem_get_info(torch.device(self.device))
            # leave room for activations of a full chunk and the logits of a full batch
            headroom = 4 * config.chunk_size * mc.hidden_size * 16 + config.max_batch * mc.vocab_size * 8
            budget = int(max(free - headroom, 0) * config.memory_fraction)
        else:
            import psutil

            budget = min(int(psutil.virtual_memory().available * 0.25), CPU_KV_BYTES_CAP)
            want = config.max_batch * (-(-max_len // config.page_size)) + 1
            budget = min(budget, want * per_page)
        pages = budget // per_page
        if pages < -(-max_len // config.page_size):
            raise ConfigError(
                f"not enough memory for a KV pool holding one {max_len}-token request "
                f"({pages} pages of {per_page} bytes fit); lower max_model_len or set max_pages"
            )
        return int(pages)

    def forward(
        self, batch: StepBatch, sample_rows: bool = True, late: LateTokens | None = None
    ) -> torch.Tensor | None:
        """Run one step: the KV of every token goes to this rank's pool; logits of `logit_rows` come back
        (fp32) when `sample_rows`, else None (ranks that do not sample skip the LM head). `late`: input
        rows whose token the previous step sampled and the host has not read yet."""
        dev = self.device
        # a step with image embeddings runs eagerly: the graphs capture token embeddings only
        if (
            self.graphs is not None
            and not batch.embed_rows
            and self.graphs.fits(batch.slices, batch.logit_rows)
        ):
            return self.graphs.replay(batch.input_ids, batch.positions, batch.slices, late)
        slices = [SeqSlice(q_len=q, kv_len=kv, pages=pages) for q, kv, pages in batch.slices]
        meta = build_meta(
            slices,
            self.kv_cache.page_size,
            self.scale,
            dev,
            paged_decode=self.paged_decode,
            page_rows=self.kv_cache.page_rows,
        )
        rows = torch.tensor(batch.logit_rows, device=dev) if sample_rows else None
        extra = {}
        if batch.embed_rows:
            extra["embeds"] = (torch.tensor(batch.embed_rows, device=dev), batch.embeds.to(dev))
        input_ids = torch.tensor(batch.input_ids, device=dev)
        if late is not None:
            late.fill(input_ids)
        return self.model(
            input_ids,
            torch.tensor(batch.positions, device=dev),
            self.kv_cache,
            meta,
            rows,
            **extra,
        )

    # -- transfer ---------------------------------------------------------------------------------------

    def attach_agent(self, settings: TransferSettings) -> None:
        """A Mooncake agent with this rank's pool registered (blocks; Mooncake busy-waits)."""
        from disaggctl.runtime.transfer_hooks import cuda_agent_hooks
        from disaggctl.transfer.mooncake import MooncakeAgent

        agent = MooncakeAgent(
            hostname=settings.hostname,
            protocol=settings.protocol,
            ib_device=settings.ib_device or None,
            timeout_s=settings.timeout_s,
            **cuda_agent_hooks(self.device),
        )
        pool = self.kv_cache.tensor
        try:
            agent.register(pool.data_ptr(), pool.numel() * pool.element_size())
        except BaseException:
            agent.close()
            raise
        self.agent = agent

    def pool(self) -> dict:
        """This rank's KV pool as a peer addresses it (`transfer.kv_layout.RankPool.to_dict`)."""
        from disaggctl.transfer.kv_layout import RankPool

        return RankPool(
            session_id=self.agent.session_id if self.agent is not None else "",
            layout=self.kv_cache.layout(),
            head_start=self.kv_cache.head_start,
            num_heads=self.kv_cache.num_kv_heads,
            head_bytes=self.kv_cache.head_bytes,
        ).to_dict()

    def write(self, session_id: str, srcs: list[int], dsts: list[int], lens: list[int]) -> None:
        """One batched write from this rank's pool into a peer's (blocks until done; TransferError)."""
        self.agent.write(session_id, srcs, dsts, lens)

    def close(self) -> None:
        self.graphs = None
        if self.agent is not None:
            self.agent.close()
            self.agent = None


def _have_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
