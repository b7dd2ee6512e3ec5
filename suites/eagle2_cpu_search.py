"""Search EAGLE-2's (depth, total_tokens) for this CPU on the embedded target, like HASS Table 9.

    python suites/eagle2_cpu_search.py --out results/studies/eagle2_cpu_search.json

HASS (arXiv 2408.15766, Table 9) varies EAGLE-2's draft-tree depth and number of draft tokens
and reports the speedup on MT-bench; the GPU optimum is depth 6-8 and 60-100 tokens.  On a CPU
a target forward grows with the tree (`suites/tree_cost.py`: here 1.5x one token for 4 tokens,
1.8x for 8, 5.7x for 60), so the best CPU tree is much smaller.  This script measures, for every setting of
the grid (depth x total_tokens x top_k x draft_vocab):

* tau (pooled new tokens / steps, bonus included) and its per-prompt median,
* the speedup = (eagle2 tokens/s) / (vanilla tokens/s), vanilla run right before eagle2 on the
  same prompt in this process (so load drift on a shared machine hits both); median over
  prompts and pooled (sum of seconds), plus the same ratio on process CPU time,
* draft ms per step (propose + KV refresh) and verify ms per step (target tree forward + verify),
* greedy equality with vanilla (every setting; a divergence is logged with the target's top-2
  logit gap at that position).

`depth` counts draft levels (the paper's "depth 6" = the official code's `--depth 5`);
`total_tokens` counts tree nodes including the root (the official `--total-token`).
The chosen CPU setting (best median speedup) is recorded under "chosen".  The JSON is
rewritten atomically after every setting; `--resume` skips settings already measured.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import sys
from functools import partial
from pathlib import Path

import torch
from _cpu_search import ints, measure, mt_bench_prompts, study, timed  # suites/ is on sys.path for its scripts

from specbench.artifacts import write_json
from specbench.logs import configure
from specbench.methods.base import DrafterBase
from specbench.methods.head_drafters import (
    DynamicTreeDrafter,
    StaticTreeDrafter,
    default_checkpoint_dir,
    parse_tree,
    resolve_head,
)
from specbench.models.draft_heads import checkpoint_sha256
from specbench.models.target import Target

log = logging.getLogger("specbench.suites.eagle2_cpu_search").info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--checkpoint", default="", help="EAGLE head directory (default: the committed head)")
    ap.add_argument("--prompts", type=int, default=5)
    ap.add_argument("--max-new", type=int, default=96)
    ap.add_argument("--depths", default="3,4,5,6")
    ap.add_argument("--total-tokens", default="8,16,32,60")
    ap.add_argument("--top-ks", default="10")
    ap.add_argument("--draft-vocabs", default="0,8192", help="0 = full vocabulary")
    ap.add_argument("--eagle-trees", default="mc_sim_7b_63,cpu_10", help="EAGLE static trees measured for reference")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", default="results/studies/eagle2_cpu_search.json")
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args(argv)
    configure(timestamps=True)  # progress lines of a long search, on stderr

    torch.set_num_threads(args.threads)
    from specbench.models import load_model

    target = Target.from_loaded(load_model(args.model, dtype="float32", device="cpu"))
    ckpt = args.checkpoint or str(default_checkpoint_dir("eagle2"))
    head = resolve_head("eagle2", target, args.checkpoint)
    grid = list(itertools.product(ints(args.depths), ints(args.total_tokens), ints(args.top_ks),
                                  ints(args.draft_vocabs)))
    out_path = Path(args.out)
    result = study(out_path, args.resume, target, args.max_new, {
        "what": "EAGLE-2 (depth, total_tokens) search on CPU like HASS Table 9: tokens/s ratio vs vanilla, "
                "same process, greedy, MT-bench turn 1",
        "checkpoint": ckpt, "checkpoint_sha256": checkpoint_sha256(ckpt),
        "grid": {"depth": ints(args.depths), "total_tokens": ints(args.total_tokens), "top_k": ints(args.top_ks),
                 "draft_vocab": ints(args.draft_vocabs)},
        "definitions": {"depth": "draft levels (paper's depth; official code --depth + 1)",
                        "total_tokens": "tree nodes incl. the root (official --total-token)",
                        "draft_vocab": "0 = full vocabulary; N = first N token ids + every token of the "
                                       "sequence so far (draft candidates only; lossless either way)",
                        "tau": "pooled new tokens / steps (bonus included)",
                        "speedup_median": "median over prompts of (eagle2 tok/s) / (vanilla tok/s), vanilla run "
                                          "right before eagle2 on the same prompt",
                        "speedup_pooled": "total vanilla time / total eagle2 time (per-token weighted)",
                        "cpu_time_speedup_median": "as speedup_median on process CPU time",
                        "loadavg_1min": "machine load when the setting started (a shared 2-core machine)"},
        "settings": [], "eagle_reference": []})
    if result.get("checkpoint_sha256") != checkpoint_sha256(ckpt):
        raise SystemExit(f"{out_path} was measured with another head; use another --out or drop --resume")
    for key, vals in (("depth", ints(args.depths)), ("total_tokens", ints(args.total_tokens)),
                      ("top_k", ints(args.top_ks)), ("draft_vocab", ints(args.draft_vocabs))):
        result["grid"][key] = sorted(set(result["grid"].get(key, [])) | set(vals))  # resumed runs add settings
    result.setdefault("commands", [])
    result["commands"].append("python suites/eagle2_cpu_search.py " + " ".join(sys.argv[1:] if argv is None else argv))
    prompts = mt_bench_prompts(target, args.prompts)
    if args.resume and (result.get("prompt_ids") not in (None, [q for q, _ in prompts])
                        or result["max_new_tokens"] != args.max_new or result["threads"] != args.threads):
        raise SystemExit("--resume needs the file's --prompts, --max-new and --threads")
    result["prompt_ids"] = [q for q, _ in prompts]
    log(f"target {target.name}, head {ckpt}, threads {torch.get_num_threads()}, prompts {result['prompt_ids']}")
    timed(target, DrafterBase(), prompts[0][1], 8)  # warm-up
    timed(target, DynamicTreeDrafter(head, 4, 10, 16), prompts[0][1], 8)
    done = {(s["depth"], s["total_tokens"], s["top_k"], s["draft_vocab"]) for s in result["settings"]}
    for depth, total, k, dv in grid:
        if (depth, total, k, dv) in done:
            continue
        entry = {"depth": depth, "total_tokens": total, "top_k": k, "draft_vocab": dv,
                 "loadavg_1min": os.getloadavg()[0],
                 **measure(target, partial(DynamicTreeDrafter, head, depth, k, total, draft_vocab=dv), prompts,
                            args.max_new)}
        result["settings"].append(entry)
        log(f"depth={depth} total={total} top_k={k} vocab={dv}: tau={entry['tau']:.2f} "
            f"speedup median={entry['speedup_median']:.3f} pooled={entry['speedup_pooled']:.3f} "
            f"cpu={entry['cpu_time_speedup_median']:.3f} draft {entry['draft_ms_per_step_median']:.1f} ms/step "
            f"verify {entry['verify_ms_per_step_median']:.1f} ms/step greedy_equal={entry['greedy_equal']}")
        write_json(out_path, result)
    done_trees = {(e["tree"], e["draft_vocab"]) for e in result.get("eagle_reference", [])}
    for tree in [t for t in args.eagle_trees.split(",") if t]:
        for dv in ints(args.draft_vocabs):
            if (tree, dv) in done_trees:
                continue
            entry = {"tree": tree, "draft_vocab": dv, "loadavg_1min": os.getloadavg()[0],
                     **measure(target, partial(StaticTreeDrafter, head, parse_tree(tree), draft_vocab=dv), prompts,
                               args.max_new)}
            result.setdefault("eagle_reference", []).append(entry)
            log(f"EAGLE tree={tree} vocab={dv}: tau={entry['tau']:.2f} speedup median={entry['speedup_median']:.3f}")
            write_json(out_path, result)
    if result["settings"]:
        best = max(result["settings"], key=lambda s: s["speedup_median"])
        result["chosen"] = {k: best[k] for k in ("depth", "total_tokens", "top_k", "draft_vocab", "tau",
                                                 "speedup_median", "speedup_pooled")}
        log(f"chosen: {result['chosen']}")
    result["all_greedy_equal"] = all(s["greedy_equal"] for s in result["settings"] + result.get("eagle_reference", []))
    write_json(out_path, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
