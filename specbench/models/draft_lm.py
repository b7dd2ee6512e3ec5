"""Standalone draft language models built from the target itself.

No smaller model shares SmolLM2's tokenizer, so the embedded drafter starts as the target's first `k`
decoder layers under its own final norm and LM head (`layer_prefix_draft`): a causal LM of the target's
architecture and vocabulary that predicts the next token from a shallow view of the context. This stands
in for the TVD++ paper's phase 1 (pretraining a 115M model on 600B tokens), which no budget here affords;
the distillation phase then fine-tunes it towards the target (`specbench.training.draft_lm`).

A fine-tuned prefix draft is stored as what training changed and nothing else (`save_prefix_draft`):
config.json names the format, the layer count and the target (by weights sha256), model.safetensors holds
the kept decoder layers and the final norm. The embedding and LM head are the target's, so the directory
is a fraction of a full causal LM and loads only over the target it was made from (`load_prefix_draft`).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch

from ..artifacts import atomic_path, write_text
from .draft_heads import CheckpointError, read_checkpoint_config, read_weights, state_mismatch, weights_file

__all__ = ["PREFIX_DRAFT_KEY", "TRAINED", "is_prefix_draft", "layer_prefix_draft", "load_prefix_draft",
           "prefix_draft_state", "save_prefix_draft"]

PREFIX_DRAFT_KEY = "specbench_prefix_draft"  # config.json key of the compact format
TRAINED = ("model.layers.", "model.norm.")  # a prefix draft's own weights; the embedding and LM head are the target's


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


def prefix_draft_state(lm) -> dict[str, torch.Tensor]:
    """The weights of prefix draft `lm` (an HF causal LM) that are its own: decoder layers and final norm."""
    return {k: v for k, v in lm.state_dict().items() if k.startswith(TRAINED)}


def is_prefix_draft(path: str | os.PathLike) -> bool:
    """Whether `path` is a directory in the compact prefix-draft format."""
    cfg = Path(path) / "config.json"
    try:
        return cfg.is_file() and PREFIX_DRAFT_KEY in json.loads(cfg.read_text())
    except (OSError, ValueError):
        return False


def save_prefix_draft(lm, path: str | os.PathLike, *, target: str, target_sha256: str) -> None:
    """Write prefix draft `lm` to `path`: config.json (format, layers, target) + model.safetensors (its own
    weights, float32), atomically."""
    from safetensors.torch import save_file

    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in prefix_draft_state(lm).items()}
    with atomic_path(d / "model.safetensors") as tmp:
        save_file(sd, str(tmp), metadata={"format": "pt"})
    cfg = {PREFIX_DRAFT_KEY: {"layers": int(lm.config.num_hidden_layers), "target": target,
                              "target_sha256": target_sha256,
                              "holds": "decoder layers and final norm; the embedding and LM head are the target's"}}
    write_text(d / "config.json", json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def load_prefix_draft(path: str | os.PathLike, model, *, target: str, target_sha256: str):
    """The prefix draft stored at `path`, over target `model` (an HF causal LM with weights sha256
    `target_sha256`), strictly: the target must be the one it was made from, and the weights must be
    exactly a `layers`-layer prefix's decoder layers and final norm (names and shapes)."""
    d = Path(path)
    meta = read_checkpoint_config(d).get(PREFIX_DRAFT_KEY)
    if meta is None:
        raise CheckpointError(f"{d} is not a specbench prefix draft (its config.json has no {PREFIX_DRAFT_KEY}): a "
                              "full causal-LM directory drafts with sps --param checkpoint=DIR as it is; to fine-tune "
                              "from it, train from the target's layers instead")
    if not isinstance(meta, dict) or not isinstance(meta.get("layers"), int):
        raise CheckpointError(f"{d}/config.json: {PREFIX_DRAFT_KEY} must be an object with an integer 'layers'")
    made_for = meta.get("target_sha256")
    if made_for != target_sha256:
        raise CheckpointError(f"draft {d} was fine-tuned from the layers of target {meta.get('target')} (weights "
                              f"sha256 {str(made_for)[:16]}...), not of {target} ({target_sha256[:16]}...): it "
                              "holds no embedding or LM head of its own; run it over that target")
    try:
        lm = layer_prefix_draft(model, meta["layers"])
    except ValueError as e:
        raise CheckpointError(f"draft {d}: {e}") from None
    wfile = weights_file(d)
    sd = read_weights(wfile)
    own = prefix_draft_state(lm)
    parts = state_mismatch(sd, own)
    if parts:
        raise CheckpointError(f"{wfile} is not a {meta['layers']}-layer prefix draft of {target}: " + "; ".join(parts))
    with torch.no_grad():
        for k, v in lm.state_dict().items():
            if k in sd:
                v.copy_(sd[k].to(v.dtype))
    return lm
