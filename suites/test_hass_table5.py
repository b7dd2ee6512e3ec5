"""HASS Table 5 (ablation: beta of the harmonized context alignment, tau)."""

import pytest
from _harness import cases, run_case


@pytest.mark.parametrize("case", cases("HASS", "Table 5"))
def test_hass_table5(case, suite, benchmark, request):
    run_case(suite, case, benchmark, request)
