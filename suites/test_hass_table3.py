"""HASS Table 3 (ablation: distillation loss variants of HASS, tau)."""

import pytest
from _harness import cases, run_case


@pytest.mark.parametrize("case", cases("HASS", "Table 3"))
def test_hass_table3(case, suite, benchmark, request):
    run_case(suite, case, benchmark, request)
