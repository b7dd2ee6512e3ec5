"""Token trees: what a drafter proposes and what the target verifies in one forward.

Node 0 is the root: the last emitted token, not yet in the target's KV cache.  Nodes
1..n-1 are draft tokens; `parents[i] < i`, so the node order is a topological order.
A chain is a tree whose every node has one child; the empty proposal (vanilla) is the
root alone.  Children are tried by the verifier in node order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch


@dataclass
class Proposal:
    """A drafter's output.

    tokens/parents describe the draft nodes only: draft node j is tree node j + 1 and
    `parents[j]` indexes tree nodes (0 = root).  `draft_probs` is None for deterministic
    candidates (point masses) or a (len(tokens), V) tensor: row j is the distribution
    draft j was *sampled* from (siblings share their parent's distribution).

    `sibling_draws` states how sampled siblings were drawn. The sampled-tree verifier is exact
    only for "iid": each sibling drawn independently from its parent's q, with replacement
    (`torch.multinomial(q, k, replacement=True)`; its default, without replacement, is not).
    A sampled tree with siblings and any other statement, or none, is refused by the verifier;
    a sampled chain and deterministic candidates need none.

    `extra_*` carry non-candidate tokens that ride along in the same target forward
    (Lookahead's Jacobi window).  They are appended after the tree nodes, attend to the
    committed context plus the tree/extra nodes given by `extra_mask` (shape
    (m, n_tree + m), n_tree including the root), sit at `extra_positions` (offsets from
    the root's position), are never accepted, and their outputs go back to the drafter.
    """

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    draft_probs: torch.Tensor | None = None
    extra_tokens: list[int] = field(default_factory=list)
    extra_positions: list[int] = field(default_factory=list)
    extra_mask: torch.Tensor | None = None
    sibling_draws: str | None = None

    @classmethod
    def chain(cls, tokens: Sequence[int], draft_probs: torch.Tensor | None = None) -> Proposal:
        return cls(list(tokens), list(range(len(tokens))), draft_probs)

    @classmethod
    def from_paths(cls, paths: Sequence[Sequence[int]]) -> Proposal:
        """A tree given as token paths from the root; shared prefixes are merged."""
        index: dict[tuple[int, ...], int] = {(): 0}
        tokens: list[int] = []
        parents: list[int] = []
        for path in paths:
            for depth in range(1, len(path) + 1):
                key = tuple(path[:depth])
                if key not in index:
                    parents.append(index[key[:-1]])
                    tokens.append(int(key[-1]))
                    index[key] = len(tokens)
        return cls(tokens, parents)

    def __len__(self) -> int:
        return len(self.tokens)


class Tree:
    """Root + draft nodes with the index structures the target and verifiers need."""

    def __init__(self, root: int, proposal: Proposal):
        if len(proposal.parents) != len(proposal.tokens):
            raise ValueError("proposal tokens and parents differ in length")
        self.proposal = proposal
        self.tokens: list[int] = [int(root), *map(int, proposal.tokens)]
        self.parents: list[int] = [-1, *proposal.parents]
        for i, p in enumerate(self.parents[1:], start=1):
            if not 0 <= p < i:
                raise ValueError(f"node {i} has parent {p}: parents must precede their children")

    def __len__(self) -> int:
        return len(self.tokens)

    @cached_property
    def depth(self) -> list[int]:
        d = [0] * len(self)
        for i in range(1, len(self)):
            d[i] = d[self.parents[i]] + 1
        return d

    @property
    def max_depth(self) -> int:
        return max(self.depth)

    @cached_property
    def children(self) -> list[list[int]]:
        ch: list[list[int]] = [[] for _ in self.tokens]
        for i in range(1, len(self)):
            ch[self.parents[i]].append(i)
        return ch

    @cached_property
    def is_chain(self) -> bool:
        return all(p == i - 1 for i, p in enumerate(self.parents[1:], start=1))

    def children_table(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """(n, C) child indices in try order, padded with -1."""
        width = max(1, max(len(c) for c in self.children))
        table = torch.full((len(self), width), -1, dtype=torch.long)
        for i, ch in enumerate(self.children):
            if ch:
                table[i, : len(ch)] = torch.tensor(ch)
        return table.to(device)

    def ancestor_mask(self) -> torch.Tensor:
        """(n, n) bool: [i, j] is True when j is i or an ancestor of i."""
        n = len(self)
        mask = torch.zeros(n, n, dtype=torch.bool)
        for i in range(n):
            mask[i, i] = True
            p = self.parents[i]
            if p >= 0:
                mask[i] |= mask[p]
        return mask

    def path_to(self, node: int) -> list[int]:
        """Node indices from the first draft below the root down to `node`."""
        path = []
        while node > 0:
            path.append(node)
            node = self.parents[node]
        return path[::-1]
