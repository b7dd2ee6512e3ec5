"""HASS Table 9 (draft tree depth x total tokens sweep of EAGLE-2 / HASS-MG, speedup on MT-bench).
The EAGLE-2 rows map to the eagle2 plugin's depth / total_tokens parameters."""

import pytest
from _harness import cases, run_case


@pytest.mark.parametrize("case", cases("HASS", "Table 9"))
def test_hass_table9(case, suite, benchmark, request):
    run_case(suite, case, benchmark, request)
