"""Which matrix-product kernel would serve the fast runtime best at each row count?  (A measurement.)

    python suites/fast_kernels.py --threads 1 --out results/studies/fast_kernels_cpu.json

The fast runtime (`specbench/models/fast_runtime.py`) runs each row count with the kernel of its plan
(`kernel_plan`: calibrated per process, or as SPECBENCH_FAST_KERNELS says). This script times, for every
row count of --rows, four kernels over copies of the target's weights: ``gemv`` (x @ Wt), ``packed``
(oneDNN `_linear_pointwise`), ``linear`` (`F.linear`) and ``wx`` ((W @ x.T).T), and ``plan``: the
runtime's own FastLinear, with its kernel and any zero-row padding. The weights are visited in the order
a forward visits them (per layer q/k/v, o, gate/up, down, then the LM head), so each one comes from memory
as in a real forward rather than from a cache warmed by the same matrix; each call is timed on its own and
summed per weight shape. It records, per row count, the matrix-product part of a forward under the plan,
under each kernel alone and under the best kernel per shape: how much a per-row-count choice gains, and
how far the products alone are from one row's cost (what bounds T(n)/T(1)).
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from specbench.artifacts import environment, write_json
from specbench.bench.results import STUDY_KIND, STUDY_SCHEMA_VERSION
from specbench.models import load_model
from specbench.models.fast_runtime import KERNELS_ENV, FastDecoder


def kernels() -> dict:
    """name -> f(FastLinear, copies, x): the candidates over this script's copies of a weight ((out, in), its
    transpose, its prepacked form), and ``plan``: the FastLinear itself, as the runtime runs it."""
    return {
        "gemv": lambda lin, w, x: x @ w["wt"],
        "packed": lambda lin, w, x: torch.ops.mkldnn._linear_pointwise(x, w["packed"], None, "none", [], ""),
        "linear": lambda lin, w, x: F.linear(x, w["w"]),
        "wx": lambda lin, w, x: (w["w"] @ x.T).T.contiguous(),
        "plan": lambda lin, w, x: lin(x),
    }


def forward_order_weights(model) -> list[torch.Tensor]:
    """The (out, in) weights of FastDecoder's products in the order a forward runs them, fused as it fuses."""
    out = []
    for layer in model.get_decoder().layers:
        a, m = layer.self_attn, layer.mlp
        out += [torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]), a.o_proj.weight,
                torch.cat([m.gate_proj.weight, m.up_proj.weight]), m.down_proj.weight]
    return [w.detach().contiguous() for w in out + [model.get_output_embeddings().weight]]


@torch.inference_mode()
def measure(model, dec: FastDecoder, rows_list: list[int], reps: int) -> dict:
    seq = [lin for lay in dec.layers for lin in (lay.qkv, lay.o, lay.gate_up, lay.down)] + [dec.lm_head]
    copies = {id(lin): {"w": w, "wt": w.t().contiguous(), "packed": torch.ops.mkldnn._reorder_linear_weight(w, 8)}
              for lin, w in zip(seq, forward_order_weights(model), strict=True)}
    ks = kernels()
    shape = {id(lin): "x".join(map(str, copies[id(lin)]["w"].shape[::-1])) for lin in seq}
    out = {}
    for rows in rows_list:
        xs = {n: torch.randn(rows, n) for n in {copies[id(lin)]["w"].shape[1] for lin in seq}}
        per = {}
        for name, f in ks.items():
            samples = collections.defaultdict(list)
            for rep in range(reps + 1):  # the first pass warms up
                acc = collections.defaultdict(float)
                for lin in seq:
                    w = copies[id(lin)]
                    x = xs[w["w"].shape[1]]
                    t0 = time.perf_counter()
                    f(lin, w, x)
                    acc[shape[id(lin)]] += time.perf_counter() - t0
                if rep:
                    for s, v in acc.items():
                        samples[s].append(v)
            per[name] = {s: round(1000 * statistics.median(v), 3) for s, v in samples.items()}
        shapes = sorted(per["gemv"])
        fixed = [k for k in ks if k != "plan"]
        best = {s: min(fixed, key=lambda k, s=s: per[k][s]) for s in shapes}
        out[rows] = {
            "ms_per_shape": per,
            "best_per_shape": best,
            "total_ms": {k: round(sum(per[k].values()), 2) for k in ks},
            "total_best_ms": round(sum(per[best[s]][s] for s in shapes), 2),
            "total_current_ms": round(sum(per["plan"].values()), 2),
        }
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rows", default="1,2,3,4,6,8,9,12,16,32,60")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="results/studies/fast_kernels_cpu.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model, dtype="float32", device="cpu")
    dec = FastDecoder(loaded.model)
    load0 = os.getloadavg()[0]
    rows_list = [int(r) for r in args.rows.split(",") if r]
    res = measure(loaded.model, dec, rows_list, args.reps)
    one = res[rows_list[0]]["total_current_ms"] if rows_list[0] == 1 else None
    result = {
        "schema_version": STUDY_SCHEMA_VERSION, "kind": STUDY_KIND,
        "what": "matrix products of one fast-runtime forward per kernel and row count, weights visited in "
                "forward order",
        **environment("cpu"),
        "command": "python suites/fast_kernels.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "target": loaded.name, "weights_sha256": loaded.weights_sha256, "dtype": "float32",
        "clock": "wall time per call (perf_counter), median over reps", "reps": args.reps,
        "loadavg_1min": {"start": load0, "end": os.getloadavg()[0]},
        "kernel_plan_source": os.environ.get(KERNELS_ENV, "auto"),  # the plan: environment's fast_kernel_plan
        "rows": {str(r): v for r, v in res.items()},
    }
    write_json(args.out, result)
    for r, v in res.items():
        ratio = f" (x{v['total_current_ms'] / one:.2f} of 1 row)" if one else ""
        print(f"rows {r:>3}: plan {v['total_current_ms']:7.1f} ms{ratio}  best per shape "
              f"{v['total_best_ms']:7.1f}  " + "  ".join(f"{k} {t:.1f}" for k, t in v["total_ms"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
