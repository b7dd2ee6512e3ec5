"""EAGLE-2 (arXiv 2406.16858) Table 1: tau and speedup of SpS, EAGLE and EAGLE-2 on Vicuna 7B/13B and
LLaMA2-Chat 7B/13B, six datasets, T = 0 and 1. All numbers [secondary] (third-party transcription)."""

import pytest
from _harness import cases, run_case


@pytest.mark.parametrize("case", cases("EAGLE-2", "Table 1"))
def test_eagle2_table1(case, suite, benchmark, request):
    run_case(suite, case, benchmark, request)
