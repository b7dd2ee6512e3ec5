"""The GPU device check's CPU-testable parts: on a machine without a CUDA device both entry points say so and
exit 2 (no traceback); the summary reads JUnit XML and results files; every method that runs without
training is in the check."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: run the check itself")


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_without_a_cuda_device_both_entry_points_exit_2_with_the_reason(tmp_path):
    sh = subprocess.run(["bash", "scripts/gpu_check.sh", str(tmp_path / "out")], cwd=REPO, capture_output=True,
                        text=True, env={"PATH": "/usr/bin:/bin"}, timeout=60)
    assert sh.returncode == 2 and "no CUDA device" in sh.stderr and "Traceback" not in sh.stderr, sh.stderr
    py = subprocess.run([sys.executable, "scripts/gpu_check.py", "--out", str(tmp_path / "out")], cwd=REPO,
                        capture_output=True, text=True, timeout=120)
    assert py.returncode == 2 and "no CUDA device" in py.stderr and "Traceback" not in py.stderr, py.stderr
    assert not (tmp_path / "out").exists()  # nothing written


def test_the_summary_reads_junit_and_results_files(tmp_path):
    mod = _module()
    xml = tmp_path / "r.xml"
    xml.write_text('<testsuites><testsuite tests="7" failures="1" errors="1" skipped="2"/></testsuites>')
    assert mod.junit_counts(xml) == {"passed": 3, "failed": 2, "skipped": 2}
    assert mod.junit_counts(tmp_path / "missing.xml") == {"passed": 0, "failed": 0, "skipped": 0}
    run = tmp_path / "pld.json"
    run.write_text(json.dumps({"config": {"method": "pld"}, "summary": {
        "pld": {"tau": 1.23456, "speedup": 0.9}, "greedy_identical": {"identical": 3, "compared": 3}}}))
    assert mod.method_row(run) == {"method": "pld", "tau": 1.235, "speedup": 0.9, "greedy_identical": "3/3"}


def test_every_method_that_needs_no_training_is_checked():
    names = dict(_module().methods_to_run())
    assert {"pld", "lookahead", "eagle", "eagle2", "hass", "sps"} <= set(names) and "vanilla" not in names
    assert names["sps"] == ["--param", "checkpoint=prefix:4"]
