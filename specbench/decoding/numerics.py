"""How far two computations of the same logits may disagree, and when a greedy divergence is a tie.

A tree forward, a cached one-token forward and an uncached forward reduce in different orders, so
the same logit comes out slightly different, by an amount that scales with the dtype's epsilon and
the logits' magnitude. Greedy decoding is lossless up to that: where the top-2 logits lie closer
than two such errors, either token is a correct argmax, and the outputs may part there.

The bound is ``ULPS[dtype] * eps(dtype) * max|logit|``. The multipliers are measured, with headroom:
forward_tree vs uncached forwards over trees of 9 nodes reached at most 9.5 eps*scale in float32
on the tiny test Llama and 24.6 on SmolLM2-135M; in bfloat16 2.1 and 3.4, in float16 3.1 and 3.5
(CPU). float32 sits higher in eps units because its error is the sum of many rounding steps of
long reductions, while in half precision matmuls accumulate in float32 and the error is mostly the
rounding of each stored activation and of the logits themselves.
"""

from __future__ import annotations

import torch

ULPS = {torch.float32: 64.0, torch.float64: 64.0, torch.bfloat16: 8.0, torch.float16: 8.0}


def logit_tolerance(dtype: torch.dtype, logits: torch.Tensor) -> float:
    """Largest difference expected between two computations of `logits` (one row) in `dtype`."""
    if dtype not in ULPS:
        raise ValueError(f"no logit tolerance for dtype {dtype}")
    return ULPS[dtype] * torch.finfo(dtype).eps * float(logits.detach().abs().max())


def classify_divergence(logits: torch.Tensor, dtype: torch.dtype) -> dict[str, float | bool]:
    """The target's next-token logits (one row) where two greedy outputs part: their top-2 gap, the
    tie tolerance (two logits each off by up to `logit_tolerance` can swap order within twice it), and
    whether the divergence is a numerical tie (gap within the tolerance) or a losslessness bug."""
    top2 = logits.detach().float().topk(2).values
    gap = float(top2[0] - top2[1])
    tolerance = 2.0 * logit_tolerance(dtype, logits)
    return {"top2_logit_gap": gap, "tie_tolerance": tolerance, "numerical_tie": gap <= tolerance}
