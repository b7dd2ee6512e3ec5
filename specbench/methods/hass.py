"""HASS (Zhang et al., ICLR 2025, arXiv 2408.15766): EAGLE-2's dynamic tree over a head of EAGLE's
architecture trained with harmonized objective distillation and context alignment
(`specbench.training.hass`). It drafts with its own checkpoints only: without one it refuses to run,
never loading the EAGLE head in its place.
"""

from __future__ import annotations

from .base import train_command
from .head_drafters import dynamic_tree_method

__all__ = ["HASS"]


_train = train_command("specbench.training.hass")


HASS = dynamic_tree_method(
    "hass", "HASS (Zhang et al. 2025): EAGLE-2's dynamic tree over an EAGLE head trained with harmonized "
    "objective distillation (top-K) and context alignment", _train)
