"""The one decode loop: prefill, then propose -> one target forward -> verify -> commit."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .sampling import SamplingConfig
from .tree import Tree
from .verify import accept

if TYPE_CHECKING:  # annotations only: the target and the drafters import this package
    from ..methods.base import Drafter
    from ..models.target import Target


@dataclass
class Generation:
    """One generated sequence and the counts every metric is derived from.

    `steps[i]` = tokens emitted by step i (accepted drafts + the bonus/correction token,
    after cutting at EOS or the budget).  `reached[k-1]`/`accepted[k-1]` count the steps in
    which draft depth k was tried / accepted (alpha_k = accepted / reached).
    """

    tokens: list[int] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    reached: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    drafted: int = 0  # draft nodes sent to the target, over all steps
    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    wall_s: float = 0.0
    stop: str = "length"

    def _count_depths(self, n_accepted: int, tried_next: bool) -> None:
        depth = n_accepted + tried_next
        while len(self.reached) < depth:
            self.reached.append(0)
            self.accepted.append(0)
        for k in range(depth):
            self.reached[k] += 1
            self.accepted[k] += k < n_accepted


TIMINGS = ("sync", "step")


def wall_clock(device: torch.device) -> float:
    """The host clock once `device` has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class _Clock:
    """Phase timestamps of one generation.

    ``sync``: every mark synchronises the device, so each phase's time is exact but the host waits for the
    GPU four times a step (the pipeline the method would overlap is drained). ``step``: marks are CUDA events
    recorded on the stream (no host wait); the step's own read-back of the verdict is its one sync, and the
    phase times are resolved once, at the end. On a CPU both are the host clock (nothing to synchronise).
    """

    def __init__(self, device: torch.device, timing: str):
        if timing not in TIMINGS:
            raise ValueError(f"unknown timing {timing!r}: choose one of {', '.join(TIMINGS)}")
        self.device, self.events = device, device.type == "cuda" and timing == "step"
        self.marks: list[Any] = []  # host seconds, or CUDA events until `resolve`

    def mark(self) -> int:
        """Record a timestamp; its index for `between`."""
        if self.events:
            e = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            e.record(torch.cuda.current_stream(self.device))  # this device's stream, not the current device's
            self.marks.append(e)
        else:
            self.marks.append(wall_clock(self.device))
        return len(self.marks) - 1

    def resolve(self) -> None:
        """Turn the marks into seconds from the first (one device sync in step mode)."""
        if self.events:
            torch.cuda.synchronize(self.device)
            first = self.marks[0]
            self.marks = [first.elapsed_time(e) / 1000 for e in self.marks]
            self.events = False
        else:
            t0 = self.marks[0]
            self.marks = [t - t0 for t in self.marks]

    def between(self, a: int, b: int) -> float:
        return float(self.marks[b] - self.marks[a])


def cut_at_stop(emitted: list[int], stop_ids: set[int]) -> tuple[list[int], bool]:
    """A step's emitted tokens up to and including the first stop token, wherever it falls: inside the
    accepted drafts, as the bonus or as the correction (vanilla would stop there too)."""
    hit = next((i for i, t in enumerate(emitted) if t in stop_ids), None)
    return (emitted, False) if hit is None else (emitted[: hit + 1], True)


def generate(target: Target, drafter: Drafter, prompt: list[int], max_new_tokens: int, sampling: SamplingConfig,
             generator: torch.Generator | None = None, stop_ids: set[int] | None = None,
             timing: str = "sync") -> Generation:
    """Decode up to `max_new_tokens` after `prompt` (a non-empty token list); `timing`: how the phases are
    timed on an accelerator (`_Clock`; the same tokens either way)."""
    if not prompt:
        raise ValueError("prompt must hold at least one token")
    target.check_fits(len(prompt), max_new_tokens)
    stop_ids = target.eos_token_ids if stop_ids is None else stop_ids
    gen = Generation()
    dev = target.device
    clock = _Clock(dev, timing)
    wall0 = wall_clock(dev)  # the wall time starts and ends with an idle device, in either mode
    start = clock.mark()
    prefill = target.prefill(prompt[:-1])  # the last prompt token is the first tree root
    drafter.begin(list(prompt), prefill)
    prefilled = clock.mark()
    seq = list(prompt)
    drafting: list[tuple[int, int]] = []  # (from mark, to mark) spans, resolved into seconds at the end
    verifying: list[tuple[int, int]] = []
    while len(gen.tokens) < max_new_tokens:
        t0 = clock.mark()
        proposal = drafter.propose(seq)
        tree = Tree(seq[-1], proposal)
        t1 = clock.mark()
        out = target.forward_tree(tree)
        verdict = accept(out.logits, tree, sampling, proposal.draft_probs, generator)
        target.commit([0, *verdict.path])
        t2 = clock.mark()
        emitted = [tree.tokens[i] for i in verdict.path] + [verdict.token]
        emitted, stopped = cut_at_stop(emitted[: max_new_tokens - len(gen.tokens)], stop_ids)
        if stopped:
            gen.stop = "eos"
        last = verdict.path[-1] if verdict.path else 0
        gen._count_depths(len(verdict.path), bool(tree.children[last]))
        gen.drafted += len(proposal)
        gen.steps.append(len(emitted))
        gen.tokens += emitted
        seq += emitted
        drafting.append((t0, t1))
        verifying.append((t1, t2))
        if gen.stop == "eos" or len(gen.tokens) >= max_new_tokens:
            break
        drafter.update(tree, verdict, out)
        drafting.append((t2, clock.mark()))
    gen.wall_s = wall_clock(dev) - wall0
    clock.resolve()
    gen.prefill_s = clock.between(start, prefilled)
    gen.draft_s = sum(clock.between(a, b) for a, b in drafting)
    gen.verify_s = sum(clock.between(a, b) for a, b in verifying)
    return gen
