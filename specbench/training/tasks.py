"""A training task: what one draft method trains and how. The pipeline (`pipeline.py`) and the loop
(`trainer.py`) know nothing about any method; they drive a `Task`:

* `Options`, a dataclass of the task's settings (loss weights, augmentation, ...): the pipeline turns its
  fields into `specbench train --method M` options (`--field-name`, the field's default and its
  ``metadata["help"]``), and records them in the trainer state's fingerprint and the manifest;
* `make_head(model, data, seed)`: a fresh head of architecture `arch` for the target (the data may
  inform the initialisation), and `trainable(head)`: the parameters the optimiser steps;
* `collate(rows)`: a batch from feature-cache rows; `augment(batch, generator)`: training-only noise;
* `loss(head, batch)`: a dict whose ``"loss"`` is back-propagated and whose other scalars are logged;
  `generator` (optional): the task's own random stream, checkpointed with the trainer state;
* `describe()`: what the manifest says of the objective;
* `phases()`: the training phases one command runs (default one; HASS's official schedule has two, the
  second starting from the first's weights);
* `export(head, out)` / `load(out, model)` / `exported_state(head)` / `format()`: the checkpoint the task
  writes and how decoding reads it back (default: the draft-head registry's format for `arch`);
  `heldout(...)`: the held-out check on the exported checkpoint (default: a head's top-1 agreement with
  the target at draft depth 1), described by `heldout_what`.
"""

from __future__ import annotations

import abc
import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

__all__ = ["Phase", "Task", "TaskOptions", "add_options", "frozen_lm_head_fn", "head_heldout_accuracy",
           "options_from_args", "shift_batch"]


@dataclass(frozen=True)
class TaskOptions:
    """Base of a task's options dataclass; each field becomes a CLI option."""


@dataclass(frozen=True)
class Phase:
    """One phase of a training command: its options, and what it changes of the command's settings."""

    opts: TaskOptions
    epochs: int | None = None  # None: the command's --epochs
    lr: float | None = None  # None: the command's --lr
    subdir: str | None = None  # None: the command's --out; else --out/subdir (a phase the next one starts from)


class Task(abc.ABC):
    """A method's training; the defaults are those of the feature-level heads: EAGLE's one-position shift,
    no augmentation, one phase."""

    name: ClassVar[str] = ""
    arch: ClassVar[str] = ""
    Options: ClassVar[type[TaskOptions]] = TaskOptions
    # The option that makes a trained head another arm of the same method (FSPAD's ablations, HASS's
    # masking): recorded as the manifest's "variant" when it differs from its default, so results files
    # and claims tell `fspad[wofs]` from `fspad`.
    variant_option: ClassVar[str | None] = None

    def __init__(self, opts: TaskOptions | None = None, seed: int = 0):
        self.opts = opts if opts is not None else self.Options()
        self.generator: torch.Generator | None = None
        # The target trained for, (name, weights sha256): set by the pipeline before make_head, for a
        # checkpoint that names what it was made from (a draft LM reusing the target's embedding).
        self.target: tuple[str, str] = ("", "")

    @abc.abstractmethod
    def make_head(self, model, data=None, seed: int = 0) -> torch.nn.Module:
        """A fresh trainable head of architecture `arch` for the target `model`."""

    def trainable(self, head: torch.nn.Module) -> list[torch.nn.Parameter]:
        return [p for p in head.parameters() if p.requires_grad]

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        return shift_batch(rows)

    def augment(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        return batch

    @abc.abstractmethod
    def loss(self, head: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """{"loss": the scalar to back-propagate, name: scalar to log, ...}."""

    def describe(self) -> dict:
        return dataclasses.asdict(self.opts)

    def variant(self) -> str | None:
        """The value of `variant_option` when it is not the default (None: the method's main arm)."""
        if self.variant_option is None:
            return None
        value = getattr(self.opts, self.variant_option)
        default = {f.name: f.default for f in dataclasses.fields(self.Options)}[self.variant_option]
        return None if value == default else str(value)

    def phases(self) -> list[Phase]:
        return [Phase(self.opts)]

    # -- the exported checkpoint (a draft head of the registry's architecture `arch` by default)
    heldout_what: ClassVar[str] = ("top-1 agreement of the head's next-token prediction with the target's argmax "
                                   "at t+1, teacher-forced on the target's features")

    def export(self, head: torch.nn.Module, out: Path) -> None:
        from ..models.draft_heads import save_head

        save_head(head, self.arch, out)

    def load(self, out: Path, model) -> torch.nn.Module:
        """The exported checkpoint as decoding loads it (strict)."""
        from ..models.draft_heads import load_head

        return load_head(out, model, self.arch).head

    def exported_state(self, head: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The weights `export` writes (the trainable ones)."""
        return head.trainable_state_dict()

    def format(self) -> str:
        return f"{self.arch} draft head (config.json + model.safetensors; specbench.models.draft_heads)"

    def heldout(self, exported: torch.nn.Module, model, tokenizer, conversations, max_tokens: int) -> dict:
        return head_heldout_accuracy(exported, model, tokenizer, conversations, max_tokens)


@torch.no_grad()
def head_heldout_accuracy(head, model, tokenizer, conversations, max_tokens: int = 512) -> dict:
    """Top-1 agreement of the head's next-token prediction with the target's argmax, teacher-forced with
    the target's true features (the training-time accuracy, i.e. draft depth 1), on assistant tokens. A
    head with a reduced draft vocabulary predicts among its ids; the target's argmax is over all of them."""
    from .features import target_hidden_states
    from .sharegpt import format_conversation

    head.eval()
    target_logits = frozen_lm_head_fn(model.get_output_embeddings())
    draft_ids = getattr(head, "draft_ids", None)
    hit = n = 0
    for _, conv in conversations:
        f = format_conversation(tokenizer, conv, max_tokens)
        if sum(f.loss_mask[1:]) == 0:
            continue
        dev = next(model.parameters()).device
        ids = torch.tensor([f.input_ids], device=dev)
        h = target_hidden_states(model, ids).float()
        T = ids.shape[1] - 1
        out = head(ids[:, 1:], h[:, :T], torch.arange(T, device=dev)[None])
        m = torch.tensor(f.loss_mask[1:], dtype=torch.bool, device=dev)
        pred = head.logits(head.token_features(out)[0][m]).argmax(-1)
        if draft_ids is not None:
            pred = draft_ids.to(pred.device)[pred]
        hit += int((pred == target_logits(h[0, 1:][m]).argmax(-1)).sum())
        n += int(m.sum())
    return {"top1": hit / max(n, 1), "tokens": n, "conversations": len(conversations)}


def shift_batch(rows: list[dict]) -> dict[str, torch.Tensor]:
    """EAGLE's one-position shift, right-padded. For a sequence of length L (pairs i = 0..L-2):

    - ``input_ids[i] = tokens[i+1]`` (the token after the feature's position),
    - ``features[i] = f_i`` (target feature; a task may add noise), ``target[i] = f_{i+1}``,
    - ``loss_mask[i] = mask[i+1]`` (the predicted feature is that of an assistant-reply token),
    - ``position_ids[i] = i``, ``attention_mask`` 1 on real pairs.
    """
    n = [len(r["input_ids"]) - 1 for r in rows]
    T = max(max(n), 1)
    B = len(rows)
    H = rows[0]["hidden"].shape[-1]
    input_ids = torch.zeros(B, T, dtype=torch.long)
    feats = torch.zeros(B, T, H)
    target = torch.zeros(B, T, H)
    mask = torch.zeros(B, T)
    att = torch.zeros(B, T, dtype=torch.long)
    for b, r in enumerate(rows):
        k = n[b]
        if k <= 0:
            continue
        input_ids[b, :k] = r["input_ids"][1:k + 1]
        feats[b, :k] = r["hidden"][:k]
        target[b, :k] = r["hidden"][1:k + 1]
        mask[b, :k] = r["loss_mask"][1:k + 1]
        att[b, :k] = 1
    pos = torch.arange(T).expand(B, T).clone()
    return {"input_ids": input_ids, "features": feats, "target": target, "loss_mask": mask,
            "attention_mask": att, "position_ids": pos}


def frozen_lm_head_fn(lm_head: torch.nn.Module):
    """(x, ids=None) -> the target's LM head over x, with its weights detached (targets for the distribution
    losses): every vocabulary row, or the rows of `ids` only, those in float32 (they are divided by the float32
    logsumexp of all rows that `features.target_logit_stats` caches)."""
    w = lm_head.weight.detach()
    b = lm_head.bias.detach() if getattr(lm_head, "bias", None) is not None else None

    def fn(x: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        if ids is None:
            return F.linear(x.to(w.dtype), w, b)
        return F.linear(x.float(), w[ids].float(), None if b is None else b[ids].float())

    return fn


# ---------------------------------------------------------------- options <-> CLI


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_options(parser: argparse.ArgumentParser, options: type[TaskOptions], defaults: dict | None = None) -> None:
    """One option per field of `options`: ``--field-name``, typed by the field's ``metadata["parse"]`` or its
    default's type (a bool field is a switch to the opposite of its default), with its help; `defaults`
    overrides fields' defaults (a method that shares another's task with other settings)."""
    group = parser.add_argument_group(f"{options.__name__} (the method's training options)")
    names = {f.name for f in dataclasses.fields(options)}
    if set(defaults or {}) - names:
        raise ValueError(f"no option(s) {sorted(set(defaults or {}) - names)} in {options.__name__}")
    for f in dataclasses.fields(options):
        default = (defaults or {}).get(f.name, f.default)
        help_ = f.metadata.get("help", "") + f" (default {default})"
        if isinstance(default, bool):
            group.add_argument(_flag(f.name) if not default else _flag("no_" + f.name), dest=f.name,
                               action="store_false" if default else "store_true", default=default, help=help_)
            continue
        parse = f.metadata.get("parse", type(default))
        group.add_argument(_flag(f.name), dest=f.name, type=parse, default=default, help=help_,
                           choices=f.metadata.get("choices"))


def options_from_args(options: type[TaskOptions], args: argparse.Namespace) -> TaskOptions:
    return options(**{f.name: getattr(args, f.name) for f in dataclasses.fields(options)})
