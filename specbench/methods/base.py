"""The method plugin protocol and its registry.

A method is a name, a `drafter` factory and an optional `train` hook.  Built-in methods are
registered through the same Python entry-point group as third-party ones
(`specbench.methods` in pyproject.toml), so a plugin package only needs

    [project.entry-points."specbench.methods"]
    mymethod = "my_package.module:METHOD"
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import UsageError
from . import catalogue
from .catalogue import Identity

if TYPE_CHECKING:  # only annotations: importing the registry or the catalogue needs no torch
    from ..decoding.tree import Proposal, Tree
    from ..decoding.verify import Verdict
    from ..models.target import StepOutput

ENTRY_POINT_GROUP = "specbench.methods"
CHECKPOINT_PARAM = "checkpoint"  # the parameter naming a method's draft weights (not a setting)


class Drafter(Protocol):
    """Per-sequence drafting state, driven by `specbench.decoding.loop.generate`."""

    def begin(self, prompt: list[int], prefill: StepOutput) -> None:
        """A new sequence: `prompt` (all tokens; the last is not yet cached) and the prefill StepOutput."""

    def propose(self, tokens: list[int]) -> Proposal:
        """Draft continuations of `tokens` (the whole sequence so far; its last token is the tree root)."""

    def update(self, tree: Tree, verdict: Verdict, out: StepOutput) -> None:
        """What the target did with the proposal: its StepOutput over the tree and the accepted path."""


class DrafterBase:
    """No-op hooks; subclasses override what they need."""

    def begin(self, prompt: list[int], prefill: StepOutput) -> None:
        pass

    def propose(self, tokens: list[int]) -> Proposal:
        from ..decoding.tree import Proposal

        return Proposal()

    def update(self, tree: Tree, verdict: Verdict, out: StepOutput) -> None:
        pass


@dataclass(frozen=True)
class Method:
    """`drafter(target, sampling, generator, **params) -> Drafter`.

    `train(argv) -> exit status` is the method's training command line (`specbench train
    --method NAME ARGS...` passes ARGS), or None for training-free methods.

    `identity` (display order, aliases, whether it needs a checkpoint, its default checkpoint)
    is the catalogue's record of `name` (`catalogue.py`), which the papers' tables share; a
    plugin the catalogue does not list may pass its own, else it gets a bare one.

    `draft_budget(params) -> {"tree_nodes": N, ...}` says what bounds one step's draft under
    complete `params`: `tree_nodes` = the most tree nodes one target forward verifies (root
    included), plus `draft_vocab` for drafters that restrict their vocabulary. Compare checks
    the papers' ordering claims only between runs of equal budgets (or both at the defaults).
    `defaults` are the method's published setting (its paper's, or Spec-Bench's for Lookahead).
    """

    name: str
    description: str
    drafter: Callable[..., Drafter]
    train: Callable[..., Any] | None = None
    defaults: dict[str, Any] = field(default_factory=dict)
    draft_budget: Callable[[dict[str, Any]], dict[str, int]] | None = None
    identity: Identity | None = None

    def __post_init__(self) -> None:
        ident = self.identity or catalogue.identity(self.name) or Identity(self.name)
        if ident.name != self.name:
            raise ValueError(f"method {self.name!r} was given the identity of {ident.name!r}")
        object.__setattr__(self, "identity", ident)

    def _identity(self) -> Identity:
        assert self.identity is not None  # set by __post_init__
        return self.identity

    @property
    def order(self) -> int:
        return self._identity().order

    @property
    def aliases(self) -> tuple[str, ...]:
        return self._identity().aliases

    @property
    def needs_checkpoint(self) -> bool:
        return self._identity().needs_checkpoint

    def default_checkpoint(self, target: str) -> str | None:
        """The committed head for `target` (a directory name under specbench/checkpoints/), if there is one."""
        dc = self._identity().default_checkpoint
        return dc.name if dc is not None and dc.target == target else None

    def at_defaults(self, params: dict[str, Any]) -> bool:
        """`params` (as recorded) are exactly the defaults, whichever draft checkpoint they name."""
        return set(params) == set(self.defaults) and all(
            params[k] == v for k, v in self.defaults.items() if k != CHECKPOINT_PARAM)

    def params(self, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        overrides = overrides or {}
        unknown = sorted(set(overrides) - set(self.defaults))
        if unknown:
            raise UsageError(f"method {self.name!r} has no parameter {', '.join(unknown)} "
                             f"(its parameters: {', '.join(sorted(self.defaults)) or 'none'})")
        out = dict(self.defaults)
        for key, value in overrides.items():
            out[key] = _coerce(value, self.defaults[key], key)
        return out


def train_command(module: str) -> Callable[[list[str]], int]:
    """A method's train hook: `module`'s ``main(argv)``, imported when training (accelerate and datasets
    load only then)."""

    def train(argv: list[str]) -> int:
        import importlib

        return int(importlib.import_module(module).main(argv))

    return train


def _coerce(value: Any, default: Any, key: str) -> Any:
    if not isinstance(value, str) or default is None or isinstance(default, str):
        return value
    try:
        if isinstance(default, bool):
            if value.lower() not in {"1", "0", "true", "false", "yes", "no"}:
                raise ValueError(value)
            return value.lower() in {"1", "true", "yes"}
        return type(default)(value)
    except ValueError:
        raise UsageError(f"parameter {key}={value!r} is not a valid {type(default).__name__}") from None


@lru_cache(maxsize=1)
def available_methods() -> dict[str, Method]:
    """The registered methods (entry points), in display order."""
    methods: dict[str, Method] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        method = ep.load()
        if not isinstance(method, Method) or method.name != ep.name:
            raise TypeError(f"entry point {ep.name} -> {ep.value} is not a Method named {ep.name!r}")
        methods[ep.name] = method
    return dict(sorted(methods.items(), key=lambda kv: (kv[1].order, kv[0])))


def get_method(name: str) -> Method:
    methods = available_methods()
    if name not in methods:
        hint = ", ".join(methods) or "none registered: is specbench installed (pip install -e .)?"
        raise UsageError(f"unknown method {name!r}; available: {hint}")
    return methods[name]
