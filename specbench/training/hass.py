"""The HASS training task (Zhang et al., ICLR 2025, arXiv 2408.15766; ``specbench train --method hass``).

HASS decodes exactly like EAGLE-2 and trains EAGLE's head (architecture ``eagle``) with two changes;
the recipe is read from HArmonizedSS/HASS @ 38922e4 (`train/main_hass.py`, `model/cnets_hass.py`):

* **Harmonized objective distillation**: EAGLE's loss plus ``topk_w * -sum_{v in TopK(p_T)} p_T(v) log q(v)``
  over the target's top-K tokens (K = `topk`, 10).
* **Harmonized context alignment**: J = `forward_num_total` (3) draft forwards per batch. Forward 1 is
  EAGLE's. Forward n >= 2 holds n feature sets [T, D1, ..., D(n-1)] at the same positions: T the target's
  features, D_k = forward k's predictions (detached) moved one position on (``D_k[i] = pred_k[i-1]``,
  ``D_k[0] = D_(k-1)[0]``). Queries come from the last set; keys and values from all sets, with the
  alignment mask of `alignment_mask`: query i sees T at j <= i-(n-1) and D_k at j = i-(n-1)+k. That
  is what the draft head sees at draft depth n-1 below the root in decoding (tested against the tree
  drafter). Each forward's loss is back-propagated (their sum); one optimiser step per batch.

Masking: `mask_mode="additive"` (default) masks attention logits with -inf, as decoding does. The
official code multiplies the logits by the 0/1 mask before the softmax (a masked logit becomes 0, not
-inf, so masked keys keep weight) and the probabilities after it (rows then sum to less than 1), even in
forward 1, while its decoder masks additively; `mask_mode="official"` reproduces that in training.

The official schedule is two phases: `topk_w` 0 for the first, then `topk_w` 1 at a lower learning rate
from the first phase's weights; ``specbench train --method hass --phase2-epochs N`` runs both.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from .eagle import EagleOptions, EagleTask, eagle_loss
from .losses import topk_distill_loss
from .tasks import Phase

__all__ = ["HassOptions", "HassTask", "alignment_mask", "main"]

OFFICIAL_ATTENTION = "specbench_hass_official"


@dataclass(frozen=True)
class HassOptions(EagleOptions):
    topk: int = field(default=10, metadata={"help": "K of the top-K distillation term (the target's top-K)"})
    topk_w: float = field(default=1.0, metadata={"help": "weight of the top-K distillation term"})
    forward_num_total: int = field(default=3, metadata={"help": "draft forwards per batch (context alignment)"})
    mask_mode: str = field(default="additive", metadata={
        "help": "attention masking in training: additive (as decoding) or official (HASS code's 0/1 product)",
        "choices": ("additive", "official")})
    phase2_epochs: int = field(default=0, metadata={
        "help": "0: one phase with topk_w; N > 0: the official two phases, --epochs with topk_w 0, then N epochs "
                "with topk_w at --phase2-lr from the first phase's weights"})
    phase2_lr: float = field(default=1e-5, metadata={"help": "learning rate of the second phase"})


def alignment_mask(T: int, n: int) -> torch.Tensor:
    """(n*T, n*T) bool, True = attend: forward n's mask over the sets [T, D1, ..., D(n-1)] laid end to end.

    Rows of the last set (the queries whose outputs are used): query i sees set 0 (T) at j <= i-(n-1) and
    set k >= 1 at j = i-(n-1)+k. Rows of the other sets are never used; they attend causally within their
    own set so that every row has a key.
    """
    if n < 1:
        raise ValueError("n >= 1")
    m = torch.zeros(n * T, n * T, dtype=torch.bool)
    i = torch.arange(T)
    causal = i[None, :] <= i[:, None]
    for s in range(n - 1):
        m[s * T:(s + 1) * T, s * T:(s + 1) * T] = causal
    q = (n - 1) * T
    m[q:, :T] = i[None, :] <= (i[:, None] - (n - 1))
    for k in range(1, n):
        j = i - (n - 1) + k
        ok = j >= 0
        m[q + i[ok], k * T + j[ok]] = True
    return m


def _official_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """The HASS code's attention: logits x 0/1 mask, softmax, x 0/1 mask again (no -inf)."""
    from transformers.models.llama.modeling_llama import repeat_kv

    k = repeat_kv(key, module.num_key_value_groups)
    v = repeat_kv(value, module.num_key_value_groups)
    keep = (attention_mask == 0).to(query.dtype) if attention_mask is not None else 1.0
    w = torch.matmul(query, k.transpose(2, 3)) * scaling * keep
    p = torch.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype) * keep
    return torch.matmul(p, v).transpose(1, 2).contiguous(), p


def _use_official_attention(head) -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(OFFICIAL_ATTENTION, _official_attention)
    head.config._attn_implementation = OFFICIAL_ATTENTION


class HassTask(EagleTask):
    """EAGLE's head, batches and noise; HASS's J aligned forwards and top-K term."""

    name = "hass"
    arch = "eagle"
    Options = HassOptions
    opts: HassOptions
    variant_option = "mask_mode"

    def make_head(self, model, data=None, seed: int = 0):
        if self.opts.forward_num_total < 1 or self.opts.topk < 1:
            raise ValueError("forward_num_total and topk must be >= 1")
        head = super().make_head(model, data, seed)
        if self.opts.mask_mode == "official":
            _use_official_attention(head)
        return head

    def forwards(self, head, batch) -> list[torch.Tensor]:
        """The J forwards' predicted features (B, T, H) each, forward n from the detached sets of the ones before.

        Forward n attends over the sets [T, D1, ..., D(n-1)], but only its last set's rows are used, and the
        head is one layer: the keys and values of the earlier sets are exactly those forwards 1..n-1 computed
        for their own last set (same tokens, positions, inputs and weights). So each forward runs its last
        set alone against a KV cache of the earlier ones, n times fewer rows than recomputing all the sets as
        the official code does; the outputs, the loss and (gradients summing over a shared tensor's uses) the
        gradients are the same."""
        from transformers import DynamicCache

        ids, pos, pad = batch["input_ids"], batch["position_ids"], batch["attention_mask"].bool()
        T = ids.shape[1]
        cache = DynamicCache()
        feats = batch["features"]
        preds = []
        for n in range(1, self.opts.forward_num_total + 1):
            if n == 1:
                pred = head(ids, feats, pos, attention_mask=batch["attention_mask"], past_key_values=cache)
            else:  # the last set's rows of the alignment mask, over the n sets' keys
                allowed = alignment_mask(T, n)[-T:].to(ids.device)[None] & pad.repeat(1, n)[:, None, :]
                pred = head(ids, feats, pos, attention_mask=allowed[:, None], past_key_values=cache)
            preds.append(pred)
            fed = getattr(head, "module", head).next_features(pred)  # what decoding feeds depth n + 1
            feats = torch.cat([feats[:, :1], fed[:, :-1]], 1).detach()
        return preds

    def loss(self, head, batch):
        raw = getattr(head, "module", head)
        preds = self.forwards(head, batch)
        parts = [self._loss_one(raw, pred, batch) for pred in preds]
        out = {"loss": sum(p["loss"] for p in parts)}
        for n, p in enumerate(parts, start=1):
            out.update({f"{k}_{n}": v for k, v in p.items() if k not in ("loss", "n_tokens", "n_ce")})
        out["acc"] = parts[0]["acc"]  # depth-1 agreement, as EAGLE logs it
        out["n_tokens"] = parts[0]["n_tokens"]
        return out

    def _loss_one(self, head, pred, batch) -> dict:
        def topk_term(h_logits, t_logits):
            if h_logits is None:  # no masked row in the batch: the term's name only
                return {"topkloss": (self.opts.topk_w, None)}
            return {"topkloss": (self.opts.topk_w, topk_distill_loss(h_logits, t_logits, self.opts.topk))}

        return eagle_loss(head, pred, batch, self._target_head, self.opts, self.generator, extra=topk_term)

    def describe(self) -> dict:
        return {**super().describe(), "topk_term": "-sum over the target's top-K tokens of p_T log q",
                "context_alignment": f"{self.opts.forward_num_total} forwards, alignment_mask"}

    def phases(self) -> list[Phase]:
        if self.opts.phase2_epochs <= 0:
            return [Phase(self.opts)]
        return [Phase(dataclasses.replace(self.opts, topk_w=0.0), subdir="phase1"),
                Phase(self.opts, epochs=self.opts.phase2_epochs, lr=self.opts.phase2_lr)]


def main(argv: list[str] | None = None) -> int:
    """``specbench train --method hass ...``; with ``--phase2-epochs N`` the official two phases in one command
    (the first written to OUT/phase1, the second to OUT, initialised from the first)."""
    from .pipeline import main as pipeline_main

    return pipeline_main(HassTask, argv)


if __name__ == "__main__":
    raise SystemExit(main())
