"""The suites in parallel through pytest-xdist (one worker per GPU on a runner; CPU workers here): cases that
share decodes stay on one worker (xdist_group), each worker writes the results files it decodes, and those
hold what one process decodes for the same settings, so `specbench compare` and its gate are unchanged.
pytest-benchmark turns its timing off under xdist: run without --benchmark-only and gate on the results
files (as the GPU workflow does)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_two_workers_write_the_results_one_process_would(tmp_path):
    from specbench.bench.runner import RunConfig, Runner

    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "suites/test_hass_table1.py", "-k", "quick and mt_bench", "-n", "2",
         "--dist", "loadgroup", "-v", "-p", "no:cacheprovider", "--suite-results", str(tmp_path),
         "--suite-limit", "1", "--suite-max-new-tokens", "8"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "[gw0]" in proc.stdout and "[gw1]" in proc.stdout  # the two methods' groups ran on two workers
    runner = Runner("smollm2-135m", dtype="float32", device="cpu")
    for method in ("pld", "lookahead"):
        doc = json.loads((tmp_path / "quick" / "smollm2-135m" / f"{method}-mt_bench-t0.json").read_text())
        ref = runner.run(RunConfig(method=method, dataset="mt_bench", limit=1, max_new_tokens=8, dtype="float32",
                                   device="cpu"), out=None, progress=False)
        got = [(s["runs"][method]["tokens"], s["runs"][method]["steps"]) for s in doc["samples"]]
        want = [(s["runs"][method]["tokens"], s["runs"][method]["steps"]) for s in ref["samples"]]
        assert got == want and doc["summary"][method]["tau"] == ref["summary"][method]["tau"], method
        assert doc["summary"]["greedy_identical"] == ref["summary"]["greedy_identical"]
    cmp = subprocess.run([sys.executable, "-m", "specbench.cli", "compare", str(tmp_path / "quick" / "smollm2-135m")],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert cmp.returncode == 0 and "lookahead" in cmp.stdout and "pld" in cmp.stdout, cmp.stderr


def test_a_target_larger_than_its_gpu_takes_the_device_map_path(tmp_path, monkeypatch):
    """(CUDA faked: 1 GiB per device.) A 2 GiB target goes to accelerate's device map in one process, and is
    skipped, with how to run it, on an xdist worker (it would take the other workers' GPUs)."""
    import importlib
    import types

    import pytest
    import torch

    monkeypatch.syspath_prepend(str(REPO / "suites"))
    harness = importlib.import_module("_harness")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(total_memory=2**30))
    small, big = tmp_path / "small", tmp_path / "big"
    for d, size in ((small, 2**20), (big, 2 * 2**30)):
        d.mkdir()
        with open(d / "model.safetensors", "wb") as f:
            f.truncate(size)  # sparse: the size is all that is read
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    assert harness.placement(str(small), "cuda:0") is None and harness.placement(str(big), "cpu") is None
    assert harness.placement(str(big), "cuda:1") == "auto"
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw1")
    with pytest.raises(pytest.skip.Exception, match="does not fit one GPU: run its cases without -n"):
        harness.placement(str(big), "cuda:1")
