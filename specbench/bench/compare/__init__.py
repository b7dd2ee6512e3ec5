"""`specbench compare`: runs side by side, deltas against references, a verdict per cell, a CI gate.

Inputs (files, directories or quoted globs; `inputs`):

- results JSON written by `specbench run` or by the suites (`pytest suites/`);
- pytest-benchmark JSON written by `pytest suites/ --benchmark-json FILE` (each suite case
  stores its run under ``extra_info["specbench"]``, see `benchmark_record`);
- Spec-Bench answer JSONL (``*.jsonl``; the vanilla answers with ``--specbench-base``).

References (``--baseline FILE``, else everything under ``baselines/``; `references`): the
papers' tables, this project's recorded embedded runs, or another run.

Verdicts (`verdicts`): ``pass`` (within tolerance), ``regress`` / ``improve`` (worse / better
beyond tolerance), ``not comparable`` (no reference, other hardware, other settings, a headline
claim ...).  Ordering claims: `claims`.  Output: `render` (tables, notes), `plot` (``--plot``),
`record` (``--write-reference``).  Exit status (`command`): 0; 1 with ``--gate`` when a cell
regressed; 2 on unusable input (one line on stderr, nothing written).

The suites (``suites/_harness.py``) use `run_from_document`, `compare`, `RefSet`,
`embedded_references`, `benchmark_record`, `dataset_size`, `why_not_comparable` and `one_line`.
"""

from .claims import check_claims, claim_statement, claim_threshold, seed_spread, why_not_comparable
from .command import add_parser, cmd_compare, configure, main
from .common import (
    CLAIMS_KIND,
    METRIC_LABEL,
    METRICS,
    REFERENCE_KIND,
    REFERENCE_SCHEMA,
    VERDICTS,
    CompareError,
    one_line,
)
from .inputs import expand_inputs, load_inputs, load_run_file
from .record import benchmark_record, reference_document
from .references import (
    EMBEDDED_DIR,
    EMBEDDED_TOLERANCE,
    RUN_TOLERANCE,
    Reference,
    RefSet,
    embedded_references,
    load_claims,
    load_reference_file,
    load_references,
    reference_cell,
)
from .render import CSV_FIELDS, FORMATS, fmt, notes, render
from .runs import (
    Run,
    canonical_target,
    label_sort_key,
    pooled_vanilla,
    run_from_document,
)
from .verdicts import Cell, compare, dataset_size, gate_failures, settings_mismatch

__all__ = [
    "CLAIMS_KIND",
    "CSV_FIELDS",
    "EMBEDDED_DIR",
    "EMBEDDED_TOLERANCE",
    "FORMATS",
    "METRICS",
    "METRIC_LABEL",
    "REFERENCE_KIND",
    "REFERENCE_SCHEMA",
    "RUN_TOLERANCE",
    "VERDICTS",
    "Cell",
    "CompareError",
    "RefSet",
    "Reference",
    "Run",
    "add_parser",
    "benchmark_record",
    "canonical_target",
    "check_claims",
    "claim_statement",
    "claim_threshold",
    "cmd_compare",
    "compare",
    "configure",
    "dataset_size",
    "embedded_references",
    "expand_inputs",
    "fmt",
    "gate_failures",
    "label_sort_key",
    "load_claims",
    "load_inputs",
    "load_reference_file",
    "load_references",
    "load_run_file",
    "main",
    "notes",
    "one_line",
    "pooled_vanilla",
    "reference_cell",
    "reference_document",
    "render",
    "run_from_document",
    "seed_spread",
    "settings_mismatch",
    "why_not_comparable",
]
