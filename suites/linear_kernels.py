"""Would another matmul form make the target's small-row forwards cheaper?  (A measurement, not a runtime change.)

    python suites/linear_kernels.py --threads 1 --out results/studies/linear_kernels_cpu.json

`suites/tree_cost.py` shows a target forward over 2-8 tokens costing 1.5-1.8x one over a
single token on this CPU.  This script asks whether that is the BLAS call rather than the
arithmetic: for every weight shape of the target and every row count 1..--max-rows it times
`F.linear(x, W)` (what transformers calls), `x @ W.T` (with a transposed copy of W kept) and
`(W @ x.T).T`, over all of the model's weights of that shape, and picks the fastest per
(shape, rows) (F.linear unless another is >5% faster).  Then it patches the model's Linear
layers with that choice and times whole target forwards over n tokens, interleaved with the
unpatched model, with tree_cost.py's timer.  Nothing in specbench uses the patch: the file records
whether the vanilla baseline and the tree forwards would get faster, and by how much.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import types

import torch
import torch.nn.functional as F
from tree_cost import chain, forward_timer  # the same timed forward (run as `python suites/...`)

from specbench.artifacts import environment, write_json
from specbench.bench.results import STUDY_KIND, STUDY_SCHEMA_VERSION

KERNELS = ("linear", "x_wt", "w_xt")


def _run(kind: str, x2: torch.Tensor, w: torch.Tensor, wt: torch.Tensor | None) -> torch.Tensor:
    if kind == "x_wt":
        return x2 @ wt
    if kind == "w_xt":
        return (w @ x2.T).T
    return F.linear(x2, w)


def _forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    m = x.numel() // x.shape[-1] if x.shape[-1] else 0
    kinds = self._specbench_kinds
    if not 1 <= m <= len(kinds) or kinds[m - 1] == "linear" or torch.is_grad_enabled():
        return F.linear(x, self.weight, self.bias)
    y = _run(kinds[m - 1], x.reshape(m, x.shape[-1]), self.weight, self._specbench_wt)
    if self.bias is not None:
        y = y + self.bias
    return y.reshape(*x.shape[:-1], y.shape[-1])


def _linears(model: torch.nn.Module) -> list[torch.nn.Linear]:
    seen, out = set(), []
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear) and id(mod) not in seen:
            seen.add(id(mod))
            out.append(mod)
    return out


def _shape_key(w: torch.Tensor) -> str:
    return f"{w.shape[0]}x{w.shape[1]}"


@torch.inference_mode()
def _time_shape(weights: list[torch.Tensor], wts: list[torch.Tensor], m: int, kind: str, reps: int) -> float:
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    x = torch.randn(m, weights[0].shape[1], dtype=weights[0].dtype, device=weights[0].device)
    best = float("inf")
    for _ in range(reps):
        t0 = clock()
        for w, wt in zip(weights, wts):
            _run(kind, x, w, wt)
        best = min(best, clock() - t0)
    return best


def _measure(model, max_rows: int, reps: int) -> dict:
    groups: dict[str, list[torch.nn.Linear]] = {}
    for mod in _linears(model):
        groups.setdefault(_shape_key(mod.weight), []).append(mod)
    plan = {}
    for shape, mods in sorted(groups.items()):
        weights = [m.weight.detach() for m in mods]
        wts = [w.T.contiguous() for w in weights]
        rows = []
        for m in range(1, max_rows + 1):
            t = {k: _time_shape(weights, wts, m, k, reps) for k in KERNELS}
            best = min(KERNELS, key=lambda k: (t[k], KERNELS.index(k)))
            # Keep the library default unless another form is clearly (>5%) faster: noise guard.
            if t[best] > 0.95 * t["linear"]:
                best = "linear"
            rows.append({"rows": m, "kernel": best, "ms": {k: round(1000 * v, 3) for k, v in t.items()}})
        plan[shape] = rows
        del wts
    return plan


def apply_plan(model: torch.nn.Module, plan: dict) -> None:
    """Patch every Linear of `model` with the plan's kernel choice per row count (keeps a W.T copy if needed)."""
    for mod in _linears(model):
        rows = plan.get(_shape_key(mod.weight))
        if not rows:
            continue
        kinds = [r["kernel"] for r in sorted(rows, key=lambda r: r["rows"])]
        mod._specbench_kinds = kinds
        mod._specbench_wt = mod.weight.detach().T.contiguous() if "x_wt" in kinds else None
        mod.forward = types.MethodType(_forward, mod)


def remove_plan(model: torch.nn.Module) -> None:
    for mod in _linears(model):
        for a in ("forward", "_specbench_kinds", "_specbench_wt"):
            mod.__dict__.pop(a, None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sizes", default="1,2,4,8,16")
    ap.add_argument("--max-rows", type=int, default=16)
    ap.add_argument("--context", type=int, default=300)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", default="results/studies/linear_kernels_cpu.json")
    args = ap.parse_args(argv)

    target, once = forward_timer(args.model, args.threads, args.context)
    t0 = time.perf_counter()
    plan = _measure(target.model, args.max_rows, reps=5)
    tune_s = time.perf_counter() - t0

    sizes = sorted({int(s) for s in args.sizes.split(",")} | {1})
    times = {(v, n): [] for v in ("F.linear", "tuned") for n in sizes}
    once(chain(4))
    for _ in range(args.reps):  # interleaved: load drift hits both variants alike
        for variant in ("F.linear", "tuned"):
            (apply_plan if variant == "tuned" else lambda m, p: remove_plan(m))(target.model, plan)
            for n in sizes:
                times[(variant, n)].append(once(chain(n)))
    remove_plan(target.model)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = [{"n": n, **{f"{v}_ms": round(1000 * med[(v, n)], 2) for v in ("F.linear", "tuned")},
             **{f"{v}_ratio_to_its_n1": round(med[(v, n)] / med[(v, 1)], 3) for v in ("F.linear", "tuned")},
             "tuned_vs_F.linear": round(med[("tuned", n)] / med[("F.linear", n)], 3)} for n in sizes]
    legend = {"linear": "L", "x_wt": "T", "w_xt": "W"}
    result = {
        "schema_version": STUDY_SCHEMA_VERSION, "kind": STUDY_KIND,
        "what": "target forward over n tokens with F.linear vs the per-(shape, rows) fastest matmul form",
        **environment("cpu"),
        "command": "python suites/linear_kernels.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "target": target.name, "weights_sha256": target.weights_sha256, "dtype": "float32",
        "clock": "thread CPU time" if args.threads == 1 else "wall time", "loadavg_1min": os.getloadavg()[0],
        "context": args.context, "reps": args.reps, "tune_seconds": round(tune_s, 1),
        "plan_legend": "kernel per row count 1..max_rows: L = F.linear, T = x @ W.T (copy), W = (W @ x.T).T",
        "plan": {s: "".join(legend[r["kernel"]] for r in rs) for s, rs in plan.items()},
        "plan_timings": plan, "rows": rows,
    }
    write_json(args.out, result)
    for r in rows:
        print(f"n={r['n']:>3}  F.linear {r['F.linear_ms']:7.1f} ms (x{r['F.linear_ratio_to_its_n1']:.2f})  "
              f"tuned {r['tuned_ms']:7.1f} ms (x{r['tuned_ratio_to_its_n1']:.2f})  "
              f"tuned/F.linear {r['tuned_vs_F.linear']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
