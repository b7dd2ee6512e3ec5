"""Property tests of the lossless verifiers (DESIGN.md, "Testing losslessness").

Hypothesis draws vocabularies (2-8), target and draft distributions per tree node (peaked,
near-uniform, uniform, sparse with exact zeros, point masses, mixtures; the root row drawn
directly), temperature / top-k / top-p applied through `probs`, and tree shapes (chains,
bushy trees, duplicated siblings, any sibling order).  Each example runs the verifier once,
batched over N_DRAWS draws with a seeded generator, and the first K_TOKENS (4) emitted tokens
jointly (a draw that stopped earlier continues from the exact target table) must pass the
sequential chi-square check of `helpers.check_case` (alpha 1e-6 over the four depths), with
zero counts in every cell of probability 0.  Its power: see tests/test_verify_mutations.py.
`derandomize=True` and fixed seeds make every run identical.  The greedy verifier is checked
for exact equality with an independent reference.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import DEVICES, K_TOKENS, KINDS, Case, check_case, explicit_table, random_table, run_verifier
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from specbench.decoding.sampling import SamplingConfig, make_generator
from specbench.decoding.tree import Proposal, Tree
from specbench.decoding.verify import verify_greedy

pytestmark = pytest.mark.usefixtures("single_thread")

SETTINGS = settings(max_examples=80, deadline=None, derandomize=True, print_blob=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --------------------------------------------------------------------------- strategies

@st.composite
def sampling_configs(draw, V: int) -> SamplingConfig:
    return SamplingConfig(temperature=draw(st.sampled_from([1.0, 0.7, 1.5])),
                          top_k=draw(st.sampled_from([0, 0, 0, 0, 0, 1, 2, 3, V])),
                          top_p=draw(st.sampled_from([1.0, 1.0, 1.0, 1.0, 0.95, 0.8, 0.5])))


@st.composite
def root_logits(draw, V: int) -> torch.Tensor:
    """The root's target row, which decides the first token.  Either written by hypothesis
    value by value (ties, exact zeros, a dominant peak) or random logits of a drawn scale
    (near-uniform to peaked) with hypothesis-chosen exact zeros."""
    if draw(st.booleans()):
        vals = torch.tensor(draw(st.lists(st.sampled_from([0.0, -1.0, 1.0, 2.0, 0.5, 6.0, -3.0]),
                                          min_size=V, max_size=V)))
    else:
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
        vals = draw(st.sampled_from([0.05, 1.0, 2.0, 4.0])) * torch.randn(V, generator=g)
    zero = draw(st.lists(st.sampled_from([False, False, True]), min_size=V, max_size=V))
    if all(zero):
        zero[draw(st.integers(0, V - 1))] = False
    return vals.masked_fill(torch.tensor(zero), -math.inf)


@st.composite
def tree_shapes(draw, max_nodes: int, max_depth: int, bushy: bool) -> list[int]:
    """Proposal parents: each new draft node hangs below any node of depth < max_depth.
    `bushy` draws a wide root (up to max_nodes children) plus a few deeper nodes."""
    n = draw(st.integers(1, max_nodes))
    parents: list[int] = []
    depth = [0]
    for j in range(n):
        allowed = [i for i in range(j + 1) if depth[i] < max_depth]
        parent = 0 if bushy and j < n // 2 + 1 else draw(st.sampled_from(allowed))
        parents.append(parent)
        depth.append(depth[parent] + 1)
    return parents


@st.composite
def target_tables(draw, V: int, levels: int):
    cfg = draw(sampling_configs(V))
    kind = draw(st.sampled_from(KINDS + ("mixed", "peaked")))  # more weight on non-degenerate rows
    seed = draw(st.integers(0, 2**31 - 1))
    P = random_table(seed, V, levels, kind, cfg, root_logits=draw(root_logits(V)))
    return P, cfg, kind


@st.composite
def draft_tables(draw, V: int, levels: int, P: list[torch.Tensor], cfg: SamplingConfig):
    """Draft distributions: independent of the target, a perturbation of it (support kept or
    not), or the target itself (every draft accepted)."""
    style = draw(st.sampled_from(["independent", "perturbed", "perturbed", "same", "uniform"]))
    seed = draw(st.integers(0, 2**31 - 1))
    if style == "same":
        return [t.clone() for t in P[:levels]], style
    if style == "uniform":
        return [torch.full((V ** L, V), 1.0 / V) for L in range(levels)], style
    if style == "independent":
        kind = draw(st.sampled_from(KINDS + ("mixed", "near_uniform", "sparse")))
        return random_table(seed, V, levels, kind, cfg), f"{style}-{kind}"
    g = torch.Generator().manual_seed(seed)
    floor = draw(st.sampled_from([0.0, 0.05]))  # 0.0 keeps the target's support, > 0 widens it
    out = []
    for t in P[:levels]:
        w = t * torch.exp(torch.randn(t.shape, generator=g)) + floor
        out.append(w / w.sum(-1, keepdim=True))
    return out, style


@st.composite
def det_cases(draw) -> Case:
    V = draw(st.integers(2, 8))
    bushy = draw(st.booleans())
    parents = draw(tree_shapes(max_nodes=V + 3 if bushy else 8, max_depth=3, bushy=bushy))
    depth = Tree(0, Proposal([0] * len(parents), parents)).max_depth
    P, cfg, kind = draw(target_tables(V, max(depth + 1, K_TOKENS)))
    # candidates: any token, or (as real drafters do) one of the likeliest under the target
    # at the parent's prefix, so that sibling rejections leave residuals with real mass
    tokens: list[int] = []
    prefix, level = [0], [0]  # prefix index and depth of each tree node (root: the empty prefix)
    likely = draw(st.booleans())
    for par in parents:
        row = P[level[par]][prefix[par]]
        rank = draw(st.integers(0, min(2, V - 1)))
        tok = int(row.argsort(descending=True)[rank]) if likely else draw(st.integers(0, V - 1))
        tokens.append(tok)
        prefix.append(prefix[par] * V + tok)
        level.append(level[par] + 1)
    if draw(st.booleans()):  # force a duplicated sibling: copy an earlier sibling's token
        for j in range(len(parents)):
            sibs = [i for i in range(j) if parents[i] == parents[j]]
            if sibs:
                tokens[j] = tokens[draw(st.sampled_from(sibs))]
                break
    return Case("det", parents, P, tokens=tokens, root=draw(st.integers(0, V - 1)),
                note=f"V={V} kind={kind} {cfg}")


@st.composite
def chain_cases(draw) -> Case:
    V = draw(st.integers(2, 8))
    depth = draw(st.integers(1, 4))
    P, cfg, kind = draw(target_tables(V, max(depth + 1, K_TOKENS)))
    Q, style = draw(draft_tables(V, depth, P, cfg))
    return Case("chain", list(range(depth)), P, Q=Q, note=f"V={V} kind={kind} q={style} {cfg}")


@st.composite
def sampled_cases(draw) -> Case:
    V = draw(st.integers(2, 8))
    bushy = draw(st.booleans())
    parents = draw(tree_shapes(max_nodes=6 if bushy else 7, max_depth=3, bushy=bushy))
    depth = Tree(0, Proposal([0] * len(parents), parents)).max_depth
    P, cfg, kind = draw(target_tables(V, max(depth + 1, K_TOKENS)))
    Q, style = draw(draft_tables(V, depth, P, cfg))
    return Case("sampled", parents, P, Q=Q, note=f"V={V} kind={kind} q={style} {cfg}")


def assert_lossless(case: Case, device: str) -> None:
    result = check_case(case, device)
    assert result.ok, f"{case.note} parents={case.parents} tokens={case.tokens}\n{result}"


# --------------------------------------------------------------------------- sampling verifiers

@pytest.mark.parametrize("device", DEVICES)
@SETTINGS
@given(case=det_cases())
def test_deterministic_tree_is_lossless(case, device):
    assert_lossless(case, device)


@pytest.mark.parametrize("device", DEVICES)
@SETTINGS
@given(case=chain_cases())
def test_chain_is_lossless(case, device):
    assert_lossless(case, device)


@pytest.mark.parametrize("device", DEVICES)
@SETTINGS
@given(case=sampled_cases())
def test_sampled_tree_is_lossless(case, device):
    assert_lossless(case, device)


# A few explicit cases the search might reach only rarely, kept as fixed regression points.
EXPLICIT = {
    # more duplicated siblings than vocabulary: all three copies of token 0 but one must be dead
    "det-duplicates": Case("det", [0, 0, 0, 0], explicit_table([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7]]),
                           tokens=[0, 0, 1, 0]),
    # siblings whose tokens have target probability 0, and a zero-probability cell in the joint
    "det-zero-siblings": Case("det", [0, 0, 1], explicit_table([[0.0, 0.6, 0.4],
                                                                  [[1, 0, 0], [0, 0.5, 0.5], [0.2, 0.8, 0]],
                                                                  [0.3, 0.3, 0.4]]),
                              tokens=[0, 1, 2]),
    # the draft puts mass where the target has none and vice versa
    "chain-disjoint-support": Case("chain", [0, 1], explicit_table([[0.5, 0.5, 0, 0], [0.25] * 4,
                                                                    [0.1, 0.2, 0.3, 0.4]]),
                                   Q=explicit_table([[0, 0.5, 0.5, 0], [0, 0, 0.5, 0.5]])),
    # four i.i.d. siblings from a draft far from the target, each with a child
    "sampled-wide": Case("sampled", [0, 0, 0, 0, 1, 2],
                         explicit_table([[0.1, 0.2, 0.7], [0.6, 0.3, 0.1], [0.3, 0.3, 0.4]]),
                         Q=explicit_table([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(EXPLICIT))
def test_explicit_cases_are_lossless(name, device):
    assert_lossless(EXPLICIT[name], device)


@pytest.mark.parametrize("device", DEVICES)
def test_point_mass_and_duplicates_exact(device):
    """Exact statements, no statistics: a point-mass target accepts its token with
    certainty and never takes a duplicate sibling or a zero-probability token."""
    P = explicit_table([[0, 1.0, 0], [[1.0, 0, 0], [0, 0, 1.0], [0, 1.0, 0]], [0, 1.0, 0]])
    case = Case("det", [0, 0, 0, 2], P, tokens=[0, 1, 1, 2])
    verdict, _ = run_verifier(case, device, n=2000)
    assert (verdict.path[:, 0] == 2).all() and (verdict.path[:, 1] == 4).all()
    assert (verdict.token == 1).all()
    assert verdict.emitted(3).tolist() == [[1, 2, 1]] * 2000


@pytest.mark.parametrize("device", DEVICES)
def test_verifier_is_deterministic_given_seed(device):
    case = EXPLICIT["sampled-wide"]
    a, _ = run_verifier(case, device, n=5000, seed=7)
    b, _ = run_verifier(case, device, n=5000, seed=7)
    assert torch.equal(a.emitted(3), b.emitted(3)) and torch.equal(a.path, b.path)


@st.composite
def one_draw_cases(draw):
    """A random tree over V tokens with peaked target rows (long accepted paths happen), and draft rows q
    (None: deterministic candidates); tokens biased towards p's likely ones."""
    V = draw(st.integers(2, 6))
    parents = draw(tree_shapes(max_nodes=12, max_depth=4, bushy=draw(st.booleans())))
    n = len(parents) + 1
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    p = (3 * torch.randn(n, V, generator=g)).softmax(-1)
    sampled = draw(st.booleans())
    q = (2 * torch.randn(n, V, generator=g)).softmax(-1) if sampled else None
    tokens = [draw(st.integers(0, V - 1))] + [int(p[par].argmax()) if draw(st.booleans()) else
                                              draw(st.integers(0, V - 1)) for par in parents]
    return Tree(tokens[0], Proposal(tokens[1:], parents, sibling_draws="iid" if sampled else None)), p, q


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(case=one_draw_cases(), seed=st.integers(0, 2**31 - 1))
def test_the_one_draw_walk_returns_the_batched_walks_verdict(case, seed):
    """The decode loop's verifier (`_walk_one`, B = 1) is the batched walk the statistical tests prove lossless:
    for the same generator state it returns the same path and token, and leaves the stream where `_walk` does."""
    from specbench.decoding.verify import _walk, _walk_one

    tree, p, q = case
    g1, g2 = make_generator(seed), make_generator(seed)
    one = _walk_one(p, tree, q, g1)
    batched = _walk(p[None], tree, None if q is None else q[None], g2).item()
    assert (one.path, one.token) == (batched.path, batched.token)
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))


# --------------------------------------------------------------------------- greedy

def greedy_reference(logits: list[list[float]], tokens: list[int], parents: list[int]) -> tuple[list[int], int]:
    """Independent formulation: node i is accepted iff its parent is, its token is the
    parent's argmax (first index of the maximum), and no earlier sibling already carries
    that token.  The accepted nodes form one chain; the extra token is its end's argmax."""
    best = [row.index(max(row)) for row in logits]
    accepted = [True] + [False] * len(parents)
    for i in range(1, len(parents) + 1):
        par = parents[i - 1]
        first_match = min(j for j in range(1, len(parents) + 1)
                          if parents[j - 1] == par and tokens[j] == tokens[i])
        accepted[i] = accepted[par] and tokens[i] == best[par] and first_match == i
    chain = [i for i in range(1, len(accepted)) if accepted[i]]
    end = chain[-1] if chain else 0
    return chain, best[end]


@st.composite
def greedy_cases(draw):
    V = draw(st.integers(2, 8))
    bushy = draw(st.booleans())
    parents = draw(tree_shapes(max_nodes=V + 3 if bushy else 10, max_depth=4, bushy=bushy))
    n = len(parents) + 1
    # small integer logits: exact ties happen, and argmax must take the first maximum
    logits = [[float(draw(st.integers(-3, 3))) for _ in range(V)] for _ in range(n)]
    # draft tokens biased towards the parent's argmax so that long accepted paths occur
    tokens = [draw(st.integers(0, V - 1))]
    for par in parents:
        row = logits[par]
        tokens.append(row.index(max(row)) if draw(st.booleans()) else draw(st.integers(0, V - 1)))
    return logits, tokens, parents


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(case=greedy_cases())
def test_greedy_matches_reference(case, device):
    logits, tokens, parents = case
    tree = Tree(tokens[0], Proposal(tokens[1:], parents))
    verdict = verify_greedy(torch.tensor(logits, device=device), tree)
    chain, token = greedy_reference(logits, tokens, parents)
    assert (verdict.path, verdict.token) == (chain, token)
    # what it emits is the greedy continuation: each token the argmax after the previous one
    emitted = [tree.tokens[i] for i in verdict.path] + [verdict.token]
    for node, tok in zip([0, *verdict.path], emitted):
        assert tok == logits[node].index(max(logits[node]))


def test_sampled_siblings_must_be_stated_iid():
    """The sampled-tree verifier refuses siblings not stated as i.i.d. draws, through the loop's entry point
    too; a sampled chain (no siblings) needs no statement."""
    from specbench.decoding.verify import accept

    V = 4
    logits = torch.zeros(3, V)
    q = torch.full((2, V), 1.0 / V)
    cfg = SamplingConfig(temperature=1.0)
    for draws in (None, "without_replacement"):
        tree = Tree(0, Proposal([1, 2], [0, 0], draft_probs=q, sibling_draws=draws))
        with pytest.raises(ValueError, match="exact only for siblings drawn i.i.d. with replacement"):
            accept(logits, tree, cfg, q)
    accept(logits, Tree(0, Proposal([1, 2], [0, 0], draft_probs=q, sibling_draws="iid")), cfg, q)
    accept(logits, Tree(0, Proposal.chain([1, 2], q)), cfg, q)



def test_chi_square_check_fails_on_one_draw_in_a_zero_probability_cell():
    from helpers import chi_square_check

    expected = torch.tensor([[0.5, 0.0], [0.25, 0.25]]).numpy()
    ok = torch.tensor([[0, 0], [0, 0], [1, 0], [1, 1]] * 300)  # exactly the expected frequencies
    assert chi_square_check(ok, expected).ok
    assert not chi_square_check(torch.cat([ok, torch.tensor([[0, 1]])]), expected).ok
