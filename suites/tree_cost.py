"""Cost of one target forward over n tokens relative to one token, on this machine.

    python suites/tree_cost.py --threads 1 --out results/studies/tree_cost_cpu.json

Every tree method pays for verification with a target forward over its draft tree (root +
drafts), so its speedup is bounded by tau / (cost(n) / cost(1)) minus the draft time.  On a
GPU cost(n) stays near cost(1) up to dozens of tokens; on a CPU it does not, and this curve is
what bounds the speedups measured here.  For each n, after a prefill of `--context` tokens,
one `Target.forward_tree` over a chain of n tokens (causal, no mask) and over a star of n
tokens (root + n-1 siblings, a 4D tree mask) is timed `--reps` times in this process on each of
`--runtimes` (hf and fast), interleaved with each other and with the n = 1 forward; the file records
medians, the ratio to n = 1 and each runtime's speed against the first.
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


def forward_timer(model: str, threads: int, context: int, runtime: str = "hf",
                  loaded=None, device: str = "cpu") -> tuple[Target, Callable[[Proposal], float]]:
    """(target, once): once(proposal) prefills `context` fixed random tokens and times one tree forward on
    `runtime` (`loaded`: the model already loaded, shared by several runtimes).

    The clock is this thread's CPU time with one thread on a CPU (robust to other processes), else wall time
    (on a GPU after synchronising it).
    """
    from specbench.decoding.loop import wall_clock

    torch.set_num_threads(threads)
    target = Target.from_loaded(loaded or load_model(model, dtype="float32", device=device), runtime=runtime)
    if target.device.type != "cpu":
        def clock() -> float:
            return wall_clock(target.device)
    else:
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
    ap.add_argument("--runtimes", default=None, help="the target runtimes timed, interleaved (the first is the "
                    "reference of `vs_first`; default hf,fast on a CPU, hf elsewhere)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda[:N]")
    ap.add_argument("--out", default="results/studies/tree_cost_cpu.json")
    args = ap.parse_args(argv)

    runtimes = [r for r in (args.runtimes or ("hf,fast" if args.device == "cpu" else "hf")).split(",") if r]
    loaded = load_model(args.model, dtype="float32", device=args.device)
    timers = {rt: forward_timer(args.model, args.threads, args.context, rt, loaded, args.device) for rt in runtimes}
    target = timers[runtimes[0]][0]
    sizes = sorted({int(s) for s in args.sizes.split(",")} | {1})
    shapes = {"chain": chain, "star": lambda n: Proposal(list(range(500, 500 + n - 1)), [0] * (n - 1))}
    for _, once in timers.values():  # warm-up
        for _ in range(3):
            once(chain(4))
    times = {(rt, s, n): [] for rt in runtimes for s in shapes for n in sizes}
    for _ in range(args.reps):  # interleaved, so drift in machine load hits every size and runtime alike
        for n in sizes:
            for s, make in shapes.items():
                for rt, (_, once) in timers.items():
                    times[(rt, s, n)].append(once(make(n)))
    med = {k: statistics.median(v) for k, v in times.items()}
    base = {rt: statistics.median(times[(rt, "chain", 1)] + times[(rt, "star", 1)]) for rt in runtimes}
    rows = [{"runtime": rt, "n": n, "shape": s, "ms_median": round(1000 * med[(rt, s, n)], 2),
             "ratio_to_n1": round(med[(rt, s, n)] / base[rt], 3),
             "vs_first": round(med[(runtimes[0], s, n)] / med[(rt, s, n)], 3)}
            for rt in runtimes for n in sizes for s in shapes if not (n == 1 and s == "star")]
    result = {
        "schema_version": STUDY_SCHEMA_VERSION, "kind": STUDY_KIND,
        "what": "target forward over n tokens after a KV-cached context, relative to n = 1 (median over reps)",
        **environment(target.device),
        "command": "python suites/tree_cost.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "target": target.name, "weights_sha256": target.weights_sha256, "dtype": "float32",
        "device": str(target.device),
        "clock": "thread CPU time" if args.threads == 1 and target.device.type == "cpu" else "wall time",
        "loadavg_1min": os.getloadavg()[0],
        "context": args.context, "reps": args.reps, "runtimes": runtimes,
        "definitions": {"ratio_to_n1": "median ms at n / median ms at n = 1, same runtime",
                        "vs_first": f"median ms of runtime {runtimes[0]} / this runtime's, same n and shape "
                                    "(> 1: this runtime is faster)"},
        "rows": rows,
    }
    write_json(args.out, result)
    for r in rows:
        print(f"{r['runtime']:<5} n={r['n']:>3} {r['shape']:<5} {r['ms_median']:8.1f} ms  x{r['ratio_to_n1']:.2f}"
              f"  {r['vs_first']:.2f}x vs {runtimes[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
