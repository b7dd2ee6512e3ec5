"""EAGLE-2 ablation (value / reranking of the dynamic tree) on Vicuna 7B ([secondary])."""

import pytest
from _harness import cases, run_case


@pytest.mark.parametrize("case", cases("EAGLE-2", "Ablation"))
def test_eagle2_ablation(case, suite, benchmark, request):
    run_case(suite, case, benchmark, request)
