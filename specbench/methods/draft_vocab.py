"""A reduced draft vocabulary: the LM-head rows a drafter scores, for drafters whose LM head dominates
their cost (a feature head's or a small draft model's full-vocabulary projection).

`DraftVocab(weight, bias, size, ranking)`: with `size` 0 (or at least the vocabulary) it is the full
vocabulary; else the ranking's first `size` ids plus every token of the sequence so far, whose LM-head
rows live in a preallocated buffer that grows as new tokens are emitted. The ranking is a
``draft_vocab.json`` (token ids, most frequent first, as training writes it; unlisted ids follow in id
order), or the ids in order when there is none (BPE ids roughly follow merge order, i.e. frequency).

`DraftVocab.fixed(rows, bias, ids)`: the vocabulary a head was trained over (its d2t/t2d mapping): exactly
those ids, never grown by the sequence's tokens.

Deterministic drafters stay lossless with any vocabulary (their candidates are point masses); a
sampling drafter's q is exactly 0 outside it, which the verifier handles exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import UsageError

__all__ = ["DraftVocab", "complete_ranking"]


def complete_ranking(ranked: list[int], vocab_size: int) -> list[int]:
    """`ranked` followed by every id below `vocab_size` it lacks, in id order: a ranking of the whole vocabulary."""
    listed = set(ranked)
    return list(ranked) + [i for i in range(vocab_size) if i not in listed]


class DraftVocab:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, size: int, ranking: Path | None = None):
        if int(size) < 0:
            raise UsageError(f"draft_vocab must be >= 0 (0 = the full vocabulary), got {size}")
        self._w, self._b = weight, bias
        self.size = int(size)
        self.ranking = ranking
        self._base: list[int] | None = None  # the ranking's first `size` ids (read once)
        self.ids: torch.Tensor | None = None  # the draft vocabulary's ids (None = full)
        self.weight, self.bias = weight, bias  # the rows scored
        self._fixed = False

    @classmethod
    def fixed(cls, rows: torch.Tensor, bias: torch.Tensor | None, ids: torch.Tensor) -> DraftVocab:
        """Exactly the draft ids `ids` (their LM-head `rows` and `bias`, already gathered), for every sequence."""
        v = cls(rows, bias, int(ids.numel()))
        v._fixed, v.ids = True, ids
        return v

    @property
    def is_fixed(self) -> bool:
        """A head's own vocabulary (`fixed`), not one chosen per sequence."""
        return self._fixed

    @property
    def full(self) -> bool:
        return not self._fixed and (self.size <= 0 or self.size >= self._w.shape[0])

    def reset(self, sequence: list[int]) -> None:
        """A new sequence: the ranking's first `size` ids + the sequence's tokens."""
        if self._fixed:
            return
        V = self._w.shape[0]
        if self.full:
            self.ids, self.weight, self.bias = None, self._w, self._b
            return
        if self._base is None:
            self._base = self._ranked(V)[: self.size]
        ids = list(dict.fromkeys([*self._base, *map(int, sequence)]))
        self._set = set(ids)
        cap = min(V, len(ids) + 1024)
        dev = self._w.device
        self._w_buf = torch.empty(cap, self._w.shape[1], dtype=self._w.dtype, device=dev)
        self._b_buf = None if self._b is None else torch.empty(cap, dtype=self._b.dtype, device=dev)
        self._id_buf = torch.empty(cap, dtype=torch.long, device=dev)
        self._n = 0
        self._add(ids)

    def grow(self, tokens: list[int]) -> None:
        """Add the tokens the sequence gained that the vocabulary lacks."""
        if self.ids is None or self._fixed:
            return
        new = [t for t in dict.fromkeys(tokens) if t not in self._set]
        if new:
            self._set.update(new)
            self._add(new)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Scores of the draft vocabulary's ids (their order: `ids`) for features (..., H)."""
        return torch.nn.functional.linear(features, self.weight, self.bias)

    def _ranked(self, V: int) -> list[int]:
        f = self.ranking
        if f is not None:
            try:
                ids = [int(i) for i in json.loads(Path(f).read_text())]
                if ids and all(0 <= i < V for i in ids):
                    return complete_ranking(ids, V)  # unlisted ids last, in order
            except (OSError, ValueError, TypeError):
                pass
            raise UsageError(f"{f} is not a JSON list of token ids below {V}")
        return list(range(V))

    def _add(self, ids: list[int]) -> None:
        n, k = self._n, len(ids)
        if n + k > self._w_buf.shape[0]:
            cap = min(self._w.shape[0], max(2 * self._w_buf.shape[0], n + k))
            self._w_buf = torch.cat([self._w_buf[:n], self._w_buf.new_empty(cap - n, self._w_buf.shape[1])])
            self._id_buf = torch.cat([self._id_buf[:n], self._id_buf.new_empty(cap - n)])
            if self._b_buf is not None:
                self._b_buf = torch.cat([self._b_buf[:n], self._b_buf.new_empty(cap - n)])
        t = torch.tensor(ids, dtype=torch.long, device=self._w.device)
        self._w_buf[n:n + k] = self._w.index_select(0, t)
        self._id_buf[n:n + k] = t
        if self._b_buf is not None:
            self._b_buf[n:n + k] = self._b.index_select(0, t)
        self._n = n + k
        self.ids = self._id_buf[: n + k]
        self.weight = self._w_buf[: n + k]
        self.bias = None if self._b_buf is None else self._b_buf[: n + k]
