"""EAGLE-3 Table 1 rows kept in the EAGLE-2 baselines file: PLD, Lookahead, SpS, Medusa and Hydra on
Vicuna 13B, T = 0 and 1 ([secondary])."""

import pytest
from _harness import cases, run_case


@pytest.mark.parametrize("case", cases("EAGLE-2", "EAGLE-3 Table 1"))
def test_eagle3_table1(case, suite, benchmark, request):
    run_case(suite, case, benchmark, request)
