"""The draft-training losses, as pure functions of tensors (no module state; the one random choice,
`masked_positions`, draws from the generator it is given).

Every term is a mean over the rows it is given; the tasks (`specbench.training.eagle`, ...) choose
the rows (masked positions) and the weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["distribution_loss", "feature_loss", "masked_positions", "topk_distill_loss"]


def feature_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SmoothL1 averaged over hidden dims, masked mean over positions (EAGLE: / (mask.sum() + 1e-5))."""
    per = F.smooth_l1_loss(pred.float(), target.float(), reduction="none").mean(-1)
    return (per * mask).sum() / (mask.sum() + 1e-5)


def distribution_loss(head_logits: torch.Tensor, target_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean soft-label cross-entropy  -sum_v p_T(v) log q(v),  top-1 agreement) over rows (N, V)."""
    p_t = torch.softmax(target_logits.float(), -1)
    logq = torch.log_softmax(head_logits.float(), -1)
    ce = -(p_t * logq).sum(-1).mean()
    acc = (head_logits.argmax(-1) == target_logits.argmax(-1)).float().mean()
    return ce, acc


def topk_distill_loss(head_logits: torch.Tensor, target_logits: torch.Tensor, k: int) -> torch.Tensor:
    """HASS's harmonized objective distillation: the mean over rows of  -sum_{v in TopK(p_T)} p_T(v) log q(v),
    the cross-entropy restricted to the target's k likeliest tokens (p_T and q normalised over the whole
    vocabulary, not renormalised over the top k)."""
    p_t = torch.softmax(target_logits.float(), -1)
    logq = torch.log_softmax(head_logits.float(), -1)
    top_p, top_idx = p_t.topk(min(k, p_t.shape[-1]), dim=-1)
    return -(top_p * logq.gather(-1, top_idx)).sum(-1).mean()


def masked_positions(mask: torch.Tensor, fraction: float, generator: torch.Generator | None) -> torch.Tensor:
    """Flat indices of masked positions, a random `fraction` of them (at least one when any)."""
    idx = mask.reshape(-1).nonzero().squeeze(-1)
    if fraction >= 1.0 or idx.numel() == 0:
        return idx
    k = max(1, int(round(idx.numel() * fraction)))
    perm = torch.randperm(idx.numel(), generator=generator, device="cpu")[:k].to(idx.device)
    return idx[perm]
