"""The papers' ordering claims (e.g. tau(HASS) > tau(EAGLE-2)) checked on the runs of one compare.

A claim says metric(better) > min_ratio x metric(worse) + min_delta (`min_ratio` 1 and `min_delta` 0
unless the claim gives them: HASS's "8% longer acceptance" is min_ratio 1.08, FSPAD's "+0.28 tokens per
step" min_delta 0.28).

The rule. A claim "metric(better) > metric(worse)" is checked on a pair of runs only when the
pair makes it meaningful:

1. the same measurement: target, dataset and temperature (the table row), and the same
   prompts, token budget and top-k / top-p;
2. comparable drafting: both runs at their methods' defaults (the papers' settings; the draft
   checkpoint aside), or equal draft budgets (`Method.draft_budget`): the same number of tree
   nodes verified per step (EAGLE: the static tree's nodes; EAGLE-2: total_tokens; PLD:
   num_pred_tokens + 1; Lookahead: guess x (level - 1) + 1) and, for methods that can restrict
   it, the same draft vocabulary size (0, the full vocabulary, included);
3. like-trained drafts: where both runs record how their draft checkpoints were made (`config.draft`,
   from the checkpoints' manifests), the same training data and epochs.

Any other pair is reported as "not checked" with the reason, never as holding or violated:
an EAGLE-2 run of 8 tree nodes says nothing about the paper's 60-node EAGLE-2 against EAGLE's
26-node tree.

The verdict. A checked tau claim carries a 95% interval of the difference tau(better) - tau(worse)
from a paired bootstrap over the prompts both runs measured (a prompt's turns resampled together;
tau of a resample is its new tokens over its steps, as the runs' own tau): it "holds" when the
interval lies above 0, is "VIOLATED" when below, and is "within noise" when it contains 0, i.e. when
other prompts of the same set could reverse the order. The interval is that of the prompt sample
only. Other metrics, and runs that do not record their samples, are judged on the point values.

Seeds. Claims name a method's arms (`Run.arm`: `fspad`, `fspad[wofs]`, ...); runs of one arm whose
draft checkpoints were trained with other seeds are its seed replicas. `seed_spread` joins the pairs of
one claim and row that differ only in those seeds: each arm's value per seed, and one verdict that
holds (or is violated) only when it does on every pair of seeds, else "within noise". Arms that draft
with the same checkpoints (EAGLE-2 against EAGLE on one head) are paired head by head, and two runs of one
arm and seed in a group give no verdict.
"""

from __future__ import annotations

import random

from ...errors import UsageError
from .runs import Run

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0  # fixed: the same runs always give the same interval


def _methods() -> dict:
    # the method plugins import torch: only when some claim has a pair of runs to judge
    from ...methods import available_methods

    return available_methods()


def _budget(method, params: dict) -> dict | None:
    if method.draft_budget is None:
        return None
    try:
        return method.draft_budget(method.params(params))
    except (UsageError, KeyError, TypeError, ValueError):  # recorded params this version cannot read
        return None


def _budget_text(b: dict) -> str:
    return f"{b['tree_nodes']} tree nodes" + (f" (draft_vocab {b['draft_vocab']})" if "draft_vocab" in b else "")


def why_not_comparable(a: Run, b: Run, methods: dict, metric: str = "tau") -> str | None:
    """Why the claim on `metric` cannot be judged on runs `a` (the claimed better) and `b` (None: it can)."""
    why = []
    if (a.prompt_ids or None) != (b.prompt_ids or None) or not a.prompt_ids:
        why.append(f"other prompts ({len(a.prompt_ids or [])} vs {len(b.prompt_ids or [])})"
                   if a.prompt_ids and b.prompt_ids else "prompt set unknown")
    if metric != "tau" and a.runtime != b.runtime:  # tau does not depend on the runtime; speeds do
        why.append(f"other runtimes ({a.runtime} vs {b.runtime})")
    if a.max_new_tokens != b.max_new_tokens:
        why.append(f"other token budgets ({a.max_new_tokens} vs {b.max_new_tokens} new tokens)")
    if (a.top_k, a.top_p) != (b.top_k, b.top_p):
        why.append(f"other sampling (top_k/top_p {a.top_k}/{a.top_p:g} vs {b.top_k}/{b.top_p:g})")
    ma, mb = methods.get(a.method), methods.get(b.method)
    missing = [r.method for r, m in ((a, ma), (b, mb)) if m is None]
    if missing:
        why.append(f"{' and '.join(missing)} not implemented here (draft budget unknown)")
    elif not (ma.at_defaults(a.params) and mb.at_defaults(b.params)):
        ba, bb = _budget(ma, a.params), _budget(mb, b.params)
        if ba is None or bb is None:
            why.append("draft budget unknown, and not both at the papers' settings")
        elif any(ba[k] != bb[k] for k in ba.keys() & bb.keys()):
            why.append(f"{a.label} verifies {_budget_text(ba)}, {b.label} {_budget_text(bb)}: judged only at equal "
                       f"budgets or with both at the papers' settings")
    da, db = a.draft or {}, b.draft or {}
    if da.get("data") and db.get("data"):  # both record their training: like with like
        if da["data"] != db["data"]:
            why.append(f"drafts trained on other data ({da['data']} vs {db['data']})")
        if (da.get("epochs"), da.get("max_steps")) != (db.get("epochs"), db.get("max_steps")):
            why.append(f"drafts trained for other budgets ({da.get('epochs')} vs {db.get('epochs')} epochs, "
                       f"max_steps {da.get('max_steps')} vs {db.get('max_steps')})")
    return "; ".join(why) or None


def claim_threshold(claim: dict, worse: float) -> float:
    """What metric(better) must exceed: min_ratio x metric(worse) + min_delta."""
    return float(claim.get("min_ratio", 1.0)) * worse + float(claim.get("min_delta", 0.0))


def claim_statement(claim: dict) -> str:
    """``hass tau > 1.08 x eagle2 tau``, ``fspad tau > eagle2 tau + 0.28``, ``eagle2 tau > eagle tau``."""
    r, d, m = float(claim.get("min_ratio", 1.0)), float(claim.get("min_delta", 0.0)), claim["metric"]
    rhs = (f"{r:g} x " if r != 1 else "") + f"{claim['worse']} {m}"
    if d:
        rhs += f" {'+' if d > 0 else '-'} {abs(d):g}"
    return f"{claim['better']} {m} > {rhs}"


def tau_difference_interval(a: Run, b: Run, level: float = 0.95, ratio: float = 1.0,
                            delta: float = 0.0) -> tuple[float, float] | None:
    """The `level` interval of tau(a) - (ratio x tau(b) + delta) by a paired bootstrap over the prompts both
    runs measured (turns of one prompt kept together), or None when either run lacks its samples or they
    share fewer than two prompts."""
    if not a.per_sample or not b.per_sample:
        return None
    keys = sorted(a.per_sample.keys() & b.per_sample.keys())
    groups: dict[str, list[tuple[str, int]]] = {}
    for k in keys:
        groups.setdefault(k[0], []).append(k)
    if len(groups) < 2:
        return None
    # per prompt: (new tokens, steps) of each run over its turns
    rows = [tuple(sum(run.per_sample[k][i] for k in ks) for run in (a, b) for i in (0, 1)) for ks in groups.values()]
    if any(r[1] == 0 or r[3] == 0 for r in rows):
        return None
    rng = random.Random(BOOTSTRAP_SEED)
    n = len(rows)
    diffs = []
    for _ in range(BOOTSTRAP_RESAMPLES):
        t = [0, 0, 0, 0]
        for _ in range(n):
            r = rows[rng.randrange(n)]
            t = [t[i] + r[i] for i in range(4)]
        diffs.append(t[0] / t[1] - ratio * t[2] / t[3] - delta)
    diffs.sort()
    lo = diffs[int((1 - level) / 2 * (len(diffs) - 1))]
    hi = diffs[int((1 + level) / 2 * (len(diffs) - 1))]
    return lo, hi


def _verdict(holds: bool, interval: tuple[float, float] | None) -> str:
    if interval is None:
        return "holds" if holds else "violated"
    return "holds" if interval[0] > 0 else "violated" if interval[1] < 0 else "within noise"


def check_claims(runs: list[Run], claims: list[dict]) -> list[dict]:
    """Each claim on every pair of runs (same target, dataset and T) of its two methods.

    A result holds the claim, the row (target, dataset, temperature), the labels, runs and values of the
    pair, `checked` and, when checked, `holds` (the point values' order), `interval` (tau claims: the 95%
    paired-bootstrap interval of the difference, or None) and `verdict` (holds / violated / within noise);
    else `reason` (see the module's rule).
    """
    by_setting: dict[tuple, list[Run]] = {}
    for r in runs:
        by_setting.setdefault(r.setting_key(), []).append(r)
    methods = None
    out = []
    for cl in claims:
        temps = None if cl.get("temperatures") is None else [float(t) for t in cl["temperatures"]]
        for key, rs in sorted(by_setting.items(), key=lambda kv: str(kv[0])):
            if (cl.get("datasets") and key[1] not in cl["datasets"]) or (temps is not None and key[2] not in temps):
                continue
            for a in (r for r in rs if r.arm == cl["better"]):
                for b in (r for r in rs if r.arm == cl["worse"]):
                    methods = _methods() if methods is None else methods
                    va, vb = a.value(cl["metric"]), b.value(cl["metric"])
                    reason = why_not_comparable(a, b, methods, cl["metric"])
                    if reason is None and (va is None or vb is None):
                        reason = f"{cl['metric']} not measured"
                    holds = reason is None and va > claim_threshold(cl, vb)
                    interval = (tau_difference_interval(a, b, ratio=float(cl.get("min_ratio", 1.0)),
                                                        delta=float(cl.get("min_delta", 0.0)))
                                if reason is None and cl["metric"] == "tau" else None)
                    out.append({"claim": cl, "target": key[0], "dataset": key[1], "temperature": key[2],
                                "labels": (a.label, b.label), "runs": (a, b), "better": va, "worse": vb,
                                "checked": reason is None, "holds": holds, "interval": interval,
                                "verdict": _verdict(holds, interval) if reason is None else None,
                                "reason": reason or ""})
    return out


def _replica_key(r: Run) -> tuple:
    """What seed replicas of one arm share: everything of the run but its draft checkpoint and seed."""
    params = {k: v for k, v in sorted(r.params.items()) if k != "checkpoint"}
    draft = {k: v for k, v in sorted((r.draft or {}).items()) if k != "seed"}
    return (r.arm, repr(params), repr(draft), r.max_new_tokens, r.top_k, r.top_p)


def seed_spread(results: list[dict]) -> list[dict]:
    """The checked results of `check_claims` joined over draft seeds: one entry per claim, row and pair of
    arm settings, with `pairs` (the results joined), `better` / `worse` ({draft seed: value}; seed None for
    a run without a recorded seed or checkpoint), `verdict` (holds / violated on every pair, else within
    noise), `seeds_disagree` (some pair holds and another is violated) and `problem` (None, or why the
    group has no verdict: two runs of one arm and seed, whose values would silently replace each other).

    Two arms drafting with the same checkpoints (EAGLE-2 and EAGLE on one head: a claim about the tree,
    not the head) are paired head by head: pairs of different heads would add the heads' seed variance to
    a comparison that has none."""
    groups: dict[tuple, list[dict]] = {}
    for cr in results:
        if not cr["checked"]:
            continue
        a, b = cr["runs"]
        key = (cr["claim"].get("id") or cr["claim"]["text"], cr["target"], cr["dataset"], cr["temperature"],
               _replica_key(a), _replica_key(b))
        groups.setdefault(key, []).append(cr)
    out = []
    for pairs in groups.values():
        if any(cr["runs"][0].draft_sha and cr["runs"][0].draft_sha == cr["runs"][1].draft_sha for cr in pairs):
            pairs = [cr for cr in pairs if cr["runs"][0].draft_sha == cr["runs"][1].draft_sha]
        problem = None
        for side in (0, 1):
            runs = {id(cr["runs"][side]): cr["runs"][side] for cr in pairs}.values()
            seen: dict = {}
            for r in runs:
                if r.draft_seed in seen:
                    problem = (f"two runs of {r.arm} with draft seed {r.draft_seed} ({seen[r.draft_seed]}, {r.source})"
                               "; keep one")
                seen[r.draft_seed] = r.source
        verdicts = {cr["verdict"] for cr in pairs}
        verdict = None if problem else next(iter(verdicts)) if len(verdicts) == 1 else "within noise"
        first = pairs[0]
        out.append({"claim": first["claim"], "target": first["target"], "dataset": first["dataset"],
                    "temperature": first["temperature"], "pairs": pairs,
                    "better": {cr["runs"][0].draft_seed: cr["better"] for cr in pairs},
                    "worse": {cr["runs"][1].draft_seed: cr["worse"] for cr in pairs},
                    "verdict": verdict, "seeds_disagree": not problem and {"holds", "violated"} <= verdicts,
                    "problem": problem})
    return out
