"""Distilling a standalone draft LM (the TVD++ paper's phase 3; ``specbench train --method tvdpp``).

The draft starts as the target's first `layers` decoder layers under its final norm and LM head
(`specbench.models.draft_lm.layer_prefix_draft`, standing in for the paper's pretraining). Fine-tuning
trains those layers and the norm; the embedding and the LM head stay the target's (frozen, as a feature
head's), so the draft's vocabulary and its token rows are the target's. The data is the feature cache of
the pipeline (token ids and the target's last hidden states), ideally of the target's own answers
(``--corpus DIR`` from ``specbench distill``, HASS appendix D / TVD++ phase 2): the target's next-token
distribution at position t is ``p_t = softmax(lm_head(h_t))`` over the full vocabulary, from the cached h_t
(stored in float16, the one approximation). The draft reads the same tokens
(teacher forcing) and is scored at assistant tokens (position t counts when token t+1 is an assistant
reply's) by `--loss`:

* ``kld``: forward KL(p || q) (the soft-label cross-entropy),
* ``tvd``: the policy-gradient surrogate of TVD(p, q), reward 1[p > q],
* ``tvdpp``: the same with the normalised advantage, its mean and std by `--tvdpp-stats`
  (``specbench.training.losses``, where the derivation is written out).

``--draft-vocab N`` trains q over a reduced draft vocabulary S: the training data's N most frequent assistant
tokens (the first N ids of the checkpoint's ``draft_vocab.json``). The draft's logits are its LM head's rows of
S only (the cost that dominates a small draft's step), p stays the target's full-vocabulary distribution
restricted to S (its mass outside S counts as missed, exactly; see ``losses``), computed as
``exp(W_S h_t - lse_t)`` from the full vocabulary's logsumexp cached with the features, so the target's side
of a step is S's rows of its LM head too. Decode with the same ``--param draft_vocab=N``: the decoder's
vocabulary is those N ids plus the sequence's own tokens.

The exported checkpoint is the compact prefix-draft format (`specbench.models.draft_lm.save_prefix_draft`):
the fine-tuned layers and norm, loading over the target it was made from; ``sps`` drafts with it
(``--param checkpoint=DIR``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..models.draft_lm import TRAINED, prefix_draft_state
from .losses import TVDPP_STATS, kld_loss, tvd, tvd_loss, tvdpp_loss
from .tasks import Task, TaskOptions, frozen_lm_head_fn

__all__ = ["DraftLM", "DraftLMOptions", "DraftLMTask", "LOSSES", "main"]

LOSSES = ("tvdpp", "tvd", "kld")


@dataclass(frozen=True)
class DraftLMOptions(TaskOptions):
    loss: str = field(default="tvdpp", metadata={"help": "distillation loss", "choices": LOSSES})
    tvdpp_stats: str = field(default="position", metadata={
        "help": "over what TVD++ normalises its reward: per position or per batch (q-weighted moments)",
        "choices": TVDPP_STATS})
    layers: int = field(default=4, metadata={"help": "the target's first decoder layers the draft keeps"})
    draft_vocab: int = field(default=0, metadata={
        "help": "train q over the data's N most frequent assistant tokens (0: the full vocabulary); decode with "
                "--param draft_vocab=N"})


class DraftLM(nn.Module):
    """A causal LM drafting for the target (`lm`, an HF causal LM): its hidden states, logits and the
    weights training changes."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Last hidden states (B, T, H), the LM head's input."""
        return self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def logits(self, hidden: torch.Tensor, support: torch.Tensor | None = None) -> torch.Tensor:
        """Draft logits over the full vocabulary, or over the ids `support` (its LM head's rows of them only)."""
        head = self.lm.get_output_embeddings()
        if support is None:
            return head(hidden)
        bias = None if head.bias is None else head.bias[support]
        return nn.functional.linear(hidden, head.weight[support], bias)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"lm.{k}": v for k, v in prefix_draft_state(self.lm).items()}  # this module's key names


def plain_batch(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Right-padded tokens, target features and the target's logit statistics (`features.target_logit_stats`,
    when the rows have them), no shift: position t predicts token t+1, so ``loss_mask[t] = mask[t+1]`` (the last
    position predicts nothing)."""
    T = max(len(r["input_ids"]) for r in rows)
    B, H = len(rows), rows[0]["hidden"].shape[-1]
    ids = torch.zeros(B, T, dtype=torch.long)
    hid = torch.zeros(B, T, H)
    mask = torch.zeros(B, T)
    att = torch.zeros(B, T, dtype=torch.long)
    stats = {k: torch.zeros(B, T, dtype=dt) for k, dt in (("target_lse", torch.float32),
                                                          ("target_argmax", torch.long)) if k in rows[0]}
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[b, :n] = r["input_ids"]
        hid[b, :n] = r["hidden"]
        mask[b, :n - 1] = r["loss_mask"][1:n]
        att[b, :n] = 1
        for k, v in stats.items():
            v[b, :n] = r[k]
    return {"input_ids": ids, "hidden": hid, "loss_mask": mask, "attention_mask": att, **stats}


class DraftLMTask(Task):
    name = "tvdpp"
    arch = "draft_lm"
    Options = DraftLMOptions
    opts: DraftLMOptions
    heldout_what = ("top-1 agreement of the draft's next-token prediction with the target's argmax, teacher-forced "
                    "on the true tokens")

    def __init__(self, opts: DraftLMOptions | None = None, seed: int = 0):
        super().__init__(opts, seed)
        self.name = self.opts.loss  # the method that decodes the draft (kld, tvd, tvdpp): manifest, work dir
        self._target_head = None
        self.support: torch.Tensor | None = None  # the draft vocabulary's ids (None: the full vocabulary)

    def make_head(self, model, data=None, seed: int = 0) -> DraftLM:
        from ..models.draft_lm import layer_prefix_draft

        self._target_head = frozen_lm_head_fn(model.get_output_embeddings())  # (x, ids=None) -> logits
        if self.opts.draft_vocab:
            from .features import draft_vocab_ids

            V = int(model.get_output_embeddings().weight.shape[0])
            ids = draft_vocab_ids(data, V, int(self.opts.draft_vocab))
            self.support = torch.tensor(ids, dtype=torch.long, device=next(model.parameters()).device)
        draft = DraftLM(layer_prefix_draft(model, self.opts.layers).float())
        for name, p in draft.named_parameters():  # tied embedding / LM head: frozen with the embedding
            p.requires_grad_(name.removeprefix("lm.").startswith(TRAINED))
        return draft.train()

    def collate(self, rows):
        return plain_batch(rows)

    def loss(self, head, batch):
        raw = getattr(head, "module", head)
        hidden = head(batch["input_ids"], batch["attention_mask"])
        mask = batch["loss_mask"]
        sel = mask.reshape(-1).nonzero().squeeze(-1)
        H = hidden.shape[-1]
        S = self.support
        q_logits = raw.logits(hidden.reshape(-1, H)[sel], S)
        h_t = batch["hidden"].reshape(-1, H)[sel]
        with torch.no_grad():
            if S is None:  # the full vocabulary: p = softmax of all the target's logits
                p_logits, lse = self._target_head(h_t), None
                t_top = p_logits.argmax(-1)
            else:  # S's logits and the cached logsumexp of all of them: p on S, exactly (not renormalised)
                if "target_lse" not in batch:
                    raise ValueError("a draft vocabulary needs the target's logsumexp in the batch (target_lse): "
                                     "rows from a feature cache of format 2 (features.target_logit_stats)")
                p_logits = self._target_head(h_t, S)
                lse = batch["target_lse"].reshape(-1)[sel]
                t_top = batch["target_argmax"].reshape(-1)[sel]
        ones = torch.ones(sel.numel(), device=sel.device)
        kw = {"support": S, "target_lse": lse}
        if self.opts.loss == "kld":
            loss = kld_loss(q_logits, p_logits, ones, **kw)
        elif self.opts.loss == "tvd":
            loss = tvd_loss(q_logits, p_logits, ones, **kw)
        else:
            loss = tvdpp_loss(q_logits, p_logits, ones, stats=self.opts.tvdpp_stats, **kw)
        with torch.no_grad():
            acc = (self._draft_ids(q_logits) == t_top).float().mean()
            return_tvd = tvd(q_logits, p_logits, ones, **kw)
        return {"loss": loss, "tvd": return_tvd, "acc": acc, "n_tokens": mask.sum()}

    def _draft_ids(self, q_logits: torch.Tensor) -> torch.Tensor:
        """The token ids of the draft's argmax (its logits are over the support's ids when it has one)."""
        top = q_logits.argmax(-1)
        return top if self.support is None else self.support[top]

    def describe(self) -> dict:
        return {**super().describe(),
                # the same p however it is computed (on S: exp(S's logits - the cached logsumexp)); the text is
                # part of the checkpoint's recipe hash, so it names the distribution, not the route
                "p": "softmax(the target's LM head over its cached (float16) last hidden states), full vocabulary",
                "q": (f"over the data's {self.opts.draft_vocab} most frequent assistant tokens (p's mass outside "
                      "them counts as missed)" if self.opts.draft_vocab else "the full vocabulary"),
                "trained": "the kept decoder layers and the final norm (embedding and LM head: the target's, frozen)",
                "init": f"the target's first {self.opts.layers} decoder layers, final norm and LM head"}

    # -- the exported checkpoint: the compact prefix-draft format (trained layers and norm only)
    def export(self, head, out: Path) -> None:
        from ..models.draft_lm import save_prefix_draft

        save_prefix_draft(head.lm, out, target=self.target[0], target_sha256=self.target[1])

    def load(self, out: Path, model) -> DraftLM:
        from ..models.draft_lm import load_prefix_draft

        lm = load_prefix_draft(out, model, target=self.target[0], target_sha256=self.target[1])
        return DraftLM(lm.float())

    def format(self) -> str:
        return (f"specbench prefix draft (config.json + model.safetensors: the target's first {self.opts.layers} "
                "decoder layers and final norm, fine-tuned; embedding and LM head are the target's; draft with "
                "sps --param checkpoint=DIR)")

    @torch.no_grad()
    def heldout(self, exported, model, tokenizer, conversations, max_tokens: int) -> dict:
        from .features import target_hidden_states
        from .sharegpt import format_conversation

        exported.eval()
        head = frozen_lm_head_fn(model.get_output_embeddings())
        hit = n = 0
        for _, conv in conversations:
            f = format_conversation(tokenizer, conv, max_tokens)
            dev = next(model.parameters()).device
            m = torch.tensor(f.loss_mask[1:], dtype=torch.bool, device=dev)
            if not m.any():
                continue
            ids = torch.tensor([f.input_ids], device=dev)
            p = head(target_hidden_states(model, ids)[0, :-1][m])
            q = exported.logits(exported(ids)[0, :-1][m], self.support)
            hit += int((self._draft_ids(q) == p.argmax(-1)).sum())
            n += int(m.sum())
        return {"top1": hit / max(n, 1), "tokens": n, "conversations": len(conversations)}


def main(argv: list[str] | None = None, loss: str = "tvdpp") -> int:
    """``python -m specbench.training.draft_lm ...``: the same as ``specbench train --method tvdpp``; `loss`: the
    method (kld, tvd, tvdpp) whose drafter is trained, and the default of ``--loss``."""
    from .pipeline import main as pipeline_main

    return pipeline_main(DraftLMTask, argv, method=loss, defaults={"loss": loss})


if __name__ == "__main__":
    raise SystemExit(main())
