"""Choosing the next token: greedy, or temperature / top-k / top-p with a per-request generator.

Stop *strings* are the server's business (it detokenizes and calls `engine.abort`); here only token ids.
The logprob reported is that of the chosen token under the model's own (unscaled) distribution.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_new_tokens: int | None = 16  # None: until the model's context is full
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = -1  # -1: off
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def validate(self) -> str | None:
        """Why these parameters are unusable, or None."""
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            return f"max_new_tokens must be >= 1, got {self.max_new_tokens}"
        if not self.temperature >= 0:
            return f"temperature must be >= 0, got {self.temperature}"
        if not 0 < self.top_p <= 1:
            return f"top_p must be in (0, 1], got {self.top_p}"
        if self.top_k == 0 or self.top_k < -1:
            return f"top_k must be -1 or >= 1, got {self.top_k}"
        return None

    @property
    def greedy(self) -> bool:
        # Below 1e-5 (vLLM's bound; SGLang's is 1e-6) the distribution is practically one-hot, and dividing the
        # logits by a far tinier temperature overflows them to inf: NaN probabilities, an engine error.
        return self.temperature < 1e-5 or self.top_k == 1


def make_generator(seed: int, device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def _filtered_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    logits = logits / p.temperature
    if p.top_k > 0 and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= p.top_p
        drop[0] = False  # also when top_p rounds to 0 in the logits' dtype (5e-324 does in float32)
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return probs


def sample_on_device(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next token and its logprob for each row of fp32 `logits` [B, vocab], as tensors where the logits
    are: nothing waits for the device, so the next step can be queued before these are read."""
    tokens = torch.argmax(logits, dim=-1)
    for i, p in enumerate(params):
        if not p.greedy:
            probs = _filtered_probs(logits[i], p)
            tokens[i] = torch.multinomial(probs, 1, generator=generators[i])[0]
    # log_softmax at the chosen token only: one pass over the logits instead of writing a second copy
    chosen = logits.gather(1, tokens[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)
    return tokens, chosen

