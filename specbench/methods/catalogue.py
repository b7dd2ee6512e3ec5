"""The known methods: one identity record per method the papers' tables name, implemented here or not.

A registered `Method` (`base.py`) takes its identity from here by name, so a method that runs
and a name in a paper's table (HASS, FSPAD, TVD++ ... before they are implemented) share one
record: the canonical name, the display order (table columns, plot legends, suite cases), the
aliases other tools write (Spec-Bench's model ids), whether the method drafts with a trained
checkpoint, and the committed default checkpoint. A third-party plugin that is not listed
gets an identity of its own (ordered after these).

Standard library only: the baselines validator and `specbench compare` import it without torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

__all__ = ["KNOWN", "NAMES", "DefaultCheckpoint", "Identity", "canonical", "identity", "sort_key"]


class DefaultCheckpoint(NamedTuple):
    """A draft head committed with the package, used when no `checkpoint` parameter is given."""

    target: str  # the embedded target it was trained for
    name: str  # its directory under specbench/checkpoints/


@dataclass(frozen=True)
class Identity:
    name: str  # canonical: the entry-point name, the baselines' `method`, results' `config.method`
    aliases: tuple[str, ...] = ()  # other spellings (lower case), e.g. Spec-Bench's "lade" for lookahead
    needs_checkpoint: bool = False  # drafts with trained weights (a `checkpoint` parameter)
    draft_of: str | None = None  # whose published drafts it runs, when not its own (EAGLE-2 runs EAGLE heads)
    head: str | None = None  # the draft-head architecture its checkpoints hold (specbench.models.draft_heads)
    default_checkpoint: DefaultCheckpoint | None = None

    @property
    def order(self) -> int:
        """Display position: the catalogue's order, after it for methods it does not list."""
        return _ORDER.get(self.name, len(KNOWN))


_SMOLLM_HEAD = DefaultCheckpoint("smollm2-135m", "eagle-smollm2-135m")

# In display order: the baseline, training-free drafters, draft models and heads, then the EAGLE
# family and the distillation objectives of TVD++ (kld, tvd, tvdpp).
KNOWN: tuple[Identity, ...] = (
    Identity("vanilla", aliases=("baseline",)),
    Identity("pld"),
    Identity("lookahead", aliases=("lade",)),
    Identity("sps", needs_checkpoint=True),
    Identity("medusa", needs_checkpoint=True),
    Identity("hydra", needs_checkpoint=True),
    Identity("eagle", needs_checkpoint=True, head="eagle", default_checkpoint=_SMOLLM_HEAD),
    Identity("eagle2", aliases=("eagle-2",), needs_checkpoint=True, draft_of="eagle", head="eagle",
             default_checkpoint=_SMOLLM_HEAD),
    Identity("hass", needs_checkpoint=True, head="eagle",  # EAGLE's architecture, trained differently
             default_checkpoint=DefaultCheckpoint("smollm2-135m", "hass-smollm2-135m")),
    Identity("fspad", needs_checkpoint=True, head="fspad",
             default_checkpoint=DefaultCheckpoint("smollm2-135m", "fspad-smollm2-135m")),
    Identity("kld", needs_checkpoint=True, default_checkpoint=DefaultCheckpoint("smollm2-135m", "kld-smollm2-135m")),
    Identity("tvd", needs_checkpoint=True, default_checkpoint=DefaultCheckpoint("smollm2-135m", "tvd-smollm2-135m")),
    Identity("tvdpp", needs_checkpoint=True,
             default_checkpoint=DefaultCheckpoint("smollm2-135m", "tvdpp-smollm2-135m")),
)
_ORDER = {m.name: i for i, m in enumerate(KNOWN)}
_BY_NAME = {m.name: m for m in KNOWN}
_ALIASES = {a: m.name for m in KNOWN for a in (m.name, *m.aliases)}
NAMES = frozenset(_BY_NAME)


def identity(name: str) -> Identity | None:
    """The catalogue's record of a canonical method name (None when it lists no such method)."""
    return _BY_NAME.get(name)


def canonical(name: str) -> str | None:
    """The canonical name of a method name or alias, any case (None when unknown)."""
    return _ALIASES.get(str(name).lower())


def sort_key(name: str) -> tuple[int, str]:
    """Display order of a method name: the catalogue's, then by name for the methods it does not list."""
    return (_ORDER.get(name, len(KNOWN)), name)
