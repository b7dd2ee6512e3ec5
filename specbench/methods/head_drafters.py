"""Tree drafters over any registered draft head: a static tree of child ranks (EAGLE) and the
dynamic tree by draft confidence (EAGLE-2), plus the resolution of a method's checkpoint.

Both draft deterministic candidates (the head's top-k tokens; `draft_probs` None), so the
shared deterministic-tree verifier makes them lossless at every temperature.  The head is
driven through `specbench.models.draft_heads.DraftHead`: `token_features(out)` score the next
token through the target's LM head, `next_features(out)` feed the next depth (both the head's
output itself for EAGLE).

Head state across steps (KV refresh)
------------------------------------
The head keeps its own KV cache over *committed* (feature, next token) pairs:

    slot t  <-  (f_t, x_{t+1}),   f_t = the target's last hidden state at position t

`begin` fills slots 0..L-2 from the prefill features of prompt[:-1] and the tokens prompt[1:]
(the last prompt token is the first tree root).  The head's output at the last committed slot
gives the root's feature (`next_features`) and its children's scores (`token_features`).
Drafting appends tree-node slots (queries see the committed slots + their own ancestors, by a
4D tree mask; node at depth d sits at position C + d - 1, C = committed slots) and feeds the
head's own predicted (next) features to the next level.  `update` drops every drafted slot (crop to
C) and appends the REAL pairs of the step: (f_root, a_1), (f_{a_1}, a_2), ..., (f_{a_k}, bonus)
with the target's features `out.hidden` of the accepted nodes, in one causal head forward.
So the committed cache always equals a fresh recompute over the whole sequence (tested).

The target is only read: its embedding and LM head are used under inference mode; its KV
cache and length are never touched.

EAGLE-2 (Li et al. 2024, arXiv 2406.16858; SafeAILab/EAGLE `topK_genrate`)
-------------------------------------------------------------------------
Level 1: the root's top_k tokens, score = draft log-prob.  Each further level: expand the
top_k *frontier* nodes of the previous level (one batched head forward), each gets its top_k
children with score = parent score + log-prob (the cumulative log-prob, the paper's
"confidence"), and the next frontier is the global top_k of these top_k^2 candidates.  After
`depth` levels all candidates are reranked by score and the best `total_tokens - 1` are kept
(plus the root: `total_tokens` tree nodes, as the official `--total-token`).  Children never
score above their parent, and ties are broken towards shallower nodes, so the kept set is
closed under ancestors.  Nodes are emitted by depth, then score (siblings in rank order).

`depth` here = number of draft levels = the paper's "depth 6" = the official code's
`--depth 5` (which counts expansions after the root's top-k).
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..decoding.tree import Proposal, Tree
from ..decoding.verify import Verdict
from ..errors import UsageError
from ..models.draft_heads import CheckpointError, LoadedHead, checkpoint_provenance, load_head
from ..models.target import buffer_cache
from . import catalogue
from .base import DrafterBase, Method
from .draft_vocab import DraftVocab

__all__ = [
    "CHECKPOINTS_DIR",
    "checkpoint_dir",
    "DYNAMIC_TREE_DEFAULTS",
    "dynamic_tree_method",
    "DynamicTreeDrafter",
    "StaticTreeDrafter",
    "TREES",
    "default_checkpoint_dir",
    "parse_tree",
    "resolve_head",
]

# EAGLE-1's default tree: SafeAILab/EAGLE eagle/model/choices.py `mc_sim_7b_63` (25 draft
# nodes + root; despite the name, which it took from Medusa's 63-node tree).  Paths of
# child ranks: [0, 1] = the 2nd-ranked child of the 1st-ranked child of the root.
MC_SIM_7B_63: list[list[int]] = [
    [0], [1], [2], [3], [0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [2, 0], [2, 1], [3, 0],
    [0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 0], [0, 1, 1], [0, 2, 0], [0, 2, 1], [1, 0, 0],
    [0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 2], [0, 0, 0, 0, 0], [0, 0, 0, 0, 1],
]
TREES: dict[str, list[list[int]]] = {
    "mc_sim_7b_63": MC_SIM_7B_63,
    # Small trees for CPUs, where a target forward grows with the tree (results/studies/tree_cost_cpu.json):
    # 10 drafts, and 3 drafts (4 nodes: on the measured CPU a 4-token forward costs ~1.5x one token).
    "cpu_10": [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0, 0], [2]],
    "cpu_4": [[0], [1], [0, 0]],
}

# Package data (pyproject's package-data), so an installed wheel finds the heads as a source checkout does.
CHECKPOINTS_DIR = Path(__file__).resolve().parents[1] / "checkpoints"


def default_checkpoint_dir(method: str = "eagle") -> Path:
    """The committed head the methods' catalogue names for `method` (each method its own record)."""
    dc = catalogue.identity(method).default_checkpoint
    if dc is None:
        raise CheckpointError(f"method {method} has no committed default head")
    return CHECKPOINTS_DIR / dc.name


# ------------------------------------------------------------------ checkpoint resolution

_HEADS: weakref.WeakKeyDictionary[Any, dict] = weakref.WeakKeyDictionary()


def _needs(method: str, target, why: str = "") -> CheckpointError:
    tname = getattr(target, "name", "") or "this target"
    return CheckpointError(
        f"method {method} needs a draft checkpoint for {tname}: pass --param checkpoint=PATH or train one with "
        f"`specbench train --method {method} ...`" + (f" ({why})" if why else ""))


def resolve_head(method: str, target, checkpoint: Any) -> LoadedHead:
    """The head `method` drafts with: a LoadedHead or head module given in memory, a checkpoint directory, or
    "" (the method's own committed default head, for the embedded target it was trained for; a method
    without one never falls back to another method's). The checkpoint must hold the architecture the
    catalogue names for the method."""
    arch = catalogue.identity(method).head if catalogue.identity(method) else None
    if isinstance(checkpoint, LoadedHead):
        if arch is not None and checkpoint.arch != arch:
            raise CheckpointError(f"method {method} drafts with a {arch} head, not the given {checkpoint.arch} head")
        checkpoint = checkpoint if checkpoint.source is not None else checkpoint.head
    if isinstance(checkpoint, LoadedHead):
        return checkpoint
    if isinstance(checkpoint, torch.nn.Module):
        head = checkpoint
        if head.vocab_size != target.vocab_size or head.hidden_size != target.config.hidden_size:
            raise CheckpointError(f"the given head does not match {target.name or 'the target'} "
                                  f"(vocab {head.vocab_size} vs {target.vocab_size}, hidden "
                                  f"{head.hidden_size} vs {target.config.hidden_size})")
        return LoadedHead(head, arch or "eagle")
    if checkpoint in ("", None):
        ident = catalogue.identity(method)
        dc = ident.default_checkpoint if ident else None
        if dc is None:
            raise _needs(method, target, "there is no committed default head")
        d = CHECKPOINTS_DIR / dc.name
        if (target.name or "") != dc.target:
            raise _needs(method, target, f"the committed default head {d.name} is for {dc.target}")
        if not d.is_dir():
            raise _needs(method, target, f"no committed default head at {d}")
        try:
            return _load_cached(d, target, arch)
        except CheckpointError as e:
            raise _needs(method, target, f"the default head {d} does not load: {e}") from e
    d = checkpoint_dir(checkpoint)
    if not d.is_dir():
        what = "is a file" if d.exists() else "not found"
        raise CheckpointError(f"draft checkpoint {checkpoint} {what}; pass a directory with config.json and "
                              "model.safetensors or pytorch_model.bin")
    return _load_cached(d, target, arch)


def checkpoint_dir(checkpoint: Any) -> Path:
    """Where a `checkpoint` parameter points: the path as given, else a name under specbench/checkpoints/
    (a committed head, e.g. ``fspad-wofs-smollm2-135m``) when the path does not exist."""
    d = Path(str(checkpoint)).expanduser()
    if not d.exists() and (CHECKPOINTS_DIR / str(checkpoint)).is_dir():
        d = CHECKPOINTS_DIR / str(checkpoint)
    return d


def _load_cached(d: Path, target, arch: str | None) -> LoadedHead:
    """One loaded head per (target, checkpoint directory, its files' mtimes)."""
    d = d.resolve()
    stamp = tuple((f.name, f.stat().st_mtime_ns) for f in sorted(d.iterdir()) if f.is_file())
    try:
        per_target = _HEADS.setdefault(target, {})
    except TypeError:  # not weak-referenceable: no caching
        return load_head(d, target, arch)
    key = (str(d), stamp, arch)
    if key not in per_target:
        per_target.clear()
        per_target[key] = load_head(d, target, arch)
    return per_target[key]


# ------------------------------------------------------------------ drafters


class _HeadDrafter(DrafterBase):
    """Shared state: the head, its committed KV cache, the root's predicted feature."""

    def __init__(self, head: LoadedHead | torch.nn.Module, draft_vocab: int = 0, runtime: str = "hf"):
        self.loaded = head if isinstance(head, LoadedHead) else LoadedHead(head, "eagle")
        self.head = head = self.loaded.head
        # The head runs on the target's runtime: its fast kernels where the target's forwards use them (a
        # head without a fast forward keeps its own); one runtime per run, as for vanilla.
        fast = head.fast() if runtime == "fast" and hasattr(head, "fast") else None
        self.run_head = fast or head
        w = head.lm_head.weight
        self.device, self.dtype = w.device, w.dtype
        self.draft_vocab = int(draft_vocab)
        # optional; candidates stay deterministic, so losslessness is unaffected
        ids = getattr(head, "draft_ids", None)
        if ids is not None:  # a head trained over a reduced vocabulary drafts over exactly it
            if self.draft_vocab not in (0, ids.numel()):
                raise UsageError(f"this head was trained over a draft vocabulary of {ids.numel()} ids (its d2t/t2d "
                                 f"mapping) and drafts over it: draft_vocab must be 0 or {ids.numel()}, not "
                                 f"{self.draft_vocab}")
            self.vocab = DraftVocab.fixed(*head.scored_rows(), ids)
        else:
            self.vocab = DraftVocab(w, getattr(head.lm_head, "bias", None), self.draft_vocab,
                                    self.loaded.draft_vocab_file)
        self.kv = buffer_cache()  # one in-place KV buffer layer
        self.committed = 0  # committed head slots (= tokens in the sequence - 1)
        self.root_feature: torch.Tensor | None = None  # the head's output at the last committed slot: the root's
        self._anc = torch.zeros(0, 0, dtype=torch.bool, device=self.device)
        self.checkpoint: str | None = str(self.loaded.source) if self.loaded.source else None

    @property
    def checkpoint_sha256(self) -> str | None:
        """sha256 of the head's weight file (None for an in-memory head), for results files."""
        return self.loaded.weights_sha256

    @property
    def draft_provenance(self) -> dict | None:
        """How the head was trained (`draft_heads.checkpoint_provenance`), for results files."""
        return checkpoint_provenance(self.loaded.source)

    @property
    def draft_vocab_sha256(self) -> str | None:
        """sha256 of the DRAFT_VOCAB_FILE this drafter ranks its draft vocabulary by (None if unused)."""
        f = self.loaded.draft_vocab_file
        if self.draft_vocab <= 0 or f is None or self.vocab.is_fixed:  # a mapping is in the weights' sha256
            return None
        from ..artifacts import sha256_file

        return sha256_file(f)

    def _topk(self, out: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, token ids) of the top-k draft log-probs for each row of head outputs (n, .)."""
        logits = self.vocab.logits(self.head.token_features(out))
        logp = torch.log_softmax(logits.float(), dim=-1)
        vals, idx = torch.topk(logp, min(k, logp.shape[-1]), dim=-1)
        if self.vocab.ids is not None:
            idx = self.vocab.ids[idx]
        return vals, idx

    # -- committed state
    @torch.inference_mode()
    def begin(self, prompt: list[int], prefill) -> None:
        self.kv = buffer_cache()
        self.committed = 0
        self.root_feature = None
        self.vocab.reset(list(prompt))
        if len(prompt) > 1:
            self._append(list(prompt[1:]), prefill.hidden)

    def _append(self, tokens: list[int], feats: torch.Tensor) -> None:
        n = len(tokens)
        ids = torch.tensor(tokens, device=self.device)[None]
        pos = torch.arange(self.committed, self.committed + n, device=self.device)[None]
        out = self.run_head(ids, feats.to(self.dtype)[None], pos, past_key_values=self.kv)
        self.committed += n
        self.root_feature = out[0, -1]

    @torch.inference_mode()
    def update(self, tree: Tree, verdict: Verdict, out) -> None:
        self.kv.layers[0].truncate(self.committed)  # drop the drafted slots
        nodes = [0, *verdict.path]
        tokens = [tree.tokens[i] for i in verdict.path] + [int(verdict.token)]
        feats = out.hidden[torch.tensor(nodes, device=out.hidden.device)]
        self._append(tokens, feats)
        self.vocab.grow(tokens)

    # -- drafting
    def _start_draft(self) -> None:
        self.kv.layers[0].truncate(self.committed)
        self._anc = torch.zeros(0, 0, dtype=torch.bool, device=self.device)

    def _draft_forward(self, tokens: torch.Tensor, parent_out: torch.Tensor, parent_slots: torch.Tensor,
                       depth: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Run tree nodes at `depth` from their parents' head outputs (their slots, -1 = root) -> (the nodes'
        head outputs, their slots)."""
        feats = self.head.next_features(parent_out)
        n, S, C = tokens.shape[0], self._anc.shape[0], self.committed
        rows = torch.zeros(n, S + n, dtype=torch.bool, device=self.device)
        if S:
            has_parent = parent_slots >= 0
            rows[:, :S] = self._anc[parent_slots.clamp_min(0)] & has_parent[:, None]
        ar = torch.arange(n, device=self.device)
        rows[ar, S + ar] = True
        anc = torch.zeros(S + n, S + n, dtype=torch.bool, device=self.device)
        anc[:S, :S] = self._anc
        anc[S:] = rows
        self._anc = anc
        mask = torch.cat([torch.ones(n, C, dtype=torch.bool, device=self.device), rows], 1)[None, None]
        pos = torch.full((1, n), C + depth - 1, device=self.device)
        out = self.run_head(tokens[None], feats[None], pos, attention_mask=mask, past_key_values=self.kv)
        return out[0], S + ar


def parse_tree(tree: Any) -> list[list[int]]:
    """A tree name from TREES, a JSON list of rank paths, or a list of rank paths."""
    if isinstance(tree, str):
        if tree in TREES:
            return [list(p) for p in TREES[tree]]
        try:
            tree = json.loads(tree)
        except ValueError:
            raise UsageError(f"unknown EAGLE tree {tree!r}: use one of {', '.join(TREES)} or a JSON list of "
                             "rank paths, e.g. [[0],[1],[0,0]]") from None
    try:
        paths = [[int(r) for r in p] for p in tree]
    except (TypeError, ValueError):
        raise UsageError(f"an EAGLE tree is a list of rank paths (lists of ints), got {tree!r}") from None
    seen = {tuple(p) for p in paths}
    for p in paths:
        if not p or min(p) < 0:
            raise UsageError(f"bad tree path {p}: non-empty, ranks >= 0")
        if len(p) > 1 and tuple(p[:-1]) not in seen:
            raise UsageError(f"tree path {p} has no parent path {p[:-1]} in the tree")
    return sorted((list(t) for t in seen), key=lambda p: (len(p), p))


class StaticTreeDrafter(_HeadDrafter):
    """EAGLE-1's static tree of child ranks, each node's children = its top-k by rank."""

    def __init__(self, head: LoadedHead | torch.nn.Module, tree: Sequence[Sequence[int]], draft_vocab: int = 0,
                 runtime: str = "hf"):
        super().__init__(head, draft_vocab, runtime)
        paths = parse_tree(list(map(list, tree)))
        index = {(): 0}
        self.parents: list[int] = []
        self.ranks: list[int] = []
        self.depths: list[int] = []
        for p in paths:
            index[tuple(p)] = len(self.parents) + 1
            self.parents.append(index[tuple(p[:-1])])
            self.ranks.append(p[-1])
            self.depths.append(len(p))
        self.max_depth = max(self.depths, default=0)
        n = len(paths)
        has_child = [False] * (n + 1)
        for p in self.parents:
            has_child[p] = True
        # Per level: node ids (1-based), their parents, ranks; and which nodes of the level get expanded.
        self.levels = []
        for d in range(1, self.max_depth + 1):
            nodes = [i + 1 for i in range(n) if self.depths[i] == d]
            self.levels.append({
                "nodes": nodes,
                "parents": [self.parents[i - 1] for i in nodes],
                "ranks": torch.tensor([self.ranks[i - 1] for i in nodes], device=self.device),
                "k": max(self.ranks[i - 1] for i in nodes) + 1,
                "expand": [i for i in nodes if has_child[i]],
            })
        self.n_nodes = n

    @torch.inference_mode()
    def propose(self, tokens: list[int]) -> Proposal:
        if self.root_feature is None or not self.n_nodes:
            return Proposal()
        self._start_draft()
        tok = torch.empty(self.n_nodes + 1, dtype=torch.long, device=self.device)
        H = self.root_feature.shape[-1]
        slot_of: dict[int, int] = {0: -1}
        feats = self.root_feature[None]  # rows = nodes expanded at the previous level
        row_of = {0: 0}
        for d, level in enumerate(self.levels, start=1):
            _, top = self._topk(feats, level["k"])  # (rows, k)
            prow = torch.tensor([row_of[p] for p in level["parents"]], device=self.device)
            tok[torch.tensor(level["nodes"], device=self.device)] = top[prow, level["ranks"]]
            if d == self.max_depth or not level["expand"]:
                break
            ex = level["expand"]
            ex_t = torch.tensor(ex, device=self.device)
            in_feats = feats[torch.tensor([row_of[self.parents[i - 1]] for i in ex], device=self.device)]
            pslots = torch.tensor([slot_of[self.parents[i - 1]] for i in ex], device=self.device)
            feats, slots = self._draft_forward(tok[ex_t], in_feats.reshape(-1, H), pslots, d)
            row_of = {node: r for r, node in enumerate(ex)}
            slot_of.update({node: int(s) for node, s in zip(ex, slots.tolist())})
        return Proposal(tok[1:].tolist(), list(self.parents))


class DynamicTreeDrafter(_HeadDrafter):
    """EAGLE-2's dynamic tree by cumulative draft log-prob (expand top_k per level, rerank, keep total_tokens)."""

    def __init__(self, head: LoadedHead | torch.nn.Module, depth: int, top_k: int, total_tokens: int,
                 draft_vocab: int = 0, runtime: str = "hf"):
        super().__init__(head, draft_vocab, runtime)
        if depth < 1 or top_k < 1 or total_tokens < 1:
            raise UsageError("the dynamic tree needs depth >= 1, top_k >= 1 and total_tokens >= 1")
        self.depth, self.top_k, self.total_tokens = int(depth), int(top_k), int(total_tokens)
        self.last_scores: torch.Tensor | None = None  # scores of the last proposal's nodes (tests, analysis)

    @torch.inference_mode()
    def propose(self, tokens: list[int]) -> Proposal:
        n_keep = self.total_tokens - 1
        if self.root_feature is None or n_keep <= 0:
            return Proposal()
        self._start_draft()
        K = self.top_k
        scores, toks = self._topk(self.root_feature[None], K)
        scores, toks = scores[0], toks[0]
        K1 = toks.shape[0]
        cand_tok, cand_score = [toks], [scores]
        cand_parent = [torch.full((K1,), -1, dtype=torch.long, device=self.device)]
        cand_depth = [torch.ones(K1, dtype=torch.long, device=self.device)]
        n_cand = K1
        f_idx = torch.arange(K1, device=self.device)  # frontier: candidate indices
        f_tok, f_score = toks, scores
        f_feat = self.root_feature[None].expand(K1, -1)
        f_slot = torch.full((K1,), -1, dtype=torch.long, device=self.device)
        for d in range(2, self.depth + 1):
            out, slots = self._draft_forward(f_tok, f_feat, f_slot, d - 1)
            vals, top = self._topk(out, K)  # (nf, K)
            cu = (f_score[:, None] + vals).reshape(-1)
            flat_tok = top.reshape(-1)
            kk = top.shape[1]
            cand_tok.append(flat_tok)
            cand_score.append(cu)
            cand_parent.append(f_idx.repeat_interleave(kk))
            cand_depth.append(torch.full((cu.shape[0],), d, dtype=torch.long, device=self.device))
            if d == self.depth:
                break
            sel = torch.topk(cu, min(K, cu.shape[0])).indices
            row = sel // kk
            f_idx = n_cand + sel
            f_tok, f_score = flat_tok[sel], cu[sel]
            f_feat, f_slot = out[row], slots[row]
            n_cand += cu.shape[0]
        all_tok = torch.cat(cand_tok)
        all_score = torch.cat(cand_score)
        all_parent = torch.cat(cand_parent)
        all_depth = torch.cat(cand_depth)
        n_keep = min(n_keep, all_tok.shape[0])
        # Rerank: score descending; a stable sort keeps earlier (shallower) candidates first on ties,
        # so every prefix is closed under ancestors (a child's score never exceeds its parent's).
        order = torch.sort(all_score, descending=True, stable=True).indices[:n_keep]
        order = order[torch.sort(all_depth[order], stable=True).indices]  # by depth, then score
        new_index = torch.full((all_tok.shape[0] + 1,), -1, dtype=torch.long, device=self.device)
        new_index[-1] = 0  # parent -1 (root) -> node 0
        new_index[order] = torch.arange(1, n_keep + 1, device=self.device)
        parents = new_index[all_parent[order]]  # -1 indexes the last entry: the root
        if bool((parents < 0).any()):
            raise AssertionError("EAGLE-2 tree selection is not closed under ancestors")
        self.last_scores = all_score[order]
        return Proposal(all_tok[order].tolist(), parents.tolist())


# ------------------------------------------------------------------ methods over the dynamic tree

# EAGLE-2's paper setting: 6 draft levels, top-10 expansion, 60 tree nodes (root included, as the
# official --total-token counts it).
DYNAMIC_TREE_DEFAULTS = {"checkpoint": "", "depth": 6, "top_k": 10, "total_tokens": 60, "draft_vocab": 0}


def dynamic_tree_method(name: str, description: str, train) -> Method:
    """A method that drafts EAGLE-2's dynamic tree over its own head (`resolve_head(name, ...)`): EAGLE-2
    itself, and HASS, which differs only in how its head is trained."""

    def drafter(target, sampling, generator, **params: Any) -> DynamicTreeDrafter:
        p = {**DYNAMIC_TREE_DEFAULTS, **params}  # Method.params has checked the names
        return DynamicTreeDrafter(resolve_head(name, target, p["checkpoint"]), int(p["depth"]), int(p["top_k"]),
                                  int(p["total_tokens"]), draft_vocab=int(p["draft_vocab"]),
                                  runtime=getattr(target, "runtime_name", "hf"))

    return Method(name, description, drafter, train=train, defaults=dict(DYNAMIC_TREE_DEFAULTS),
                  draft_budget=lambda p: {"tree_nodes": int(p["total_tokens"]), "draft_vocab": int(p["draft_vocab"])})
