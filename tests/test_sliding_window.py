"""Sliding-window targets (tiny random Mistral, windows 8 and 64; a tiny all-sliding Qwen2) decode exactly.

Target keeps the full KV history in BufferLayers and applies the window in its own 4D mask
(transformers' sliding layers drop old rows and cannot roll back a rejected draft).  Checked
against uncached full-model forwards, where transformers applies the window itself:

* the vanilla loop == argmax of uncached forwards, token for token;
* PLD (chain drafts, some accepted, some rejected) == vanilla greedy;
* forward_tree over a tree with siblings, deeper than the small window, after a context longer
  than the window == uncached forwards along every path; after committing a non-contiguous
  path, decoding goes on exactly as from a fresh prefill;
* the same checks catch the old code (transformers' sliding layers + selection commit), a mask
  without the window, and a window off by one;
* a model mixing sliding and full-attention layers is refused with a ModelError.

Generations run past both windows: prompt (14 tokens) + 56 new = 70 > 64.
"""

from __future__ import annotations

import pytest
import torch
from test_lossless_e2e import greedy_prompts, next_logits

import specbench.models.target as target_mod
from specbench.decoding import Proposal, SamplingConfig, Tree, generate, make_generator
from specbench.errors import SpecbenchError
from specbench.methods import DrafterBase, get_method
from specbench.models.loading import tiny_llama, tiny_mistral, tiny_random, tiny_sizes
from specbench.models.registry import ModelError
from specbench.models.target import Target, attention_window

pytestmark = pytest.mark.usefixtures("single_thread")

VOCAB = 64
MAX_NEW = 56
WINDOWS = [8, 64]
ATOL = 1e-4


# --------------------------------------------------------------------------- models and references

def tiny_qwen2(sliding_window: int | None, max_window_layers: int, seed: int = 0):
    """A tiny random Qwen2 (sizes and init of tiny_llama); sliding layers are those >= max_window_layers."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**tiny_sizes(VOCAB, 32, 2, 4, 2, 64, 512), use_sliding_window=sliding_window is not None,
                         sliding_window=sliding_window, max_window_layers=max_window_layers)
    return tiny_random(Qwen2ForCausalLM, config, seed)


@pytest.fixture(scope="module", params=WINDOWS, ids=lambda w: f"window{w}")
def target(request):
    return Target(tiny_mistral(sliding_window=request.param).model, name=f"tiny-mistral-w{request.param}")


@pytest.fixture(scope="module")
def prompts(target):
    return greedy_prompts(target.model)


@pytest.fixture(scope="module")
def uncached_greedy(target, prompts):
    out = []
    for prompt in prompts:
        seq = list(prompt)
        for _ in range(MAX_NEW):
            seq.append(int(next_logits(target.model, [seq])[0].argmax()))
        out.append(seq[len(prompt):])
    return out


# --------------------------------------------------------------------------- the checks (also run on mutants)

def vanilla(target, prompt):
    return generate(target, DrafterBase(), prompt, MAX_NEW, SamplingConfig(), make_generator(0), stop_ids=set())


def vanilla_problems(target, prompts, refs) -> list[str]:
    """Where the KV-cached vanilla loop differs from `refs` (uncached argmax)."""
    problems = []
    for prompt, ref in zip(prompts, refs):
        got = vanilla(target, prompt).tokens
        if got != ref:
            i = next(j for j, (a, b) in enumerate(zip(got, ref)) if a != b)
            problems.append(f"prompt {prompt}: token {i} is {got[i]}, uncached argmax {ref[i]}")
    return problems


def pld_run(target, prompts, refs) -> tuple[list[str], int, int]:
    """(mismatches with `refs`, draft tokens accepted, draft tokens rejected) of PLD greedy."""
    method = get_method("pld")
    sampling = SamplingConfig()
    drafter = method.drafter(target, sampling, make_generator(0), **method.params({}))
    problems, accepted, rejected = [], 0, 0
    for prompt, ref in zip(prompts, refs):
        gen = generate(target, drafter, prompt, MAX_NEW, sampling, make_generator(0), stop_ids=set())
        if gen.tokens != ref:
            i = next((j for j, (a, b) in enumerate(zip(gen.tokens, ref)) if a != b), len(ref))
            problems.append(f"prompt {prompt}: first difference at token {i}\n  pld     {gen.tokens}\n  ref     {ref}")
        accepted += sum(gen.accepted)
        rejected += sum(gen.reached) - sum(gen.accepted)  # tried depths that were not accepted
    return problems, accepted, rejected


def deep_tree(g: torch.Generator) -> Tree:
    """Root siblings with the same token, a second branching below node 1, and one branch 9 drafts deep
    (past the window of 8 inside the tree itself)."""
    parents = [0, 0, 1, 1, 2, 3, 6, 7, 8, 9, 10, 11]
    tokens = torch.randint(0, VOCAB, (len(parents),), generator=g).tolist()
    tokens[1] = tokens[0]  # duplicated siblings: two different KV rows, same token
    return Tree(int(torch.randint(0, VOCAB, (1,), generator=g)), Proposal(tokens, parents))


def tree_problems(target) -> list[str]:
    """forward_tree vs uncached forwards along every path, after a context longer than the window; then
    commit a non-contiguous path and check the next forward against uncached forwards and a fresh prefill."""
    model, window = target.model, attention_window(target.config)
    g = torch.Generator().manual_seed(3)
    context = torch.randint(0, VOCAB, (window + 6,), generator=g).tolist()
    tree = deep_tree(g)
    assert not tree.is_chain and max(tree.depth) + 1 > 8
    problems = []

    def compare(got, seq, what):
        ref = next_logits(model, [seq])[0]
        err = float((got - ref).abs().max())
        if err > ATOL:
            problems.append(f"{what}: logits differ by {err:.3g}")

    target.prefill(context)
    out = target.forward_tree(tree)
    for node in range(len(tree)):
        compare(out.logits[node], context + [tree.tokens[0]] + [tree.tokens[i] for i in tree.path_to(node)],
                f"node {node}")

    leaf = max(range(len(tree)), key=lambda i: (tree.depth[i], i))
    path = tree.path_to(leaf)
    assert path != list(range(1, len(path) + 1)), "the committed path must be non-contiguous"
    target.commit([0, *path])
    kept = context + [tree.tokens[0]] + [tree.tokens[i] for i in path]
    assert target.length == len(kept)
    nxt = Tree(7, Proposal([1, 2, 3], [0, 0, 1]))
    after = target.forward_tree(nxt).logits
    for node in range(len(nxt)):
        compare(after[node], kept + [7] + [nxt.tokens[i] for i in nxt.path_to(node)], f"after commit, node {node}")
    fresh = Target(model, name="fresh")
    fresh.prefill(kept)
    err = float((after - fresh.forward_tree(nxt).logits).abs().max())
    if err > ATOL:
        problems.append(f"after commit vs a fresh prefill: logits differ by {err:.3g}")
    return problems


# --------------------------------------------------------------------------- exact decoding

def test_every_cache_layer_keeps_full_history(target):
    assert target.window == attention_window(target.config) in WINDOWS
    target.prefill(list(range(40)) + list(range(40)))  # 80 tokens: past both windows
    assert all(type(layer) is target_mod.BufferLayer and layer.keys.shape[-2] == 80 for layer in target.cache.layers)


def test_vanilla_loop_equals_uncached_argmax(target, prompts, uncached_greedy):
    assert len(prompts[0]) + MAX_NEW > max(WINDOWS)
    assert not vanilla_problems(target, prompts, uncached_greedy)


def test_pld_equals_vanilla_with_accepts_and_rejects(target, prompts, uncached_greedy):
    refs = [vanilla(target, p).tokens for p in prompts]
    assert refs == uncached_greedy
    problems, accepted, rejected = pld_run(target, prompts, refs)
    assert not problems, "\n".join(problems)
    assert accepted > 0, "no draft accepted: the comparison is vacuous"
    assert rejected > 0, "no draft rejected: commit after a rejection is not exercised"


def test_forward_tree_and_commit_match_uncached(target):
    problems = tree_problems(target)
    assert not problems, "\n".join(problems)


def test_all_sliding_qwen2_decodes_exactly():
    """Qwen2 with use_sliding_window and max_window_layers=0: every layer slides, the same mask serves all."""
    model = tiny_qwen2(sliding_window=8, max_window_layers=0)
    target = Target(model, name="tiny-qwen2-w8")
    assert target.window == 8
    prompt = list(range(3, 17))
    seq = list(prompt)
    for _ in range(MAX_NEW):
        seq.append(int(next_logits(model, [seq])[0].argmax()))
    assert not vanilla_problems(target, [prompt], [seq[len(prompt):]])
    assert not tree_problems(target)


# --------------------------------------------------------------------------- the checks catch broken code

def _old_buffer_cache(config=None):
    """The code before the fix: transformers' sliding-window layers kept as built."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=config)
    cache.layers = [target_mod.BufferLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def _old_commit(self, nodes):
    """The code before the fix: non-buffer layers rebuilt by index_select at absolute positions."""
    contiguous = nodes == list(range(len(nodes)))
    idx = None if contiguous else torch.tensor(nodes)
    for layer in self.cache.layers:
        if isinstance(layer, target_mod.BufferLayer):
            layer.keep(self.length, idx, len(nodes))
        else:
            sel = torch.cat([torch.arange(self.length), self.length + torch.tensor(nodes)])
            layer.keys, layer.values = layer.keys.index_select(2, sel), layer.values.index_select(2, sel)
    self.length += len(nodes)


def test_checks_catch_transformers_sliding_layers(target, prompts, uncached_greedy, monkeypatch):
    """Mutation: the old code (transformers' sliding layers, selection commit, transformers' own mask for
    prefill and chains).  Window 8: already the vanilla loop is wrong; window 64: PLD goes wrong once a
    rejected draft has to be rolled back."""
    monkeypatch.setattr(target_mod, "buffer_cache", _old_buffer_cache)
    monkeypatch.setattr(Target, "commit", _old_commit)
    monkeypatch.setattr(target, "window", None)
    target.prefill([1, 2, 3])
    assert any(type(layer) is not target_mod.BufferLayer for layer in target.cache.layers)
    check = vanilla_problems if attention_window(target.config) == 8 else (lambda *a: pld_run(*a)[0])
    try:
        problems = check(target, prompts, uncached_greedy)
    except (RuntimeError, IndexError) as e:  # the old commit selecting rows the sliding layer dropped
        problems = [f"{type(e).__name__}: {e}"]
    assert problems


@pytest.mark.parametrize("wrong", ["no window", "window + 1", "window - 1"])
def test_checks_catch_a_wrong_window_in_the_mask(target, prompts, uncached_greedy, monkeypatch, wrong):
    """Mutation: the mask without the window, or off by one either way (transformers: q - k < W)."""
    window = attention_window(target.config)
    monkeypatch.setattr(target, "window", {"no window": 1 << 30, "window + 1": window + 1,
                                           "window - 1": window - 1}[wrong])
    assert tree_problems(target)
    if wrong == "no window":
        assert vanilla_problems(target, prompts, uncached_greedy)


# --------------------------------------------------------------------------- what is refused, what is unchanged

def test_mixed_sliding_and_full_layers_are_refused():
    model = tiny_qwen2(sliding_window=8, max_window_layers=1)  # layer 0 full, layer 1 sliding
    assert sorted(set(model.config.layer_types)) == ["full_attention", "sliding_attention"]
    with pytest.raises(ModelError, match="same attention on every layer") as info:
        Target(model)
    assert isinstance(info.value, SpecbenchError)  # the CLI prints it as one line


def test_window_of_configs():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    assert attention_window(LlamaConfig()) is None
    assert attention_window(MistralConfig(sliding_window=None)) is None
    assert attention_window(MistralConfig(sliding_window=4096)) == 4096
    assert attention_window(Qwen2Config()) is None  # use_sliding_window is False by default
    assert attention_window(Qwen2Config(use_sliding_window=True, max_window_layers=28, num_hidden_layers=24)) is None
    assert attention_window(Qwen2Config(use_sliding_window=True, max_window_layers=0, sliding_window=64)) == 64
    with pytest.raises(ModelError):
        attention_window(Qwen2Config(use_sliding_window=True, max_window_layers=4, num_hidden_layers=8))


def test_full_attention_targets_keep_model_built_masks(monkeypatch):
    """Llama: no window, and prefill and chains still let the model build its causal mask (no mask passed)."""
    target = Target(tiny_llama().model)
    assert target.window is None
    masks = []
    run = target._run
    monkeypatch.setattr(target, "_run", lambda ids, pos, mask: masks.append(mask) or run(ids, pos, mask))
    target.prefill([1, 2, 3])
    target.forward_tree(Tree(4, Proposal.chain([5, 6])))
    target.commit([0, 1])
    target.forward_tree(Tree(5, Proposal([1, 2], [0, 0])))
    assert masks[:2] == [None, None] and masks[2] is not None
