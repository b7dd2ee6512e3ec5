"""HASS Table 7 (ablation: Top-K distillation k and weight, tau and speedup)."""

import pytest
from _harness import cases, run_case


@pytest.mark.parametrize("case", cases("HASS", "Table 7"))
def test_hass_table7(case, suite, benchmark, request):
    run_case(suite, case, benchmark, request)
