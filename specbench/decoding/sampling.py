"""Sampling settings and the logits -> probabilities transform shared by target and drafts.

Losslessness at T > 0 is defined against the target distribution *after* temperature,
top-k and top-p, so every drafter that reports a draft distribution q must build it with
the same `probs` function.  Everything here is device-agnostic torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..errors import UsageError


@dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 means greedy (argmax of the raw logits); top_k 0 and top_p 1 disable them."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise UsageError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise UsageError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def warp_logits(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Temperature, then top-k, then top-p (the order transformers uses), over the last dim."""
    if cfg.greedy:
        raise ValueError("warp_logits is for T > 0; greedy decoding uses argmax of raw logits")
    logits = logits.float() / cfg.temperature
    if cfg.top_k and cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cum <= 1 - cfg.top_p
        drop_sorted[..., -1] = False  # always keep the most likely token
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def probs(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Sampling distribution (float32) for T > 0."""
    return warp_logits(logits, cfg).softmax(dim=-1)


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    g = torch.Generator(device=torch.device(device))
    g.manual_seed(seed)
    return g


def sample(p: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row of `p` (..., V) -> (...) long."""
    flat = p.reshape(-1, p.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).reshape(p.shape[:-1])
