"""The FSPAD draft head (Gui et al., arXiv 2408.15562) and its checkpoint format: EAGLE-2's head with a
Feature Sampler in front of the decoder layer and Partial Alignment Distillation's split output.

Architecture (as Luc4Gui/FSPAD `eagle/model/cnets_fspad.py`; the EAGLE head of `eagle_head` otherwise):

    e = embed_tokens(x_{t+1})                              # the target's embedding, frozen
    x = fc.fc(cat(e, f_t))                                 # Linear(2H -> H, bias), embedding first
    h = x + fc.mlp(RMSNorm(x), g=e)                        # Feature Sampler: EMLP(x, g) =
                                                           #   down(SiLU(gate(g)) * up(x)), H->I->H, no bias
    a = h + self_attn(h)                                   # the one decoder layer (no input norm) ...
    out = cat(a, a) + mlp(post_attention_layernorm(a))     # ... its MLP's down_proj I -> 2H, residual doubled
    predict, regress = out[..., :H], out[..., H:]

`predict` scores the next token through the target's LM head (`token_features`); `regress` is the
predicted next feature, fed to the next draft depth (`next_features`). Training (`training.fspad`)
puts the soft-label cross-entropy on `predict` and the SmoothL1 feature loss on `regress` only: the
"partial" alignment.

The repository's two ablations are variants of the same head (config.json ``fspad_variant``):

* ``wofs`` (`cnets_fspad_wofs.py`): PAD without the Feature Sampler, a plain ``fc`` Linear(2H -> H);
* ``mlplin`` (`cnets_mlplin.py`): the Feature Sampler without PAD, down_proj I -> H, one output that
  both scores and is fed back (as EAGLE's).

Checkpoint keys, the official code's names: ``fc.fc.{weight,bias}``, ``fc.mlp.{gate,up,down}_proj.weight``,
``fc.post_attention_layernorm.weight`` (the sampler; ``fc.{weight,bias}`` in ``wofs``) and EAGLE's
``layers.0.*`` (``layers.0.mlp.down_proj.weight`` of shape (2H, I) with PAD). An official checkpoint's
config.json names no variant: it is read as ``fspad``; add ``"fspad_variant": "wofs"`` (or ``"mlplin"``)
to load an ablation's.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .draft_heads import CheckpointError, HeadArch
from .eagle_head import EAGLE_ARCH, EagleHead, _FastEagleHead, head_config, head_from_config, mapping_hint
from .fast_runtime import FastLinear
from .hf_compat import cache_kwargs

__all__ = ["FSPAD_ARCH", "VARIANTS", "VARIANT_KEY", "EMLP", "FeatureSampler", "FspadHead"]

VARIANT_KEY = "fspad_variant"
# variant -> (Feature Sampler, Partial Alignment Distillation)
VARIANTS = {"fspad": (True, True), "wofs": (False, True), "mlplin": (True, False)}


def _act(config):
    from transformers.activations import ACT2FN

    return ACT2FN[getattr(config, "hidden_act", "silu")]


class EMLP(nn.Module):
    """FSPAD's embedding-gated MLP: ``down(act(gate(g)) * up(x))``; the token embedding g drives the gate."""

    def __init__(self, config, **factory):
        super().__init__()
        hidden, inter = int(config.hidden_size), int(config.intermediate_size)
        self.gate_proj = nn.Linear(hidden, inter, bias=False, **factory)
        self.up_proj = nn.Linear(hidden, inter, bias=False, **factory)
        self.down_proj = nn.Linear(inter, hidden, bias=False, **factory)
        self.act_fn = _act(config)

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(g)) * self.up_proj(x))


class FeatureSampler(nn.Module):
    """FSPAD's ``Efc``: ``x = fc(cat(e, f)); x + mlp(norm(x), g=e)``. `norm` is a fresh RMSNorm of the
    target's architecture (the key name ``post_attention_layernorm`` is the official code's)."""

    def __init__(self, config, norm: nn.Module, bias: bool = True, **factory):
        super().__init__()
        H = int(config.hidden_size)
        self.fc = nn.Linear(2 * H, H, bias=bias, **factory)
        self.mlp = EMLP(config, **factory)
        self.post_attention_layernorm = norm

    def forward(self, emb: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        x = self.fc(torch.cat((emb, features), dim=-1))
        return x + self.mlp(self.post_attention_layernorm(x), emb)


class FspadHead(EagleHead):
    """The EAGLE head with FSPAD's Feature Sampler (`sampler`) and/or PAD's 2H output (`pad`), by `variant`."""

    def __init__(self, config, embed_tokens: nn.Embedding, lm_head: nn.Linear, fc_bias: bool = True, *,
                 variant: str = "fspad", layer_cls=None, rotary_cls=None, draft_vocab_size: int = 0):
        if variant not in VARIANTS:
            raise ValueError(f"unknown FSPAD variant {variant!r}; known: {', '.join(VARIANTS)}")
        super().__init__(config, embed_tokens, lm_head, fc_bias, layer_cls=layer_cls, rotary_cls=rotary_cls,
                         draft_vocab_size=draft_vocab_size)
        self.variant = variant
        self.sampler, self.pad = VARIANTS[variant]
        ref = lm_head.weight  # where EAGLE's part of the head lives
        factory = {"device": ref.device, "dtype": ref.dtype}
        layer = self.layers[0]
        if self.sampler:
            norm = copy.deepcopy(layer.post_attention_layernorm)
            nn.init.ones_(norm.weight)
            self.fc = FeatureSampler(self.config, norm, bias=self.fc_bias, **factory)
        if self.pad:
            down = layer.mlp.down_proj
            layer.mlp.down_proj = nn.Linear(down.in_features, 2 * down.out_features, bias=down.bias is not None,
                                            **factory)

    @property
    def input_fc(self) -> nn.Linear:
        return self.fc.fc if self.sampler else self.fc

    def fuse(self, emb: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.fc(emb, features) if self.sampler else super().fuse(emb, features)

    def decode(self, h: torch.Tensor, mask, position_ids, pos_emb, past_key_values) -> torch.Tensor:
        if not self.pad:
            return super().decode(h, mask, position_ids, pos_emb, past_key_values)
        # The decoder layer's own steps, with PAD's doubled residual around the MLP (as cnets_fspad.py).
        layer = self.layers[0]
        attn = layer.self_attn(hidden_states=layer.input_layernorm(h), attention_mask=mask, position_ids=position_ids,
                               position_embeddings=pos_emb, **cache_kwargs(layer.self_attn, past_key_values))
        a = h + (attn[0] if isinstance(attn, tuple) else attn)
        return torch.cat((a, a), dim=-1) + layer.mlp(layer.post_attention_layernorm(a))

    def fast(self) -> _FastEagleHead:
        """The head on the fast kernels: the sampler by `fast_fuse`, PAD's doubled residual by `FastLayer`
        (which adds the residual once per H of down_proj's outputs, as `decode` does)."""
        return _FastEagleHead(self)

    def fast_fuse(self):
        """The Feature Sampler (or, without it, EAGLE's fc) on the fast kernels."""
        if not self.sampler:
            return super().fast_fuse()
        sampler = self.fc
        fc = FastLinear(sampler.fc.weight, sampler.fc.bias)
        gate, up, down = (FastLinear(lin.weight) for lin in (sampler.mlp.gate_proj, sampler.mlp.up_proj,
                                                             sampler.mlp.down_proj))
        norm = sampler.post_attention_layernorm
        w, eps = norm.weight.detach(), float(norm.variance_epsilon)

        def fuse(emb: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
            x = fc(torch.cat((emb, feats), dim=-1))
            n = torch.nn.functional.rms_norm(x, (x.shape[-1],), w, eps)
            return x + down(torch.nn.functional.silu(gate(emb)) * up(n))

        return fuse

    def token_features(self, out: torch.Tensor) -> torch.Tensor:
        """`predict`, the first half with PAD: it scores the next token."""
        return out[..., :self.hidden_size] if self.pad else out

    def next_features(self, out: torch.Tensor) -> torch.Tensor:
        """`regress`, the second half with PAD: the predicted next feature, fed to the next depth."""
        return out[..., self.hidden_size:] if self.pad else out


def _build(target, cfg_dict: dict | None) -> FspadHead:
    variant = str((cfg_dict or {}).get(VARIANT_KEY, "fspad"))
    if variant not in VARIANTS:
        raise CheckpointError(f"config.json has {VARIANT_KEY}={variant!r}; known: {', '.join(VARIANTS)}")
    return head_from_config(target, cfg_dict, FspadHead, own_keys=(VARIANT_KEY,), variant=variant)


def _config(head: FspadHead) -> dict:
    return {**head_config(head), VARIANT_KEY: head.variant}


def _key_hint(cfg: dict, keys: list[str]) -> str:
    variant = cfg.get(VARIANT_KEY)
    said = (f"config.json says {VARIANT_KEY}={variant}" if variant
            else f"config.json names no {VARIANT_KEY}, read as fspad")
    return mapping_hint(cfg, keys) or (
        f" ({said}; an ablation's checkpoint needs \"{VARIANT_KEY}\": \"wofs\" or \"mlplin\")")


FSPAD_ARCH = HeadArch(
    "fspad", _build, _config,
    copies=EAGLE_ARCH.copies,  # the embedding copy official checkpoints carry, as EAGLE's
    key_hint=_key_hint,
    description="FSPAD head: EAGLE's with a Feature Sampler (embedding-gated MLP) and a 2H predict/regress output",
)
