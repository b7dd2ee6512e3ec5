"""Benchmark harness pieces: baselines from the papers, comparisons."""
