"""Vanilla autoregressive decoding: the empty proposal, one token per target forward."""

from .base import DrafterBase, Method


def _drafter(target, sampling, generator) -> DrafterBase:
    return DrafterBase()


METHOD = Method("vanilla", "autoregressive baseline (this project's KV-cached loop)", _drafter,
                draft_budget=lambda p: {"tree_nodes": 1})
