"""Search the embedded drafter's size for this CPU: the target's first K layers under its norm and LM head,
over a reduced draft vocabulary, drafting gamma tokens for `sps` (the TVD++ pipeline's phase 1 stand-in).

    python suites/draft_lm_cpu_search.py --threads 1 --out results/studies/draft_lm_cpu_search.json

A drafted token must cost little next to a target token (the TVD++ issue's goal: <= 1/8), and the LM head
over the full 49k vocabulary alone costs about as much as eight of the target's layers, so both the depth
K and the draft vocabulary N matter. For every setting of the grid (K x N x gamma) this measures, greedy
on MT-bench turn 1 with the untrained prefix draft (`checkpoint=prefix:K`):

* tau, the speedup against vanilla decoded right before it on the same prompt (median and pooled),
* draft ms per step and per drafted token against the vanilla ms per target token (`draft_cost_ratio`),
* greedy equality with vanilla.

The draft vocabulary ranks ids by the committed EAGLE head's `draft_vocab.json` (the training data's
assistant tokens by frequency, for this tokenizer). The JSON is rewritten after every setting; `--resume`
skips settings already measured. The chosen setting (`choose`: the deepest draft, then the largest
vocabulary, within the cost budget) is recorded under "chosen"; training the distilled drafters
starts from it.
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

from specbench.artifacts import sha256_file, write_json
from specbench.decoding import SamplingConfig
from specbench.logs import configure
from specbench.methods.head_drafters import default_checkpoint_dir
from specbench.methods.sps import DraftModelDrafter
from specbench.models.draft_heads import DRAFT_VOCAB_FILE
from specbench.models.draft_lm import layer_prefix_draft
from specbench.models.target import Target

log = logging.getLogger("specbench.suites.draft_lm_cpu_search").info


def choose(settings: list[dict], max_cost: float) -> dict | None:
    """The (layers, draft_vocab) a distilled drafter starts from: within the cost budget, the deepest (the
    capacity training can use), then the largest vocabulary (the fewest tokens q cannot propose)."""
    by_setting: dict[tuple, list[float]] = {}
    for s in settings:
        by_setting.setdefault((s["layers"], s["draft_vocab"]), []).append(s["draft_cost_ratio"])
    fits = [(k, dv, sorted(c)[len(c) // 2]) for (k, dv), c in by_setting.items() if sorted(c)[len(c) // 2] <= max_cost]
    if not fits:
        return None
    k, dv, cost = max(fits, key=lambda t: (t[0], t[1] == 0, t[1]))
    return {"layers": k, "draft_vocab": dv, "draft_cost_ratio": cost}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--layers", default="1,2,4,6")
    ap.add_argument("--draft-vocabs", default="2048,4096,0", help="0 = full vocabulary")
    ap.add_argument("--gammas", default="3,5")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="results/studies/draft_lm_cpu_search.json")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--max-cost", type=float, default=1 / 8, help="a drafted token's cost budget, in target tokens")
    args = ap.parse_args(argv)
    configure(timestamps=True)
    torch.set_num_threads(args.threads)
    from specbench.models import load_model

    target = Target.from_loaded(load_model(args.model, dtype="float32", device="cpu"))
    ranking = default_checkpoint_dir("eagle") / DRAFT_VOCAB_FILE
    grid = list(itertools.product(ints(args.layers), ints(args.draft_vocabs), ints(args.gammas)))
    out_path = Path(args.out)
    result = study(out_path, args.resume, target, args.max_new, {
        "what": "layer-prefix draft LM (untrained) x draft vocabulary x gamma for sps on CPU: tokens/s ratio vs "
                "vanilla, same process, greedy, MT-bench turn 1",
        "ranking": str(ranking), "ranking_sha256": sha256_file(ranking),
        "definitions": {"layers": "the target's first K decoder layers (+ its final norm and LM head)",
                        "draft_vocab": "0 = full vocabulary; N = the ranking's first N ids + the sequence's "
                                       "tokens (q is 0 elsewhere)",
                        "draft_cost_ratio": "median over prompts of (draft ms per drafted token) / (vanilla ms "
                                            "per target token)",
                        "tau": "pooled new tokens / steps (bonus included)",
                        "speedup_median": "median over prompts of (sps tok/s) / (vanilla tok/s), vanilla run "
                                          "right before sps on the same prompt",
                        "loadavg_1min": "machine load when the setting started (a shared 2-core machine)"},
        "settings": [], "commands": []})
    given = sys.argv[1:] if argv is None else argv
    result["commands"].append("python suites/draft_lm_cpu_search.py " + " ".join(given))
    prompts = mt_bench_prompts(target, args.prompts)
    if args.resume and (result.get("prompt_ids") not in (None, [q for q, _ in prompts])
                        or result["max_new_tokens"] != args.max_new or result["threads"] != args.threads):
        raise SystemExit("--resume needs the file's --prompts, --max-new and --threads")
    result["prompt_ids"] = [q for q, _ in prompts]
    drafts: dict[int, Target] = {}
    done = {(s["layers"], s["draft_vocab"], s["gamma"]) for s in result["settings"]}
    for k, dv, gamma in grid:
        if (k, dv, gamma) in done:
            continue
        if k not in drafts:
            drafts.clear()
            drafts[k] = Target(layer_prefix_draft(target.model, k), name=f"prefix:{k}")
        make = partial(DraftModelDrafter, drafts[k], SamplingConfig(), None, gamma, dv, ranking)
        timed(target, make(), prompts[0][1], 8)  # warm-up
        m = measure(target, make, prompts, args.max_new)
        per_token = [r["draft_ms_per_step"] / gamma / r["vanilla_ms_per_token"] for r in m["per_prompt"]]
        entry = {"layers": k, "draft_vocab": dv, "gamma": gamma, "loadavg_1min": os.getloadavg()[0],
                 "draft_cost_ratio": sorted(per_token)[len(per_token) // 2], **m}
        result["settings"].append(entry)
        log(f"layers={k} vocab={dv} gamma={gamma}: tau={entry['tau']:.2f} speedup median={entry['speedup_median']:.3f}"
            f" draft/target token cost {entry['draft_cost_ratio']:.3f} greedy_equal={entry['greedy_equal']}")
        write_json(out_path, result)
    if result["settings"]:
        result["chosen"] = choose(result["settings"], args.max_cost)
        result["chosen_rule"] = (f"the most layers, then the largest draft vocabulary, whose drafted token costs <= "
                                 f"{args.max_cost:g} of a target token (median over the gammas); the untrained "
                                 "prefix's tau (~1) says nothing of a trained draft's, so it does not decide")
        log(f"chosen: {result['chosen']}")
    result["all_greedy_equal"] = all(s["greedy_equal"] for s in result["settings"])
    write_json(out_path, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
