"""End-to-end losslessness on a tiny random Llama (vocab 64): every method through the one
decode loop (specbench.decoding.loop.generate) and the real Target.

* greedy: every method whose drafter can be built without files emits exactly vanilla
  greedy's tokens (a divergence is tolerated only at a numerical tie of the top-2 logits),
  and drafts are actually accepted (prompts are built so that prompt lookup matches);
* sampling (T=1, and T=0.8 with top-k/top-p): the first K_FIRST (4) tokens of many short
  generations follow the EXACT target distribution computed from the model (P(x_d | x_<d) at
  every prefix that occurred, by uncached forwards), jointly, by the same sequential check as
  the verifier tests (`helpers.check_sequence`); mutation tests show it catches drafts
  mislabelled as sampled and a wrong extra token after two accepted drafts; a test-only
  drafter with sampled tree drafts (i.i.d. siblings, draft distribution q != p) exercises the
  loop's sampled-draft path, which no built-in training-free method uses;
* beyond the first step (lookahead drafts only after its window warmed up): every token
  emitted by a step that had drafts follows p(. | its prefix), by a randomised probability
  integral transform whose values must be uniform (same chi-square check; see the comment
  above test_drafted_steps_follow_target);
* Target.forward_tree logits equal uncached forwards along every path of a tree, and
  commit of a non-contiguous path leaves the KV cache equal to a sequential prefill.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from helpers import DEVICES, check_sequence, chi_square_check

from specbench.decoding import Proposal, SamplingConfig, Tree, generate, make_generator, probs
from specbench.decoding.numerics import classify_divergence
from specbench.methods import DrafterBase, available_methods, get_method
from specbench.models.draft_heads import save_head
from specbench.models.target import RUNTIMES, Target

pytestmark = pytest.mark.usefixtures("single_thread")

VOCAB = 64
MAX_NEW_GREEDY = 48
N_GENERATIONS = 2000  # short generations per sampling test
K_FIRST = 4  # their first tokens, checked jointly
MUTANT_GENERATIONS = 600  # enough for the gross faults of the end-to-end mutation tests


# --------------------------------------------------------------------------- model

@pytest.fixture(scope="module", params=RUNTIMES)
def target(request):
    """The tiny random Llama target of `helpers.tiny_target` on each runtime (`specbench.models.target.RUNTIMES`):
    every test of this module runs on both, the hf runtime's being the reference the fast one must match."""
    from helpers import TEST_DEVICE, tiny_target

    if request.param == "fast" and TEST_DEVICE != "cpu":
        pytest.skip("the fast runtime is CPU-only")
    return Target(tiny_target().model, name="tiny", runtime=request.param)


@pytest.fixture(scope="module")
def model(target):
    """The target's model (vocab VOCAB)."""
    return target.model


@torch.inference_mode()
def next_logits(model, seqs: list[list[int]], batch: int = 1024) -> torch.Tensor:
    """Uncached forward of equal-length sequences -> (len(seqs), V) last-position logits."""
    dev = next(model.parameters()).device
    out = []
    for i in range(0, len(seqs), batch):
        ids = torch.tensor(seqs[i:i + batch], device=dev)
        out.append(model(input_ids=ids).logits[:, -1].float().cpu())
    return torch.cat(out)


# --------------------------------------------------------------------------- prompts

def _random_tokens(g: torch.Generator, n: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=g).tolist()


def greedy_prompts(model, count: int = 3) -> list[list[int]]:
    """Prompts s + [X] + t + s whose greedy next token is X: prompt lookup then drafts the
    continuation [X, *t, ...] of the earlier s, and its first token is accepted."""
    g = torch.Generator().manual_seed(1)
    found: list[list[int]] = []
    for _ in range(200):
        s, t = _random_tokens(g, 5), _random_tokens(g, 3)
        cands = [s + [x] + t + s for x in range(VOCAB)]
        best = next_logits(model, cands).argmax(-1)
        hits = [x for x in range(VOCAB) if int(best[x]) == x]
        if hits:
            found.append(cands[hits[0]])
            if len(found) == count:
                return found
    raise AssertionError("no prompt whose greedy continuation repeats an earlier one: change the seeds")


def sampling_prompt(model, cfg: SamplingConfig) -> list[int]:
    """s + [X, Y] + t + s with (X, Y) maximising P(X) * P(Y | X) under cfg: prompt lookup drafts
    [X, Y, ...], so draft acceptance is frequent at T > 0."""
    g = torch.Generator().manual_seed(2)
    s, t = _random_tokens(g, 5), _random_tokens(g, 3)
    pairs = [(x, y) for x in range(VOCAB) for y in range(VOCAB)]
    prompts = [s + [x, y] + t + s for x, y in pairs]
    p1 = probs(next_logits(model, prompts), cfg)
    p2 = probs(next_logits(model, [pr + [x] for pr, (x, _) in zip(prompts, pairs)]), cfg)
    score = torch.tensor([p1[i, x] * p2[i, y] for i, (x, y) in enumerate(pairs)])
    return prompts[int(score.argmax())]


def exact_rows(model, prompt: list[int], emitted: torch.Tensor, cfg: SamplingConfig) -> list[torch.Tensor]:
    """rows[d] (N, V): the target's exact P(x_d | prompt, x_<d) under cfg for each generation's own
    tokens, by uncached forwards of the distinct prefixes."""
    rows = []
    for d in range(emitted.shape[1]):
        if d == 0:
            rows.append(probs(next_logits(model, [prompt]), cfg).expand(len(emitted), -1))
            continue
        heads, inverse = torch.unique(emitted[:, :d], dim=0, return_inverse=True)
        p = probs(next_logits(model, [prompt + h.tolist() for h in heads]), cfg)
        rows.append(p[inverse.reshape(-1)])
    return rows


# --------------------------------------------------------------------------- drafters

def _distilled_checkpoint(task, target, d: Path) -> None:
    """A head of `task`'s architecture fitted in ~100 steps (a few seconds) to the tiny target's own T=1
    text, with the task's loss: any weights keep decoding lossless, but only a head that drafts what the
    target says gets drafts accepted, which the sampling tests need to be more than vacuous."""
    from specbench.training.features import target_hidden_states

    model = target.model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        ids = torch.randint(0, VOCAB, (64, 1))
        with torch.no_grad():
            for _ in range(31):
                nxt = torch.multinomial(torch.softmax(model(ids).logits[:, -1], -1), 1)
                ids = torch.cat([ids, nxt], 1)
            hidden = target_hidden_states(model, ids)
        rows = [{"input_ids": ids[i], "loss_mask": torch.ones(ids.shape[1]), "hidden": hidden[i]}
                for i in range(len(ids))]
        head = task.make_head(model, rows, seed=0)
        opt = torch.optim.AdamW(task.trainable(head), lr=1e-2)
        for step in range(100):
            loss = task.loss(head, task.collate(rows[(step * 8) % 64:(step * 8) % 64 + 8]))["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
    save_head(head.eval(), task.arch, d)


def _eagle_checkpoint(target, d: Path) -> None:
    from specbench.training.eagle import EagleOptions, EagleTask

    _distilled_checkpoint(EagleTask(EagleOptions(embed_init_scale=1.0)), target, d)


def _eagle_draft_vocab_checkpoint(target, d: Path) -> None:
    """An EAGLE head trained over a reduced draft vocabulary (24 of 64 ids; its d2t/t2d mapping)."""
    from specbench.training.eagle import EagleOptions, EagleTask

    _distilled_checkpoint(EagleTask(EagleOptions(embed_init_scale=1.0, draft_vocab=24)), target, d)


def _fspad_checkpoint(target, d: Path) -> None:
    from specbench.training.fspad import FspadOptions, FspadTask

    _distilled_checkpoint(FspadTask(FspadOptions(embed_init_scale=1.0)), target, d)


def _fspad_draft_vocab_checkpoint(target, d: Path) -> None:
    """An FSPAD head trained over a reduced draft vocabulary (24 of 64 ids; its d2t/t2d mapping)."""
    from specbench.training.fspad import FspadOptions, FspadTask

    _distilled_checkpoint(FspadTask(FspadOptions(embed_init_scale=1.0, draft_vocab=24)), target, d)


# Losslessness must hold for any draft weights, so a checkpoint made here for the tiny target drives a
# head method's whole path. Keyed by draft-head architecture (`Identity.head`, else the method's name):
# a registered method that needs a checkpoint of an architecture missing here fails, never skips.
def _layer_prefix_draft(target, d: Path) -> None:
    """A draft LM for `sps`: the tiny target's first layer, its final norm and LM head (q close to p but not
    equal, so drafts are often accepted and sometimes corrected)."""
    from specbench.models.draft_lm import layer_prefix_draft

    layer_prefix_draft(target.model, 1).save_pretrained(d)


def _stored_prefix_draft(target, d: Path) -> None:
    """The distilled drafters' format: the tiny target's first layer and norm (perturbed), stored compactly."""
    from specbench.models.draft_lm import layer_prefix_draft, save_prefix_draft

    lm = layer_prefix_draft(target.model, 1)
    with torch.no_grad():
        lm.model.norm.weight.mul_(1.1)
    save_prefix_draft(lm, d, target=target.name, target_sha256=target.weights_sha256)


# A method over a head trained over a reduced draft vocabulary: not a method of its own, a checkpoint kind
# (EAGLE-2's stands for EAGLE, EAGLE-2 and HASS, whose heads share the architecture)
REDUCED_VOCAB_HEAD = "eagle2(draft-vocab head)"
REDUCED_VOCAB_FSPAD = "fspad(draft-vocab head)"
REDUCED_VOCAB = {REDUCED_VOCAB_HEAD: "eagle2", REDUCED_VOCAB_FSPAD: "fspad"}
CHECKPOINT_BUILDERS = {"eagle": _eagle_checkpoint, "fspad": _fspad_checkpoint, "sps": _layer_prefix_draft,
                       REDUCED_VOCAB_HEAD: _eagle_draft_vocab_checkpoint,
                       REDUCED_VOCAB_FSPAD: _fspad_draft_vocab_checkpoint,
                       **dict.fromkeys(("kld", "tvd", "tvdpp"), _stored_prefix_draft)}
# Methods whose drafter is another's with other default weights: their sampling tests run under -m slow.
SAME_DRAFTER = {"kld": "sps", "tvd": "sps", "tvdpp": "sps"}


def checkpoint_params(target, tmp_path_factory):
    """name -> the method parameters that point it at a draft checkpoint made for `target` ({} if it needs
    none); one checkpoint per architecture, made on first use. A head loads into any dtype of the target."""
    made: dict[str, str] = {}

    def params_for(name: str) -> dict:
        method = get_method(_method(name))
        if not method.needs_checkpoint:
            return {}
        arch = name if name in REDUCED_VOCAB else method.identity.head or name
        if arch not in CHECKPOINT_BUILDERS:
            pytest.fail(f"{name} needs a draft checkpoint ({arch}) and this test cannot make one for the tiny "
                        "target: add a builder to CHECKPOINT_BUILDERS")
        if arch not in made:
            d = tmp_path_factory.mktemp(f"{arch}-head")
            CHECKPOINT_BUILDERS[arch](target, d)
            made[arch] = str(d)
        return {"checkpoint": made[arch]}

    return params_for


@pytest.fixture(scope="module")
def checkpoints(target, tmp_path_factory):
    return checkpoint_params(target, tmp_path_factory)


def build_drafter(name: str, target, sampling: SamplingConfig, generator, checkpoints):
    if name == SAMPLED_TREE:
        return SampledTreeDrafter(target.model, sampling, generator)
    method = get_method(_method(name))
    return method.drafter(target, sampling, generator, **method.params(checkpoints(name)))


def _method(name: str) -> str:
    return REDUCED_VOCAB.get(name, name)


class SampledTreeDrafter(DrafterBase):
    """Test double of a standalone drafter (TVD++-like): two root siblings drawn i.i.d. from q,
    each with one child drawn from q given it.  q = probs(0.6 * target logits, the run's
    sampling config): a flattened target (so q != p), built with the shared `probs`."""

    def __init__(self, model, sampling: SamplingConfig, generator):
        self.model, self.sampling, self.generator = model, sampling, generator

    def _q(self, seqs: list[list[int]]) -> torch.Tensor:
        return probs(0.6 * next_logits(self.model, seqs), self.sampling)

    def propose(self, tokens: list[int]) -> Proposal:
        q_root = self._q([tokens])[0]
        sib = torch.multinomial(q_root, 2, replacement=True, generator=self.generator).tolist()
        q_sib = self._q([tokens + [s] for s in sib])
        kids = torch.multinomial(q_sib, 1, generator=self.generator)[:, 0].tolist()
        return Proposal(tokens=[*sib, *kids], parents=[0, 0, 1, 2],
                        draft_probs=torch.stack([q_root, q_root, q_sib[0], q_sib[1]]), sibling_draws="iid")


SAMPLED_TREE = "sampled-tree(test drafter)"
METHODS = sorted(available_methods()) + list(REDUCED_VOCAB)


# --------------------------------------------------------------------------- greedy

@pytest.fixture(scope="module")
def prompts(model):
    return greedy_prompts(model) + [[7]]  # a one-token prompt: empty prefill, the root is the prompt


@pytest.fixture(scope="module")
def vanilla_greedy(target, prompts):
    return [generate(target, DrafterBase(), p, MAX_NEW_GREEDY, SamplingConfig(), make_generator(0), stop_ids=set())
            for p in prompts]


def assert_same_or_tie(model, prompt: list[int], ref: list[int], got: list[int], what: str) -> None:
    """Token-for-token equality; at the first divergence the target's top-2 logits (uncached
    forward) must be a numerical tie, then the rest is not comparable and is skipped."""
    if got == ref:
        return
    i = next((j for j, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
    assert len(ref) == len(got) or i < min(len(ref), len(got)), f"{what}: lengths {len(got)} vs {len(ref)}"
    verdict = classify_divergence(next_logits(model, [prompt + ref[:i]])[0], next(model.parameters()).dtype)
    gap = verdict["top2_logit_gap"]
    assert verdict["numerical_tie"], (f"{what}: token {i} is {got[i]}, vanilla greedy has {ref[i]}; top-2 logit gap "
                                      f"{gap:.3g} > tie tolerance {verdict['tie_tolerance']:.3g}\n  vanilla {ref}\n"
                                      f"  method  {got}")
    warnings.warn(f"{what}: numerical tie at token {i} (top-2 logit gap {gap:.2g}); tokens after it not compared",
                  stacklevel=2)


def test_vanilla_loop_equals_uncached_argmax(model, prompts, vanilla_greedy):
    """The reference itself: the KV-cached loop with the empty proposal == argmax of uncached forwards."""
    for prompt, gen in zip(prompts, vanilla_greedy):
        seq = list(prompt)
        for _ in range(MAX_NEW_GREEDY):
            seq.append(int(next_logits(model, [seq])[0].argmax()))
        assert_same_or_tie(model, prompt, seq[len(prompt):], gen.tokens, "vanilla loop vs uncached argmax")
        assert gen.steps == [1] * MAX_NEW_GREEDY


@pytest.mark.parametrize("name", METHODS)
def test_greedy_equals_vanilla(name, model, target, prompts, vanilla_greedy, checkpoints):
    sampling = SamplingConfig()
    drafter = build_drafter(name, target, sampling, make_generator(0), checkpoints)
    accepted = 0
    for prompt, ref in zip(prompts, vanilla_greedy):
        gen = generate(target, drafter, prompt, MAX_NEW_GREEDY, sampling, make_generator(0), stop_ids=set())
        assert_same_or_tie(model, prompt, ref.tokens, gen.tokens, f"{name} greedy")
        assert sum(gen.steps) == len(gen.tokens) == MAX_NEW_GREEDY
        accepted += len(gen.tokens) - len(gen.steps)
    if name == "vanilla":
        assert accepted == 0
    else:
        assert accepted > 0, f"{name}: no draft token was ever accepted, the comparison is vacuous"


def _eos_cases(ref: list[int], ends: set[int], per_kind: int = 3) -> list[tuple[int, int, str]]:
    """(k, stop token, where) with ref[k] the token's first occurrence, so vanilla with that EOS stops at
    k: up to `per_kind` positions inside a step's accepted drafts and as many at a step's end."""
    firsts = [k for k in range(len(ref)) if ref[k] not in ref[:k]]
    inside = [(k, ref[k], "inside accepted drafts") for k in firsts if k not in ends][:per_kind]
    at_end = [(k, ref[k], "end of step") for k in firsts if k in ends][:per_kind]
    return inside + at_end


def _eos_greedy_run(name, model, target, prompts, vanilla_greedy, checkpoints):
    """Per EOS case: where the stop falls in the method's step (inside its accepted drafts, or at the
    step's end: the bonus or correction) and a message if the output is not vanilla's, cut at EOS."""
    sampling = SamplingConfig()
    drafter = build_drafter(name, target, sampling, make_generator(0), checkpoints)
    placements, problems = set(), []
    for prompt, ref in zip(prompts, vanilla_greedy):
        free = generate(target, drafter, prompt, MAX_NEW_GREEDY, sampling, make_generator(0), stop_ids=set())
        if free.tokens != ref.tokens:
            continue  # a numerical tie (test_greedy_equals_vanilla proves it one): the cut is not comparable
        ends = {sum(free.steps[:i + 1]) - 1 for i in range(len(free.steps))}  # last index of each step
        for k, eos, where in _eos_cases(ref.tokens, ends):
            gen = generate(target, drafter, prompt, MAX_NEW_GREEDY, sampling, make_generator(0), stop_ids={eos})
            placements.add(where)
            if gen.tokens != ref.tokens[:k + 1] or gen.stop != "eos":
                problems.append(f"EOS {eos} at {k} ({where}): got {gen.tokens} ({gen.stop}), "
                                f"vanilla {ref.tokens[:k + 1]}")
    return placements, problems


@pytest.mark.parametrize("name", METHODS)
def test_greedy_eos_cut_equals_vanilla(name, model, target, prompts, vanilla_greedy, checkpoints):
    """With EOS on, every method stops where vanilla does, whether EOS is accepted inside the drafts,
    is the bonus, or is the correction; the drafting methods must meet EOS inside accepted drafts."""
    placements, problems = _eos_greedy_run(name, model, target, prompts, vanilla_greedy, checkpoints)
    assert not problems, f"{name}: " + "; ".join(problems)
    assert "end of step" in placements
    if name != "vanilla":
        assert "inside accepted drafts" in placements, f"{name} never met EOS inside its accepted drafts"


def test_eos_check_catches_a_loop_that_looks_only_at_the_last_token(model, target, prompts, vanilla_greedy,
                                                                    checkpoints, monkeypatch):
    """Mutation: the loop notices a stop token only at the end of a step's emitted tokens."""
    import specbench.decoding.loop as loop

    monkeypatch.setattr(loop, "cut_at_stop", lambda emitted, stop_ids: (emitted, emitted[-1] in stop_ids))
    _, problems = _eos_greedy_run("pld", model, target, prompts, vanilla_greedy, checkpoints)
    assert problems


# --------------------------------------------------------------------------- sampling

SAMPLINGS = {
    "T1": SamplingConfig(temperature=1.0),
    "T0.8-topk12-topp0.9": SamplingConfig(temperature=0.8, top_k=12, top_p=0.9),
}


@pytest.fixture(scope="module")
def sampling_prompts(model):
    return {key: sampling_prompt(model, cfg) for key, cfg in SAMPLINGS.items()}


def _sampling_params():
    """T=1 for every method; the top-k/top-p case for pld and sps by default, the others under -m slow
    (top-k/top-p with sampled drafts is covered at the verifier level, tests/test_verify.py)."""
    fast_topk = {"pld", "sps"}  # sps: the one built-in method whose drafts are sampled from a real q
    for name in METHODS + [SAMPLED_TREE]:
        for cfg_name in SAMPLINGS:
            slow = (cfg_name != "T1" and name not in fast_topk) or name in SAME_DRAFTER
            yield pytest.param(name, cfg_name, id=f"{name}-{cfg_name}", marks=[pytest.mark.slow] if slow else [])


class Recording:
    """Wraps a drafter to record each step's proposal (per sequence)."""

    def __init__(self, inner):
        self.inner, self.proposals = inner, []

    @property
    def sizes(self) -> list[int]:
        return [len(p) for p in self.proposals]

    def begin(self, prompt, prefill):
        self.proposals = []
        self.inner.begin(prompt, prefill)

    def propose(self, tokens):
        proposal = self.inner.propose(tokens)
        self.proposals.append(proposal)
        return proposal

    def update(self, tree, verdict, out):
        self.inner.update(tree, verdict, out)


def first_tokens(target, drafter, prompt: list[int], cfg: SamplingConfig, generator, n: int = N_GENERATIONS):
    """The first K_FIRST tokens of n generations (n, K_FIRST), and per generation the size of its
    first proposal and the tokens its first step emitted. `generator` is the drafter's own: one stream
    for drafting and verifying, so no draw is reused by another generation."""
    drafter = Recording(drafter)
    out, sizes, firsts = [], [], []
    for _ in range(n):
        gen = generate(target, drafter, prompt, K_FIRST, cfg, generator, stop_ids=set())
        assert len(gen.tokens) == K_FIRST
        out.append(gen.tokens)
        sizes.append(drafter.sizes[0])
        firsts.append(gen.steps[0])
    return torch.tensor(out), sizes, firsts


@pytest.mark.parametrize("name,cfg_name", list(_sampling_params()))
def test_first_tokens_follow_target(name, cfg_name, model, target, sampling_prompts, checkpoints):
    """The first K_FIRST tokens jointly, whatever steps emitted them (`helpers.check_sequence`)."""
    cfg = SAMPLINGS[cfg_name]
    prompt = sampling_prompts[cfg_name]
    generator = make_generator(12345)
    drafter = build_drafter(name, target, cfg, generator, checkpoints)
    emitted, sizes, firsts = first_tokens(target, drafter, prompt, cfg, generator)
    accepted = sum(n > 1 for n in firsts)
    deep = sum(n > 2 for n in firsts)  # first steps that emitted a third token from the drafts' walk
    result = check_sequence(emitted, exact_rows(model, prompt, emitted, cfg))
    assert result.ok, (f"{name} at {cfg}: {accepted}/{N_GENERATIONS} first steps accepted a draft, {deep} two or "
                       f"more\n{result}")
    assert all(part.dof > 0 for part in result.parts), f"{name}: a depth had no prefix group large enough\n{result}"
    if any(sizes):  # methods that draft from the first step on (lookahead warms up: see the next test)
        assert accepted > N_GENERATIONS // 20, f"{name}: drafts accepted in only {accepted} first steps"
    else:
        assert name in ("vanilla", "lookahead"), f"{name} never drafted in the first step"


def test_first_token_check_catches_a_head_method_that_mislabels_its_drafts(model, target, sampling_prompts,
                                                                           checkpoints, monkeypatch):
    """Mutation: EAGLE-2's top-k drafts declared as sampled from a uniform q. The sampled verifier then
    accepts a draft with min(1, p/q) instead of p, over-emitting drafted tokens: the check above, run on
    the head method with its test checkpoint, must see it (and passes on the real drafter)."""
    from specbench.methods.head_drafters import DynamicTreeDrafter

    real = DynamicTreeDrafter.propose

    def mislabelled(self, tokens):
        prop = real(self, tokens)
        if not prop.tokens:
            return prop
        q = torch.full((len(prop.tokens), VOCAB), 1.0 / VOCAB)
        return Proposal(prop.tokens, prop.parents, draft_probs=q, sibling_draws="iid")  # the lie told in full

    monkeypatch.setattr(DynamicTreeDrafter, "propose", mislabelled)
    cfg, prompt = SAMPLINGS["T1"], sampling_prompts["T1"]
    generator = make_generator(12345)
    emitted, _, _ = first_tokens(target, build_drafter("eagle2", target, cfg, generator, checkpoints), prompt, cfg,
                                 generator, n=MUTANT_GENERATIONS)
    assert not check_sequence(emitted, exact_rows(model, prompt, emitted, cfg)).ok


def test_first_token_check_sees_past_the_second_token(model, target, sampling_prompts, checkpoints, monkeypatch):
    """Mutation: the loop takes a step's extra token from the wrong node once two drafts are accepted
    (the parent of the last accepted node). Tokens 1-2 stay exact, so only a check that reaches the
    third token sees it: the two-token check passes on it, the K_FIRST-token check must not."""
    import specbench.decoding.loop as loop
    from specbench.decoding import sample

    real = loop.accept

    def off_by_one_node(logits, tree, cfg, draft_probs, generator=None):
        verdict = real(logits, tree, cfg, draft_probs, generator)
        if len(verdict.path) >= 2:
            verdict.token = int(sample(probs(logits[verdict.path[-2]][None], cfg), generator)[0])
        return verdict

    monkeypatch.setattr(loop, "accept", off_by_one_node)
    cfg, prompt = SAMPLINGS["T1"], sampling_prompts["T1"]
    generator = make_generator(12345)
    emitted, _, firsts = first_tokens(target, build_drafter("pld", target, cfg, generator, checkpoints), prompt, cfg,
                                      generator, n=MUTANT_GENERATIONS)
    assert sum(n > 2 for n in firsts) > MUTANT_GENERATIONS // 20  # the fault is reached
    rows = exact_rows(model, prompt, emitted, cfg)
    assert check_sequence(emitted[:, :2], rows[:2]).ok
    assert not check_sequence(emitted, rows).ok


# Beyond the first step: every emitted token x_t must follow p_t = p(. | prompt, x_<t).  With
# the randomised probability integral transform u_t = F_t(x_t-) + U * p_t(x_t), under an order
# of the vocabulary fixed before x_t is drawn, the u_t of a lossless decoder are i.i.d.
# uniform on [0, 1), and stay so under any selection of positions decided by what came
# before them.  Selected: the tokens emitted by steps with a non-empty proposal.  Order:
# for deterministic candidates (draft probs None), the candidates at that point of the
# step's tree first (child order), then the other tokens by decreasing p_t: a verifier that
# accepts drafts too often or too rarely moves mass to or from the low end of [0, 1), which
# the chi-square check of the binned u_t sees.  For SAMPLED drafts the candidates must not
# be used: the output is p only marginally over the draft sampling, not given the drafted
# tokens (given x drafted, x comes out more often), so there the order is by p_t alone.
PIT_TOKENS = 12  # per generation: lookahead drafts only after its window warmed up (3+ steps)
PIT_GENERATIONS = 500
PIT_BINS = 20


def _pit_params():
    for name in METHODS + [SAMPLED_TREE]:
        if name != "vanilla":
            yield pytest.param(name, id=name, marks=[] if name in ("lookahead", "sps") else [pytest.mark.slow])


def _candidate_orders(proposals: list[Proposal], root_tokens: list[int], steps: list[int],
                      tokens: list[int]) -> list[tuple[int, list[int]]]:
    """(position, deterministic draft candidates there) for every token emitted by a step with a
    proposal.  The node reached inside a step is followed through the first child carrying the
    emitted token (the one the verifier accepts: a rejected token is zeroed, so neither a
    duplicate nor the correction can carry it).  Sampled proposals give no candidates (see above)."""
    out, pos = [], 0
    for proposal, root, n in zip(proposals, root_tokens, steps):
        if len(proposal):
            tree = Tree(root, proposal)
            cur = 0
            for t in range(pos, pos + n):
                kids = tree.children[cur] if proposal.draft_probs is None else []
                out.append((t, list(dict.fromkeys(tree.tokens[c] for c in kids))))
                cur = next((c for c in kids if tree.tokens[c] == tokens[t]), 0)
        pos += n
    return out


def _pit(p: torch.Tensor, x: int, first: list[int], rnd: float) -> float:
    """u for token x under the order: `first` (in that order), then the rest by decreasing p."""
    p = p.double()
    is_first = torch.zeros_like(p, dtype=torch.bool)
    is_first[first] = True
    if x in first:
        below = float(p[first[: first.index(x)]].sum())
    else:
        rest = ~is_first & ((p > p[x]) | ((p == p[x]) & (torch.arange(len(p)) < x)))
        below = float(p[is_first].sum() + p[rest].sum())
    return min((below + rnd * float(p[x])) / float(p.sum()), 1 - 1e-12)


@pytest.mark.parametrize("name", list(_pit_params()))
def test_drafted_steps_follow_target(name, model, target, sampling_prompts, checkpoints):
    cfg = SAMPLINGS["T1"]
    prompt = sampling_prompts["T1"]
    generator = make_generator(777)
    drafter = Recording(build_drafter(name, target, cfg, generator, checkpoints))
    seqs, picks, accepted = [], [], 0
    for _ in range(PIT_GENERATIONS):
        gen = generate(target, drafter, prompt, PIT_TOKENS, cfg, generator, stop_ids=set())
        assert len(gen.tokens) == PIT_TOKENS
        seqs.append(prompt + gen.tokens)
        roots = [(prompt + gen.tokens)[len(prompt) - 1 + pos] for pos in _starts(gen.steps)]
        picks.append(_candidate_orders(drafter.proposals, roots, gen.steps, gen.tokens))
        accepted += sum(n - 1 for size, n in zip(drafter.sizes, gen.steps) if size)
    assert accepted >= 100, f"{name}: only {accepted} draft tokens accepted, the check would be vacuous"
    # p_t for every emitted token: one uncached forward per sequence
    logits = torch.cat([_all_logits(model, seqs[i:i + 256]) for i in range(0, len(seqs), 256)])
    p = probs(logits[:, len(prompt) - 1:-1], cfg)  # (N, PIT_TOKENS, V)
    rnd = torch.rand(len(seqs), PIT_TOKENS, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    u = []
    for i, rows in enumerate(picks):
        for t, first in rows:
            x = seqs[i][len(prompt) + t]
            assert p[i, t, x] > 0, f"{name}: emitted token {x} of target probability 0 at position {t}"
            u.append(_pit(p[i, t], x, first, float(rnd[i, t])))
    bins = (torch.tensor(u) * PIT_BINS).long()
    result = chi_square_check(bins[:, None], torch.full((PIT_BINS,), 1.0 / PIT_BINS).numpy(), label="PIT: ")
    assert result.ok, f"{name}: {len(u)} tokens of drafted steps, {accepted} accepted drafts\n{result}"


def _starts(steps: list[int]) -> list[int]:
    out, pos = [], 0
    for n in steps:
        out.append(pos)
        pos += n
    return out


@torch.inference_mode()
def _all_logits(model, seqs: list[list[int]]) -> torch.Tensor:
    return model(input_ids=torch.tensor(seqs, device=next(model.parameters()).device)).logits.float().cpu()


# --------------------------------------------------------------------------- Target

def _tree_for_test(g: torch.Generator, n: int = 9) -> Tree:
    """A random non-chain tree with a duplicated sibling token."""
    parents = [0, 0, 1, 1, 2, 0, 4, 3][: n - 1]
    tokens = _random_tokens(g, len(parents))
    tokens[1] = tokens[0]  # duplicated root siblings: two different KV rows, same token
    return Tree(_random_tokens(g, 1)[0], Proposal(tokens, parents))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", ["tree", "chain"])
def test_forward_tree_matches_sequential_and_commit(shape, device, model, target):
    runtime = target.runtime_name if device == "cpu" else "hf"  # the fast runtime is CPU-only
    model = model.to(device)
    try:
        target = Target(model, name="tiny", runtime=runtime)
        g = torch.Generator().manual_seed(3)
        context = _random_tokens(g, 7)
        tree = _tree_for_test(g) if shape == "tree" else Tree(_random_tokens(g, 1)[0],
                                                              Proposal.chain(_random_tokens(g, 5)))
        assert tree.is_chain == (shape == "chain")
        target.prefill(context)
        out = target.forward_tree(tree)
        assert out.logits.shape == (len(tree), VOCAB)
        for node in range(len(tree)):
            seq = context + [tree.tokens[0]] + [tree.tokens[i] for i in tree.path_to(node)]
            ref = next_logits(model, [seq])[0]
            torch.testing.assert_close(out.logits[node].cpu(), ref, atol=1e-4, rtol=0,
                                       msg=lambda m, node=node: f"node {node} path {tree.path_to(node)}: {m}")

        # commit a path that is not a prefix of the node order (non-contiguous KV rows)
        leaf = max(range(len(tree)), key=lambda i: (tree.depth[i], i))
        path = tree.path_to(leaf)
        assert shape == "chain" or path != list(range(1, len(path) + 1))
        target.commit([0, *path])
        kept = context + [tree.tokens[0]] + [tree.tokens[i] for i in path]
        ref_target = Target(model, name="ref", runtime=runtime)
        ref_target.prefill(kept)
        assert target.length == ref_target.length == len(kept)
        for layer, ref_layer in zip(target.cache.layers, ref_target.cache.layers):
            torch.testing.assert_close(layer.keys, ref_layer.keys, atol=1e-5, rtol=0)
            torch.testing.assert_close(layer.values, ref_layer.values, atol=1e-5, rtol=0)

        # and decoding goes on from the committed cache exactly as from the prefill
        nxt = Tree(_random_tokens(g, 1)[0], Proposal([1, 2, 3], [0, 0, 1]))
        torch.testing.assert_close(target.forward_tree(nxt).logits, ref_target.forward_tree(nxt).logits,
                                   atol=1e-4, rtol=0)
    finally:
        model.to("cpu")
