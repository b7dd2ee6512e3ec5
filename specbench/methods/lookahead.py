r"""Lookahead decoding (Fu, Bailis, Stoica, Zhang, ICML 2024: "Break the Sequential Dependency of
LLM Inference Using Lookahead Decoding"), as in hao-ai-lab/LookaheadDecoding (`lade`), which
Spec-Bench and HASS use as their Lookahead baseline.

Every step is ONE target forward over three groups of tokens:

* the root (the last emitted token, not yet cached; relative position 0);
* the verification branch: the n-grams of the pool whose first token is the root, given as
  token paths and merged into a prefix tree (`Proposal.from_paths`; draft probs None);
* the lookahead branch: a 2D window of Jacobi iterates, sent as the proposal's `extra_*`
  tokens.  Their outputs come back to `update` as `out.extra_logits`; they are never accepted
  and their KV entries are dropped at commit, so the output is whatever the shared lossless
  verifier accepts from the verification branch.

The window
----------
Parameters: N = `level` (n-gram size, >= 3), W = `window`, G = `guess`.  Once warmed up the
window has N-1 rows and W columns.  Row 0 is [root, r0_1 .. r0_{W-1}]; rows 1..N-2 hold W
tokens each.  The token in row r, column c sits at relative position r + c (the root is row
0, column 0).  Column c, read top to bottom, is a Jacobi trajectory: row r is the iterate one
step newer than row r-1, one position further right.

Attention (the paper's mask; `window_mask`, checked row by row in tests/test_lookahead.py).
Besides the whole committed context, which every token sees:

* lookahead token (r, c) sees exactly the row-0 tokens of columns <= c (the root included)
  and the tokens of its own column c in rows 1..r (itself included).  It therefore sees one
  token at each relative position 0..r+c: a causal sequence.
* a verification node sees the root and its own ancestors (the tree mask);
* the lookahead and verification branches never see each other.

Pool (`NGramPool`): n-grams keyed by their first token; per key at most G continuations of
N-1 tokens, least-recently-used first out (re-adding an n-gram refreshes it).  After each
warmed-up step, the argmax outputs `new[c]` of the last row (the prediction for position
N-1+c) close W n-grams, one per column: (row0[c], row1[c], ..., row_{N-2}[c], new[c]) is
added under key row0[c] (column 0 uses the root as key).  The pool is filled only from the
lookahead branch (the reference's POOL_FROM_PROMPT option, off in Spec-Bench, is not used).
The verification candidates of a step are all pool entries keyed by the root (<= G of them).

Window update (the reference's ALWAYS_FWD_ONE=1, which its greedy path asserts): the window
moves one column per step whatever was accepted: row0 <- row1[1:], row r <- row r+1,
last row <- new.  EOS tokens in the new last row are replaced by random prompt tokens (the
reference's `filter_window`).  Initialisation: row 0 holds W+N-3 tokens drawn uniformly from
the prompt (the reference's `copy_from`); the first N-2 steps fill rows 1..N-2 one per step
(no verification branch yet: the pool is still empty), dropping the leftmost column each time.

Temperature > 0: the window and the pool always use the argmax of the lookahead outputs, as
the reference does (TEMP_FOR_GUESS = 0 in `jacobi_sample_multilevel`); candidates are point
masses verified by the shared deterministic-candidate verifier (accept x with r(x), on
rejection zero it and renormalise: SpecInfer's rule, which the reference implements too),
so losslessness never depends on the window.

Randomness: the prompt tokens of the initial window (and the EOS replacements) come from a
private `random.Random` seeded with the run generator's *initial* seed (0 without a
generator) and re-seeded at every sequence, so a prompt's drafts do not depend on the order
of prompts and the sampling generator's stream is not consumed.

Parameters: Spec-Bench's defaults are level 5, window 7, guess 7 (hemingkx/Spec-Bench eval.sh).

CPU setting: level=3, window=3, guess=3.  Searched on this project's 2-core CPU with the
embedded SmolLM2-135M-Instruct (fp32, 1 thread, 5 MT-bench prompts x 96 tokens, greedy;
results/studies/lookahead_cpu_search.json, 2026-11-24, torch 2.13.0+cpu): no setting beats vanilla
here.  A forward over 2-8 tokens already costs ~1.45x a 1-token forward on this CPU (gemv ->
gemm), so small windows win: W=3, N=3, G in {3, 5, 7} reach tau 1.24-1.27 at a tokens/s ratio
of ~0.74 (process CPU time; the machine was shared, wall time unusable), while Spec-Bench's
(5, 7, 7) reaches tau 1.59 at ~0.42.  Greedy output equalled vanilla on 20 MT-bench prompts x
128 tokens with both settings.  Reproduce (the second command extends the grid downwards):

    python suites/lookahead_cpu_search.py --threads 1 --out results/studies/lookahead_cpu_search.json
    python suites/lookahead_cpu_search.py --threads 1 --resume --windows 1,2,3 --levels 3 --guesses 1,2,3 \
        --out results/studies/lookahead_cpu_search.json
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from functools import lru_cache

import torch

from ..decoding.tree import Proposal, Tree
from ..decoding.verify import Verdict
from ..errors import UsageError
from .base import DrafterBase, Method

__all__ = ["NGramPool", "LookaheadDrafter", "window_mask", "window_positions", "METHOD"]


class NGramPool:
    """n-grams keyed by their first token: per key at most `capacity` continuations, LRU order.

    `get(key)` lists the continuations oldest first (the reference's order); `add` of a
    continuation already present moves it to the newest end, and a full key drops its oldest.
    """

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError("pool capacity must be >= 1")
        self.capacity = capacity
        self._map: dict[int, list[tuple[int, ...]]] = {}

    def add(self, key: int, continuation: Sequence[int]) -> None:
        cont = tuple(continuation)
        lst = self._map.get(key)
        if lst is None:
            self._map[key] = [cont]
            return
        try:
            lst.remove(cont)
        except ValueError:
            if len(lst) >= self.capacity:
                del lst[0]
        lst.append(cont)

    def get(self, key: int) -> list[tuple[int, ...]]:
        return self._map.get(key, [])

    def __contains__(self, key: int) -> bool:
        return key in self._map

    def __len__(self) -> int:
        """Number of n-grams held (over all keys)."""
        return sum(len(v) for v in self._map.values())

    def keys(self) -> Iterable[int]:
        return self._map.keys()


# ----------------------------------------------------------------------------- window layout
#
# The extra tokens are sent row by row: row 0 without the root (n0 tokens, relative positions
# 1..n0), then rows 1..f (n0 + 1 tokens each, row r column c at position r + c).  During the
# warm-up f grows from 0 to N-2 while n0 shrinks from W+N-3 to W-1.


@lru_cache(maxsize=64)
def window_positions(n0: int, f: int) -> tuple[int, ...]:
    """Relative positions of the extra tokens of a window with `n0` row-0 tokens and rows 1..f."""
    pos = list(range(1, n0 + 1))
    for r in range(1, f + 1):
        pos += range(r, r + n0 + 1)
    return tuple(pos)


@lru_cache(maxsize=64)
def window_mask(n0: int, f: int) -> torch.Tensor:
    """(m, 1 + m) bool: column 0 is the root, columns 1.. the m extra tokens (row order above).

    Row of token (r, c) is True exactly at the row-0 tokens of columns <= c (root included) and
    at the tokens (1..r, c) of its own column.  Do not modify the returned (cached) tensor.
    """
    m = n0 + f * (n0 + 1)
    mask = torch.zeros(m, 1 + m, dtype=torch.bool)
    mask[:, 0] = True
    for k in range(n0):  # row 0, column k + 1: causal over row 0
        mask[k, 1: k + 2] = True
    for r in range(1, f + 1):
        for c in range(n0 + 1):
            i = n0 + (r - 1) * (n0 + 1) + c
            mask[i, 1: c + 1] = True  # row-0 tokens of columns 1..c
            for s in range(1, r + 1):  # own column, rows 1..r
                mask[i, 1 + n0 + (s - 1) * (n0 + 1) + c] = True
    return mask


class LookaheadDrafter(DrafterBase):
    """Per-sequence Lookahead state: the Jacobi window and the n-gram pool."""

    def __init__(self, level: int, window: int, guess: int, eos_ids: Iterable[int] = (), seed: int = 0):
        if level < 3 or window < 1 or guess < 1:
            raise UsageError(f"lookahead needs level >= 3, window >= 1 and guess >= 1 "
                             f"(got level={level}, window={window}, guess={guess})")
        self.level, self.window, self.guess = level, window, guess
        self.eos_ids = frozenset(int(t) for t in eos_ids)
        self.seed = seed
        self._mask_cache: dict[tuple[int, int, int], torch.Tensor] = {}
        self.rows: list[list[int]] = []
        self.pool = NGramPool(guess)

    # -- state

    @property
    def warm(self) -> bool:
        """True once all N-1 rows of the window are filled (verification branch active)."""
        return len(self.rows) == self.level - 1

    def _random_prompt_token(self) -> int:
        return self._rng.choice(self._prompt)

    def begin(self, prompt: list[int], prefill) -> None:
        self._rng = random.Random(self.seed)
        self._prompt = list(prompt)
        self.rows = [[self._random_prompt_token() for _ in range(self.window + self.level - 3)]]
        self.pool = NGramPool(self.guess)

    # -- one step

    def _extra_mask(self, n0: int, f: int, n_tree: int) -> torch.Tensor:
        key = (n0, f, n_tree)
        mask = self._mask_cache.get(key)
        if mask is None:
            local = window_mask(n0, f)
            m = local.shape[0]
            mask = torch.zeros(m, n_tree + m, dtype=torch.bool)
            mask[:, 0] = local[:, 0]
            mask[:, n_tree:] = local[:, 1:]
            if len(self._mask_cache) > 256:
                self._mask_cache.clear()
            self._mask_cache[key] = mask
        return mask

    def propose(self, tokens: list[int]) -> Proposal:
        cands = self.pool.get(tokens[-1]) if self.warm else []
        prop = Proposal.from_paths(cands) if cands else Proposal()
        rows = self.rows
        n0, f = len(rows[0]), len(rows) - 1
        extra: list[int] = []
        for row in rows:
            extra += row
        prop.extra_tokens = extra
        prop.extra_positions = list(window_positions(n0, f))
        prop.extra_mask = self._extra_mask(n0, f, len(prop.tokens) + 1)
        return prop

    def update(self, tree: Tree, verdict: Verdict, out) -> None:
        rows = self.rows
        last = len(rows[-1])
        new = out.extra_logits[-last:].argmax(-1).tolist()  # argmax also at T > 0 (see module doc)
        if not self.warm:  # warm-up: add the next row, drop the leftmost column
            n0 = len(rows[0])
            self.rows = [row[1:] for row in rows] + [new[len(new) - n0:]]
            return
        # Collect one n-gram per column: (row0[c], row1[c], .., row_{N-2}[c], new[c]).
        keys = [tree.tokens[0], *rows[0]]
        add = self.pool.add
        for c in range(self.window):
            add(keys[c], tuple(row[c] for row in rows[1:]) + (new[c],))
        if self.eos_ids:
            new = [self._random_prompt_token() if t in self.eos_ids else t for t in new]
        # Shift the window by one column.
        self.rows = [rows[1][1:], *rows[2:], new]


def _drafter(target, sampling, generator, level: int, window: int, guess: int) -> LookaheadDrafter:
    seed = int(generator.initial_seed()) if generator is not None else 0
    return LookaheadDrafter(int(level), int(window), int(guess), eos_ids=target.eos_token_ids, seed=seed)


METHOD = Method("lookahead",
                "Lookahead decoding (Jacobi window + n-gram pool + verification branch in one forward, training-free)",
                _drafter, defaults={"level": 5, "window": 7, "guess": 7},
                # the verification branch: <= G n-grams of N-1 tokens after the root (the window is never verified)
                draft_budget=lambda p: {"tree_nodes": int(p["guess"]) * (int(p["level"]) - 1) + 1})
