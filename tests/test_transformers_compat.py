"""transformers compatibility: the project's own model calls emit no deprecation warnings.

A decode (target prefill, chain and tree forwards, commit of a non-contiguous path, the EAGLE
head drafting and refreshing its KV cache) and the training-side feature extraction run under
a recorder of DeprecationWarning / FutureWarning and of transformers' deprecation log lines.
Deprecated arguments (e.g. `past_key_values`, renamed `cache` in transformers 5.x) are removed
a few releases after the warning, so a warning today is a break tomorrow.  The same recorder
must catch the deprecated call made on purpose, or the test would prove nothing.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import warnings

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaModel

from specbench.decoding import SamplingConfig, Tree, generate
from specbench.decoding.tree import Proposal
from specbench.decoding.verify import Verdict
from specbench.methods.base import get_method
from specbench.methods.head_drafters import DynamicTreeDrafter, StaticTreeDrafter, parse_tree
from specbench.models.eagle_head import EagleHead
from specbench.models.hf_compat import cache_kwargs
from specbench.models.target import Target
from specbench.training.features import target_hidden_states

pytestmark = pytest.mark.usefixtures("single_thread")

DEPRECATIONS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
PROMPT = [3, 17, 5, 9, 22, 41, 3, 17]


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record):
        msg = record.getMessage()
        if "deprecat" in msg.lower():
            self.lines.append(msg)


@contextlib.contextmanager
def deprecations():
    """Yields a list that collects every deprecation warning and transformers deprecation log line."""
    found: list[str] = []
    tf_logger = logging.getLogger("transformers")
    handler = _Lines()
    # transformers logs some deprecations with `warning_once` (an lru_cache): forget what it already said.
    once = getattr(logging.Logger, "warning_once", None)
    if hasattr(once, "cache_clear"):
        once.cache_clear()
    tf_logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield found
    finally:
        tf_logger.removeHandler(handler)
    found += [f"{w.category.__name__} ({w.filename}:{w.lineno}): {w.message}"
              for w in caught if issubclass(w.category, DEPRECATIONS)]
    found += handler.lines


@pytest.fixture(scope="module")
def head(target) -> EagleHead:
    torch.manual_seed(1)
    return EagleHead.for_target(target).eval().requires_grad_(False)


def _decode_by_hand(target: Target) -> None:
    """prefill, a chain forward (the model's own causal mask), a branching tree (a 4D tree mask), commits."""
    target.prefill(PROMPT[:-1])
    chain = Tree(PROMPT[-1], Proposal([5, 6, 7], [0, 1, 2]))
    target.forward_tree(chain)
    target.commit([0, 1])
    tree = Tree(9, Proposal([10, 11, 12, 13], [0, 0, 1, 2]))
    target.forward_tree(tree)
    target.commit([0, 2, 4])  # a non-contiguous path: the KV cache is compacted in place


def _draft_steps(target: Target, drafter, steps: int = 3) -> None:
    seq = list(PROMPT)
    drafter.begin(seq, target.prefill(seq[:-1]))
    for _ in range(steps):
        tree = Tree(seq[-1], drafter.propose(seq))
        out = target.forward_tree(tree)
        path = tree.children[0][:1]  # accept the first drafted child when there is one
        verdict = Verdict(path, int(out.logits[path[-1] if path else 0].argmax()))
        target.commit([0, *path])
        seq += [tree.tokens[i] for i in path] + [verdict.token]
        drafter.update(tree, verdict, out)


def test_decode_emits_no_deprecation_warnings(target, head):
    with deprecations() as found:
        _decode_by_hand(target)
        _draft_steps(target, StaticTreeDrafter(head, parse_tree("cpu_10")))
        _draft_steps(target, DynamicTreeDrafter(head, 3, 4, 8))
        for name in ("vanilla", "pld"):
            m = get_method(name)
            generate(target, m.drafter(target, SamplingConfig(), None, **m.params({})), PROMPT, 8,
                     SamplingConfig(), None, stop_ids=set())
    assert found == []


def test_training_calls_emit_no_deprecation_warnings(target, head):
    """The feature extraction (decoder without a cache) and the head's training forward (no cache)."""
    ids = torch.tensor([PROMPT])
    with deprecations() as found:
        feats = target_hidden_states(target.model, ids, torch.ones_like(ids))
        head(ids[:, 1:], feats[:, :-1], torch.arange(len(PROMPT) - 1))
    assert found == []


@pytest.mark.skipif("cache" not in inspect.signature(LlamaModel.forward).parameters,
                    reason="this transformers still takes past_key_values: nothing deprecated to catch")
def test_recorder_catches_the_deprecated_cache_argument(target):
    """The recorder is not blind: the old argument name, passed on purpose, is caught."""
    target.prefill(PROMPT[:3])
    with deprecations() as found, torch.inference_mode():
        target.body(input_ids=torch.tensor([PROMPT[3:5]]), position_ids=torch.tensor([[3, 4]]),
                    past_key_values=target.cache, use_cache=True)
    assert found and "past_key_values" in found[0]


def test_cache_kwargs_reads_the_forward_signature():
    class New(torch.nn.Module):
        def forward(self, x, cache=None, use_cache=False):
            return x

    class Old(torch.nn.Module):
        def forward(self, x, past_key_values=None, use_cache=False):
            return x

    c = object()
    assert cache_kwargs(New(), c) == {"cache": c, "use_cache": True}
    assert cache_kwargs(Old(), c) == {"past_key_values": c, "use_cache": True}
    assert cache_kwargs(Old(), None) == {"past_key_values": None, "use_cache": False}
