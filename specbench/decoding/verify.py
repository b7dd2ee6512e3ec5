"""Lossless verification of a token tree against the target's distributions.

Pure functions over tensors.  The sampling verifiers are batched over a leading dim B
(B draws of the same tree; the losslessness tests use B >= 20000) and share one walk, `_walk`,
parameterised by the draft distributions; the decode loop (B = 1) takes `_walk_one`, the same walk
over the same primitives and random stream, visiting only the children on its path:

* deterministic candidates (q = point mass on the drafted token, EAGLE/PLD/Lookahead):
  accept child x with r(x); on rejection zero r(x) and renormalise;
* sampled candidates with draft distribution q (Leviathan/Chen for a chain, SpecInfer's
  multi-step speculative sampling for i.i.d. siblings): accept with min(1, r(x)/q(x));
  on rejection r <- norm(max(r - q, 0)).

r starts as the target distribution p at the current node.  When no child is accepted the
correction is sampled from r; when a leaf is accepted the bonus is sampled from p there.
The three primitives below are module-level so mutation tests can break them one at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling import SamplingConfig, probs, sample
from .tree import Tree


def _accept_prob(r_x: torch.Tensor, q_x: torch.Tensor | None) -> torch.Tensor:
    return r_x if q_x is None else torch.clamp(r_x / q_x, max=1.0)


def _normalise(r_new: torch.Tensor, r_old: torch.Tensor) -> torch.Tensor:
    # A residual of zero mass is reachable only through rounding (rejection had probability
    # 0); keep the previous distribution rather than divide by zero.
    s = r_new.sum(-1, keepdim=True)
    return torch.where(s > 0, r_new / s.clamp_min(torch.finfo(r_new.dtype).tiny), r_old)


def _residual(r: torch.Tensor, q: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    new = r.scatter(-1, x[:, None], 0.0) if q is None else (r - q).clamp_min(0.0)
    return _normalise(new, r)


@dataclass
class Verdict:
    """One verification: accepted draft nodes (root excluded, root->leaf) + the extra token."""

    path: list[int]
    token: int


@dataclass
class BatchVerdict:
    path: torch.Tensor  # (B, max_depth) accepted node indices, -1 padded
    n_accepted: torch.Tensor  # (B,)
    token: torch.Tensor  # (B,) bonus or correction token
    tokens: torch.Tensor  # (B, n) node tokens of each draw

    def emitted(self, k: int) -> torch.Tensor:
        """(B, k) first k emitted tokens; -1 where a draw emitted fewer than k."""
        B = self.path.shape[0]
        out = torch.full((B, k), -1, dtype=torch.long, device=self.path.device)
        for j in range(k):
            if j < self.path.shape[1]:
                node = self.path[:, j]
                out[:, j] = torch.where(node >= 0, self.tokens.gather(1, node.clamp_min(0)[:, None])[:, 0], out[:, j])
            out[:, j] = torch.where(self.n_accepted == j, self.token, out[:, j])
        return out

    def item(self, b: int = 0) -> Verdict:
        n = int(self.n_accepted[b])
        return Verdict(self.path[b, :n].tolist(), int(self.token[b]))


def _walk(p: torch.Tensor, tree: Tree, q: torch.Tensor | None, generator: torch.Generator | None,
          tokens: torch.Tensor | None = None) -> BatchVerdict:
    B, n, V = p.shape
    if n != len(tree):
        raise ValueError(f"target distributions cover {n} nodes, tree has {len(tree)}")
    dev = p.device
    rows = torch.arange(B, device=dev)
    children = tree.children_table(dev)
    if tokens is None:
        tokens = torch.tensor(tree.tokens, device=dev).expand(B, n)
    depth = tree.max_depth
    cur = torch.zeros(B, dtype=torch.long, device=dev)
    alive = torch.ones(B, dtype=torch.bool, device=dev)
    r = p[:, 0]
    path = torch.full((B, depth), -1, dtype=torch.long, device=dev)
    for d in range(depth):
        moved = torch.zeros(B, dtype=torch.bool, device=dev)
        for j in range(children.shape[1]):
            child = children[cur, j]
            active = alive & ~moved & (child >= 0)
            c = child.clamp_min(0)
            x = tokens.gather(1, c[:, None])[:, 0]
            q_c = None if q is None else q[rows, c]
            q_x = None if q_c is None else q_c.gather(-1, x[:, None]).squeeze(-1)
            u = torch.rand(B, generator=generator, device=dev)
            accept = active & (u < _accept_prob(r.gather(-1, x[:, None]).squeeze(-1), q_x))
            reject = active & ~accept
            r = torch.where(reject[:, None], _residual(r, q_c, x), r)
            moved |= accept
            cur = torch.where(accept, child, cur)
        path[:, d] = torch.where(moved, cur, -1)
        r = torch.where(moved[:, None], p[rows, cur], r)
        alive = moved
    n_acc = (path >= 0).sum(-1)
    return BatchVerdict(path, n_acc, sample(r, generator), tokens)


def _walk_one(p: torch.Tensor, tree: Tree, q: torch.Tensor | None, generator: torch.Generator | None) -> Verdict:
    """`_walk` for one draw (the decode loop's B = 1): p, q (n, V). The same walk with the same primitives,
    drawing the same uniforms in the same order (all depth x width of them, then the final draw), so on a CPU
    generator it returns `_walk`'s verdict for the same generator state (on CUDA one draw of k uniforms is not
    k draws of one, so the values differ there, not their distribution); but it visits only the children on
    the walk, in Python, with a handful of tensor ops per visited child instead of `_walk`'s ~20 per child slot
    per depth."""
    n = p.shape[0]
    if n != len(tree):
        raise ValueError(f"target distributions cover {n} nodes, tree has {len(tree)}")
    children = tree.children
    width = max((len(c) for c in children), default=0)
    depth = tree.max_depth
    u = torch.rand(depth * width, generator=generator, device=p.device).tolist() if depth * width else []
    node, r, path = 0, p[0], list[int]()
    for d in range(depth):
        moved = False
        for j, child in enumerate(children[node]):
            x = tree.tokens[child]
            q_c = None if q is None else q[child]
            if u[d * width + j] < float(_accept_prob(r[x], None if q_c is None else q_c[x])):
                node, moved = child, True
                path.append(child)
                break
            r = _residual(r[None], None if q_c is None else q_c[None],
                          torch.tensor([x], device=p.device))[0]
        if not moved:
            break
        r = p[node]
    return Verdict(path, int(sample(r, generator)))


def verify_tree_deterministic(p: torch.Tensor, tree: Tree, generator: torch.Generator | None = None) -> BatchVerdict:
    """Tree of deterministic candidates; p (B, n, V) target distributions per node."""
    return _walk(p, tree, None, generator)


def verify_tree_sampled(p: torch.Tensor, tree: Tree, q: torch.Tensor, generator: torch.Generator | None = None,
                        tokens: torch.Tensor | None = None) -> BatchVerdict:
    """Tree whose siblings were sampled i.i.d. from q; q (B, n, V), row i = q of node i (row 0 unused).

    `tokens` (B, n) gives each draw its own drafted tokens (the tree then fixes only the
    shape); default: the tree's tokens for every draw.
    """
    _check_iid(tree)
    return _walk(p, tree, q, generator, tokens)


def _check_iid(tree: Tree) -> None:
    if tree.proposal.sibling_draws != "iid" and any(len(c) > 1 for c in tree.children):
        # Multi-step rejection sampling over siblings is exact for i.i.d. draws only: siblings drawn
        # without replacement shift the output distribution, so the tree is refused, not mis-verified.
        raise ValueError(f"sampled siblings drawn {tree.proposal.sibling_draws or '(not stated)'}: the "
                         "sampled-tree verifier is exact only for siblings drawn i.i.d. with replacement; "
                         "draw them so and set Proposal.sibling_draws='iid'")


def verify_chain(p: torch.Tensor, tree: Tree, q: torch.Tensor, generator: torch.Generator | None = None,
                 tokens: torch.Tensor | None = None) -> BatchVerdict:
    """Leviathan/Chen speculative sampling of a chain drafted from q (arguments as verify_tree_sampled)."""
    if not tree.is_chain:
        raise ValueError("verify_chain needs a chain; use verify_tree_sampled for trees")
    return _walk(p, tree, q, generator, tokens)


def verify_greedy(logits: torch.Tensor, tree: Tree) -> Verdict:
    """Temperature 0: follow children that equal the target's argmax."""
    best = logits.argmax(-1).tolist()
    node, path = 0, list[int]()
    while True:
        nxt = next((c for c in tree.children[node] if tree.tokens[c] == best[node]), None)
        if nxt is None:
            return Verdict(path, best[node])
        path.append(nxt)
        node = nxt


def accept(logits: torch.Tensor, tree: Tree, cfg: SamplingConfig, draft_probs: torch.Tensor | None,
           generator: torch.Generator | None = None) -> Verdict:
    """The decode loop's entry point: logits (n, V) for the tree's nodes."""
    if cfg.greedy:
        return verify_greedy(logits, tree)
    p = probs(logits, cfg)
    if draft_probs is None:
        return _walk_one(p, tree, None, generator)
    _check_iid(tree)
    q = torch.cat([torch.zeros_like(draft_probs[:1]), draft_probs]).to(p)
    return _walk_one(p, tree, q, generator)
