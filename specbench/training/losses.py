"""The draft-training losses, as pure functions of tensors (no module state; the one random choice,
`masked_positions`, draws from the generator it is given).

Every term is a mean over the rows it is given; the tasks (`specbench.training.eagle`, ...) choose
the rows (masked positions) and the weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["TVDPP_STATS", "distribution_loss", "feature_loss", "kld_loss", "masked_positions", "topk_distill_loss",
           "tvd", "tvd_loss", "tvdpp_loss"]


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


# ---------------------------------------------------------------- distillation objectives of a draft LM (TVD++)
#
# For one position, p = the target's distribution, q = q_theta the draft's (over the same ids).
#
# KLD: forward KL(p || q) = sum_v p log p - sum_v p log q; its gradient is -sum_v p(v) grad log q(v) (the
#   soft-label cross-entropy's; the constant entropy of p is left out of the value).
#
# TVD(p, q) = 1/2 sum_v |p(v) - q(v)|. With grad q = q grad log q and sum_v grad q(v) = grad 1 = 0:
#   grad TVD = 1/2 sum_v sign(q - p) grad q = 1/2 sum_v (1 - 2 r(v)) grad q(v)      (r(v) = 1[p(v) > q(v)])
#            = - sum_v r(v) grad q(v) = - E_{v~q}[ r(v) grad log q(v) ],
#   a policy gradient with reward r (where p = q exactly, sign is 0 and 1 - 2r is 1: a set of measure zero).
#   `tvd_loss` is its exact-expectation surrogate  - sum_v sg(q(v)) r(v) log q(v)  (sg: no gradient), whose
#   gradient is grad TVD (its value is not TVD: `tvd` gives that, for logging).
#
# TVD++ replaces the reward by a normalised advantage A = (r - mu) / (sigma + eps), as policy-gradient
#   methods do to reduce variance:  - sum_v sg(q(v)) A(v) log q(v).  The paper's definition of mu and sigma
#   was not available; `stats` chooses them, both as moments of r under q (the distribution the policy
#   gradient's expectation is taken over):
#   * "position": per position, mu = sum_v q r (the draft's mass where it under-covers p) and
#     sigma^2 = sum_v q (r - mu)^2 = mu (1 - mu) (r is 0/1). The baseline then adds nothing to the gradient
#     (sum_v q grad log q = 0): TVD++ is TVD's gradient scaled by 1 / (sigma_t + eps) at each position, which
#     weights most the positions where q's mass is split between over- and under-covered tokens;
#   * "batch": one mu and sigma over all masked positions of the batch (q-weighted, each position counting
#     once): a single scale of TVD's gradient per batch plus a baseline that, again, adds nothing in
#     expectation.
#   With exact expectations over the vocabulary the baseline is variance-free, so what TVD++ changes is the
#   scale: that is what these tests check and what the study measures.
#
# A reduced draft vocabulary S (`support`: the ids the draft scores, its logits (..., |S|)): q is a
#   distribution over S, exactly 0 elsewhere, while p stays the target's over the full vocabulary, restricted
#   to S without renormalising (p(v) = softmax(full logits)[v]). Then, exactly:
#   * TVD(p, q) = 1/2 (sum_S |p - q| + (1 - sum_S p)): the mass p puts outside S is always missed;
#   * its gradient: q is constant (0) outside S and sum_S grad q = 0 still, so the derivation above holds
#     with every sum over S: the surrogates are unchanged with r = 1[p > q] on S;
#   * KL(p || q) is infinite when p has mass outside S; `kld_loss` is then the cross-entropy over S,
#     -sum_S p log q, whose minimiser is q = p / p(S) on S (KL(p_S / p(S) || q) scaled by p(S)).
#   p on S needs the normaliser of all the target's logits, not only S's: given `target_lse` (the logsumexp of
#   the full vocabulary's logits, cached with the features), `target_logits` are S's logits alone and
#   p = exp(target_logits - target_lse), the same numbers as softmax(full logits) at S's ids.

TVDPP_STATS = ("position", "batch")


def _masked_mean(per: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (per * mask).sum() / (mask.sum() + 1e-5)


def _target_probs(target_logits: torch.Tensor, support: torch.Tensor | None,
                  target_lse: torch.Tensor | None = None) -> torch.Tensor:
    """p over the full vocabulary, then (with a support) its entries at the support's ids, not renormalised; with
    `target_lse`, `target_logits` are already the support's and p = exp(target_logits - target_lse)."""
    if target_lse is not None:
        return torch.exp(target_logits.float() - target_lse.float()[..., None])
    p = torch.softmax(target_logits.float(), -1)
    return p if support is None else p.index_select(-1, support)


def kld_loss(draft_logits: torch.Tensor, target_logits: torch.Tensor, mask: torch.Tensor,
             support: torch.Tensor | None = None, target_lse: torch.Tensor | None = None) -> torch.Tensor:
    """Forward KL(p || q) up to p's entropy (the soft-label cross-entropy), masked mean over positions (..., V);
    with a `support` the draft's logits are over its ids and the sum runs over them (see above; `target_lse`
    too)."""
    p = _target_probs(target_logits, support, target_lse)
    return _masked_mean(-(p * torch.log_softmax(draft_logits.float(), -1)).sum(-1), mask)


def _reward(draft_logits: torch.Tensor, target_logits: torch.Tensor, support: torch.Tensor | None,
            target_lse: torch.Tensor | None = None):
    logq = torch.log_softmax(draft_logits.float(), -1)
    q = logq.exp()
    p = _target_probs(target_logits, support, target_lse)
    return p, q, logq, (p > q.detach()).float()


def tvd(draft_logits: torch.Tensor, target_logits: torch.Tensor, mask: torch.Tensor,
        support: torch.Tensor | None = None, target_lse: torch.Tensor | None = None) -> torch.Tensor:
    """TVD(p, q) = 1/2 sum_v |p - q|, masked mean over positions (differentiable, the reference of the tests);
    with a `support`, q is 0 outside it and p's mass there counts in full."""
    p, q, _, _ = _reward(draft_logits, target_logits, support, target_lse)
    per = 0.5 * (p - q).abs().sum(-1)
    if support is not None:
        per = per + 0.5 * (1.0 - p.sum(-1))
    return _masked_mean(per, mask)


def tvd_loss(draft_logits: torch.Tensor, target_logits: torch.Tensor, mask: torch.Tensor,
             support: torch.Tensor | None = None, target_lse: torch.Tensor | None = None) -> torch.Tensor:
    """The policy-gradient surrogate of TVD (see above): its gradient is TVD's; masked mean over positions."""
    _, q, logq, r = _reward(draft_logits, target_logits, support, target_lse)
    return _masked_mean(-(q.detach() * r * logq).sum(-1), mask)


def tvdpp_loss(draft_logits: torch.Tensor, target_logits: torch.Tensor, mask: torch.Tensor,
               stats: str = "position", eps: float = 1e-5, support: torch.Tensor | None = None,
               target_lse: torch.Tensor | None = None) -> torch.Tensor:
    """TVD++: the surrogate with the normalised advantage (r - mu) / (sigma + eps), mu and sigma by `stats`."""
    if stats not in TVDPP_STATS:
        raise ValueError(f"unknown TVD++ statistics {stats!r}; known: {', '.join(TVDPP_STATS)}")
    _, q, logq, r = _reward(draft_logits, target_logits, support, target_lse)
    qd = q.detach()
    if stats == "position":
        mu = (qd * r).sum(-1, keepdim=True)
        var = (qd * (r - mu) ** 2).sum(-1, keepdim=True)
    else:
        w = mask.float()[..., None] * qd  # each masked position's q sums to one
        n = mask.float().sum() + 1e-5
        mu = (w * r).sum() / n
        var = (w * (r - mu) ** 2).sum() / n
    adv = (r - mu) / (var.sqrt() + eps)
    return _masked_mean(-(qd * adv * logq).sum(-1), mask)
