"""Prompt lookup decoding (Saxena 2023): draft the continuation of an earlier n-gram match.

Same semantics as transformers' `prompt_lookup_num_tokens`: try n-gram sizes from
`max_ngram_size` down to 1, take the earliest earlier occurrence of the sequence's last
n tokens that has a continuation, and propose up to `num_pred_tokens` tokens of it.
"""

from __future__ import annotations

import torch

from ..decoding.tree import Proposal
from ..errors import UsageError
from .base import DrafterBase, Method


def lookup(tokens: torch.Tensor, max_ngram_size: int, num_pred_tokens: int) -> list[int]:
    length = tokens.shape[0]
    for n in range(min(max_ngram_size, length - 1), 0, -1):
        windows = tokens.unfold(0, n, 1)
        starts = (windows == tokens[-n:]).all(dim=1).nonzero().flatten() + n
        starts = starts[starts < length]
        if starts.numel():
            s = int(starts[0])
            return tokens[s:s + num_pred_tokens].tolist()
    return []


class PLDDrafter(DrafterBase):
    def __init__(self, max_ngram_size: int, num_pred_tokens: int):
        self.max_ngram_size = max_ngram_size
        self.num_pred_tokens = num_pred_tokens

    def propose(self, tokens: list[int]) -> Proposal:
        return Proposal.chain(lookup(torch.tensor(tokens), self.max_ngram_size, self.num_pred_tokens))


def _drafter(target, sampling, generator, max_ngram_size: int, num_pred_tokens: int) -> PLDDrafter:
    if max_ngram_size < 1 or num_pred_tokens < 1:
        raise UsageError("pld needs max_ngram_size >= 1 and num_pred_tokens >= 1")
    return PLDDrafter(max_ngram_size, num_pred_tokens)


METHOD = Method("pld", "prompt lookup decoding (n-gram match in the context, training-free)", _drafter,
                defaults={"max_ngram_size": 3, "num_pred_tokens": 10},
                draft_budget=lambda p: {"tree_nodes": int(p["num_pred_tokens"]) + 1})  # a chain after the root
