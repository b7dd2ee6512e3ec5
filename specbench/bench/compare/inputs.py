"""Compare's inputs: specbench results files, pytest-benchmark JSON of the suites, Spec-Bench answer JSONL.

`load_inputs` turns files, directories and quoted globs into labelled runs and refuses what
cannot be one table (mixed targets, two files holding the same cell).
"""

from __future__ import annotations

import glob
import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .. import results as _results
from .common import CLAIMS_KIND, REFERENCE_KIND, CompareError, read_json
from .runs import Run, run_from_document

log = logging.getLogger(__name__)


class OtherKind(CompareError):
    """A specbench file of a kind that holds no run (a study, ...): a glob's inputs skip it."""


def _is_benchmark_json(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("benchmarks"), list) and (
        "machine_info" in data or "version" in data)


def _runs_from_benchmark_json(data: dict, source: str) -> list[Run]:
    runs = []
    for b in data["benchmarks"]:
        rec = (b.get("extra_info") or {}).get("specbench") if isinstance(b, dict) else None
        if not isinstance(rec, dict):
            continue
        if int(rec.get("schema_version", 1)) > _results.SCHEMA_VERSION:
            raise CompareError(f"{source}: benchmark {b.get('name')} holds a run of schema version "
                               f"{rec.get('schema_version')}, newer than this specbench reads "
                               f"({_results.SCHEMA_VERSION}); upgrade specbench")
        r = run_from_document(rec, f"{source}::{b.get('name', '?')}")
        r.extra["results_file"] = rec.get("results_file")
        runs.append(r)
    if not runs:
        raise CompareError(f"{source}: a pytest-benchmark file without specbench runs (no extra_info['specbench']; "
                           f"write it with `pytest suites/ --benchmark-only --benchmark-json FILE`)")
    return runs


def load_run_file(path: Path, specbench_base: Path | None = None) -> list[Run]:
    """Runs held by one input file (results JSON, pytest-benchmark JSON or Spec-Bench answers JSONL)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        from .. import specbench_jsonl

        return [run_from_document(doc, f"{path}::{doc['config']['dataset']}")
                for doc in specbench_jsonl.import_results(path, specbench_base)]
    data = read_json(path)
    if _is_benchmark_json(data):
        return _runs_from_benchmark_json(data, str(path))
    if isinstance(data, dict) and data.get("kind") in (REFERENCE_KIND, CLAIMS_KIND):
        raise CompareError(f"{path}: a {data['kind']} file is a reference, not a run; pass it with --baseline")
    if isinstance(data, dict) and "rows" in data and "tolerance" in data:
        raise CompareError(f"{path}: a papers' baselines file is a reference, not a run; pass it with --baseline")
    kind = data.get("kind") if isinstance(data, dict) else None
    if isinstance(kind, str) and kind.startswith("specbench.") and kind != _results.KIND:
        raise OtherKind(f"{path}: a {kind} file, not a run")
    return [run_from_document(_results.load(path), str(path))]


def expand_inputs(patterns: Iterable[str]) -> list[Path]:
    """Files named by the arguments: files, directories (their *.json/*.jsonl, recursively) or quoted globs."""
    out: list[Path] = []
    for pat in patterns:
        p = Path(pat)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.suffix in (".json", ".jsonl") and q.is_file()
                           and not q.name.startswith("."))
            if not found:
                raise CompareError(f"{pat}: directory holds no *.json results")
            out += found
        elif p.exists():
            out.append(p)
        elif glob.has_magic(pat):
            found = sorted(Path(q) for q in glob.glob(pat, recursive=True))
            if not found:
                raise CompareError(f"no results files match {pat!r} (empty glob); run the suites or "
                                   f"`specbench run` first")
            out += found
        else:
            raise CompareError(f"{pat}: no such file")
    seen, uniq = set(), []
    for p in out:
        k = p.resolve()
        if k not in seen:
            seen.add(k)
            uniq.append(p)
    return uniq


def load_inputs(patterns: Iterable[str], specbench_base: str | None = None,
                allow_mixed_targets: bool = False, on_skip: Callable[[str], None] = log.warning) -> list[Run]:
    """The labelled runs of the inputs (files, directories or quoted globs).

    A specbench file of a kind that holds no run (``specbench.study``, any ``specbench.*`` kind
    but runs, references and claims) is skipped with a warning naming it; everything else that
    is not a run (a reference, a papers' file, corrupt or foreign JSON) is an error. `on_skip`
    receives each skip notice (default: the log).
    """
    patterns = list(patterns)
    if not patterns:
        raise CompareError("no results files given (expected results/*.json, a directory or a pytest-benchmark JSON)")
    paths = expand_inputs(patterns)
    base = Path(specbench_base) if specbench_base else None
    runs: list[Run] = []
    skipped = []
    for p in paths:
        try:
            runs += load_run_file(p, base)
        except OtherKind as e:  # e.g. results/**/*.json catching results/studies/: not an error
            on_skip(f"skipped {e}")
            skipped.append(p)
    if not runs:
        raise CompareError(f"no runs in the inputs (skipped {len(skipped)} file(s) of other kinds, "
                           f"e.g. {skipped[0]})" if skipped else "no runs in the inputs")
    # a pytest-benchmark record of a run whose results file is also an input: keep the results file
    given = {p.resolve() for p in paths}
    runs = [r for r in runs if not (r.extra.get("results_file") and Path(r.extra["results_file"]).resolve() in given)]
    _check_targets(runs, allow_mixed_targets)
    assign_labels(runs)
    _check_duplicates(runs)
    return runs


def _check_targets(runs: list[Run], allow_mixed: bool) -> None:
    by_key: dict[str, Run] = {}
    for r in runs:
        first = by_key.setdefault(r.target_key, r)
        if r.target_sha and first.target_sha and r.target_sha != first.target_sha:
            raise CompareError(f"mismatched runs: {first.source} and {r.source} both name target {r.target_key} "
                               f"but with different weights (sha256 {first.target_sha[:12]} vs {r.target_sha[:12]})")
    if len(by_key) > 1 and not allow_mixed:
        a, b = list(by_key.values())[:2]
        raise CompareError(f"mismatched runs: {a.source} is on target {a.target_key} but {b.source} is on "
                           f"{b.target_key}; compare one target at a time (or pass --allow-mixed-targets)")


def variant(r: Run) -> str:
    """What tells two runs of one method apart: its parameters, runtime and machine (runs on two VMs or two
    runtimes are two results, not a duplicate)."""
    return json.dumps([r.params, r.runtime, r.machine], sort_keys=True)


def assign_labels(runs: list[Run]) -> None:
    """Label each run by its method, numbered (``eagle2#1``, ``eagle2#2``) when the method ran with several
    parameter sets, runtimes or machines; the legend under the tables lists what each label ran with."""
    by_method: dict[str, list[Run]] = {}
    for r in runs:
        by_method.setdefault(r.method, []).append(r)
    for method, rs in by_method.items():
        distinct = sorted({variant(r) for r in rs})
        for r in rs:
            n = distinct.index(variant(r)) + 1
            r.label = method if len(distinct) == 1 else f"{method}#{n}"


def _check_duplicates(runs: list[Run]) -> None:
    seen: dict[tuple, Run] = {}
    for r in runs:
        key = (*r.setting_key(), r.label)
        if key in seen and r.method != "vanilla":
            o = seen[key]
            raise CompareError(f"mismatched runs: {o.source} and {r.source} both hold {r.label} on {r.dataset} "
                               f"T={r.temperature:g} for {r.target_key}; pass one of them")
        seen.setdefault(key, r)
