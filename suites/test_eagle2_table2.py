"""EAGLE-2 Table 2: PLD, Lookahead, EAGLE and EAGLE-2 on LLaMA2-Chat 70B and LLaMA3-Instruct 8B/70B,
MT-bench, T = 0 ([secondary])."""

import pytest
from _harness import cases, run_case


@pytest.mark.parametrize("case", cases("EAGLE-2", "Table 2"))
def test_eagle2_table2(case, suite, benchmark, request):
    run_case(suite, case, benchmark, request)
