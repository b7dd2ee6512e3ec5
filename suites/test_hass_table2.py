"""HASS (arXiv 2408.15766) Table 2: speedup of EAGLE, EAGLE-2 and HASS (same cells as Table 1;
the decodes are shared with Table 1 within a session). Speedup is judged only on an H800."""

import pytest
from _harness import cases, run_case


@pytest.mark.parametrize("case", cases("HASS", "Table 2"))
def test_hass_table2(case, suite, benchmark, request):
    run_case(suite, case, benchmark, request)
