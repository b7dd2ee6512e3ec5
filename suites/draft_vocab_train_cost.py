"""What a reduced draft vocabulary saves in training: one step (loss + backward) of a head task on the same batch,
full vocabulary against `--draft-vocab N`, interleaved repeats in one process, medians.

    python suites/draft_vocab_train_cost.py --threads 1 --out results/studies/draft_vocab_train_cost_cpu.json

The batch is the first `--batch` ShareGPT training conversations of at least 300 tokens (cut at 384), with the
embedded target's features; the CE runs on `--ce-fraction` of the masked positions, as the committed heads did.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from specbench.artifacts import environment, write_json
from specbench.bench.results import STUDY_KIND, STUDY_SCHEMA_VERSION
from specbench.models import load_model


def main(argv=None) -> int:
    from specbench.training.eagle import EagleOptions, EagleTask
    from specbench.training.features import target_hidden_states
    from specbench.training.hass import HassOptions, HassTask
    from specbench.training.sharegpt import format_conversation, select_training_conversations

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--vocabs", default="0,4096,8192", help="draft vocabulary sizes (0 = full)")
    ap.add_argument("--methods", default="eagle,hass")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--ce-fraction", type=float, default=0.5)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="results/studies/draft_vocab_train_cost_cpu.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model, dtype="float32", device="cpu")
    model = loaded.model.eval()
    model.requires_grad_(False)
    rows = []
    for _, conv in select_training_conversations("sharegpt", max_conversations=200, progress=False).chosen:
        f = format_conversation(loaded.tokenizer, conv, 384)
        if len(f.input_ids) >= 300 and sum(f.loss_mask) > 100:
            ids = torch.tensor([f.input_ids])
            rows.append({"input_ids": ids[0], "loss_mask": torch.tensor(f.loss_mask, dtype=torch.float32),
                         "hidden": target_hidden_states(model, ids)[0].float()})
        if len(rows) == args.batch:
            break
    kinds = {"eagle": (EagleTask, EagleOptions), "hass": (HassTask, HassOptions)}
    vocabs = [int(v) for v in args.vocabs.split(",")]
    tasks = {(m, n): kinds[m][0](kinds[m][1](ce_fraction=args.ce_fraction, draft_vocab=n), seed=0)
             for m in args.methods.split(",") for n in vocabs}
    heads = {k: t.make_head(model, rows, seed=0) for k, t in tasks.items()}
    batch = next(iter(tasks.values())).collate(rows)
    times: dict = {}
    load0 = os.getloadavg()[0]
    for rep in range(args.reps):
        for k, task in tasks.items():
            t0 = time.perf_counter()
            task.loss(heads[k], task.augment(batch, torch.Generator().manual_seed(rep)))["loss"].backward()
            times.setdefault(k, []).append(time.perf_counter() - t0)
            heads[k].zero_grad()
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "schema_version": STUDY_SCHEMA_VERSION, "kind": STUDY_KIND,
        "what": "one training step (loss + backward) of a head task on one batch, full vocabulary vs a reduced "
                "draft vocabulary (--draft-vocab N), interleaved repeats, median wall time",
        **environment("cpu"),
        "command": "python suites/draft_vocab_train_cost.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "target": loaded.name, "weights_sha256": loaded.weights_sha256, "batch_sequences": len(rows),
        "batch_tokens": int(batch["attention_mask"].sum()), "ce_fraction": args.ce_fraction, "reps": args.reps,
        "loadavg_1min": {"start": load0, "end": os.getloadavg()[0]},
        "steps": {m: {str(n): {"median_ms": round(1000 * med[(m, n)], 1),
                               "speed_vs_full": round(med[(m, vocabs[0])] / med[(m, n)], 2)} for n in vocabs}
                  for m in args.methods.split(",")},
    }
    write_json(args.out, result)
    for m, per in result["steps"].items():
        for n, v in per.items():
            print(f"{m} draft_vocab {n}: {v['median_ms']:.0f} ms/step, {v['speed_vs_full']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
