"""HASS (arXiv 2408.15766) Table 1: acceptance length tau of PLD, Lookahead, EAGLE, EAGLE-2 and HASS
on LLaMA2-Chat 7B/13B and LLaMA3-Instruct 8B/70B, MT-bench / HumanEval / GSM8K, T = 0 and 1.

The quick subset (CI) lives here: PLD and Lookahead on the embedded target, T = 0."""

import pytest
from _harness import cases, run_case

QUICK = {"methods": ("pld", "lookahead"), "datasets": ("mt_bench", "humaneval", "gsm8k"), "temperatures": (0.0,)}


@pytest.mark.parametrize("case", cases("HASS", "Table 1", quick=QUICK))
def test_hass_table1(case, suite, benchmark, request):
    run_case(suite, case, benchmark, request)
