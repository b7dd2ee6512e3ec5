"""The fast runtime computes the hf runtime's function: the same logits (to float rounding) on every call
the decode loop makes (prefill, extend, a tree forward with its mask, commit of a non-contiguous path,
truncate), the same greedy tokens for vanilla and tree methods, on Llama and on Qwen2 (q/k/v biases), and
a clear refusal where it does not apply. A deliberately broken fast runtime (mask ignored, rotary off)
must fail the parity check."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from specbench.decoding import Proposal, SamplingConfig, Tree, generate
from specbench.methods import DrafterBase, get_method
from specbench.models import fast_runtime
from specbench.models.loading import tiny_llama, tiny_mistral, tiny_random, tiny_sizes
from specbench.models.registry import ModelError
from specbench.models.target import Target

pytestmark = pytest.mark.usefixtures("single_thread")

ATOL = 1e-4  # float32 logits of std-0.5 tiny models are O(10): a few ulps of rounding, far below any bug


def _qwen2(seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return tiny_random(Qwen2ForCausalLM, Qwen2Config(**tiny_sizes(64, 32, 2, 4, 2, 64, 512)), seed)


MODELS = {"llama": lambda: tiny_llama(seed=3).model, "llama-tied": lambda: tiny_llama(seed=4, tie_word_embeddings=True)
          .model, "qwen2": _qwen2}


def _script(t: Target) -> list[torch.Tensor]:
    """Every kind of call the loop and the drafters make, in one sequence; the logits of each."""
    out = [t.prefill(list(range(3, 20))).logits]
    tree = Tree(5, Proposal.from_paths([[7, 8, 9], [7, 10], [11, 12, 13, 14], [15]]))
    step = t.forward_tree(tree)
    out.append(step.logits)
    t.commit(tree.path_to(len(tree) - 2))  # a path that is not the first nodes: rows move in the cache
    out.append(t.extend([21]).logits)
    out.append(t.extend([22, 23, 24]).logits)
    t.truncate(t.length - 2)
    out.append(t.forward_tree(Tree(9, Proposal.chain([1, 2, 3]))).logits)
    t.commit([0, 1])
    out.append(t.extend([4]).logits)
    return out


# plans a machine may choose (`fast_runtime.kernel_plan`): the rule before calibration, oneDNN everywhere,
# and one that runs every kernel and pads (the test model's calls have 1-5 rows)
PLANS = {"fixed": "1:gemv", "packed": "", "mixed": "1:wx,2:linear,3:packed@5,4:gemv@6,5:wx@7"}


@pytest.mark.parametrize("plan", sorted(PLANS))
@pytest.mark.parametrize("family", sorted(MODELS))
def test_every_call_matches_the_hf_runtime(family, plan, monkeypatch):
    """With any kernel plan (a machine's choice)."""
    monkeypatch.setattr(fast_runtime, "_plan", fast_runtime.parse_plan(PLANS[plan]))
    model = MODELS[family]()
    fast, hf = Target(model, runtime="fast"), Target(model, runtime="hf")
    assert fast.runtime_name == "fast" and hf.runtime_name == "hf"
    for i, (a, b) in enumerate(zip(_script(fast), _script(hf))):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0, msg=lambda m, i=i: f"call {i}: {m}")
    for la, lb in zip(fast.cache.layers, hf.cache.layers):  # the same KV rows survive the commits
        torch.testing.assert_close(la.keys, lb.keys, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kernel", fast_runtime.KERNELS)
@pytest.mark.parametrize("rows,pad", [(1, 0), (1, 3), (2, 0), (3, 2), (16, 0), (17, 0)])
def test_each_kernel_and_padding_computes_the_linear(kernel, rows, pad, monkeypatch):
    """x W^T + b by every kernel, unpadded or over appended zero rows (rows past the plan: packed)."""
    plan = f"{rows}:{kernel}@{rows + pad}" if rows <= fast_runtime.PLAN_ROWS else f"1:{kernel}"
    monkeypatch.setattr(fast_runtime, "_plan", fast_runtime.parse_plan(plan))
    g = torch.Generator().manual_seed(rows)
    w, b, x = torch.randn(40, 24, generator=g), torch.randn(40, generator=g), torch.randn(rows, 24, generator=g)
    lin = fast_runtime.FastLinear(w, b)
    y = lin(x)
    assert y.shape == (rows, 40)
    torch.testing.assert_close(y, F.linear(x, w, b), atol=1e-5, rtol=1e-5)


def test_a_linear_keeps_only_the_weight_layouts_its_plan_uses(monkeypatch):
    w = torch.randn(8, 4)
    monkeypatch.setattr(fast_runtime, "_plan", fast_runtime.parse_plan(""))
    lin = fast_runtime.FastLinear(w)
    assert lin.packed is not None and lin.wt is None and lin.w is None
    monkeypatch.setattr(fast_runtime, "_plan", fast_runtime.parse_plan("1:gemv,2:wx"))
    lin = fast_runtime.FastLinear(w)
    assert lin.wt is not None and lin.w is not None
    half = fast_runtime.FastLinear(w.half())  # no oneDNN path: F.linear on the weight itself
    assert half.packed is None and half.wt is None and half.plan == {}
    torch.testing.assert_close(half(torch.ones(3, 4).half()), F.linear(torch.ones(3, 4).half(), w.half()))


def test_the_kernel_plan_is_chosen_once_and_can_be_pinned(monkeypatch):
    from specbench.errors import UsageError

    expect = {"fixed": {1: ("gemv", 1), 2: ("packed", 2)}, "packed": {1: ("packed", 1), 2: ("packed", 2)},
              "1:wx, 3:packed@8": {1: ("wx", 1), 2: ("packed", 2), 3: ("packed", 8)}}
    for want, head in expect.items():
        monkeypatch.setattr(fast_runtime, "_plan", None)
        monkeypatch.setenv(fast_runtime.KERNELS_ENV, want)
        plan = fast_runtime.kernel_plan()
        assert sorted(plan) == list(range(1, fast_runtime.PLAN_ROWS + 1))
        assert {n: plan[n] for n in head} == head
        assert fast_runtime.parse_plan(fast_runtime.plan_text(plan)) == plan  # what results files record repeats
    monkeypatch.setattr(fast_runtime, "_plan", None)
    monkeypatch.setenv(fast_runtime.KERNELS_ENV, "auto")
    chosen = fast_runtime.kernel_plan()
    for n, (kernel, m) in chosen.items():
        assert kernel in fast_runtime.KERNELS and m >= n and (m == n or kernel == "packed")
    monkeypatch.setenv(fast_runtime.KERNELS_ENV, "other")
    assert fast_runtime.kernel_plan() == chosen  # once per process: later settings do not flip it
    for bad in ("other", "1:gemv@0", "0:gemv", "17:packed", "2:fast", "2:wx@1", "1"):
        monkeypatch.setattr(fast_runtime, "_plan", None)
        monkeypatch.setenv(fast_runtime.KERNELS_ENV, bad)
        with pytest.raises(UsageError, match="SPECBENCH_FAST_KERNELS=.*expected auto, fixed, packed or a plan"):
            fast_runtime.kernel_plan()


BROKEN = {
    "mask ignored": lambda self, ids, positions, mask, cache: ORIGINAL(self, ids, positions, None, cache),
    "no rotary": lambda self, ids, positions, mask, cache: ORIGINAL(self, ids, positions * 0, mask, cache),
}
ORIGINAL = fast_runtime.FastDecoder.forward


@pytest.mark.parametrize("how", sorted(BROKEN))
def test_the_parity_check_catches_a_broken_fast_runtime(monkeypatch, how):
    model = MODELS["llama"]()
    hf = _script(Target(model, runtime="hf"))
    monkeypatch.setattr(fast_runtime.FastDecoder, "forward", BROKEN[how])
    broken = _script(Target(model, runtime="fast"))
    assert any(not torch.allclose(a, b, atol=ATOL, rtol=0) for a, b in zip(broken, hf))


@pytest.mark.parametrize("method,params", [("vanilla", {}), ("pld", {}), ("lookahead", {})])
def test_greedy_tokens_equal_the_hf_runtime(method, params):
    model = tiny_llama(seed=5).model
    m = get_method(method)
    outs = {}
    for rt in ("hf", "fast"):
        t = Target(model, runtime=rt)
        d = m.drafter(t, SamplingConfig(), None, **m.params(params)) if method != "vanilla" else DrafterBase()
        outs[rt] = [generate(t, d, p, 24, SamplingConfig(), None, stop_ids=set()).tokens
                    for p in ([1, 2, 3], [9, 8, 7, 6, 5], [4, 4, 4, 4])]
    assert outs["fast"] == outs["hf"]


def test_unsupported_models_are_refused_or_left_to_hf():
    sliding = tiny_mistral(sliding_window=8).model
    with pytest.raises(ModelError, match="fast runtime does not support this model .a sliding attention window.*"
                                         "--runtime hf"):
        Target(sliding, runtime="fast")
    assert Target(sliding, runtime="auto").runtime_name == "hf"
    assert Target(tiny_llama().model, runtime="auto").runtime_name == "fast"
    with pytest.raises(ModelError, match="unknown runtime 'gpu'"):
        Target(tiny_llama().model, runtime="gpu")


def _head_script(forward, head, kv) -> list[torch.Tensor]:
    """The head calls a tree drafter makes: a causal prefill, a tree level under a bool mask, a causal commit
    after rolling the drafted slots back."""
    g = torch.Generator().manual_seed(1)
    H = head.hidden_size
    ids, feats = torch.randint(0, head.vocab_size, (12,), generator=g), torch.randn(12, H, generator=g)
    out = [forward(ids[None, :9], feats[None, :9], torch.arange(9)[None], past_key_values=kv)]
    level = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)  # rows 1 and 2 are row 0's children
    mask = torch.cat([torch.ones(3, 9, dtype=torch.bool), level], 1)[None, None]
    out.append(forward(ids[None, 9:], feats[None, 9:], torch.tensor([[9, 10, 10]]), attention_mask=mask,
                       past_key_values=kv))
    kv.layers[0].truncate(9)
    out.append(forward(ids[None, 9:11], feats[None, 9:11], torch.arange(9, 11)[None], past_key_values=kv))
    return out


@pytest.mark.parametrize("variant", ["eagle", "fspad", "wofs", "mlplin"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_the_draft_heads_fast_forward_matches_its_forward(family, variant):
    """A tree drafter on the fast runtime drafts with the head's `fast()`: the head's function to rounding, on
    every kind of call, for EAGLE's head and FSPAD's (sampler, PAD's 2H output, and each alone)."""
    from specbench.models.eagle_head import EagleHead
    from specbench.models.fspad_head import FspadHead
    from specbench.models.target import buffer_cache

    target = Target(MODELS[family](), runtime="fast")
    torch.manual_seed(2)
    head = (EagleHead.for_target(target) if variant == "eagle" else FspadHead.for_target(target, variant=variant))
    head = head.eval()
    with torch.inference_mode():
        ref = _head_script(head, head, buffer_cache())
    got = _head_script(head.fast(), head, buffer_cache())
    for i, (a, b) in enumerate(zip(got, ref)):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0, msg=lambda m, i=i: f"call {i}: {m}")
    method = get_method("eagle2" if variant == "eagle" else "fspad")
    drafter = method.drafter(target, SamplingConfig(), None, **method.params({"checkpoint": head}))
    assert drafter.run_head is not drafter.head  # ... and the tree drafter uses it on this runtime
