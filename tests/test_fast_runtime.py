"""The fast runtime computes the hf runtime's function: the same logits (to float rounding) on every call
the decode loop makes (prefill, extend, a tree forward with its mask, commit of a non-contiguous path,
truncate), the same greedy tokens for vanilla and tree methods, on Llama and on Qwen2 (q/k/v biases), and
a clear refusal where it does not apply. A deliberately broken fast runtime (mask ignored, rotary off)
must fail the parity check."""

from __future__ import annotations

import pytest
import torch

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


@pytest.mark.parametrize("one_row", ["gemv", "packed"])
@pytest.mark.parametrize("family", sorted(MODELS))
def test_every_call_matches_the_hf_runtime(family, one_row, monkeypatch):
    """With either kernel for one-row products (a machine's choice, `fast_runtime.one_row_kernel`)."""
    monkeypatch.setattr(fast_runtime, "_one_row", one_row)
    model = MODELS[family]()
    fast, hf = Target(model, runtime="fast"), Target(model, runtime="hf")
    assert fast.runtime_name == "fast" and hf.runtime_name == "hf"
    for i, (a, b) in enumerate(zip(_script(fast), _script(hf))):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0, msg=lambda m, i=i: f"call {i}: {m}")
    for la, lb in zip(fast.cache.layers, hf.cache.layers):  # the same KV rows survive the commits
        torch.testing.assert_close(la.keys, lb.keys, atol=ATOL, rtol=0)


def test_the_one_row_kernel_is_chosen_once_and_can_be_pinned(monkeypatch):
    from specbench.errors import UsageError

    for want in ("gemv", "packed"):
        monkeypatch.setattr(fast_runtime, "_one_row", None)
        monkeypatch.setenv(fast_runtime.ONE_ROW_ENV, want)
        assert fast_runtime.one_row_kernel() == want
        lin = fast_runtime.FastLinear(torch.randn(8, 4))
        assert lin.gemv_one_row == (want == "gemv")
        torch.testing.assert_close(lin(torch.ones(1, 4)), torch.ones(1, 4) @ lin.wt)
    monkeypatch.setattr(fast_runtime, "_one_row", None)
    monkeypatch.setenv(fast_runtime.ONE_ROW_ENV, "auto")
    chosen = fast_runtime.one_row_kernel()
    assert chosen in ("gemv", "packed")
    monkeypatch.setenv(fast_runtime.ONE_ROW_ENV, "other")
    assert fast_runtime.one_row_kernel() == chosen  # once per process: later settings do not flip it
    monkeypatch.setattr(fast_runtime, "_one_row", None)
    with pytest.raises(UsageError, match="SPECBENCH_FAST_ONE_ROW='other': expected gemv, packed or auto"):
        fast_runtime.one_row_kernel()


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
