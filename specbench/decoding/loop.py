"""The one decode loop: prefill, then propose -> one target forward -> verify -> commit."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .sampling import SamplingConfig
from .tree import Tree
from .verify import accept

if TYPE_CHECKING:  # annotations only: the target and the drafters import this package
    from ..methods.base import Drafter
    from ..models.target import Target


@dataclass
class Generation:
    """One generated sequence and the counts every metric is derived from.

    `steps[i]` = tokens emitted by step i (accepted drafts + the bonus/correction token,
    after cutting at EOS or the budget).  `reached[k-1]`/`accepted[k-1]` count the steps in
    which draft depth k was tried / accepted (alpha_k = accepted / reached).
    """

    tokens: list[int] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    reached: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    drafted: int = 0  # draft nodes sent to the target, over all steps
    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    wall_s: float = 0.0
    stop: str = "length"

    def _count_depths(self, n_accepted: int, tried_next: bool) -> None:
        depth = n_accepted + tried_next
        while len(self.reached) < depth:
            self.reached.append(0)
            self.accepted.append(0)
        for k in range(depth):
            self.reached[k] += 1
            self.accepted[k] += k < n_accepted


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def cut_at_stop(emitted: list[int], stop_ids: set[int]) -> tuple[list[int], bool]:
    """A step's emitted tokens up to and including the first stop token, wherever it falls: inside the
    accepted drafts, as the bonus or as the correction (vanilla would stop there too)."""
    hit = next((i for i, t in enumerate(emitted) if t in stop_ids), None)
    return (emitted, False) if hit is None else (emitted[: hit + 1], True)


def generate(target: Target, drafter: Drafter, prompt: list[int], max_new_tokens: int, sampling: SamplingConfig,
             generator: torch.Generator | None = None, stop_ids: set[int] | None = None) -> Generation:
    """Decode up to `max_new_tokens` after `prompt` (a non-empty token list)."""
    if not prompt:
        raise ValueError("prompt must hold at least one token")
    target.check_fits(len(prompt), max_new_tokens)
    stop_ids = target.eos_token_ids if stop_ids is None else stop_ids
    gen = Generation()
    dev = target.device
    start = _clock(dev)
    prefill = target.prefill(prompt[:-1])  # the last prompt token is the first tree root
    drafter.begin(list(prompt), prefill)
    gen.prefill_s = _clock(dev) - start
    seq = list(prompt)
    while len(gen.tokens) < max_new_tokens:
        t0 = _clock(dev)
        proposal = drafter.propose(seq)
        tree = Tree(seq[-1], proposal)
        t1 = _clock(dev)
        out = target.forward_tree(tree)
        verdict = accept(out.logits, tree, sampling, proposal.draft_probs, generator)
        target.commit([0, *verdict.path])
        t2 = _clock(dev)
        emitted = [tree.tokens[i] for i in verdict.path] + [verdict.token]
        emitted, stopped = cut_at_stop(emitted[: max_new_tokens - len(gen.tokens)], stop_ids)
        if stopped:
            gen.stop = "eos"
        last = verdict.path[-1] if verdict.path else 0
        gen._count_depths(len(verdict.path), bool(tree.children[last]))
        gen.drafted += len(proposal)
        gen.steps.append(len(emitted))
        gen.tokens += emitted
        seq += emitted
        gen.draft_s += t1 - t0
        gen.verify_s += t2 - t1
        if gen.stop == "eos" or len(gen.tokens) >= max_new_tokens:
            break
        drafter.update(tree, verdict, out)
        gen.draft_s += _clock(dev) - t2
    gen.wall_s = _clock(dev) - start
    return gen
