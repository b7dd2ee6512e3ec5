"""Records compare reads back: a suite case's pytest-benchmark entry, and `--write-reference` files."""

from __future__ import annotations

from .. import results as _results
from .common import REFERENCE_KIND, REFERENCE_SCHEMA, CompareError
from .references import EMBEDDED_TOLERANCE, reference_cell
from .runs import Run


def benchmark_record(doc: dict, results_file: str | None = None) -> dict:
    """What a suite case stores in pytest-benchmark's extra_info['specbench'] (readable by compare)."""
    cfg = doc["config"]
    method = cfg["method"]
    summ = {k: v for k, v in doc["summary"].items() if k in (method, "vanilla", "greedy_identical")}
    return {"schema_version": doc.get("schema_version", _results.SCHEMA_VERSION), "kind": _results.KIND,
            "config": cfg, "summary": summ, "environment": doc.get("environment", {}),
            "status": doc.get("status", "complete"), "suite": doc.get("suite"), "results_file": results_file}


def reference_document(runs: list[Run], *, command: str, description: str = "") -> dict:
    """A `specbench.reference` document recording `runs` (e.g. the quick suite) for later gates."""
    if not runs:
        raise CompareError("nothing to record")
    run_cmds = sorted({str(r.suite.get("command")) for r in runs if r.suite and r.suite.get("command")})
    env = dict(runs[0].env)
    cells = [reference_cell(r) for r in sorted(runs, key=lambda r: (r.setting_key(), r.label)) if r.method != "vanilla"]
    return {
        "kind": REFERENCE_KIND, "schema_version": REFERENCE_SCHEMA,
        "description": description or (
            "Numbers recorded by a real run of this project on the embedded target; the CPU gate "
            "(`specbench compare ... --baseline <this file> --gate`) checks tau against them. Speedup and "
            "tokens/s are recorded for information and never gated (a shared 2-core CPU)."),
        "recorded_by": {"run_command": run_cmds, "record_command": command, "date": env.get("date"),
                        "environment": env},
        "tolerance": EMBEDDED_TOLERANCE,
        "cells": cells,
    }
