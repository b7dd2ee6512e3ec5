"""Lookahead decoding: n-gram pool, window mask (row by row against the paper's rule), window
mechanics, one-forward equivalence, greedy == vanilla, T=1 first-two-token distribution, and
the lookahead tokens' outputs never reaching the output.

Everything runs on a tiny random Llama (vocab 64) in a few seconds.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers import chi_square_check

from specbench.decoding import Proposal, SamplingConfig, Tree, generate, make_generator, probs
from specbench.errors import UsageError
from specbench.methods import get_method
from specbench.methods.base import DrafterBase
from specbench.methods.lookahead import METHOD, LookaheadDrafter, NGramPool, window_mask, window_positions
from specbench.models.target import Target

V = 64  # the vocabulary of the conftest `target`

pytestmark = pytest.mark.usefixtures("single_thread")


PROMPTS = [
    [1, 5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7, 8],
    [3, 4, 3, 4, 3, 4, 3, 4],
    list(range(10, 30)),
    [9] * 9,
    [1, 2, 3],
]


def _one_hot_out(tokens_per_row: list[int]) -> SimpleNamespace:
    """A fake StepOutput whose extra logits have the given argmaxes."""
    logits = torch.zeros(len(tokens_per_row), V)
    logits[torch.arange(len(tokens_per_row)), torch.tensor(tokens_per_row)] = 1.0
    return SimpleNamespace(extra_logits=logits)


def _layout(rows: list[list[int]]) -> list[tuple[int, int]]:
    """(row, column) of each extra token: row 0 without the root (columns 1..), then rows 1.. (columns 0..)."""
    out = [(0, c) for c in range(1, len(rows[0]) + 1)]
    for r, row in enumerate(rows[1:], start=1):
        out += [(r, c) for c in range(len(row))]
    return out


# ----------------------------------------------------------------------------- n-gram pool


def test_pool_keys_by_first_token_and_caps_per_key():
    pool = NGramPool(3)
    pool.add(7, (1, 2))
    pool.add(8, (1, 2))
    assert pool.get(7) == [(1, 2)] and pool.get(8) == [(1, 2)]
    assert pool.get(9) == [] and 9 not in pool and 7 in pool
    for cont in [(3, 4), (5, 6), (7, 8)]:
        pool.add(7, cont)
    assert pool.get(7) == [(3, 4), (5, 6), (7, 8)], "a full key drops its oldest n-gram"
    assert len(pool) == 4
    with pytest.raises(ValueError):
        NGramPool(0)


def test_pool_readding_refreshes_lru_order():
    pool = NGramPool(3)
    for cont in [(1, 1), (2, 2), (3, 3)]:
        pool.add(0, cont)
    pool.add(0, [1, 1])  # present: moved to the newest end, nothing dropped, no duplicate
    assert pool.get(0) == [(2, 2), (3, 3), (1, 1)]
    pool.add(0, (4, 4))  # full: the least recently used, (2, 2), goes
    assert pool.get(0) == [(3, 3), (1, 1), (4, 4)]


def test_warmup_then_pool_filled_from_window_columns():
    N, W, G = 4, 3, 5
    d = LookaheadDrafter(N, W, G)
    prompt = [11, 12, 13, 14, 15]
    d.begin(prompt, None)
    assert len(d.rows) == 1 and len(d.rows[0]) == W + N - 3
    assert all(t in prompt for t in d.rows[0]), "the window starts from random prompt tokens"
    root = 40
    # warm-up: rows are added one per step, the leftmost column dropped each time; no candidates
    for step, expected_lengths in enumerate([[W + N - 4, W + N - 3], [W - 1, W, W]]):
        prop = d.propose(prompt + [root])
        assert prop.tokens == [], "no verification branch before the window is full"
        n_last = len(d.rows[-1])
        new = list(range(50 + 10 * step, 50 + 10 * step + n_last))
        before = [row[:] for row in d.rows]
        d.update(Tree(root, prop), None, _one_hot_out([0] * (len(prop.extra_tokens) - n_last) + new))
        assert [len(r) for r in d.rows] == expected_lengths
        assert d.rows[:-1] == [row[1:] for row in before]
        assert d.rows[-1] == new[len(new) - len(before[0]):]
        assert len(d.pool) == 0
    assert d.warm
    # warmed up: one n-gram per column, (row0[c], row1[c], row2[c], new[c]) keyed by row0[c]
    rows = [row[:] for row in d.rows]
    prop = d.propose(prompt + [root])
    new = [61, 62, 63]
    d.update(Tree(root, prop), None, _one_hot_out([0] * (len(prop.extra_tokens) - W) + new))
    keys = [root, *rows[0]]
    for c in range(W):
        assert (rows[1][c], rows[2][c], new[c]) in d.pool.get(keys[c])
    assert len(d.pool) == len({(keys[c], rows[1][c], rows[2][c], new[c]) for c in range(W)})
    # the window moved one column: row0 <- row1[1:], row r <- row r+1, last row <- new
    assert d.rows == [rows[1][1:], rows[2], new]
    # the next proposal verifies the pool's n-grams keyed by the root
    prop = d.propose(prompt + [root])
    paths = [list(p) for p in d.pool.get(root)]
    assert paths and Proposal.from_paths(paths).tokens == prop.tokens
    assert prop.draft_probs is None


def test_eos_in_new_row_is_replaced_by_prompt_tokens():
    d = LookaheadDrafter(3, 4, 2, eos_ids={2})
    prompt = [30, 31, 32]
    d.begin(prompt, None)
    d.update(Tree(prompt[-1], d.propose(prompt)), None, _one_hot_out([5] * len(d.rows[0])))  # warm-up step
    assert d.warm
    row1 = d.rows[1][:]
    prop = d.propose(prompt)
    d.update(Tree(prompt[-1], prop), None, _one_hot_out([0] * (len(prop.extra_tokens) - 4) + [2, 7, 2, 8]))
    assert d.rows[-1][1] == 7 and d.rows[-1][3] == 8
    assert d.rows[-1][0] in prompt and d.rows[-1][2] in prompt, "EOS in the window is replaced"
    assert (row1[0], 2) in d.pool.get(prompt[-1]), "the pool keeps what the target predicted"


# ----------------------------------------------------------------------------- the mask


def _paper_rule(r: int, c: int, r2: int, c2: int) -> bool:
    """Lookahead token (r, c) sees (r2, c2) iff (r2, c2) is a row-0 token of a column <= c (the
    root is (0, 0)), or a token of its own column c in rows 1..r (itself included)."""
    return (r2 == 0 and c2 <= c) or (c2 == c and 1 <= r2 <= r)


@pytest.mark.parametrize("N,W", [(3, 1), (3, 4), (4, 3), (5, 7), (6, 2)])
def test_mask_rows_follow_the_paper_rule(N, W):
    G = 3
    d = LookaheadDrafter(N, W, G)
    prompt = list(range(1, 20))
    d.begin(prompt, None)
    root = prompt[-1]
    stages = 0
    while True:
        if d.warm:  # give the root a few candidates so the verification branch is not empty
            for cont in [(1,) * (N - 1), (1, 2) + (3,) * (N - 3), (4,) * (N - 1)]:
                d.pool.add(root, cont)
        prop = d.propose(prompt)
        n_tree = 1 + len(prop.tokens)
        m = len(prop.extra_tokens)
        layout = _layout(d.rows)
        assert m == len(layout) and prop.extra_mask.shape == (m, n_tree + m)
        assert prop.extra_tokens == [t for row in d.rows for t in row]
        coords = [(0, 0)] + layout  # root first, then the extras
        cols = [0] + list(range(n_tree, n_tree + m))
        for i, (r, c) in enumerate(layout):
            row = prop.extra_mask[i]
            assert prop.extra_positions[i] == r + c, f"token ({r},{c}) at position {r + c}"
            # verification nodes (tree columns 1..n_tree-1) are invisible to the lookahead branch
            assert not row[1:n_tree].any(), f"lookahead token ({r},{c}) sees the verification branch"
            for (r2, c2), col in zip(coords, cols):
                assert bool(row[col]) == _paper_rule(r, c, r2, c2), \
                    f"N={N} W={W} stage {stages}: token ({r},{c}) vs ({r2},{c2})"
            # hence: a causal sequence, one token at each position 0..r+c
            seen = [0] + [prop.extra_positions[j] for j in range(m) if row[n_tree + j]]
            assert sorted(seen) == list(range(r + c + 1))
        if d.warm:
            break
        d.update(Tree(root, prop), None, _one_hot_out([7] * m))
        stages += 1
    assert stages == N - 2
    assert len(d.rows[0]) == W - 1 and all(len(r) == W for r in d.rows[1:])


def test_window_mask_shapes_and_positions():
    assert window_mask(2, 0).tolist() == [[True, True, False], [True, True, True]]
    assert window_positions(2, 2) == (1, 2, 1, 2, 3, 2, 3, 4)
    m = window_mask(6, 3)
    assert m.shape == (6 + 3 * 7, 1 + 6 + 3 * 7) and m[:, 0].all()


def test_target_mask_separates_branches(target):
    d = LookaheadDrafter(4, 3, 3)
    prompt = [5, 6, 7, 8, 9]
    d.begin(prompt, None)
    d.rows = [[10, 11], [12, 13, 14], [15, 16, 17]]
    d.pool.add(9, (1, 2, 3))
    d.pool.add(9, (1, 4, 5))
    prop = d.propose(prompt)
    tree = Tree(9, prop)
    target.prefill(prompt[:-1])
    full = target._tree_mask(tree, prop)[0, 0, :, target.length:] == 0
    n = len(tree)
    assert not full[:n, n:].any(), "verification nodes must not see lookahead tokens"
    assert torch.equal(full[:n, :n], tree.ancestor_mask())
    assert torch.equal(full[n:], prop.extra_mask)


# ----------------------------------------------------------------------------- one forward


@pytest.mark.parametrize("rows", [
    [[20, 21, 22, 23]],  # first warm-up step (rows 1.. empty)
    [[20, 21, 22], [22, 23, 24, 25]],  # second warm-up step
    [[20, 21], [22, 23, 24], [25, 26, 27]],  # warm: N-1 = 3 rows of W = 3 columns
])
def test_one_forward_equals_sequential_forwards(target, rows):
    """Every lookahead token's logits (and every candidate's) equal a plain causal forward of
    the tokens it is meant to see: the mask and the positions are right end to end."""
    N, W = 4, 3
    d = LookaheadDrafter(N, W, 4)
    prompt = [1, 5, 6, 7, 8, 5, 6, 7]
    d.begin(prompt, None)
    d.rows = [r[:] for r in rows]
    root = prompt[-1]
    for cont in [(30, 31, 32), (30, 33, 34), (35, 36, 37)]:
        d.pool.add(root, cont)
    prop = d.propose(prompt)
    tree = Tree(root, prop)
    target.prefill(prompt[:-1])
    out = target.forward_tree(tree)
    model = target.model

    def last_logits(seq):
        with torch.inference_mode():
            return model(torch.tensor([seq])).logits[0, -1].float()

    row0 = [root, *d.rows[0]]
    for i, (r, c) in enumerate(_layout(d.rows)):
        seq = prompt[:-1] + row0[: c + 1] + [d.rows[s][c] for s in range(1, r + 1)]
        torch.testing.assert_close(out.extra_logits[i], last_logits(seq), atol=1e-4, rtol=1e-4)
    for node in range(len(tree)):
        seq = prompt + [tree.tokens[j] for j in tree.path_to(node)]
        torch.testing.assert_close(out.logits[node], last_logits(seq), atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("params", [(5, 7, 7), (3, 3, 3), (4, 5, 2), (3, 1, 1)])
def test_greedy_equals_vanilla(target, params):
    N, W, G = params
    accepted = 0
    for prompt in PROMPTS:
        ref = generate(target, DrafterBase(), prompt, 48, SamplingConfig(), stop_ids=set())
        d = LookaheadDrafter(N, W, G, eos_ids=target.eos_token_ids)
        got = generate(target, d, prompt, 48, SamplingConfig(), stop_ids=set())
        assert got.tokens == ref.tokens, f"prompt {prompt}"
        assert sum(got.steps) == len(got.tokens) == 48
        accepted += len(got.tokens) - len(got.steps)
    assert accepted > 0, "no draft token was ever accepted: the test would be vacuous"


def test_greedy_check_catches_a_leaky_mask(target, monkeypatch):
    """Mutation: if verification nodes could see the lookahead tokens, greedy equality breaks."""
    honest = Target._tree_mask

    def leaky(self, tree, prop):
        mask = honest(self, tree, prop)
        mask[..., : len(tree), self.length + len(tree):] = 0.0
        return mask

    monkeypatch.setattr(Target, "_tree_mask", leaky)
    refs = [generate(target, DrafterBase(), p, 48, SamplingConfig(), stop_ids=set()).tokens for p in PROMPTS]
    outs = [generate(target, LookaheadDrafter(5, 7, 7), p, 48, SamplingConfig(), stop_ids=set()).tokens
            for p in PROMPTS]
    assert outs != refs


def test_method_factory_and_registry(target):
    assert get_method("lookahead") is METHOD
    assert METHOD.defaults == {"level": 5, "window": 7, "guess": 7}
    params = METHOD.params({"window": "3"})
    d = METHOD.drafter(target, SamplingConfig(), make_generator(5), **params)
    assert (d.level, d.window, d.guess, d.seed) == (5, 3, 7, 5)
    assert d.eos_ids == frozenset(target.eos_token_ids)
    with pytest.raises(UsageError):
        METHOD.drafter(target, SamplingConfig(), None, level=2, window=3, guess=3)
    # same seed, same prompt -> same initial window, whatever came before
    d.begin(PROMPTS[0], None)
    first = [r[:] for r in d.rows]
    d.begin(PROMPTS[1], None)
    d.begin(PROMPTS[0], None)
    assert d.rows == first


class _RecordingTarget(Target):
    def __init__(self, inner: Target):
        super().__init__(inner.model, name="tiny")
        self.trace = []

    def forward_tree(self, tree):
        out = super().forward_tree(tree)
        self.trace.append([tree, out, None])
        return out

    def commit(self, nodes):
        self.trace[-1][2] = list(nodes)
        super().commit(nodes)
        assert all(layer.keys.shape[2] == self.length for layer in self.cache.layers), \
            "the lookahead tokens' KV must be dropped at commit"


def test_lookahead_outputs_never_emitted(target):
    rec = _RecordingTarget(target)
    prompt = PROMPTS[0]
    gen = generate(rec, LookaheadDrafter(4, 4, 4), prompt, 40, SamplingConfig(), stop_ids=set())
    emitted = []
    for tree, out, nodes in rec.trace:
        n = len(tree)
        assert out.logits.shape[0] == n and out.extra_logits.shape[0] == len(tree.proposal.extra_tokens) > 0
        assert nodes[0] == 0 and all(0 < i < n for i in nodes[1:]), "only tree nodes are committed"
        emitted += [tree.tokens[i] for i in nodes[1:]] + [int(out.logits[nodes[-1]].argmax())]
    assert emitted[: len(gen.tokens)] == gen.tokens
    assert rec.length == len(prompt) - 1 + sum(len(nodes) for _, _, nodes in rec.trace)

    # A poisoned window (every lookahead token = a token vanilla never emits) changes nothing.
    ref = generate(target, DrafterBase(), prompt, 40, SamplingConfig(), stop_ids=set())
    poison = next(t for t in range(V) if t not in ref.tokens and t not in prompt)

    class Poisoned(LookaheadDrafter):
        def propose(self, tokens):
            self.rows = [[poison] * len(r) for r in self.rows]
            return super().propose(tokens)

    got = generate(target, Poisoned(4, 4, 4), prompt, 40, SamplingConfig(), stop_ids=set())
    assert got.tokens == ref.tokens and poison not in got.tokens


def _exact_first_two(target: Target, prompt: list[int], cfg: SamplingConfig) -> torch.Tensor:
    """(V, V) exact joint probability of the first two sampled tokens."""
    with torch.inference_mode():
        p1 = probs(target.model(torch.tensor([prompt])).logits[0, -1], cfg)
        batch = torch.tensor([prompt + [x] for x in range(V)])
        p2 = probs(target.model(batch).logits[:, -1], cfg)
    return p1[:, None] * p2


def test_t1_first_two_tokens_match_target_distribution(target):
    """T=1: the first two emitted tokens are distributed as the target's.  The drafter starts
    warm (full window, pool holding likely n-grams for the root, siblings at two depths) so
    the first step already verifies candidates next to a full lookahead branch."""
    cfg = SamplingConfig(temperature=1.0)
    prompt = [1, 5, 6, 7, 8, 5, 6, 7, 8, 5]
    exact = _exact_first_two(target, prompt, cfg)
    p1 = exact.sum(1)
    top1 = p1.topk(3).indices.tolist()
    cands = []
    for i, a in enumerate(top1):
        for b in (exact[a] / p1[a]).topk(2 if i == 0 else 1).indices.tolist():
            cands.append((a, b))
    N, W, G = 3, 4, 4

    class Warm(LookaheadDrafter):
        def begin(self, prompt_, prefill):
            super().begin(prompt_, prefill)
            self.rows = [[self._random_prompt_token() for _ in range(W - 1)]] + \
                        [[self._random_prompt_token() for _ in range(W)] for _ in range(N - 2)]
            for c in cands:
                self.pool.add(prompt_[-1], c)

    d = Warm(N, W, G)
    gen = make_generator(20240601)
    n = 3000
    first2 = []
    accepted = 0
    for _ in range(n):
        g = generate(target, d, prompt, 2, cfg, gen, stop_ids=set())
        first2.append(g.tokens)
        accepted += g.steps[0] - 1
    assert accepted > n // 10, "candidates are rarely accepted: the test would be weak"
    # The shared check: a draw in a cell of probability 0 fails outright instead of being pooled away.
    result = chi_square_check(torch.tensor(first2), exact.double().numpy())
    assert result.ok, str(result)
