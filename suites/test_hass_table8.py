"""HASS Table 8 (training data: fixed ShareGPT vs target-generated, tau and speedup)."""

import pytest
from _harness import cases, run_case


@pytest.mark.parametrize("case", cases("HASS", "Table 8"))
def test_hass_table8(case, suite, benchmark, request):
    run_case(suite, case, benchmark, request)
