"""Shared machinery of the tests: the statistical check, the verifier harness and the tiny target.

The check (`check_sequence`, `check_case`; `chi_square_check` for one histogram) is imported by both the
property tests (tests/test_verify.py) and the mutation tests (tests/test_verify_mutations.py),
so the mutation tests prove that *this* check, not a copy of it, catches broken verifiers.

Vocabulary of the harness
-------------------------
A `Case` is a tree shape plus *prefix tables*: ``P[L]`` has shape ``(V**L, V)`` and row
``idx(prefix)`` is the target's next-token distribution after the ``L`` emitted tokens
``prefix`` (``idx`` = the prefix read as a base-V number).  ``Q[L]`` is the draft
distribution in the same layout.  Each of the B draws of a sampled case drafts its own
tokens from Q (siblings i.i.d. from their parent's row), and p for node i is gathered from
the table at *that draw's* prefix, so the exact output distribution is known in closed
form: P(x1) = P[0][x1], P(x1, x2) = P[0][x1] * P[1][x1, x2], and so on to the K_TOKENS-th token.
"""

from __future__ import annotations

import importlib
import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
from scipy.stats import chi2

from specbench.decoding.sampling import SamplingConfig, make_generator, probs
from specbench.decoding.tree import Proposal, Tree

if TYPE_CHECKING:
    from specbench.models.target import Target

# The module whose primitives the mutation tests monkeypatch.
verify_module = importlib.import_module("specbench.decoding.verify")

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda",
                 marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]

ALPHA = 1e-6  # false-alarm rate of one check; a p-value below it is a failure
MIN_EXPECTED = 10.0  # cells with a smaller expected count are pooled
N_DRAWS = 20_000  # draws per verifier call
K_TOKENS = 4  # emitted tokens checked jointly (a depth-3 chain emits up to 4)
MISMATCH = "distribution mismatch"
OK = "ok"


# --------------------------------------------------------------------------- tiny targets

# The device the tiny targets live on: cpu here; the GPU device check (scripts/gpu_check.sh) runs the
# end-to-end and half-precision modules again with SPECBENCH_TEST_DEVICE=cuda.
TEST_DEVICE = os.environ.get("SPECBENCH_TEST_DEVICE", "cpu")


def tiny_target(seed: int = 0, name: str = "tiny", **sizes) -> Target:
    """A tiny random Llama target: `specbench.models.tiny_llama` (vocab 64, hidden 32, 2 layers unless
    `sizes` say otherwise), deterministic in `seed`, the global RNG untouched, on TEST_DEVICE."""
    from specbench.models import tiny_llama  # transformers: only for the modules that decode
    from specbench.models.target import Target

    return Target(tiny_llama(seed=seed, **sizes).model.to(TEST_DEVICE), name=name)


# --------------------------------------------------------------------------- the check

@dataclass
class CheckResult:
    verdict: str  # OK or MISMATCH
    pvalue: float
    statistic: float
    dof: int
    n: int
    detail: str = ""
    parts: list[CheckResult] = field(default_factory=list)
    alpha: float = ALPHA

    @property
    def ok(self) -> bool:
        return self.verdict == OK

    def __str__(self) -> str:
        head = (f"{self.verdict}: chi2={self.statistic:.1f} dof={self.dof} p={self.pvalue:.3g} "
                f"(N={self.n}, fail below {self.alpha:g})")
        lines = [head + (f"; {self.detail}" if self.detail else "")]
        lines += ["  " + str(p) for p in self.parts]
        return "\n".join(lines)


def _pool(expected: np.ndarray, observed: np.ndarray, min_expected: float) -> tuple[np.ndarray, np.ndarray]:
    """Pool the cells whose expected count is below `min_expected` into one cell (then keep
    adding the next-smallest cells to that pool until it reaches `min_expected` too)."""
    order = np.argsort(expected, kind="stable")
    e, o = expected[order], observed[order]
    small = int(np.searchsorted(e, min_expected, side="left"))  # e[:small] < min_expected
    if small == 0:
        return e, o
    pe, po = e[:small].sum(), o[:small].sum()
    rest_e, rest_o = list(e[small:]), list(o[small:])
    while pe < min_expected and rest_e:
        pe += rest_e.pop(0)
        po += rest_o.pop(0)
    return np.array([pe, *rest_e]), np.array([po, *rest_o])


def chi_square_check(samples, expected, alpha: float = ALPHA, label: str = "") -> CheckResult:
    """Pearson chi-square goodness of fit of `samples` (N, k) ints against the exact joint
    probabilities `expected` (V,)*k.

    Cells of probability exactly 0 are not part of the statistic: any sample in them is a
    mismatch outright.  Cells with a small expected count are pooled (see `_pool`).  Never
    raises on bad samples (out-of-range tokens, wrong shape): those are mismatches too.
    """
    expected = np.asarray(expected, dtype=np.float64)
    k, V = expected.ndim, expected.shape[0]
    total = expected.sum()
    if not (abs(total - 1.0) < 1e-4 and (expected >= 0).all()):
        raise ValueError(f"expected probabilities must be >= 0 and sum to 1 (sum {total})")  # a test bug
    s = samples.detach().cpu().numpy() if isinstance(samples, torch.Tensor) else np.asarray(samples)
    s = s.reshape(len(s), -1).astype(np.int64)
    n = len(s)
    if s.shape[1] != k:
        return CheckResult(MISMATCH, 0.0, math.inf, 0, n, f"{label}samples have {s.shape[1]} tokens, expected {k}")
    bad = ((s < 0) | (s >= V)).any(1)
    if bad.any():
        return CheckResult(MISMATCH, 0.0, math.inf, 0, n,
                           f"{label}{int(bad.sum())} samples hold invalid tokens, e.g. {s[bad][0].tolist()}")
    observed = np.bincount(np.ravel_multi_index(s.T, expected.shape), minlength=expected.size).astype(np.float64)
    exp = expected.ravel() / total
    zero = exp == 0
    if observed[zero].any():
        cells = np.flatnonzero(zero & (observed > 0))
        shown = ", ".join(f"{np.unravel_index(c, expected.shape)}x{int(observed[c])}" for c in cells[:5])
        return CheckResult(MISMATCH, 0.0, math.inf, 0, n,
                           f"{label}{int(observed[zero].sum())} samples in cells of target probability 0: {shown}")
    e, o = _pool(n * exp[~zero], observed[~zero], MIN_EXPECTED)
    if len(e) < 2:
        return CheckResult(OK, 1.0, 0.0, 0, n, f"{label}one cell holds all the mass")
    stat = float(((o - e) ** 2 / e).sum())
    dof = len(e) - 1
    pvalue = float(chi2.sf(stat, dof))
    return CheckResult(MISMATCH if pvalue < alpha else OK, pvalue, stat, dof, n, label.rstrip(": "), alpha=alpha)


def combine(parts: list[CheckResult]) -> CheckResult:
    worst = min(parts, key=lambda r: (r.ok, r.pvalue))
    return CheckResult(OK if all(p.ok for p in parts) else MISMATCH, worst.pvalue, worst.statistic, worst.dof,
                       worst.n, "worst of: " + ", ".join(p.detail or "?" for p in parts), parts, worst.alpha)


def check_sequence(emitted: torch.Tensor, rows: list[torch.Tensor], alpha: float = ALPHA) -> CheckResult:
    """THE losslessness check of emitted token sequences: `emitted` (N, k) and `rows[d]` (N, V), the
    target's exact distribution of token d given that draw's own tokens before d.

    Sequential conditionals: at each depth d the draws are grouped by their prefix x_<d (equal
    prefixes have equal rows) and each group's token-d counts are tested against its row by Pearson
    chi-square (small cells pooled); the groups' statistics and degrees of freedom add up (given the
    group sizes they are independent) into one test per depth.  Together the k tests cover the
    joint law of the k tokens: P(x_1..x_k) = prod_d P(x_d | x_<d).  Each runs at alpha / k
    (Bonferroni), and a draw in a cell of probability 0, at any depth, fails outright.
    """
    em = emitted.detach().cpu().long().numpy() if isinstance(emitted, torch.Tensor) else np.asarray(emitted)
    n, k = em.shape
    V = rows[0].shape[-1]
    if len(rows) < k:
        raise ValueError(f"{k} tokens need {k} conditional rows, got {len(rows)}")  # a test bug
    if ((em < 0) | (em >= V)).any():
        bad = em[((em < 0) | (em >= V)).any(1)][0]
        return CheckResult(MISMATCH, 0.0, math.inf, 0, n, f"invalid tokens, e.g. {bad.tolist()}", alpha=alpha / k)
    parts = []
    for d in range(k):
        p = rows[d].detach().double().cpu().numpy()
        p = p / p.sum(-1, keepdims=True)
        x = em[:, d]
        label = f"token {d + 1} given {d}" if d else "token 1"
        px = p[np.arange(n), x]
        if (px == 0).any():
            where = np.flatnonzero(px == 0)
            shown = ", ".join(str(em[i, :d + 1].tolist()) for i in where[:3])
            parts.append(CheckResult(MISMATCH, 0.0, math.inf, 0, n,
                                     f"{label}: {len(where)} draws in cells of target probability 0: {shown}",
                                     alpha=alpha / k))
            continue
        group = np.unique(em[:, :d], axis=0, return_inverse=True)[1].reshape(-1) if d else np.zeros(n, np.int64)
        stat, dof = 0.0, 0
        order = np.argsort(group, kind="stable")
        for members in np.split(order, np.cumsum(np.bincount(group))[:-1]):
            observed = np.bincount(x[members], minlength=V).astype(np.float64)
            row = p[members[0]]
            nz = row > 0
            e, o = _pool(len(members) * row[nz], observed[nz], MIN_EXPECTED)
            if len(e) >= 2:
                stat += float(((o - e) ** 2 / e).sum())
                dof += len(e) - 1
        pvalue = float(chi2.sf(stat, dof)) if dof else 1.0
        parts.append(CheckResult(MISMATCH if pvalue < alpha / k else OK, pvalue, stat, dof, n, label,
                                 alpha=alpha / k))
    return combine(parts)


def check_emitted(first2: torch.Tensor, p0: torch.Tensor, p1: torch.Tensor) -> CheckResult:
    """`check_sequence` for two tokens from the exact P(x1) (V,) and P(x2 | x1) (V, V)."""
    first2 = first2.detach().cpu().long()
    x1 = first2[:, 0].clamp(0, p0.shape[-1] - 1)
    return check_sequence(first2, [p0.detach().cpu()[None].expand(len(first2), -1), p1.detach().cpu()[x1]])


def detection_noncentrality(dof: int, alpha: float, power: float = 0.99) -> float:
    """Noncentrality lambda at which a chi-square test with `dof` degrees of freedom at level `alpha`
    rejects with probability `power` (lambda = N * sum (p' - p)^2 / p for N draws from p' != p)."""
    from scipy.optimize import brentq
    from scipy.stats import ncx2

    crit = chi2.isf(alpha, dof)
    return float(brentq(lambda lam: ncx2.sf(crit, dof, lam) - power, 1e-6, 1e6))


def detectable_relative_shift(n: int, p: float, alpha: float, power: float = 0.99) -> float:
    """Smallest relative change r of one cell of probability p (the rest rescaled) that a 1-dof test
    over n draws detects with `power`: lambda = n (p r)^2 / (p (1 - p))."""
    return math.sqrt(detection_noncentrality(1, alpha, power) * (1 - p) / (n * p))


# --------------------------------------------------------------------------- cases

VERIFIERS = ("det", "chain", "sampled")


@dataclass
class Case:
    """`kind`: "det" (deterministic candidates `tokens`), "chain" (verify_chain, tokens drafted
    from Q per draw) or "sampled" (verify_tree_sampled, tokens drafted from Q per draw).
    `parents` are the Proposal's (tree node of each draft node's parent)."""

    kind: str
    parents: list[int]
    P: list[torch.Tensor]
    Q: list[torch.Tensor] | None = None
    tokens: list[int] | None = None
    root: int = 0
    note: str = ""

    def __post_init__(self):
        assert self.kind in VERIFIERS
        assert (self.tokens is None) == (self.kind != "det")
        assert (self.Q is None) == (self.kind == "det")
        depth = self.tree().max_depth
        assert len(self.P) >= max(depth, 1) + 1, "P needs levels 0..max(depth, 1)"
        if self.Q is not None:
            assert len(self.Q) >= depth, "Q needs levels 0..depth-1"

    @property
    def vocab(self) -> int:
        return self.P[0].shape[-1]

    def tree(self) -> Tree:
        toks = self.tokens if self.tokens is not None else [0] * len(self.parents)
        draws = "iid" if self.kind == "sampled" else None  # run_verifier draws every node independently
        return Tree(self.root, Proposal(list(toks), list(self.parents), sibling_draws=draws))


def run_verifier(case: Case, device: str, n: int = N_DRAWS, seed: int = 0):
    """Run the case's verifier once, batched over n draws. Returns (BatchVerdict, tree)."""
    dev = torch.device(device)
    tree = case.tree()
    V, m = case.vocab, len(tree)
    P = [t.to(dev, torch.float32) for t in case.P]
    depth = tree.depth
    if case.kind == "det":
        idx = [0] * m
        for i in range(1, m):
            idx[i] = idx[tree.parents[i]] * V + tree.tokens[i]
        p = torch.stack([P[depth[i]][idx[i]] for i in range(m)])[None].expand(n, m, V)
        return verify_module.verify_tree_deterministic(p, tree, make_generator(seed, dev)), tree
    Q = [t.to(dev, torch.float32) for t in case.Q]
    draft_gen = make_generator(seed + 1, dev)
    idx = torch.zeros(n, m, dtype=torch.long, device=dev)
    toks = torch.full((n, m), case.root, dtype=torch.long, device=dev)
    q = torch.zeros(n, m, V, device=dev)
    for i in range(1, m):
        par = tree.parents[i]
        q[:, i] = Q[depth[par]][idx[:, par]]
        toks[:, i] = torch.multinomial(q[:, i], 1, generator=draft_gen)[:, 0]
        idx[:, i] = idx[:, par] * V + toks[:, i]
    p = torch.stack([P[depth[i]][idx[:, i]] for i in range(m)], 1)
    fn = verify_module.verify_chain if case.kind == "chain" else verify_module.verify_tree_sampled
    return fn(p, tree, q, make_generator(seed, dev), tokens=toks), tree


def prefix_index(tokens: torch.Tensor, V: int) -> torch.Tensor:
    """Row of each draw's prefix (N, L) in a level-L prefix table: the tokens read as a base-V number."""
    idx = torch.zeros(len(tokens), dtype=torch.long, device=tokens.device)
    for j in range(tokens.shape[1]):
        idx = idx * V + tokens[:, j]
    return idx


def emitted_tokens(verdict, case: Case, k: int, seed: int = 0) -> torch.Tensor:
    """The first k emitted tokens of each draw.  A draw that emitted fewer stopped there; its next
    tokens are what the next decode steps would emit from a correct verifier, i.e. draws from the
    target's rows at that draw's prefix."""
    em = verdict.emitted(k)
    g = make_generator(seed + 2, em.device)
    for j in range(1, k):
        short = em[:, j] < 0
        head = em[short, :j]
        if short.any() and bool(((head >= 0) & (head < case.vocab)).all()):
            rows = case.P[j].to(em.device, torch.float32)[prefix_index(head, case.vocab)]
            em[short, j] = torch.multinomial(rows, 1, generator=g)[:, 0]
    return em


def table_rows(case: Case, emitted: torch.Tensor) -> list[torch.Tensor]:
    """rows[d] (N, V): the exact target distribution of token d given each draw's tokens before it."""
    em = emitted.cpu().clamp(0, case.vocab - 1)
    return [case.P[d].double()[prefix_index(em[:, :d], case.vocab)] for d in range(emitted.shape[1])]


def check_case(case: Case, device: str = "cpu", n: int = N_DRAWS, seed: int = 0, k: int = K_TOKENS) -> CheckResult:
    """THE losslessness check of a verifier: run it n times and compare the first k emitted tokens
    (k at most the table's levels) with the exact target probabilities, jointly (`check_sequence`)."""
    verdict, _ = run_verifier(case, device, n, seed)
    em = emitted_tokens(verdict, case, min(k, len(case.P)), seed)
    return check_sequence(em, table_rows(case, em))


# --------------------------------------------------------------------------- table builders

def explicit_table(rows_by_level: list, levels: int = K_TOKENS) -> list[torch.Tensor]:
    """Tables from explicit probabilities: level 0 one row (V,), level L a (V**L, V) array or
    a single (V,) row repeated for every prefix.  Levels past the given ones (up to `levels`)
    repeat the last given level on the prefix's last tokens, so every case can be checked to
    K_TOKENS emitted tokens."""
    V = len(rows_by_level[0])
    out = []
    for L, rows in enumerate(rows_by_level):
        t = torch.tensor(rows, dtype=torch.float32)
        t = t.reshape(-1, V).expand(V ** L, V) if t.numel() == V else t.reshape(V ** L, V)
        out.append((t / t.sum(-1, keepdim=True)).contiguous())
    last = out[-1]
    for L in range(len(out), levels):
        out.append(last[torch.arange(V ** L) % len(last)].contiguous())
    return out


KINDS = ("peaked", "near_uniform", "uniform", "sparse", "point", "mixed")


def _logits(kind: str, rows: int, V: int, g: torch.Generator) -> torch.Tensor:
    if kind == "mixed":
        pick = torch.randint(0, len(KINDS) - 1, (rows,), generator=g)
        every = torch.stack([_logits(k, rows, V, g) for k in KINDS[:-1]])
        return every[pick, torch.arange(rows)]
    if kind == "peaked":
        return 3.0 * torch.randn(rows, V, generator=g)
    if kind == "near_uniform":
        return 0.05 * torch.randn(rows, V, generator=g)
    if kind == "uniform":
        return torch.zeros(rows, V)
    keep_one = torch.nn.functional.one_hot(torch.randint(0, V, (rows,), generator=g), V).bool()
    if kind == "sparse":
        keep = (torch.rand(rows, V, generator=g) < 0.5) | keep_one
        return (1.5 * torch.randn(rows, V, generator=g)).masked_fill(~keep, float("-inf"))
    if kind == "point":
        return torch.zeros(rows, V).masked_fill(~keep_one, float("-inf"))
    raise ValueError(kind)


def random_table(seed: int, V: int, levels: int, kind: str, cfg: SamplingConfig,
                 root_logits: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Levels 0..levels-1 of a prefix table, each row `probs(logits, cfg)` of random logits of
    the given kind; `root_logits` (V,) overrides level 0."""
    g = make_generator(seed)
    out = []
    for L in range(levels):
        logits = _logits(kind, V ** L, V, g)
        if L == 0 and root_logits is not None:
            logits = root_logits.reshape(1, V).float()
        out.append(probs(logits, cfg))
    return out
