"""FSPAD (Gui et al., arXiv 2408.15562): EAGLE-2's dynamic tree over the FSPAD head
(`specbench.models.fspad_head`: Feature Sampler + Partial Alignment Distillation), trained by
`specbench.training.fspad`. The tree scores tokens with the head's predict half and feeds its regress
half to the next depth (the head's `token_features` / `next_features`); the repository's ablations are
heads of other variants, run with ``--param checkpoint=DIR``. Without one it drafts with its committed head
for the embedded target (`specbench/checkpoints/fspad-smollm2-135m/`); for another target it refuses to
run, never loading another architecture's head in its place.
"""

from __future__ import annotations

from .base import train_command
from .head_drafters import dynamic_tree_method

__all__ = ["FSPAD"]


_train = train_command("specbench.training.fspad")


FSPAD = dynamic_tree_method(
    "fspad", "FSPAD (Gui et al. 2024): EAGLE-2's dynamic tree over a head with a Feature Sampler and a "
    "predict/regress split output (Partial Alignment Distillation)", _train)
