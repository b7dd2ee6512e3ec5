"""Mutation tests: the losslessness check of tests/test_verify.py must catch broken verifiers.

Each mutant replaces one primitive of the verifier's walk (`_accept_prob`, `_normalise`,
`_residual` in specbench/decoding/verify.py) through pytest's monkeypatch, and runs THE
check (`helpers.check_case`, imported, not copied) on one fixed, explicit case chosen so the
mutation changes the output distribution.  A kill is the check returning "distribution
mismatch"; an exception inside a mutant would make the test error, never pass.  Each case is
also run against the unmutated verifier, which must pass, so a kill is not the check failing
on everything.  Two mutants below go further: (g) a fault at the third draft, invisible to the
first two tokens, and (h) a 2% change of one token's acceptance, with the power statement of
the checks.
"""

from __future__ import annotations

import pytest
import torch
from helpers import (
    ALPHA,
    DEVICES,
    K_TOKENS,
    MISMATCH,
    Case,
    check_case,
    detectable_relative_shift,
    detection_noncentrality,
    explicit_table,
    run_verifier,
)
from helpers import verify_module as vm

pytestmark = pytest.mark.usefixtures("single_thread")

_accept_prob, _normalise, _residual = vm._accept_prob, vm._normalise, vm._residual


# --------------------------------------------------------------------------- mutants

def residual_is_r(r, q, x):
    """(a) No residual: after a rejection the correction is sampled from the current r (= p at
    the first rejection) instead of norm(max(r - q, 0)) / r with x zeroed."""
    return r


def normalise_skipped(r_new, r_old):
    """(b) The residual is not renormalised.  torch.multinomial normalises its rows itself, so
    the correction draw is unaffected: on a CHAIN this mutant is equivalent.  It changes the
    acceptance probability of every later SIBLING, which reads r(x) of an unnormalised r."""
    return r_new


def accept_ignores_q(r_x, q_x):
    """(c) Sampled drafts accepted with probability r(x), as if they were deterministic."""
    return r_x


def rejected_token_kept(r, q, x):
    """(d) Deterministic candidates: a rejected token is not zeroed (r unchanged), so a
    duplicated sibling of a rejected candidate gets a second, illegal chance."""
    return r if q is None else _residual(r, q, x)


def accept_without_min(r_x, q_x):
    """(e) p/q without the min(1, .).  EQUIVALENT under the walk's `u < ratio` with u in
    [0, 1): ratio >= 1 accepts either way (see test_accept_without_min_is_equivalent)."""
    return r_x if q_x is None else r_x / q_x


def accept_ratio_inverted(r_x, q_x):
    """(e') The non-equivalent replacement of (e): the ratio the wrong way up, min(1, q/p)."""
    return r_x if q_x is None else torch.clamp(q_x / r_x, max=1.0)


def sampled_as_deterministic(r, q, x):
    """(f) Sampled siblings treated like deterministic ones on rejection: x zeroed instead of
    r <- norm(max(r - q, 0))."""
    return _residual(r, None, x)


# --------------------------------------------------------------------------- fixed cases

CASES = {
    # sampled chain of length 2; the draft over-weights token 0
    "chain": Case("chain", [0, 1],
                  explicit_table([[0.2, 0.3, 0.5], [[0.6, 0.3, 0.1], [0.1, 0.1, 0.8], [0.3, 0.4, 0.3]],
                                  [0.2, 0.4, 0.4]]),
                  Q=explicit_table([[0.7, 0.2, 0.1], [0.3, 0.6, 0.1]])),
    # two deterministic siblings with different tokens
    "det-siblings": Case("det", [0, 0], explicit_table([[0.5, 0.3, 0.2], [0.4, 0.3, 0.3]]), tokens=[0, 1]),
    # deterministic duplicated siblings: the second 0 must never be accepted
    "det-duplicate": Case("det", [0, 0, 0], explicit_table([[0.4, 0.6, 0.0], [0.4, 0.3, 0.3]]), tokens=[0, 0, 1]),
    # three siblings sampled i.i.d. from a draft that straddles the target
    "sampled-siblings": Case("sampled", [0, 0, 0],
                             explicit_table([[0.2, 0.2, 0.6], [[0.5, 0.5, 0], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]]]),
                             Q=explicit_table([[0.5, 0.5, 0.0]])),
    # after rejecting the first sibling the residual is (0, 0.1, 0.4) before normalisation,
    # (0, 0.2, 0.8) after: a second sibling 1 is accepted with 0.2/0.3 only if normalised.
    # Token 2 is outside the draft's support, so the residual never reaches zero mass.
    "sampled-residual": Case("sampled", [0, 0, 0], explicit_table([[0.2, 0.4, 0.4], [0.5, 0.2, 0.3]]),
                             Q=explicit_table([[0.7, 0.3, 0.0]])),
}

MUTANTS = [
    # (name, primitive patched, replacement, case it is killed on)
    ("a-correction-from-p", "_residual", residual_is_r, "chain"),
    ("a-correction-from-p-det", "_residual", residual_is_r, "det-siblings"),
    ("b-no-renormalise", "_normalise", normalise_skipped, "det-siblings"),
    ("b-no-renormalise-sampled", "_normalise", normalise_skipped, "sampled-residual"),
    ("c-accept-ignores-q", "_accept_prob", accept_ignores_q, "chain"),
    ("d-duplicate-sibling-kept", "_residual", rejected_token_kept, "det-duplicate"),
    ("e'-ratio-inverted", "_accept_prob", accept_ratio_inverted, "chain"),
    ("f-sampled-as-deterministic", "_residual", sampled_as_deterministic, "sampled-siblings"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case_name", sorted(CASES))
def test_fixed_cases_pass_unmutated(case_name, device):
    result = check_case(CASES[case_name], device)
    assert result.ok, str(result)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,primitive,broken,case_name", MUTANTS, ids=[m[0] for m in MUTANTS])
def test_mutant_is_killed(name, primitive, broken, case_name, device, monkeypatch):
    monkeypatch.setattr(vm, primitive, broken)
    result = check_case(CASES[case_name], device)
    assert result.verdict == MISMATCH, f"mutant {name} survived on case {case_name}:\n{result}"


@pytest.mark.parametrize("device", DEVICES)
def test_accept_without_min_is_equivalent(device, monkeypatch):
    """(e) is an equivalent mutant: with u in [0, 1), `u < min(1, p/q)` iff `u < p/q`, so the
    walk consumes the same random numbers and returns bit-identical verdicts; the check
    passes on it, as it must.  It is replaced by (e') above."""
    cases = [CASES["chain"], CASES["sampled-siblings"]]
    before = [run_verifier(c, device, n=5000, seed=3)[0] for c in cases]
    monkeypatch.setattr(vm, "_accept_prob", accept_without_min)
    after = [run_verifier(c, device, n=5000, seed=3)[0] for c in cases]
    for a, b in zip(before, after):
        assert torch.equal(a.path, b.path) and torch.equal(a.token, b.token)
    assert check_case(CASES["chain"], device).ok


@pytest.mark.parametrize("device", DEVICES)
def test_no_renormalise_is_equivalent_on_a_chain(device, monkeypatch):
    """Why (b) is killed on siblings: on a chain the skipped normalisation only reaches
    torch.multinomial, which normalises rows itself, so the check rightly passes there."""
    monkeypatch.setattr(vm, "_normalise", normalise_skipped)
    assert check_case(CASES["chain"], device).ok


# --------------------------------------------------------------------------- beyond the second token

class ThirdDraftIgnoresQ:
    """(g) A fault at depth 2 only: on a chain, the walk's third acceptance (the third draft token)
    uses r(x) instead of min(1, r(x)/q(x)).  The first two emitted tokens are exactly unaffected, so
    only a check that reaches the third token can see it."""

    def __init__(self, chain_depth: int):
        self.chain_depth, self.calls = chain_depth, 0

    def __call__(self, r_x, q_x):
        depth = self.calls % self.chain_depth  # a chain's walk calls this once per depth, root first
        self.calls += 1
        return r_x if depth == 2 else _accept_prob(r_x, q_x)


DEPTH3 = Case("chain", [0, 1, 2],
              explicit_table([[0.3, 0.3, 0.4], [[0.5, 0.3, 0.2], [0.2, 0.5, 0.3], [0.3, 0.3, 0.4]],
                              [0.2, 0.2, 0.6], [0.4, 0.4, 0.2]]),
              Q=explicit_table([[0.3, 0.3, 0.4], [0.3, 0.4, 0.3], [0.6, 0.3, 0.1]]))


@pytest.mark.parametrize("device", DEVICES)
def test_a_fault_at_the_third_draft_is_caught_only_past_two_tokens(device, monkeypatch):
    assert check_case(DEPTH3, device).ok
    monkeypatch.setattr(vm, "_accept_prob", ThirdDraftIgnoresQ(3))
    assert check_case(DEPTH3, device, k=2).ok  # invisible to the first two tokens, as it must be
    result = check_case(DEPTH3, device, k=K_TOKENS)
    assert result.verdict == MISMATCH, f"a third-draft fault survived the {K_TOKENS}-token check:\n{result}"


# --------------------------------------------------------------------------- power
# What the checks can see, at alpha = ALPHA / K_TOKENS per depth and 99% power: a change r of one
# token's probability p (the rest rescaled) is detected when r >= detectable_relative_shift(N, p), the
# best case of a one-degree-of-freedom test. With N_DRAWS = 20,000 draws (the property tests) that is
# 8% for p = 0.3 (the first token's V-1 degrees of freedom need 8.4% at V = 3 and 9.2% at V = 8, and
# deeper tokens, whose draws split over prefixes, need more); the targeted check
# below runs POWER_DRAWS in one batched call, which detects 1.6% for p = 0.3, so a 2% relative
# change of one mid-probability token's acceptance is caught.
POWER_DRAWS = 500_000

# A single draft token 0 with p(0) = 0.3, q(0) = 0.5: accepted with 0.6, and the residual after a
# rejection (0, 0, 1) never returns it, so P(emit 0) = 0.5 * a(0) exactly.
POWER_CASE = Case("chain", [0], explicit_table([[0.3, 0.3, 0.4], [0.2, 0.3, 0.5]]),
                  Q=explicit_table([[0.5, 0.3, 0.2]]))


def accept_two_percent_more(r_x, q_x):
    """(h) The acceptance of the one draft token whose draft probability is 0.5 (token 0 of
    POWER_CASE) raised by 2% relative: 0.6 -> 0.612, so P(emit 0) 0.300 -> 0.306."""
    a = _accept_prob(r_x, q_x)
    return a if q_x is None else torch.where((q_x - 0.5).abs() < 1e-6, (a * 1.02).clamp(max=1.0), a)


def test_power_statement():
    """The figures stated above, recomputed: so the statement cannot drift from the constants."""
    from helpers import N_DRAWS

    alpha = ALPHA / K_TOKENS
    assert round(detectable_relative_shift(N_DRAWS, 0.3, alpha), 2) == 0.08
    assert round(detectable_relative_shift(POWER_DRAWS, 0.3, alpha), 3) == 0.016
    # the mutant's exact first-token distribution has enough noncentrality for 99% power at dof 2
    p, distorted = torch.tensor([0.3, 0.3, 0.4]), torch.tensor([0.306, 0.3, 0.394])
    lam = POWER_DRAWS * float(((distorted - p) ** 2 / p).sum())
    assert lam > detection_noncentrality(2, alpha)


@pytest.mark.parametrize("device", DEVICES)
def test_two_percent_acceptance_change_is_caught(device, monkeypatch):
    assert check_case(POWER_CASE, device, n=POWER_DRAWS).ok
    monkeypatch.setattr(vm, "_accept_prob", accept_two_percent_more)
    result = check_case(POWER_CASE, device, n=POWER_DRAWS)
    assert result.verdict == MISMATCH, f"a 2% acceptance change survived {POWER_DRAWS} draws:\n{result}"
