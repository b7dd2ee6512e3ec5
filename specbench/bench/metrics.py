"""The one definition of each metric (see DEFINITIONS, also written into every results file)."""

from __future__ import annotations

import statistics

DEFINITIONS = {
    "step": "one target forward after prefill; it emits the accepted draft tokens + 1 (bonus or correction)",
    "tau": "new tokens / steps pooled over all steps of the run (micro average, bonus included, "
           "tokens past EOS not counted)",
    "tau_macro": "mean over samples of (sample new tokens / sample steps), as HASS reports",
    "mean_accepted": "tau - 1: accepted draft tokens per step (gpt-fast's 'mean accepted')",
    "alpha_k": "acceptance rate at draft depth k: steps in which depth k was accepted / steps in which it was tried",
    "tokens_per_s": "new tokens / wall time (prefill + decode), pooled over samples; wall time per sample is the "
                    "median over repeats",
    "speedup": "method tokens_per_s / vanilla tokens_per_s, both measured in the same process on the same prompts "
               "and settings; vanilla = this project's KV-cached loop",
    "speedup_vs_hf_generate": "tokens_per_s / tokens_per_s of transformers' generate() on the same prompts "
                              "(a separately named denominator, never mixed with speedup)",
    "draft_fraction": "draft time / (draft + verify time): share of a step spent in the drafter",
}


def record(gen, wall_times: list[float]) -> dict:
    """A sample's stored counts from a `Generation` (wall = median over repeats)."""
    return {
        "new_tokens": len(gen.tokens), "steps": list(gen.steps), "reached": list(gen.reached),
        "accepted": list(gen.accepted), "drafted": gen.drafted, "stop": gen.stop, "tokens": list(gen.tokens),
        "wall_s": statistics.median(wall_times), "wall_s_repeats": wall_times,
        "prefill_s": gen.prefill_s, "draft_s": gen.draft_s, "verify_s": gen.verify_s,
    }


def summarize(records: list[dict]) -> dict:
    """Pooled metrics of one method over sample records."""
    tokens = sum(r["new_tokens"] for r in records)
    steps = sum(len(r["steps"]) for r in records)
    depth = max((len(r["reached"]) for r in records), default=0)
    reached = [sum(r["reached"][k] for r in records if k < len(r["reached"])) for k in range(depth)]
    accepted = [sum(r["accepted"][k] for r in records if k < len(r["accepted"])) for k in range(depth)]
    wall = sum(r["wall_s"] for r in records)
    draft = sum(r["draft_s"] for r in records)
    verify = sum(r["verify_s"] for r in records)
    per_sample = [r["new_tokens"] / len(r["steps"]) for r in records if r["steps"]]
    tau = tokens / steps if steps else 0.0
    return {
        "samples": len(records), "new_tokens": tokens, "steps": steps,
        "tau": tau, "tau_macro": statistics.fmean(per_sample) if per_sample else 0.0,
        "mean_accepted": tau - 1 if steps else 0.0,
        "alpha_k": [a / r if r else None for a, r in zip(accepted, reached)], "reached_k": reached,
        "tokens_per_s": tokens / wall if wall else 0.0, "wall_s": wall, "draft_s": draft, "verify_s": verify,
        "draft_fraction": draft / (draft + verify) if draft + verify else 0.0,
        "drafted_per_step": sum(r["drafted"] for r in records) / steps if steps else 0.0,
    }


def speedups(method: dict, vanilla: dict, records: list[tuple[dict, dict]]) -> dict:
    """Pooled speedup, and the median over samples of the per-sample tokens/s ratio."""
    ratios = [(m["new_tokens"] / m["wall_s"]) / (v["new_tokens"] / v["wall_s"])
              for m, v in records if m["wall_s"] and v["wall_s"] and v["new_tokens"]]
    return {
        "speedup": method["tokens_per_s"] / vanilla["tokens_per_s"] if vanilla["tokens_per_s"] else None,
        "speedup_median_per_sample": statistics.median(ratios) if ratios else None,
    }
