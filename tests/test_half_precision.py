"""Half precision: the tiny target in bfloat16 and float16 (on CPU; on CUDA in the device check).

The same checks as in float32 (tests/test_lossless_e2e.py), with the tolerance derived from the
dtype and the logits' scale (`specbench.decoding.numerics`) instead of a float32 constant:

* `Target.forward_tree` logits equal uncached forwards along every path of a tree within
  `logit_tolerance` (float32 too, which shows the float32 multiplier holds);
* every method's greedy output equals vanilla's in the same dtype, and the vanilla loop equals the
  uncached argmax; where they part, the top-2 gap must be within the tie tolerance;
* mutation: a tree mask that lets a node see its previous sibling is caught by both checks in both
  half dtypes, so the looser tolerance still sees a real bug.
"""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_target
from test_lossless_e2e import METHODS, _tree_for_test, build_drafter, checkpoint_params, greedy_prompts, next_logits

from specbench.decoding import SamplingConfig, generate, make_generator
from specbench.decoding.numerics import classify_divergence, logit_tolerance
from specbench.methods import DrafterBase
from specbench.models.target import Target

pytestmark = pytest.mark.usefixtures("single_thread")

HALF = [torch.bfloat16, torch.float16]
MAX_NEW = 48
_DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@pytest.fixture(scope="module")
def fp32_target():
    return tiny_target()


@pytest.fixture(scope="module")
def targets(fp32_target):
    """dtype -> the tiny target converted to it (its own copy of the weights)."""
    import copy

    return {dt: Target(copy.deepcopy(fp32_target.model).to(dt), name=f"tiny-{_DTYPE_IDS[dt]}")
            for dt in [torch.float32, *HALF]}


@pytest.fixture(scope="module")
def head_params(fp32_target, tmp_path_factory):
    """name -> method parameters; a head made for the float32 target loads into each dtype (cast by the loader)."""
    return checkpoint_params(fp32_target, tmp_path_factory)


@pytest.fixture(scope="module")
def prompts(fp32_target):
    return greedy_prompts(fp32_target.model) + [[7]]  # and a one-token prompt (empty prefill)


def tree_forward_errors(target: Target, seed: int = 3, trials: int = 6) -> list[tuple[float, float]]:
    """(max |forward_tree - uncached| logit difference, tolerance) for every node of a few trees."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for trial in range(trials):
        context = torch.randint(0, 64, (5 + 3 * trial,), generator=g).tolist()
        tree = _tree_for_test(g)
        target.prefill(context)
        logits = target.forward_tree(tree).logits
        seqs = [context + [tree.tokens[0]] + [tree.tokens[i] for i in tree.path_to(node)] for node in range(len(tree))]
        for node, seq in enumerate(seqs):
            ref = next_logits(target.model, [seq])[0]
            out.append((float((logits[node] - ref).abs().max()), logit_tolerance(target.dtype, ref)))
    return out


def greedy_problems(target: Target, name: str, prompts, params) -> tuple[list[str], int, int]:
    """(divergences that are no numerical tie, ties seen, drafts accepted) of `name` against vanilla
    greedy in the target's dtype; vanilla itself is compared with the uncached argmax."""
    sampling = SamplingConfig()
    problems, ties, accepted = [], 0, 0
    for prompt in prompts:
        if name == "vanilla":
            ref, seq = [], list(prompt)
            for _ in range(MAX_NEW):
                seq.append(int(next_logits(target.model, [seq])[0].argmax()))
            ref = seq[len(prompt):]
            drafter = DrafterBase()
        else:
            ref = generate(target, DrafterBase(), prompt, MAX_NEW, sampling, make_generator(0), stop_ids=set()).tokens
            drafter = build_drafter(name, target, sampling, make_generator(0), params)
        gen = generate(target, drafter, prompt, MAX_NEW, sampling, make_generator(0), stop_ids=set())
        accepted += len(gen.tokens) - len(gen.steps)
        if gen.tokens == ref:
            continue
        i = next(j for j, (a, b) in enumerate(zip(ref, gen.tokens)) if a != b)
        verdict = classify_divergence(next_logits(target.model, [prompt + ref[:i]])[0], target.dtype)
        if verdict["numerical_tie"]:
            ties += 1
        else:
            problems.append(f"token {i}: {gen.tokens[i]} vs {ref[i]}, top-2 gap {verdict['top2_logit_gap']:.3g} "
                            f"> tie tolerance {verdict['tie_tolerance']:.3g}")
    return problems, ties, accepted


@pytest.mark.parametrize("dtype", [torch.float32, *HALF], ids=lambda d: _DTYPE_IDS[d])
def test_forward_tree_matches_uncached_within_dtype_tolerance(dtype, targets):
    errors = tree_forward_errors(targets[dtype])
    worst = max(errors, key=lambda e: e[0] / e[1])
    assert all(d <= tol for d, tol in errors), f"{dtype}: logit difference {worst[0]:.3g} > tolerance {worst[1]:.3g}"


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("dtype", HALF, ids=lambda d: _DTYPE_IDS[d])
def test_greedy_equals_vanilla_or_ties(dtype, name, targets, prompts, head_params):
    problems, ties, accepted = greedy_problems(targets[dtype], name, prompts, head_params)
    assert not problems, f"{name} in {dtype}: " + "; ".join(problems)
    if name != "vanilla":
        assert accepted > 0, f"{name} in {dtype}: no draft accepted, the comparison is vacuous"


def _sibling_sees_sibling(real):
    """Mutant of Target._tree_mask: each node also attends to the sibling listed just before it."""
    def broken(self, tree, prop):
        mask = real(self, tree, prop).clone()
        for i in range(1, len(tree)):
            sibs = [j for j in tree.children[tree.parents[i]] if j < i]
            if sibs:
                mask[0, 0, i, self.length + sibs[-1]] = 0.0
        return mask
    return broken


@pytest.mark.parametrize("dtype", HALF, ids=lambda d: _DTYPE_IDS[d])
def test_half_precision_checks_catch_a_broken_tree_mask(dtype, targets, prompts, head_params, monkeypatch):
    monkeypatch.setattr(Target, "_tree_mask", _sibling_sees_sibling(Target._tree_mask))
    assert any(d > tol for d, tol in tree_forward_errors(targets[dtype]))
    problems, _, _ = greedy_problems(targets[dtype], "eagle2", prompts, head_params)
    assert problems, f"eagle2 with a broken tree mask in {dtype} matched vanilla on every prompt"


@pytest.mark.parametrize("dtype", [torch.float32, *HALF], ids=lambda d: _DTYPE_IDS[d])
def test_a_divergence_is_a_tie_only_within_the_dtype_tolerance(dtype):
    logits = torch.tensor([8.0, 3.0, -2.0])
    tol = 2 * logit_tolerance(dtype, logits)
    assert tol == pytest.approx(2 * {torch.float32: 64, torch.bfloat16: 8, torch.float16: 8}[dtype]
                                * torch.finfo(dtype).eps * 8.0)
    for gap, tie in ((0.5 * tol, True), (2 * tol, False)):
        verdict = classify_divergence(torch.tensor([8.0, 8.0 - gap, -2.0]), dtype)
        assert verdict["numerical_tie"] is tie and verdict["top2_logit_gap"] == pytest.approx(gap)


@pytest.mark.parametrize("dtype", HALF, ids=lambda d: _DTYPE_IDS[d])
def test_the_verifier_works_in_float32_whatever_the_model_dtype(dtype, monkeypatch):
    """Half-precision logits and draft probabilities reach the walk as float32 distributions."""
    from specbench.decoding import verify
    from specbench.decoding.tree import Proposal, Tree

    seen = []
    walk = verify._walk_one
    monkeypatch.setattr(verify, "_walk_one", lambda p, tree, q, g: seen.append((p.dtype, q)) or walk(p, tree, q, g))
    logits = torch.randn(3, 64).to(dtype)
    q = torch.softmax(torch.randn(2, 64), -1).to(dtype)
    cfg = SamplingConfig(temperature=0.8, top_p=0.9)
    verify.accept(logits, Tree(1, Proposal.chain([2, 3])), cfg, None, make_generator(0))
    verify.accept(logits, Tree(1, Proposal.chain([2, 3], q)), cfg, q, make_generator(0))
    assert [p for p, _ in seen] == [torch.float32, torch.float32] and seen[1][1].dtype == torch.float32
