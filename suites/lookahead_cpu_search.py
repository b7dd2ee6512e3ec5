"""Search Lookahead's (level N, window W, guess G) for this CPU on the embedded target, and check
greedy equality with vanilla.

    python suites/lookahead_cpu_search.py --threads 1 --out results/studies/lookahead_cpu_search.json

1. Speed search: on `--prompts` MT-bench prompts (turn 1, chat template, spread over the 8
   categories) x `--max-new` tokens, greedy, stop at EOS: vanilla runs each prompt before and
   after the search (mean of the two), lookahead runs each prompt for every (W, N, G) of the
   grid, all in this process.  Per setting: tau (pooled new tokens / steps, and the per-prompt
   median) and the tokens/s ratio lookahead / vanilla (per-prompt median), in wall-clock time
   and in this process's CPU time.  On a shared machine the CPU-time ratio is the meaningful
   one (other processes' load stretches wall time, not this process's CPU time), so settings
   are ranked by it unless `--metric wall`.  With one thread the CPU time is the compute the
   decode needs; with several, OpenMP threads spin when a sibling is descheduled, so use
   `--threads 1` on a busy machine.
2. Greedy check: `--greedy-prompts` MT-bench prompts x `--greedy-max-new` tokens with
   Spec-Bench's defaults (5, 7, 7) and with the chosen setting: the tokens must equal vanilla
   greedy; a divergence is reported with the target's top-2 logit gap there (a numerical tie
   when tiny).

The JSON is rewritten atomically after every setting, so a stopped run keeps what it measured;
`--resume` skips settings already in the file.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

from specbench.artifacts import environment, write_json
from specbench.bench.datasets import DATA_DIR
from specbench.bench.results import STUDY_KIND, STUDY_SCHEMA_VERSION
from specbench.decoding import SamplingConfig, generate
from specbench.logs import configure
from specbench.methods.base import DrafterBase
from specbench.methods.lookahead import LookaheadDrafter
from specbench.models.target import Target

DEFAULT_QUESTIONS = str(DATA_DIR / "spec_bench" / "question.jsonl")
SPEC_BENCH_DEFAULT = {"level": 5, "window": 7, "guess": 7}


log = logging.getLogger("specbench.suites.lookahead_cpu_search").info


def load_target(spec: str) -> Target:
    from specbench.models import load_model

    return Target.from_loaded(load_model(spec, dtype="float32", device="cpu"))


def mt_bench_prompts(target: Target, path: str, k: int) -> list[tuple[int, list[int]]]:
    """k MT-bench (first 80 lines) turn-1 prompts, spread evenly over the 8 categories."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()[:80]]
    pick = [rows[i * 80 // k] for i in range(k)] if k <= 80 else rows
    out = []
    for q in pick:
        enc = target.tokenizer.apply_chat_template([{"role": "user", "content": q["turns"][0]}],
                                                   add_generation_prompt=True)
        ids = enc["input_ids"] if not isinstance(enc, list) else enc
        out.append((q["question_id"], list(ids)))
    return out


def run(target: Target, drafter, prompt: list[int], max_new: int, cpu: list | None = None):
    """Greedy generation; returns (Generation, wall seconds); appends process CPU seconds to `cpu`."""
    t0, c0 = time.perf_counter(), time.process_time()
    g = generate(target, drafter, prompt, max_new, SamplingConfig(), None, target.eos_token_ids)
    if cpu is not None:
        cpu.append(time.process_time() - c0)
    return g, time.perf_counter() - t0


def top2_gap(target: Target, seq: list[int]) -> float:
    with torch.inference_mode():
        logits = target.model(torch.tensor([seq])).logits[0, -1].float()
    top = logits.topk(2).values
    return float(top[0] - top[1])


def measure_vanilla(target, prompts, max_new, result):
    """One vanilla run per prompt, appended to result["vanilla"][qid]."""
    for qid, prompt in prompts:
        cpu: list[float] = []
        g, wall = run(target, DrafterBase(), prompt, max_new, cpu)
        result["vanilla"].setdefault(str(qid), []).append(
            {"new_tokens": len(g.tokens), "wall_s": wall, "cpu_s": cpu[0], "tokens": g.tokens})


def score(entry: dict, result: dict) -> None:
    """(Re)compute an entry's ratios against the mean of the vanilla runs of each prompt."""
    for r in entry["per_prompt"]:
        runs = result["vanilla"][str(r["question_id"])]
        van_wall = statistics.mean(v["wall_s"] / v["new_tokens"] for v in runs)
        van_cpu = statistics.mean(v["cpu_s"] / v["new_tokens"] for v in runs)
        r["ratio"] = van_wall / (r["lookahead_s"] / r["new_tokens"])
        r["cpu_ratio"] = van_cpu / (r["lookahead_cpu_s"] / r["new_tokens"])
    rows = entry["per_prompt"]
    entry["speedup_median"] = statistics.median(r["ratio"] for r in rows)
    entry["cpu_time_speedup_median"] = statistics.median(r["cpu_ratio"] for r in rows)


def search(target, prompts, grid, max_new, result, out_path, resume, metric):
    done = {(s["window"], s["level"], s["guess"]) for s in result["settings"]} if resume else set()
    measure_vanilla(target, prompts, max_new, result)
    for W, N, G in grid:
        if (W, N, G) in done:
            continue
        rows = []
        for qid, prompt in prompts:
            cpu: list[float] = []
            la, tl = run(target, LookaheadDrafter(N, W, G, eos_ids=target.eos_token_ids), prompt, max_new, cpu)
            equal = la.tokens == result["vanilla"][str(qid)][0]["tokens"]
            if not equal:
                log(f"  !! greedy mismatch on question {qid} at W={W} N={N} G={G}")
            rows.append({"question_id": qid, "new_tokens": len(la.tokens), "steps": len(la.steps),
                         "tau": len(la.tokens) / len(la.steps), "lookahead_s": tl, "lookahead_cpu_s": cpu[0],
                         "draft_ms_per_step": 1000 * la.draft_s / len(la.steps),
                         "verify_ms_per_step": 1000 * la.verify_s / len(la.steps),
                         "greedy_equal": equal})
        entry = {"window": W, "level": N, "guess": G,
                 "tau": sum(r["new_tokens"] for r in rows) / sum(r["steps"] for r in rows),
                 "tau_median": statistics.median(r["tau"] for r in rows),
                 "draft_ms_per_step_median": statistics.median(r["draft_ms_per_step"] for r in rows),
                 "verify_ms_per_step_median": statistics.median(r["verify_ms_per_step"] for r in rows),
                 "greedy_equal": all(r["greedy_equal"] for r in rows),
                 "per_prompt": rows}
        score(entry, result)
        result["settings"].append(entry)
        log(f"W={W} N={N} G={G}: tau={entry['tau']:.3f} speedup (wall) {entry['speedup_median']:.3f} "
            f"(cpu time) {entry['cpu_time_speedup_median']:.3f}; draft {entry['draft_ms_per_step_median']:.2f} "
            f"ms/step, verify {entry['verify_ms_per_step_median']:.0f} ms/step (wall)")
        write_json(out_path, result)
    measure_vanilla(target, prompts, max_new, result)  # again at the end: drift check, averaged in
    for entry in result["settings"]:
        score(entry, result)
    drift = [runs[-1]["cpu_s"] / runs[0]["cpu_s"] for runs in result["vanilla"].values()]
    result["vanilla_cpu_drift_end_over_start"] = drift
    log(f"vanilla cpu-time drift end/start per prompt: {[round(d, 3) for d in drift]}")
    write_json(out_path, result)


def greedy_check(target, prompts, params, max_new):
    rows = []
    for qid, prompt in prompts:
        van, _ = run(target, DrafterBase(), prompt, max_new)
        la, _ = run(target, LookaheadDrafter(params["level"], params["window"], params["guess"],
                                             eos_ids=target.eos_token_ids), prompt, max_new)
        row = {"question_id": qid, "equal": la.tokens == van.tokens, "new_tokens": len(van.tokens),
               "tau": len(la.tokens) / len(la.steps)}
        if not row["equal"]:
            i = next((j for j, (a, b) in enumerate(zip(la.tokens, van.tokens)) if a != b),
                     min(len(la.tokens), len(van.tokens)))
            row.update(first_diff=i, top2_logit_gap=top2_gap(target, prompt + van.tokens[:i]))
        log(f"  greedy {params} q{qid}: equal={row['equal']} tau={row['tau']:.2f}"
            + ("" if row["equal"] else f" diff@{row['first_diff']} gap={row['top2_logit_gap']:.2e}"))
        rows.append(row)
    return {"params": params, "max_new_tokens": max_new, "prompts": len(rows),
            "equal": sum(r["equal"] for r in rows),
            "tau": sum(r["new_tokens"] for r in rows) / sum(r["new_tokens"] / r["tau"] for r in rows),
            "per_prompt": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--questions", default=DEFAULT_QUESTIONS)
    ap.add_argument("--prompts", type=int, default=5)
    ap.add_argument("--max-new", type=int, default=96)
    ap.add_argument("--windows", default="3,5,7")
    ap.add_argument("--levels", default="3,4,5")
    ap.add_argument("--guesses", default="3,5,7")
    ap.add_argument("--greedy-prompts", type=int, default=20)
    ap.add_argument("--greedy-max-new", type=int, default=128)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", default="results/studies/lookahead_cpu_search.json")
    ap.add_argument("--metric", choices=["cpu", "wall"], default="cpu",
                    help="rank settings by the process-CPU-time ratio (robust on a shared machine) or wall time")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--skip-search", action="store_true", help="only the greedy check (chosen setting from --out)")
    args = ap.parse_args(argv)
    configure(timestamps=True)  # progress lines of a long search, on stderr

    torch.set_num_threads(args.threads)
    out_path = Path(args.out)
    target = load_target(args.model)
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    grid = list(itertools.product(ints(args.windows), ints(args.levels), ints(args.guesses)))
    if (args.resume or args.skip_search) and out_path.exists():
        result = json.loads(out_path.read_text())
    else:
        result = {"schema_version": STUDY_SCHEMA_VERSION, "kind": STUDY_KIND,
                  "what": "Lookahead (W, N, G) search on CPU: tokens/s ratio vs vanilla, same process, greedy",
                  "command": ("python suites/lookahead_cpu_search.py "
                              + " ".join(sys.argv[1:] if argv is None else argv)),
                  **environment("cpu"), "device": "cpu", "dtype": "float32",
                  "target": target.name, "weights_sha256": target.weights_sha256,
                  "dataset": "mt_bench (Spec-Bench question.jsonl, turn 1, chat template)",
                  "max_new_tokens": args.max_new, "stop": "eos",
                  "grid": {"window": ints(args.windows), "level": ints(args.levels), "guess": ints(args.guesses)},
                  "metrics": {"tau": "pooled new tokens / steps (bonus included)",
                              "tau_median": "median over prompts of per-prompt tau",
                              "speedup_median": "median over prompts of (lookahead tok/s) / (vanilla tok/s), wall "
                                                "clock; vanilla = mean of a run of the prompt before and after "
                                                "the search, same process, same settings",
                              "cpu_time_speedup_median": "as speedup_median with this process's CPU time instead of "
                                                         "wall time (insensitive to other processes' load)"},
                  "ranked_by": args.metric, "vanilla": {}, "settings": []}
    if args.resume:  # a resumed search may extend the grid
        for k, v in (("window", args.windows), ("level", args.levels), ("guess", args.guesses)):
            result["grid"][k] = sorted(set(result["grid"][k]) | set(ints(v)))
        result.setdefault("commands", [result["command"]]).append(
            "python suites/lookahead_cpu_search.py " + " ".join(sys.argv[1:] if argv is None else argv))
    prompts = mt_bench_prompts(target, args.questions, args.prompts)
    result["prompt_ids"] = [q for q, _ in prompts]
    log(f"target {target.name}, threads {torch.get_num_threads()}, prompts {result['prompt_ids']}")
    run(target, DrafterBase(), prompts[0][1], 16)  # warm-up
    run(target, LookaheadDrafter(5, 7, 7), prompts[0][1], 16)
    if not args.skip_search:
        search(target, prompts, grid, args.max_new, result, out_path, args.resume, args.metric)
    key = "cpu_time_speedup_median" if args.metric == "cpu" else "speedup_median"
    best = max(result["settings"], key=lambda s: s[key])
    result["chosen"] = {"level": best["level"], "window": best["window"], "guess": best["guess"],
                        "ranked_by": key, "tau": best["tau"], "speedup_median": best["speedup_median"],
                        "cpu_time_speedup_median": best["cpu_time_speedup_median"]}
    log(f"chosen: {result['chosen']}")
    write_json(out_path, result)
    if args.greedy_prompts:
        gprompts = mt_bench_prompts(target, args.questions, args.greedy_prompts)
        checks = result.get("greedy_check", []) if args.resume or args.skip_search else []
        chosen = {k: result["chosen"][k] for k in ("level", "window", "guess")}
        for params in [SPEC_BENCH_DEFAULT] + ([chosen] if chosen != SPEC_BENCH_DEFAULT else []):
            if any(c["params"] == params and c["max_new_tokens"] == args.greedy_max_new
                   and c["prompts"] == args.greedy_prompts for c in checks):
                continue  # already checked (--resume)
            checks.append(greedy_check(target, gprompts, params, args.greedy_max_new))
            result["greedy_check"] = checks
            write_json(out_path, result)
            log(f"greedy check {params}: {checks[-1]['equal']}/{checks[-1]['prompts']} equal, "
                f"tau {checks[-1]['tau']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
