"""HASS Table 6 (ablation: feature / token alignment, tau)."""

import pytest
from _harness import cases, run_case


@pytest.mark.parametrize("case", cases("HASS", "Table 6"))
def test_hass_table6(case, suite, benchmark, request):
    run_case(suite, case, benchmark, request)
