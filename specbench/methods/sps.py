"""sps: speculative sampling with a draft language model (Leviathan et al. 2023; Chen et al. 2023).

Each step the draft LM extends the sequence by a chain of `gamma` tokens, each drawn from its own
distribution q (the draft's logits under the run's temperature, top-k and top-p, exactly as the target's
p; the argmax at T=0). The chain goes to the target in one forward and the loop's verifier accepts or
corrects it with q, so the output is distributed as the target's whatever the draft. The draft runs on
the same runtime as the target (`specbench.models.target.Target`): its KV cache holds the sequence, is
extended by each draft token and rolled back (`Target.truncate`) to the accepted prefix after the step.

Any causal LM with the target's vocabulary can draft (`--param checkpoint=PATH`, a local HF directory,
a cached HF id or an embedded name, or a fine-tuned prefix draft of the target in specbench's compact
format). A draft whose tokenizer differs from the target's is refused: its
token ids would mean other strings, and the drafts would be rejected garbage.
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

import torch

from ..decoding.sampling import SamplingConfig, probs, sample
from ..decoding.tree import Proposal
from ..errors import UsageError
from ..models.draft_heads import DRAFT_VOCAB_FILE, CheckpointError
from ..models.draft_lm import is_prefix_draft
from .base import DrafterBase, Method
from .draft_vocab import DraftVocab

__all__ = ["KLD", "METHOD", "TVD", "TVDPP", "DraftModelDrafter", "check_same_vocabulary", "draft_model_method"]


class DraftModelDrafter(DrafterBase):
    """Chains of `gamma` tokens from a draft model's q (`draft`: a specbench Target over the draft LM).

    `draft_vocab` N > 0: a reduced draft vocabulary (`DraftVocab`: the `ranking` file's first N ids plus the
    sequence's tokens). q is the draft's distribution over those ids only (its LM head restricted to their
    rows, -inf logits elsewhere, then the run's temperature/top-k/top-p), exactly 0 on every other id: the
    verifier's min(1, p/q) never meets q = 0 for a drafted token, and its residual max(0, p - q) covers the
    ids the draft cannot propose, so sampling stays lossless.
    """

    def __init__(self, draft, sampling: SamplingConfig, generator: torch.Generator | None, gamma: int,
                 draft_vocab: int = 0, ranking: Path | None = None):
        if gamma < 1:
            raise UsageError(f"gamma must be >= 1, not {gamma}")
        self.draft, self.sampling, self.generator, self.gamma = draft, sampling, generator, int(gamma)
        self.checkpoint_sha256 = getattr(draft, "weights_sha256", None) or None  # recorded in results files
        # a stored draft is named by its directory, whose manifest says how it was trained
        from ..models.draft_heads import checkpoint_provenance

        self.draft_provenance = checkpoint_provenance(getattr(draft, "name", None))
        self._base = 0  # length of the sequence the last proposal continued
        self.vocab = DraftVocab(draft.head.weight.detach(), _detached(getattr(draft.head, "bias", None)),
                                draft_vocab, ranking)

    @property
    def draft_vocab_sha256(self) -> str | None:
        """sha256 of the ranking a reduced draft vocabulary follows (None if unused), for results files."""
        if self.vocab.full or self.vocab.ranking is None:
            return None
        from ..artifacts import sha256_file

        return sha256_file(self.vocab.ranking)

    def _logits(self, pending: list[int]) -> torch.Tensor:
        """(1, V) draft logits after feeding `pending` (-inf outside a reduced vocabulary)."""
        if self.vocab.full:
            return self.draft.extend(pending).logits[-1:]
        hidden = self.draft.extend(pending, logits=False).hidden[-1:]
        sub = self.vocab.logits(hidden).float()
        full = sub.new_full((1, self.draft.vocab_size), float("-inf"))
        return full.index_copy_(1, self.vocab.ids, sub)

    @torch.inference_mode()
    def begin(self, prompt: list[int], prefill) -> None:
        self.draft.prefill(list(prompt[:-1]))  # as the target: the last prompt token is the first root
        self.vocab.reset(list(prompt))

    @torch.inference_mode()
    def propose(self, tokens: list[int]) -> Proposal:
        """The draft cache holds a prefix of `tokens`; feed the rest, then draw one token at a time."""
        self._base = len(tokens)
        pending = tokens[self.draft.length:]
        gamma = min(self.gamma, self.draft.max_length - len(tokens))  # never past the draft's context
        drafts: list[int] = []
        rows = []
        for _ in range(max(gamma, 0)):
            logits = self._logits(pending)
            if self.sampling.greedy:
                token = int(logits.argmax(-1))
            else:
                q = probs(logits, self.sampling)
                token = int(sample(q, self.generator))
                rows.append(q[0])
            drafts.append(token)
            pending = [token]
        # The last draft is not cached yet: it is fed (if accepted) with the next step's correction.
        return Proposal.chain(drafts, torch.stack(rows) if rows else None)

    @torch.inference_mode()
    def update(self, tree, verdict, out) -> None:
        # Keep the sequence the proposal continued plus the accepted drafts; the new root is fed next time.
        self.draft.truncate(min(self._base + len(verdict.path), self.draft.length))
        self.vocab.grow([tree.tokens[i] for i in verdict.path] + [int(verdict.token)])


def _detached(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


def check_same_vocabulary(target, draft) -> None:
    """Refuse (CheckpointError) a draft whose token ids are not the target's: another tokenizer (when both have
    one), or an LM head of another size (q and p must be distributions over the same ids)."""
    tt, dt = getattr(target, "tokenizer", None), getattr(draft, "tokenizer", None)
    if tt is not None and dt is not None and tt.get_vocab() != dt.get_vocab():
        differ = sorted(set(tt.get_vocab().items()) ^ set(dt.get_vocab().items()))[:3]
        raise CheckpointError(f"the draft model {draft.name} has another tokenizer than the target {target.name} "
                              f"(e.g. {differ}); a draft model needs the target's tokenizer")
    if target.vocab_size != draft.vocab_size:
        raise CheckpointError(f"the draft model {draft.name} scores {draft.vocab_size} token ids, the target "
                              f"{target.name} {target.vocab_size}; a draft model needs the target's tokenizer and "
                              "vocabulary")


_DRAFTS: weakref.WeakKeyDictionary[Any, dict] = weakref.WeakKeyDictionary()


def _load_draft(method: str, target, spec: str):
    """The draft model `spec` (default: the method's committed one) on the target's device and dtype, one per
    target (suites reuse it)."""
    from ..models import load_model
    from ..models.target import Target
    from . import catalogue
    from .head_drafters import CHECKPOINTS_DIR

    if not spec and method == "sps" and target.name in PHASE1:
        spec = PHASE1[target.name]
    if not spec:
        ident = catalogue.identity(method)
        dc = ident.default_checkpoint if ident else None
        if dc is None or dc.target != (target.name or "") or not (CHECKPOINTS_DIR / dc.name).is_dir():
            train = "" if method == "sps" else f" or train one with `specbench train --method {method} ...`"
            raise CheckpointError(f"method {method} needs a draft model for {target.name or 'this target'}: pass "
                                  "--param checkpoint=PATH (a causal LM directory, a cached HF id or an embedded "
                                  f"name, with the target's tokenizer; or {PREFIX}K, the target's first K layers)"
                                  f"{train}")
        spec = str(CHECKPOINTS_DIR / dc.name)
    per_target = _DRAFTS.setdefault(target, {})
    if spec not in per_target:
        if spec.startswith(PREFIX):
            draft = _prefix_draft(target, spec)
        elif is_prefix_draft(spec):
            draft = _stored_prefix_draft(target, spec)
        else:
            draft = Target.from_loaded(load_model(spec, dtype=target.dtype, device=target.device),
                                       runtime=_draft_runtime(target))
            check_same_vocabulary(target, draft)
        per_target.clear()
        per_target[spec] = draft
    return per_target[spec]


PREFIX = "prefix:"  # checkpoint=prefix:K: the target's first K layers, final norm and LM head, built at run time
# sps's draft when none is given, per embedded target: the untrained layer prefix (the TVD++ pipeline's phase 1)
# of the depth the CPU search chose (results/studies/draft_lm_cpu_search.json).
PHASE1 = {"smollm2-135m": f"{PREFIX}3"}


def _prefix_draft(target, spec: str):
    """The untrained layer-prefix draft `prefix:K` of the target (the TVD++ pipeline's phase-1 stand-in)."""
    from ..models.draft_lm import layer_prefix_draft
    from ..models.target import Target

    try:
        k = int(spec[len(PREFIX):])
        lm = layer_prefix_draft(target.model, k)
    except ValueError as e:
        n = target.config.num_hidden_layers
        raise CheckpointError(f"checkpoint={spec}: {PREFIX}K needs an integer K in 1..{n} ({e})") from None
    ident = f"{target.weights_sha256 or target.name}:{PREFIX}{k}"  # what results files record as the draft
    return Target(lm, getattr(target, "tokenizer", None), name=f"{target.name}:{PREFIX}{k}", weights_sha256=ident,
                  runtime=_draft_runtime(target))


def _stored_prefix_draft(target, path: str):
    """A fine-tuned prefix draft (`specbench.models.draft_lm`'s compact format) over the target's embedding
    and LM head."""
    from ..models.draft_heads import checkpoint_sha256
    from ..models.draft_lm import load_prefix_draft
    from ..models.target import Target

    lm = load_prefix_draft(path, target.model, target=target.name, target_sha256=target.weights_sha256)
    return Target(lm, getattr(target, "tokenizer", None), name=path, weights_sha256=checkpoint_sha256(path),
                  runtime=_draft_runtime(target))


def _draft_runtime(target) -> str:
    """The draft runs on the target's runtime where it can: fast if the target is (and the draft supported)."""
    return "auto" if getattr(target, "runtime_name", "hf") == "fast" else "hf"


def draft_model_method(name: str, description: str, train=None) -> Method:
    """A method drafting chains from a draft LM: sps (any draft), and the TVD++ paper's distilled drafters."""

    def drafter(target, sampling: SamplingConfig, generator, checkpoint: Any = "", gamma: int = 5,
                draft_vocab: int = 0) -> DraftModelDrafter:
        draft = checkpoint if hasattr(checkpoint, "extend") else _load_draft(name, target, str(checkpoint))
        return DraftModelDrafter(draft, sampling, generator, int(gamma), int(draft_vocab), _ranking(draft, target))

    return Method(name, description, drafter, train=train, defaults={"checkpoint": "", "gamma": 5, "draft_vocab": 0},
                  draft_budget=lambda p: {"tree_nodes": int(p["gamma"]) + 1, "draft_vocab": int(p["draft_vocab"])})


def _ranking(draft, target) -> Path | None:
    """The token ranking a reduced draft vocabulary follows: for a draft built from the target (prefix:K),
    that of a committed checkpoint for the target (its training data's assistant tokens by frequency), a
    distilled draft LM's first (the phase-3 drafters' ranking, so phase 1 drafts over the same ids), else a
    head's; else the draft directory's DRAFT_VOCAB_FILE (training writes one); else none (ids in order)."""
    from . import catalogue
    from .head_drafters import CHECKPOINTS_DIR

    if str(draft.name).startswith(f"{target.name}:{PREFIX}"):
        for ident in sorted(catalogue.KNOWN, key=lambda i: i.head is not None):  # stable: draft LMs first
            dc = ident.default_checkpoint
            if dc is not None and dc.target == target.name and (CHECKPOINTS_DIR / dc.name / DRAFT_VOCAB_FILE).is_file():
                return CHECKPOINTS_DIR / dc.name / DRAFT_VOCAB_FILE
        return None
    path = str(draft.name) if is_prefix_draft(draft.name) else str(getattr(getattr(draft, "model", None),
                                                                            "name_or_path", "") or "")
    own = Path(path) / DRAFT_VOCAB_FILE
    return own if path and own.is_file() else None


def _train_with(loss: str):
    def train(argv: list[str]) -> int:
        """`specbench train --method M ...`: the draft-LM distillation, with M's loss unless --loss says."""
        from ..training.draft_lm import main  # accelerate/datasets only when training

        return main(argv, loss)

    return train


METHOD = draft_model_method(
    "sps", "speculative sampling (Leviathan et al. / Chen et al. 2023): a chain of gamma tokens from a draft LM's "
    "q, verified with q")
KLD = draft_model_method("kld", "sps with a draft LM distilled by forward KL (the TVD++ paper's baseline)",
                         _train_with("kld"))
TVD = draft_model_method("tvd", "sps with a draft LM distilled by total variation distance (policy gradient)",
                         _train_with("tvd"))
TVDPP = draft_model_method("tvdpp", "sps with a draft LM distilled by TVD++ (Goel et al. 2024: TVD with a "
                           "normalised advantage)", _train_with("tvdpp"))
