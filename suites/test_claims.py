"""The fidelity study's claims on the embedded target (baselines/embedded/fidelity.json; the claims from
claims.json), one case per claim, dataset and temperature of the study.

A case decodes the runs of both of the claim's arms, every training seed of each, into the suite's results
directory (resuming what is there), judges them by `specbench compare`'s rule (like with like, the paired
prompt bootstrap, seeds joined: `bench.fidelity.measure`) and checks that the verdict and each seed's tau
reproduce the plan's recorded table. The claim is never asserted to hold: whether it does is the recorded
finding. Without a recorded row (or with --suite-limit / --suite-max-new-tokens, other settings than the
record's), the case reports what it measured and skips.
"""

import dataclasses
import json

import pytest

from specbench.bench import compare as C
from specbench.bench import fidelity as F

PLAN = F.load_plan()
CLAIMS = F.study_claims(PLAN)
RECORDED = {(r["claim"], r["dataset"], r["temperature"]): r for r in (PLAN.doc.get("table") or {}).get("rows") or []}
PARAMS = [pytest.param(c, ds, t, id=f"claim-{c['id']}-{ds}-T{t:g}", marks=[pytest.mark.claim, pytest.mark.slow])
          for c in CLAIMS for ds in PLAN.datasets for t in PLAN.temperatures]


def _summary(row: dict) -> str:
    if "better" not in row:
        return f"{row['verdict']} ({row.get('reason')})"
    taus = {s: row[s]["tau"] for s in ("better", "worse")}
    return f"{row['verdict']}, tau per seed {taus['better']} vs {taus['worse']}"


@pytest.mark.parametrize("claim,dataset,temperature", PARAMS)
def test_claim(claim, dataset, temperature, suite, benchmark):
    runner = suite.runner(PLAN.target)
    if temperature > 0 and PLAN.runtime not in ("auto", runner.target.runtime_name):
        # sampled tokens follow the logits' last bits, which differ between runtimes: not a reproduction
        pytest.skip(f"a sampled row reproduces on the plan's runtime only ({PLAN.runtime}); the suite runs "
                    f"{runner.target.runtime_name}: pass --suite-runtime {PLAN.runtime}")
    # one row of the study; greedy tau does not depend on the target's runtime, so the suite's runner may differ
    plan = dataclasses.replace(PLAN, datasets=(dataset,), temperatures=(temperature,),
                               runtime=runner.target.runtime_name,
                               limit=suite.limit_override or PLAN.limit,
                               max_new_tokens=suite.max_new_override or PLAN.max_new_tokens)
    arms = {claim["better"], claim["worse"]}
    benchmark.group = f"claims: {PLAN.target} {dataset} T={temperature:g}"
    paths = benchmark.pedantic(lambda: F.run_plan(plan, suite.results_root / "fidelity", runner=runner,
                                                  progress=False, only=lambda a, c, d, t: a.name in arms),
                               rounds=1, iterations=1)
    runs = [C.run_from_document(json.loads(p.read_text()), str(p)) for p in paths]
    [row] = F.measure(plan, runs, [claim])
    benchmark.extra_info.update({"claim": claim["text"], "row": row})
    recorded = RECORDED.get((claim["id"], dataset, temperature))
    if recorded is None or (plan.limit, plan.max_new_tokens) != (PLAN.limit, PLAN.max_new_tokens):
        pytest.skip(f"measured {C.claim_statement(claim)} on {dataset} T={temperature:g}: {_summary(row)}; "
                    + ("no recorded row to reproduce (record the table with `specbench fidelity table --results "
                       "DIR --record`)" if recorded is None else "other settings than the recorded table's"))
    assert row["verdict"] == recorded["verdict"], (
        f"{C.claim_statement(claim)} on {dataset} T={temperature:g}: recorded {_summary(recorded)}, "
        f"measured {_summary(row)}")
    tol = C.EMBEDDED_TOLERANCE["tau"]["rel"]  # tau at T=0 is deterministic; the margin covers numerical ties
    for side in ("better", "worse") if "better" in recorded else ():
        for seed, tau in recorded[side]["tau"].items():
            got = row[side]["tau"].get(seed)
            assert got is not None and abs(got - tau) <= tol * tau, (
                f"{recorded[side]['arm']} seed {seed} on {dataset} T={temperature:g}: tau {got} vs recorded {tau}")
