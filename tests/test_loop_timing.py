"""The decode loop's phase timing: ``sync`` waits for the device at every phase boundary, ``step`` only records
CUDA events and waits once at the end; both give the same tokens, and the mode is a recorded run setting.
CUDA is faked here (a device whose type is "cuda", counting synchronise calls), so this runs on any CPU."""

from __future__ import annotations

import types

import pytest
import torch

from specbench.decoding import SamplingConfig, generate
from specbench.decoding import loop as loop_mod
from specbench.methods import DrafterBase, get_method

pytestmark = pytest.mark.usefixtures("single_thread")


class FakeEvent:
    """A CUDA event stand-in: records the host clock; elapsed_time in milliseconds, as CUDA's."""

    streams: list = []

    def __init__(self, enable_timing=False):
        self.t = None

    def record(self, stream=None):
        import time

        FakeEvent.streams.append(stream)
        self.t = time.perf_counter()

    def elapsed_time(self, other):
        return (other.t - self.t) * 1000


@pytest.fixture
def fake_cuda(monkeypatch):
    syncs = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: syncs.append(device))
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: ("stream of", device))
    FakeEvent.streams = []
    return syncs


@pytest.mark.parametrize("timing,per_phase", [("sync", True), ("step", False)])
def test_sync_mode_waits_at_every_phase_and_step_mode_once(fake_cuda, timing, per_phase):
    device = types.SimpleNamespace(type="cuda", index=1)
    clock = loop_mod._Clock(device, timing)
    marks = [clock.mark() for _ in range(12)]  # three steps' worth of phase boundaries
    assert len(fake_cuda) == (12 if per_phase else 0)
    # events go on the target's device's stream, not the current device's (a worker pinned to cuda:1)
    assert FakeEvent.streams == ([] if per_phase else [("stream of", device)] * 12)
    clock.resolve()
    assert len(fake_cuda) == (12 if per_phase else 1)
    spans = [clock.between(a, b) for a, b in zip(marks, marks[1:])]
    assert all(s >= 0 for s in spans) and clock.between(marks[0], marks[-1]) == pytest.approx(sum(spans))


def test_both_modes_give_the_same_tokens_and_a_bad_mode_is_refused(target):
    m = get_method("pld")
    outs = {}
    for timing in loop_mod.TIMINGS:
        gen = generate(target, m.drafter(target, SamplingConfig(), None, **m.params({})), [5, 6, 5, 6, 5, 6], 20,
                       SamplingConfig(), None, stop_ids=set(), timing=timing)
        assert gen.wall_s >= gen.prefill_s + gen.draft_s + gen.verify_s - 1e-6 and gen.verify_s > 0
        outs[timing] = gen.tokens
    assert outs["sync"] == outs["step"]
    with pytest.raises(ValueError, match="unknown timing 'gpu'"):
        generate(target, DrafterBase(), [1, 2], 4, SamplingConfig(), None, timing="gpu")
