"""What the CPU searches share: MT-bench turn-1 prompts, timed greedy decodes, and each setting's figures
(tau, speedup against vanilla decoded right before it on the same prompt, draft and verify time per step,
greedy equality with the top-2 logit gap at a divergence)."""

from __future__ import annotations

import json
import logging
import statistics
import time

import torch

from specbench.artifacts import environment
from specbench.bench.datasets import DATA_DIR
from specbench.bench.results import STUDY_KIND, STUDY_SCHEMA_VERSION
from specbench.decoding import SamplingConfig, generate
from specbench.methods.base import DrafterBase
from specbench.models.target import Target

__all__ = ["ints", "measure", "mt_bench_prompts", "study", "timed"]

QUESTIONS = DATA_DIR / "spec_bench" / "question.jsonl"
log = logging.getLogger("specbench.suites.cpu_search").info


def ints(text: str) -> list[int]:
    """A comma-separated grid axis ("2,3,4")."""
    return [int(x) for x in text.split(",") if x]


def study(out_path, resume: bool, target: Target, max_new: int, fields: dict) -> dict:
    """The study record a search extends: the file at `out_path` when resuming, else a new one with the
    environment, the target and the prompt set every search records, then `fields` ("what" first)."""
    if resume and out_path.exists():
        return json.loads(out_path.read_text())
    return {"schema_version": STUDY_SCHEMA_VERSION, "kind": STUDY_KIND, "what": fields.pop("what"),
            **environment("cpu"), "device": "cpu", "dtype": "float32",
            "target": target.name, "weights_sha256": target.weights_sha256,
            "dataset": "mt_bench (Spec-Bench question.jsonl, turn 1, chat template)",
            "max_new_tokens": max_new, "stop": "eos", **fields}


def mt_bench_prompts(target: Target, k: int) -> list[tuple[str, list[int]]]:
    """k MT-bench turn-1 prompts spread evenly over the 8 categories, chat template applied."""
    try:
        from specbench.bench.datasets import load_prompts

        rows = [(p.id, p.turns[0]) for p in load_prompts("mt_bench")]
    except Exception:  # noqa: BLE001 - fall back to the shared copy of the same file
        rows = [(f"mt_bench/{r['question_id']}", r["turns"][0])
                for r in map(json.loads, QUESTIONS.read_text().splitlines()[:80])]
    pick = [rows[i * len(rows) // k] for i in range(k)] if k < len(rows) else rows
    tok = target.tokenizer
    out = []
    for qid, text in pick:
        s = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        out.append((qid, tok(s, add_special_tokens=False)["input_ids"]))
    return out


def timed(target, drafter, prompt, max_new):
    t0, c0 = time.perf_counter(), time.process_time()
    g = generate(target, drafter, prompt, max_new, SamplingConfig(), None, target.eos_token_ids)
    return g, time.perf_counter() - t0, time.process_time() - c0


def top2_gap(target: Target, seq: list[int]) -> float:
    with torch.inference_mode():
        top = target.model(torch.tensor([seq])).logits[0, -1].float().topk(2).values
    return float(top[0] - top[1])


def measure(target, make_drafter, prompts, max_new) -> dict:
    rows = []
    for qid, prompt in prompts:
        van, tv, cv = timed(target, DrafterBase(), prompt, max_new)
        g, tm, cm = timed(target, make_drafter(), prompt, max_new)
        row = {"prompt": qid, "new_tokens": len(g.tokens), "steps": len(g.steps), "tau": len(g.tokens) / len(g.steps),
               "vanilla_s": tv, "method_s": tm, "speedup": (len(g.tokens) / tm) / (len(van.tokens) / tv),
               "cpu_speedup": (len(g.tokens) / cm) / (len(van.tokens) / cv),
               "draft_ms_per_step": 1000 * g.draft_s / len(g.steps),
               "verify_ms_per_step": 1000 * g.verify_s / len(g.steps),
               "vanilla_ms_per_token": 1000 * tv / max(len(van.tokens), 1),
               "alpha": [a / r for a, r in zip(g.accepted, g.reached) if r],
               "greedy_equal": g.tokens == van.tokens}
        if not row["greedy_equal"]:
            i = next((j for j, (a, b) in enumerate(zip(g.tokens, van.tokens)) if a != b),
                     min(len(g.tokens), len(van.tokens)))
            row.update(first_diff=i, top2_logit_gap=top2_gap(target, prompt + van.tokens[:i]))
            log(f"  !! greedy mismatch on {qid} at token {i}, top-2 logit gap {row['top2_logit_gap']:.2e}")
        rows.append(row)
    return {
        "tau": sum(r["new_tokens"] for r in rows) / sum(r["steps"] for r in rows),
        "tau_median": statistics.median(r["tau"] for r in rows),
        "speedup_median": statistics.median(r["speedup"] for r in rows),
        "speedup_pooled": sum(r["vanilla_s"] * r["new_tokens"] for r in rows) / sum(r["method_s"] * r["new_tokens"]
                                                                                  for r in rows),
        "cpu_time_speedup_median": statistics.median(r["cpu_speedup"] for r in rows),
        "draft_ms_per_step_median": statistics.median(r["draft_ms_per_step"] for r in rows),
        "verify_ms_per_step_median": statistics.median(r["verify_ms_per_step"] for r in rows),
        "vanilla_ms_per_token_median": statistics.median(r["vanilla_ms_per_token"] for r in rows),
        "greedy_equal": all(r["greedy_equal"] for r in rows),
        "per_prompt": rows,
    }
