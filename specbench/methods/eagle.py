"""EAGLE (Li et al. 2024, static draft tree) and EAGLE-2 (Li et al. 2024, dynamic draft tree): the tree
drafters of `head_drafters` over an EAGLE-architecture head (`specbench.models.eagle_head`).

EAGLE-2 runs EAGLE's heads (the catalogue's `draft_of`), so both share one default checkpoint and one
trainer (`specbench.training.eagle`).
"""

from __future__ import annotations

from typing import Any

from .base import Method, train_command
from .head_drafters import StaticTreeDrafter, dynamic_tree_method, parse_tree, resolve_head

__all__ = ["EAGLE", "EAGLE2"]


def _eagle_drafter(target, sampling, generator, checkpoint: Any = "", tree: Any = "mc_sim_7b_63",
                   draft_vocab: int = 0) -> StaticTreeDrafter:
    return StaticTreeDrafter(resolve_head("eagle", target, checkpoint), parse_tree(tree), draft_vocab=int(draft_vocab),
                             runtime=getattr(target, "runtime_name", "hf"))


_train = train_command("specbench.training.eagle")


EAGLE = Method(
    "eagle",
    "EAGLE (Li et al. 2024): feature-level draft head, static tree (default mc_sim_7b_63, 25 drafts)",
    _eagle_drafter,
    train=_train,
    defaults={"checkpoint": "", "tree": "mc_sim_7b_63", "draft_vocab": 0},
    draft_budget=lambda p: {"tree_nodes": len(parse_tree(p["tree"])) + 1, "draft_vocab": int(p["draft_vocab"])},
)

EAGLE2 = dynamic_tree_method(
    "eagle2", "EAGLE-2 (Li et al. 2024): EAGLE head, dynamic tree by draft confidence (depth levels, top_k, "
    "total_tokens)", _train)
