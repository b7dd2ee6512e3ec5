"""The FSPAD training task (``specbench train --method fspad``; Gui et al., arXiv 2408.15562).

FSPAD trains its head (`specbench.models.fspad_head`) with EAGLE's objective, data, shift and feature
noise (Luc4Gui/FSPAD `eagle/train/main_fspad.py`: v_w 1.0, p_w 0.1), but with Partial Alignment
Distillation the two terms see different halves of the head's output: the SmoothL1 feature loss the
``regress`` half (the feature fed to the next depth), the soft-label cross-entropy the ``predict`` half
(the one that scores tokens). `eagle_loss` takes both through the head's `next_features` /
`token_features`, so the task is EAGLE's with FSPAD's head; `--variant wofs|mlplin` trains the
repository's ablations (PAD without the Feature Sampler, the sampler without PAD).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..models.fspad_head import VARIANTS
from .eagle import EagleOptions, EagleTask

__all__ = ["FspadOptions", "FspadTask", "main"]


@dataclass(frozen=True)
class FspadOptions(EagleOptions):
    variant: str = field(default="fspad", metadata={
        "help": "fspad (Feature Sampler + PAD), or the ablations wofs (PAD only) and mlplin (sampler only)",
        "choices": tuple(VARIANTS)})


class FspadTask(EagleTask):
    """EAGLE's task over the FSPAD head of `opts.variant`."""

    name = "fspad"
    arch = "fspad"
    Options = FspadOptions
    opts: FspadOptions
    variant_option = "variant"

    def head_options(self) -> dict:
        from ..models.fspad_head import FspadHead

        return {"cls": FspadHead, "variant": self.opts.variant}

    def describe(self) -> dict:
        sampler, pad = VARIANTS[self.opts.variant]
        return {**super().describe(), "feature_sampler": sampler, "partial_alignment": pad,
                "feature": "SmoothL1 of the regress half (fed to the next depth)" if pad else
                           "SmoothL1 mean over hidden, masked mean",
                "distribution": ("soft-label CE of the predict half " if pad else "soft-label CE ")
                                + "vs softmax(lm_head(target feature))"}


def main(argv: list[str] | None = None) -> int:
    """``python -m specbench.training.fspad ...``: the same as ``specbench train --method fspad``."""
    from .pipeline import main as pipeline_main

    return pipeline_main(FspadTask, argv)


if __name__ == "__main__":
    raise SystemExit(main())
