"""Cost of one target forward over n tokens relative to one token, on this machine.

    python suites/tree_cost.py --threads 1 --out results/studies/tree_cost_cpu.json

Every tree method pays for verification with a target forward over its draft tree (root +
drafts), so its speedup is bounded by tau / (cost(n) / cost(1)) minus the draft time.  On a
GPU cost(n) stays near cost(1) up to dozens of tokens; on a CPU it does not, and this curve is
what bounds the speedups measured here.  For each n, after a prefill of `--context` tokens,
one `Target.forward_tree` over a chain of n tokens (causal, no mask) and over a star of n
tokens (root + n-1 siblings, a 4D tree mask) is timed `--reps` times in this process,
interleaved with the n = 1 forward; the file records medians and the ratio to n = 1.
With `--threads 1` the clock is this thread's CPU time (robust to other processes' load),
otherwise wall time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

from specbench.artifacts import environment, write_json
from specbench.bench.results import STUDY_KIND, STUDY_SCHEMA_VERSION
from specbench.decoding.tree import Proposal, Tree
from specbench.models import load_model
from specbench.models.target import Target


def chain(n: int) -> Proposal:
    """n tree nodes in a line (root + n-1 drafts): causal attention, no mask."""
    return Proposal(list(range(500, 500 + n - 1)), list(range(n - 1)))


def forward_timer(model: str, threads: int, context: int) -> tuple[Target, Callable[[Proposal], float]]:
    """(target, once): once(proposal) prefills `context` fixed random tokens and times one tree forward.

    The clock is this thread's CPU time with one thread (robust to other processes), else wall time.
    """
    torch.set_num_threads(threads)
    target = Target.from_loaded(load_model(model, dtype="float32", device="cpu"))
    clock = time.thread_time if threads == 1 else time.perf_counter
    prompt = [int(t) for t in torch.randint(100, target.vocab_size - 1, (context + 1,),
                                            generator=torch.Generator().manual_seed(0))]

    def once(prop: Proposal) -> float:
        target.prefill(prompt[:-1])
        tree = Tree(prompt[-1], prop)
        t0 = clock()
        target.forward_tree(tree)
        return clock() - t0

    return target, once


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sizes", default="1,2,3,4,6,8,12,16,24,32,60")
    ap.add_argument("--context", type=int, default=300, help="tokens in the KV cache before the forward")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", default="results/studies/tree_cost_cpu.json")
    args = ap.parse_args(argv)

    target, once = forward_timer(args.model, args.threads, args.context)
    sizes = sorted({int(s) for s in args.sizes.split(",")} | {1})
    shapes = {"chain": chain, "star": lambda n: Proposal(list(range(500, 500 + n - 1)), [0] * (n - 1))}
    for _ in range(3):  # warm-up
        once(chain(4))
    times = {(s, n): [] for s in shapes for n in sizes}
    for _ in range(args.reps):  # interleaved, so drift in machine load hits every size alike
        for n in sizes:
            for s, make in shapes.items():
                times[(s, n)].append(once(make(n)))
    base = statistics.median(times[("chain", 1)] + times[("star", 1)])
    rows = [{"n": n, "shape": s, "ms_median": round(1000 * statistics.median(times[(s, n)]), 2),
             "ratio_to_n1": round(statistics.median(times[(s, n)]) / base, 3)}
            for n in sizes for s in shapes if not (n == 1 and s == "star")]
    result = {
        "schema_version": STUDY_SCHEMA_VERSION, "kind": STUDY_KIND,
        "what": "target forward over n tokens after a KV-cached context, relative to n = 1 (median over reps)",
        **environment("cpu"),
        "command": "python suites/tree_cost.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "target": target.name, "weights_sha256": target.weights_sha256, "dtype": "float32", "device": "cpu",
        "clock": "thread CPU time" if args.threads == 1 else "wall time", "loadavg_1min": os.getloadavg()[0],
        "context": args.context, "reps": args.reps, "rows": rows,
    }
    write_json(args.out, result)
    for r in rows:
        print(f"n={r['n']:>3} {r['shape']:<5} {r['ms_median']:8.1f} ms  x{r['ratio_to_n1']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
