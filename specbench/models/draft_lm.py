"""Standalone draft language models built from the target itself.

No smaller model shares SmolLM2's tokenizer, so the embedded drafter starts as the target's first `k`
decoder layers under its own final norm and LM head (`layer_prefix_draft`): a causal LM of the target's
architecture and vocabulary that predicts the next token from a shallow view of the context. This stands
in for the TVD++ paper's phase 1 (pretraining a 115M model on 600B tokens), which no budget here affords;
the distillation phase then fine-tunes it towards the target (`specbench.training.draft_lm`).
"""

from __future__ import annotations

import copy

import torch

__all__ = ["layer_prefix_draft"]


@torch.no_grad()
def layer_prefix_draft(model, layers: int):
    """A copy of HF causal LM `model` keeping its first `layers` decoder layers (embedding, final norm and LM
    head included, tied as in the target), on the target's device and dtype, in eval mode."""
    n = int(model.config.num_hidden_layers)
    if not 1 <= layers <= n:
        raise ValueError(f"a layer-prefix draft keeps 1..{n} of the target's layers, not {layers}")
    body = model.get_decoder()
    kept = body.layers
    body.layers = torch.nn.ModuleList()  # deepcopy the rest of the model without its layers
    try:
        draft = copy.deepcopy(model)
    finally:
        body.layers = kept
    draft.get_decoder().layers = torch.nn.ModuleList(copy.deepcopy(layer) for layer in kept[:layers])
    draft.config.num_hidden_layers = layers
    if getattr(draft.config, "layer_types", None):
        draft.config.layer_types = list(draft.config.layer_types[:layers])
    if getattr(draft.config, "tie_word_embeddings", False):
        draft.tie_weights()
    return draft.eval()
