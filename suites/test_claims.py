"""The papers' qualitative claims (baselines/embedded/claims.json) as ordering assertions on the
embedded target, e.g. tau(hass) > tau(eagle2). A claim whose methods do not exist yet, or whose
draft checkpoint is missing, is skipped with that reason."""

import json

import pytest
from _harness import REPO, run_claim

CLAIMS = json.loads((REPO / "baselines" / "embedded" / "claims.json").read_text())["claims"]
PARAMS = [pytest.param(c, ds, float(t), id=f"claim-{c['id']}-{ds}-T{t:g}", marks=[pytest.mark.claim, pytest.mark.slow])
          for c in CLAIMS for ds in c["datasets"] for t in c["temperatures"]]


@pytest.mark.parametrize("claim,dataset,temperature", PARAMS)
def test_claim(claim, dataset, temperature, suite, benchmark, request):
    run_claim(suite, claim, dataset, temperature, benchmark, request)
