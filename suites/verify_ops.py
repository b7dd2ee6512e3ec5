"""How many tensor ops one verification costs the decode loop at T > 0 (a count, not a timing).

    python suites/verify_ops.py --out results/studies/verify_ops.json

EAGLE-2's paper-setting tree (60 nodes, depth 6, up to 10 children a node) over the embedded
target's vocabulary (49152), target rows p from random logits of std `--peak` (peaked), drafted
tokens the argmax of their parent's row with probability `--accept` (so walks go several levels
deep, as with a trained head). For each of `--trials` seeds, torch's profiler counts the aten ops
of one verification by the batched walk at B = 1 (`_walk`, which the statistical tests drive) and
by the loop's one-draw walk (`_walk_one`), for deterministic candidates (EAGLE/EAGLE-2/PLD/
Lookahead: q = None) and sampled ones (q given). The file records the median and maximum counts
and the accepted path lengths; both walks return the same verdict.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from specbench.artifacts import environment, write_json
from specbench.bench.results import STUDY_KIND, STUDY_SCHEMA_VERSION
from specbench.decoding.tree import Proposal, Tree
from specbench.decoding.verify import _walk, _walk_one


def eagle2_tree(g: torch.Generator, p: torch.Tensor, nodes: int, depth: int, width: int, accept: float) -> Tree:
    """A random tree of `nodes` nodes, depth <= `depth`, <= `width` children a node; a child's token is its
    parent's argmax with probability `accept` (first child only), else a random other token."""
    V = p.shape[-1]
    parents: list[int] = []
    tokens: list[int] = []
    d = [0]
    kids = [0]
    frontier = [0]
    while len(parents) < nodes - 1:
        par = frontier[int(torch.randint(len(frontier), (1,), generator=g))]
        if kids[par] >= width or d[par] >= depth:
            frontier.remove(par)
            continue
        first = kids[par] == 0
        tok = int(p[par].argmax()) if first and float(torch.rand(1, generator=g)) < accept else \
            int(torch.randint(V, (1,), generator=g))
        kids[par] += 1
        parents.append(par)
        tokens.append(tok)
        d.append(d[par] + 1)
        kids.append(0)
        frontier.append(len(parents))
    return Tree(int(torch.randint(V, (1,), generator=g)), Proposal(tokens, parents, sibling_draws="iid"))


def count_ops(fn, *args):
    """(top-level aten ops of fn(*args), its result)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = fn(*args)
    return sum(1 for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None), out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--nodes", type=int, default=60)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--width", type=int, default=10)
    ap.add_argument("--accept", type=float, default=0.7)
    ap.add_argument("--peak", type=float, default=8.0, help="std of the random target logits (peakedness of p)")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--out", default="results/studies/verify_ops.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = {k: {"batched_B1": [], "one_draw": []} for k in ("deterministic", "sampled")}
    accepted = {k: [] for k in rows}
    for seed in range(args.trials):
        g = torch.Generator().manual_seed(seed)
        logits = args.peak * torch.randn(args.nodes, args.vocab, generator=g)
        p = logits.softmax(-1)
        tree = eagle2_tree(g, p, args.nodes, args.depth, args.width, args.accept)
        q = (logits + torch.randn(logits.shape, generator=g)).softmax(-1)
        for kind, qq in (("deterministic", None), ("sampled", q)):
            ga, gb = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
            n_batched, _ = count_ops(_walk, p[None], tree, None if qq is None else qq[None], ga)
            n_one, verdict = count_ops(_walk_one, p, tree, qq, gb)
            rows[kind]["batched_B1"].append(n_batched)
            rows[kind]["one_draw"].append(n_one)
            accepted[kind].append(len(verdict.path))
    summary = {kind: {walk: {"median": statistics.median(v), "max": max(v)} for walk, v in r.items()}
               | {"accepted_median": statistics.median(accepted[kind]), "accepted_max": max(accepted[kind])}
               for kind, r in rows.items()}
    result = {
        "schema_version": STUDY_SCHEMA_VERSION, "kind": STUDY_KIND,
        "what": "aten ops (top-level, torch profiler) of one T>0 tree verification, batched walk at B=1 vs the "
                "decode loop's one-draw walk, EAGLE-2's paper-setting tree",
        **environment("cpu"),
        "command": "python suites/verify_ops.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "tree": {"nodes": args.nodes, "depth": args.depth, "width": args.width, "first_child_is_argmax": args.accept},
        "vocab": args.vocab, "logit_std": args.peak, "trials": args.trials, "summary": summary, "per_trial": rows,
        "accepted": accepted,
    }
    write_json(args.out, result)
    for kind, s in summary.items():
        print(f"{kind:<13} batched(B=1) median {s['batched_B1']['median']:>6} ops, one-draw median "
              f"{s['one_draw']['median']:>4} (max {s['one_draw']['max']}); accepted median {s['accepted_median']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
