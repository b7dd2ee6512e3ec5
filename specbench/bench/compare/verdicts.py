"""A verdict per (run, metric): pass, regress, improve, or not comparable with the reason why.

A recorded reference (embedded or another run) is used when it holds the same cell; it yields a
verdict only when its settings equal the run's (method parameters, prompts, token budget,
sampling, target weights). Otherwise the papers' rows decide, through `baselines.judge`, and
only for runs over the paper's whole dataset with the paper's draft tree.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

from ..baselines import BaselineRow, find, judge
from .common import METRIC_LABEL, METRICS, is_num, machine_label, normalized
from .references import RUN_TOLERANCE, Reference, RefSet, reference_cell
from .runs import Run

_PROVENANCE_RANK = {"[paper]": 0, "[code]": 1, "[abstract]": 2, "[secondary]": 3, "[derived]": 4}
_MATCH_FIELDS = ("target_sha256", "params", "top_k", "top_p", "seed", "max_new_tokens", "prompt_ids")


@dataclass
class Cell:
    run: Run
    metric: str
    value: float | None
    ref: Reference | None = None
    verdict: str = "not comparable"
    reason: str = "no reference"
    others: list[Reference] = field(default_factory=list)  # further matching references (not gated)
    matched: bool = False  # `ref` measured this run's settings (its value and delta mean something here)

    @property
    def delta_rel(self) -> float | None:
        if self.ref is None or self.value is None or not self.ref.value:
            return None
        return (self.value - self.ref.value) / abs(self.ref.value)


def _direction(measured: float, ref: float, rel: float) -> str:
    if abs(measured - ref) <= rel * abs(ref) + 1e-12:
        return "pass"
    return "regress" if measured < ref else "improve"


_DATASET_SIZES: dict[str, int] = {}


def dataset_size(name: str) -> int | None:
    """Prompts in a vendored evaluation set (None for any other name); json only, no `datasets` import."""
    if name not in _DATASET_SIZES:
        try:
            from ..datasets import DATA_DIR, DATASETS

            spec = DATASETS[name]
            n = 0
            for line in (DATA_DIR / spec.file).read_text().splitlines():
                if line.strip():
                    rec = json.loads(line)
                    n += spec.categories is None or rec.get("category") in spec.categories
            _DATASET_SIZES[name] = n
        except (KeyError, OSError, ValueError):
            return None
    return _DATASET_SIZES[name]


def _paper_refs(rs: RefSet, run: Run, metric: str) -> list[Reference]:
    rows = find(rs.rows, target=run.target_key, method=run.method, dataset=run.dataset,
                temperature=run.temperature, metric=metric, setting=None)
    rows.sort(key=lambda r: (_PROVENANCE_RANK.get(r.provenance, 9), r.source_file, r.table))
    out = []
    for r in rows:
        if metric in rs.tolerance_override:
            r = replace(r, tolerance_rel=float(rs.tolerance_override[metric]))
        out.append(Reference(r.value, f"{r.paper} {r.table} {r.provenance}", r.tolerance_rel, True, row=r))
    return out


def settings_mismatch(cell: dict, run: Run) -> str | None:
    """Why a recorded cell measured other settings than `run` (None: the same settings)."""
    mine = reference_cell(run)
    for k in _MATCH_FIELDS:
        a, b = cell.get(k), mine.get(k)
        if k == "target_sha256" and (a is None or b is None):
            continue
        if k == "seed" and (a is None or b is None):
            continue
        if normalized(a) != normalized(b):
            if k == "prompt_ids":
                return (f"other prompts ({len(a or [])} in the reference, {len(b or [])} here)"
                        if a and b else "prompt set unknown")
            if k == "target_sha256":
                return "other target weights"
            if k == "params":
                diff = sorted(set(a or {}) | set(b or {}))
                diff = [d for d in diff if normalized((a or {}).get(d)) != normalized((b or {}).get(d))]
                return "other method parameters (" + ", ".join(
                    f"{d}: {(a or {}).get(d)!r} vs {(b or {}).get(d)!r}" for d in diff) + ")"
            return f"other {k} ({a!r} in the reference, {b!r} here)"
    return None


def _cell_refs(rs: RefSet, run: Run, metric: str) -> tuple[list[Reference], str | None]:
    cands = [(c, tol, src) for c, tol, src in rs.cells
             if c.get("target") == run.target_key and c.get("method") == run.method
             and c.get("dataset") == run.dataset and is_num(c.get("temperature"))
             and abs(float(c["temperature"]) - run.temperature) < 1e-9]
    out, why = [], None
    for c, tol, src in cands:
        v = c.get(metric)
        if not is_num(v):
            continue
        spec = tol.get(metric, {"rel": RUN_TOLERANCE.get(metric, 0.03), "gate": False})
        rel = float(rs.tolerance_override.get(metric, spec["rel"]))
        kind = "run" if spec.get("same_hardware") is not None else "embedded"
        ref = Reference(float(v), src, rel, bool(spec.get("gate", True)), cell=c, kind=kind)
        mism = settings_mismatch(c, run)
        if mism is None:
            out.insert(0, ref)
        else:
            why = why or mism
            out.append(ref)
    return out, why


def _judge_cell(cell: Cell, rs: RefSet) -> None:
    run, metric, v = cell.run, cell.metric, cell.value
    if run.method == "vanilla":
        cell.reason = "the denominator"
        return
    refs, mismatch = _cell_refs(rs, run, metric)
    papers = _paper_refs(rs, run, metric)
    if v is None:
        cell.reason = "not measured"
        cell.ref = (refs or papers or [None])[0]
        return
    if refs:
        ref = refs[0]
        cell.ref, cell.others = ref, refs[1:] + papers
        c = ref.cell
        if settings_mismatch(c, run) is not None:
            cell.reason = mismatch or "other settings"
            return
        cell.matched = True
        if metric != "tau" and (c.get("runtime") or "hf") != run.runtime:  # tau does not depend on the runtime
            cell.reason = f"other runtime ({c.get('runtime') or 'hf'} in the reference, {run.runtime} here)"
            return
        if not ref.gated:
            cell.reason = f"{METRIC_LABEL[metric]} is recorded, not gated, on this reference (a shared CPU)"
            return
        if ref.kind == "run" and metric != "tau":
            hw_ref = (c.get("hardware") or {})
            here, there = run.machine, machine_label(hw_ref)
            if not here or not there or here != there:
                cell.reason = f"other hardware ({there or '?'} vs {here or '?'})"
                return
        cell.verdict = _direction(v, ref.value, ref.tolerance_rel)
        cell.reason = ""
        return
    if papers:
        ref = papers[0]
        cell.ref, cell.others = ref, papers[1:]
        row = ref.row
        tree_diff = _tree_mismatch(row, run)
        if tree_diff:
            cell.reason = tree_diff
            return
        n = len(run.prompt_ids or [])
        size = dataset_size(run.dataset)
        if size and n and n < size:
            cell.reason = f"run used {n} of the {size} prompts"
            return
        cell.matched = True
        j = judge(row, v, run.hardware)
        if j == "not_comparable":
            if metric == "speedup" and "bound" not in row.extra and row.dataset is not None:
                cell.reason = (f"speedup judged only on {row.hardware_class} (here: {run.hardware or 'CPU'})"
                               if row.hardware_class else "the paper does not state its hardware")
            else:
                cell.reason = "a headline claim, not a table cell"
            return
        cell.verdict = "pass" if j == "pass" else _direction(v, ref.value, ref.tolerance_rel)
        cell.reason = ""
        return
    cell.reason = "no reference"


def _tree_mismatch(row: BaselineRow, run: Run) -> str | None:
    if not row.tree:
        return None
    diffs = [f"{k} {row.tree[k]} vs {run.params[k]}" for k in ("depth", "top_k", "total_tokens")
             if row.tree.get(k) is not None and k in run.params and is_num(run.params[k])
             and int(run.params[k]) != int(row.tree[k])]
    return ("other draft tree (" + ", ".join(diffs) + ")") if diffs else None


def compare(runs: list[Run], rs: RefSet) -> list[Cell]:
    """A judged cell per run and metric."""
    cells = []
    for run in runs:
        for m in METRICS:
            c = Cell(run, m, run.value(m))
            _judge_cell(c, rs)
            cells.append(c)
    return cells


def gate_failures(cells: list[Cell]) -> list[Cell]:
    return [c for c in cells if c.verdict == "regress"]
