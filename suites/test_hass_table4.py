"""HASS Table 4 (ablation: number of harmonized alignment steps, tau)."""

import pytest
from _harness import cases, run_case


@pytest.mark.parametrize("case", cases("HASS", "Table 4"))
def test_hass_table4(case, suite, benchmark, request):
    run_case(suite, case, benchmark, request)
