"""Trees, sampling, lossless verifiers and the one decode loop every method runs in."""

from .loop import Generation, generate
from .sampling import SamplingConfig, make_generator, probs, sample
from .tree import Proposal, Tree
from .verify import (
                     BatchVerdict,
                     Verdict,
                     accept,
                     verify_chain,
                     verify_greedy,
                     verify_tree_deterministic,
                     verify_tree_sampled,
)

__all__ = ["Generation", "generate", "SamplingConfig", "make_generator", "probs", "sample", "Proposal", "Tree",
           "BatchVerdict", "Verdict", "accept", "verify_chain", "verify_greedy", "verify_tree_deterministic",
           "verify_tree_sampled"]
