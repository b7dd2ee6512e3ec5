"""The EAGLE training task (``specbench train --method eagle``; EAGLE-2 drafts with the same heads).

Loss (SafeAILab/EAGLE eagle/train/main.py; FSPAD/HASS keep it as their base):

    loss = v_w * SmoothL1(f^_{t+1}, f_{t+1})            (mean over hidden dims, masked mean over tokens)
         + p_w * CE(p_target(.|f_{t+1}), p_head(.|f^_{t+1}))   (soft labels, masked mean over tokens)

with v_w = 1.0, p_w = 0.1; the target distribution is ``softmax(lm_head(f_{t+1}))`` under no_grad. Both
terms use the loss mask (assistant-reply tokens). The CE term needs the frozen LM head (vocab x hidden)
twice per token, the dominant cost on CPU: `ce_fraction` < 1 computes it on a random subset of the
masked positions (an unbiased estimate of the same masked mean; recorded in the manifest), and
`draft_vocab` N > 0 computes both distributions over the training data's N most frequent assistant tokens
only (EAGLE-3, FR-Spec): the target's softmax renormalised over them, the best a drafter confined to them
can match (its acceptance at T > 0 is the target's mass on them; at T=0 the target's argmax is among them
or no draft is accepted). The head keeps that vocabulary as its d2t/t2d mapping and drafts over it.
Augmentation: EAGLE's uniform noise on the input features (or gaussian, or none).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from .losses import distribution_loss, feature_loss, masked_positions
from .tasks import Task, TaskOptions

__all__ = ["EagleOptions", "EagleTask", "add_feature_noise", "build_head", "eagle_loss", "main"]


def _auto_or_float(value: str) -> str | float:
    import argparse

    if value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'auto' or a number, not {value!r}") from None


@dataclass(frozen=True)
class EagleOptions(TaskOptions):
    v_w: float = field(default=1.0, metadata={"help": "weight of the feature regression (SmoothL1) term"})
    p_w: float = field(default=0.1, metadata={"help": "weight of the soft-label cross-entropy term"})
    ce_fraction: float = field(default=1.0, metadata={
        "help": "fraction of the masked positions on which the cross-entropy is computed (an unbiased estimate)"})
    noise: str = field(default="uniform", metadata={
        "help": "feature augmentation: EAGLE's uniform noise, gaussian, or none",
        "choices": ("uniform", "gaussian", "none")})
    noise_std: float = field(default=0.2, metadata={"help": "scale of the feature noise"})
    embed_init_scale: str | float = field(default="auto", metadata={
        "parse": _auto_or_float,
        "help": "scale of fc's embedding-half init: 'auto' = std(features)/std(embedding), or a number"})
    draft_vocab: int = field(default=0, metadata={
        "help": "train and draft over the training data's N most frequent assistant tokens (EAGLE-3's d2t/t2d "
                "mapping in the checkpoint; the target's distribution renormalised over them); 0 = the full "
                "vocabulary"})


def add_feature_noise(feats: torch.Tensor, kind: str, std: float, generator: torch.Generator | None) -> torch.Tensor:
    """EAGLE's feature augmentation (train only). uniform: ``(U[0,1) - 0.5) * std * 512 / seq_len``
    (SafeAILab/EAGLE eagle/train/main.py AddUniformNoise, std 0.2); gaussian: ``N(0, std)``."""
    if kind == "none" or std == 0:
        return feats
    shape, dev = feats.shape, feats.device
    if kind == "uniform":
        u = torch.rand(shape, generator=generator, device="cpu").to(dev)
        return feats + (u - 0.5) * std * 512 / shape[1]
    if kind == "gaussian":
        return feats + torch.randn(shape, generator=generator, device="cpu").to(dev) * std
    raise ValueError(f"unknown noise kind {kind!r} (uniform, gaussian, none)")


def build_head(model, seed: int = 0, fc_bias: bool = True, embed_init_scale: float = 1.0, cls=None, **options):
    """A fresh EAGLE head (or one of subclass `cls`, with its constructor `options`) for HF causal LM
    `model` (random init from `seed`, float32, trainable).

    `embed_init_scale` multiplies the initial weights of fc's embedding half (fc input = cat(e, f)). The
    target's features (post-norm hidden states) are often an order of magnitude larger than its token
    embeddings (SmolLM2-135M: std 1.9 vs 0.136), so with the default init the token signal is drowned
    at the start and a short run barely learns to use it; scaling by std(f)/std(e) balances the two
    inputs from step 0. An initialisation only: the architecture and checkpoint format are unchanged.
    """
    from ..models.eagle_head import EagleHead

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = (cls or EagleHead).for_target(model, fc_bias=fc_bias, **options)
    head.float()
    if embed_init_scale != 1.0:
        with torch.no_grad():
            head.input_fc.weight[:, :head.hidden_size].mul_(embed_init_scale)
    head.requires_grad_(True)
    return head


def eagle_loss(head, out: torch.Tensor, batch: dict, target_head_fn, opts: EagleOptions,
               generator: torch.Generator | None = None, extra=None) -> dict:
    """EAGLE's loss of head outputs `out` for `batch` (see the module docstring): the feature term on
    ``head.next_features(out)``, the distribution terms on ``head.token_features(out)`` (one and the same
    predicted feature for EAGLE's head; FSPAD's regress and predict halves).

    `extra(head_logits, target_logits) -> {name: (weight, term)}`: further distribution terms on the same
    sampled rows (HASS's top-K term), added to the loss with their weights and logged by name."""
    mask = batch["loss_mask"].float()
    target = batch["target"]
    pred = head.token_features(out)
    vloss = feature_loss(head.next_features(out), target, mask)
    sel = masked_positions(mask, opts.ce_fraction, generator)
    H = pred.shape[-1]
    if sel.numel():
        with torch.no_grad():
            t_logits = target_head_fn(target.reshape(-1, H)[sel])
        h_logits = head.logits(pred.reshape(-1, H)[sel])
        ploss, acc = distribution_loss(h_logits, t_logits)
        terms = extra(h_logits, t_logits) if extra else {}
    else:
        ploss = pred.sum() * 0.0
        acc = torch.tensor(float("nan"))
        terms = {name: (w, pred.sum() * 0.0) for name, (w, _) in (extra(None, None) if extra else {}).items()}
    loss = opts.v_w * vloss + opts.p_w * ploss + sum(w * t for w, t in terms.values())
    return {"loss": loss, "vloss": vloss.detach(), "ploss": ploss.detach(),
            **{name: t.detach() for name, (_, t) in terms.items()}, "acc": acc.detach(),
            "n_tokens": mask.sum().detach(), "n_ce": torch.tensor(float(sel.numel()))}


class EagleTask(Task):
    """EAGLE's head, shift, feature noise and loss (a subclass may train another head class with them)."""

    name = "eagle"
    arch = "eagle"
    Options = EagleOptions
    opts: EagleOptions

    def __init__(self, opts: EagleOptions | None = None, seed: int = 0):
        super().__init__(opts, seed)
        self.generator = torch.Generator().manual_seed(seed + 2)  # the CE position sampler
        self.embed_scale: float | None = None
        self._target_head = None

    def make_head(self, model, data=None, seed: int = 0):
        scale = self.opts.embed_init_scale
        if scale == "auto":
            if data is None:
                raise ValueError("embed_init_scale 'auto' needs the training data")
            sample = torch.cat([data[i]["hidden"] for i in range(min(8, len(data)))])
            scale = round(float(sample.std() / model.get_input_embeddings().weight.float().std()), 3)
        self.embed_scale = float(scale)
        N = int(self.opts.draft_vocab)
        head = build_head(model, seed=seed, embed_init_scale=self.embed_scale, **self.head_options(),
                          **({"draft_vocab_size": N} if N else {}))
        if N:
            from .features import draft_vocab_ids

            head.set_draft_vocab(draft_vocab_ids(data, head.vocab_size, N))
        # the target's distribution over the rows the head scores (all, or the draft vocabulary's), looked up at
        # each call: a second phase's --init-from loads its mapping after make_head
        def target_logits(x: torch.Tensor) -> torch.Tensor:
            w, b = head.scored_rows()
            return torch.nn.functional.linear(x.to(w.dtype), w, b)

        self._target_head = target_logits
        return head

    def head_options(self) -> dict:
        """`build_head`'s `cls` and constructor options (EAGLE's head: none)."""
        return {}

    def augment(self, batch, generator):
        return {**batch, "features": add_feature_noise(batch["features"], self.opts.noise, self.opts.noise_std,
                                                       generator)}

    def forward(self, head, batch) -> torch.Tensor:
        """The head's forward: noisy target features + next tokens -> its outputs (B, T, .)."""
        return head(batch["input_ids"], batch["features"], batch["position_ids"],
                    attention_mask=batch["attention_mask"])

    def loss(self, head, batch):
        return eagle_loss(getattr(head, "module", head), self.forward(head, batch), batch, self._target_head,
                          self.opts, self.generator)

    def describe(self) -> dict:
        return {**dataclasses.asdict(self.opts), "fc_embedding_half_init_scale": self.embed_scale,
                "feature": "SmoothL1 mean over hidden, masked mean",
                "distribution": "soft-label CE vs softmax(lm_head(target feature))"}


def main(argv: list[str] | None = None) -> int:
    """``python -m specbench.training.eagle ...``: the same as ``specbench train --method eagle``."""
    from .pipeline import main as pipeline_main

    return pipeline_main(EagleTask, argv)


if __name__ == "__main__":
    raise SystemExit(main())
