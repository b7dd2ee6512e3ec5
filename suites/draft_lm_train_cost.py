"""What two changes of the draft-LM training step save, each measured against its alternative in one process,
interleaved repeats, medians (synthetic rows: the costs depend on shapes, not values):

* the target's side of a step over a draft vocabulary S: p on S from all the target's logits and a full softmax
  (twice: loss and logged TVD), against S's rows of the LM head and the cached logsumexp (`target_lse`);
* AdamW's update over the drafter's trainable parameters: torch's per-op loop against the fused kernel.

    python suites/draft_lm_train_cost.py --threads 2 --out results/studies/draft_lm_train_cost_cpu.json
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from specbench.artifacts import environment, write_json
from specbench.bench.results import STUDY_KIND, STUDY_SCHEMA_VERSION
from specbench.models import load_model


def _median_seconds(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main(argv=None) -> int:
    from specbench.training import losses as L
    from specbench.training.draft_lm import DraftLMOptions, DraftLMTask
    from specbench.training.tasks import frozen_lm_head_fn

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--positions", type=int, default=1900, help="scored positions per step (8 x 330 x 0.72)")
    p.add_argument("--draft-vocab", type=int, default=4096)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    model = load_model("smollm2-135m").model
    head = frozen_lm_head_fn(model.get_output_embeddings())
    g = torch.Generator().manual_seed(0)
    V = model.get_output_embeddings().weight.shape[0]
    S = torch.randperm(V, generator=g)[:a.draft_vocab]
    h = (torch.randn(a.positions, model.config.hidden_size, generator=g) * 2).half().float()
    q = torch.randn(a.positions, a.draft_vocab, generator=g)
    ones = torch.ones(a.positions)
    lse = torch.logsumexp(head(h), -1)

    @torch.no_grad()
    def full():
        t = head(h)
        return L.tvdpp_loss(q, t, ones, support=S), L.tvd(q, t, ones, support=S), t.argmax(-1)

    @torch.no_grad()
    def cached():
        t = head(h, S)
        return (L.tvdpp_loss(q, t, ones, support=S, target_lse=lse), L.tvd(q, t, ones, support=S, target_lse=lse))

    torch.testing.assert_close(full()[0], cached()[0])  # the same loss either way
    task = DraftLMTask(DraftLMOptions(layers=a.layers))
    params = task.trainable(task.make_head(model))
    for prm in params:
        prm.grad = torch.randn(prm.shape, generator=g) * 1e-3
    opts = {name: torch.optim.AdamW(params, lr=1e-4, fused=fused) for name, fused in (("loop", None), ("fused", True))}
    rows = {"target_side_full_softmax": [], "target_side_cached_lse": [], "adamw_loop": [], "adamw_fused": []}
    for _ in range(3):  # interleaved rounds
        rows["target_side_full_softmax"].append(_median_seconds(full, a.reps))
        rows["target_side_cached_lse"].append(_median_seconds(cached, a.reps))
        rows["adamw_loop"].append(_median_seconds(opts["loop"].step, a.reps))
        rows["adamw_fused"].append(_median_seconds(opts["fused"].step, a.reps))
    med = {k: round(statistics.median(v), 4) for k, v in rows.items()}
    ratios = {"target_side": round(med["target_side_full_softmax"] / med["target_side_cached_lse"], 2),
              "adamw": round(med["adamw_loop"] / med["adamw_fused"], 2)}
    print(f"threads {a.threads}: median seconds {med}; full/cached {ratios['target_side']}x, "
          f"loop/fused {ratios['adamw']}x ({sum(prm.numel() for prm in params)} parameters)")
    if a.out:
        write_json(a.out, {"kind": STUDY_KIND, "schema_version": STUDY_SCHEMA_VERSION, "study": "draft_lm_train_cost",
                           "settings": vars(a), "parameters": sum(prm.numel() for prm in params),
                           "median_seconds": med, "rounds": rows, "ratios": ratios,
                           "environment": environment(torch.device("cpu"))}, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
