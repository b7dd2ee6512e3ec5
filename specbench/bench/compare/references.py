"""What runs are compared against: the papers' tables, this project's recorded references, another run.

- the papers' tables (``baselines/*.json``, main-table rows), judged by ``baselines.judge``
  (tau 3 %; speedup 15 % and only on the paper's GPU class);
- this project's recorded embedded runs (``baselines/embedded/*.json``, kind
  ``specbench.reference``): tau gated, speedup and tokens/s shown but never gated;
- another results / pytest-benchmark file given with ``--baseline``: run against run (speed
  metrics only when both ran on the same hardware).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ...artifacts import display_path
from ..baselines import DEFAULT_ROOT, BaselineRow, load_baselines, load_file
from .common import (
    CLAIMS_KIND,
    METRICS,
    REFERENCE_KIND,
    REFERENCE_SCHEMA,
    CompareError,
    is_num,
    read_json,
)
from .inputs import load_run_file
from .runs import Run

EMBEDDED_DIR = DEFAULT_ROOT / "embedded"
# run-against-run tolerances (relative); the papers' files and reference files carry their own
RUN_TOLERANCE = {"tau": 0.03, "speedup": 0.15, "tokens_per_s": 0.15}
# the embedded reference: tau deterministic at T=0 -> tight; speed on a shared CPU -> never gated
EMBEDDED_TOLERANCE = {"tau": {"rel": 0.02, "gate": True}, "speedup": {"rel": 0.15, "gate": False},
                      "tokens_per_s": {"rel": 0.15, "gate": False}}


@dataclass
class Reference:
    value: float
    source: str  # "HASS Table 1 [paper]", "baselines/embedded/x.json", a results file
    tolerance_rel: float
    gated: bool  # False: shown, never a pass/regress verdict (speed on a shared CPU)
    row: BaselineRow | None = None  # a papers' row (judged with baselines.judge)
    cell: dict | None = None  # a recorded cell (reference file or another run)
    kind: str = "paper"  # paper | embedded | run


@dataclass
class RefSet:
    """Every reference one compare sees: papers' rows, recorded cells, ordering claims."""

    rows: list[BaselineRow] = field(default_factory=list)
    cells: list[tuple[dict, dict, str]] = field(default_factory=list)  # (cell, tolerance, source)
    kinds: list[str] = field(default_factory=list)
    claims: list[dict] = field(default_factory=list)
    tolerance_override: dict = field(default_factory=dict)

    @classmethod
    def of_documents(cls, docs: list[dict], claims: list[dict] | None = None) -> RefSet:
        """The references of loaded `specbench.reference` documents (as `embedded_references` returns them)."""
        return cls(cells=[(c, d["tolerance"], d["_path"]) for d in docs for c in d["cells"]],
                   kinds=["embedded"] if docs else [], claims=list(claims or []))


def reference_cell(r: Run) -> dict:
    """A run as a recorded reference cell: its settings (matched before a verdict) and its metrics."""
    return {
        "target": r.target_key, "target_sha256": r.target_sha, "method": r.method, "params": r.params,
        "dataset": r.dataset, "dataset_file": r.dataset_file, "temperature": r.temperature, "top_k": r.top_k,
        "top_p": r.top_p, "seed": r.seed, "runtime": r.runtime,
        "limit": r.limit, "max_new_tokens": r.max_new_tokens, "prompt_ids": r.prompt_ids,
        "tau": r.value("tau"), "tau_macro": r.summary.get("tau_macro"), "alpha_k": r.summary.get("alpha_k"),
        "reached_k": r.summary.get("reached_k"), "speedup": r.value("speedup"),
        "tokens_per_s": r.value("tokens_per_s"),
        "vanilla_tokens_per_s": (r.vanilla or {}).get("tokens_per_s"),
        "new_tokens": r.summary.get("new_tokens"), "steps": r.summary.get("steps"),
        "greedy_identical": r.greedy, "hardware": {"gpu": r.env.get("gpu"), "cpu": r.env.get("cpu"),
                                                  "cpu_isa": r.env.get("cpu_isa")},
        "source": r.source,
    }


def load_reference_file(path: Path) -> dict:
    """A `specbench.reference` file (baselines/embedded/*.json), validated."""
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, dict) or data.get("kind") != REFERENCE_KIND:
        raise CompareError(f"{path}: not a specbench reference file (kind {REFERENCE_KIND!r})")
    v = data.get("schema_version")
    if not isinstance(v, int) or v > REFERENCE_SCHEMA:
        raise CompareError(f"{path}: reference schema version {v!r} is newer than this specbench reads "
                           f"({REFERENCE_SCHEMA}); upgrade specbench")
    cells = data.get("cells")
    if not isinstance(cells, list) or not all(isinstance(c, dict) for c in cells):
        raise CompareError(f"{path}: 'cells' must be a list of objects")
    for i, c in enumerate(cells):
        for k in ("target", "method", "dataset", "temperature", "tau"):
            if k not in c:
                raise CompareError(f"{path}: cells[{i}] lacks {k!r}")
    tol = data.get("tolerance") or EMBEDDED_TOLERANCE
    for m, spec in tol.items():
        if not isinstance(spec, dict) or not is_num(spec.get("rel")) or not 0 < spec["rel"] < 1:
            raise CompareError(f"{path}: tolerance.{m}.rel must be a number in (0, 1)")
    data["tolerance"] = tol
    return data


def load_claims(path: Path) -> list[dict]:
    """The ordering claims of a `specbench.claims` file (baselines/embedded/claims.json)."""
    data = read_json(Path(path))
    if not isinstance(data, dict) or data.get("kind") != CLAIMS_KIND or not isinstance(data.get("claims"), list):
        raise CompareError(f"{path}: not a specbench claims file (kind {CLAIMS_KIND!r} with a claims list)")
    for i, c in enumerate(data["claims"]):
        if not isinstance(c, dict) or not all(isinstance(c.get(k), str) for k in ("id", "text", "better", "worse",
                                                                                  "metric")):
            raise CompareError(f"{path}: claims[{i}] needs id, text, better, worse and metric (strings)")
        for k, low in (("min_ratio", 0.0), ("min_delta", None)):
            if k in c and not (is_num(c[k]) and (low is None or c[k] > low)):
                raise CompareError(f"{path}: claims[{i}].{k} must be a number" + (f" > {low:g}" if low is not None
                                                                                   else ""))
        if "temperatures" in c and (not isinstance(c["temperatures"], list)
                                    or not all(is_num(t) for t in c["temperatures"])):
            raise CompareError(f"{path}: claims[{i}].temperatures must be a list of numbers")
        if "datasets" in c and (not isinstance(c["datasets"], list)
                                or not all(isinstance(d, str) for d in c["datasets"])):
            raise CompareError(f"{path}: claims[{i}].datasets must be a list of dataset names")
    return data["claims"]


def embedded_references(root: Path = EMBEDDED_DIR) -> tuple[list[dict], list[dict]]:
    """(reference documents, claims) under baselines/embedded/."""
    refs, claims = [], []
    if Path(root).is_dir():
        for p in sorted(Path(root).glob("*.json")):
            data = read_json(p)
            kind = data.get("kind") if isinstance(data, dict) else None
            if kind == REFERENCE_KIND:
                doc = load_reference_file(p)
                doc["_path"] = display_path(p)
                refs.append(doc)
            elif kind == CLAIMS_KIND:
                claims += load_claims(p)
    return refs, claims


def load_references(baseline: str | None = None, *, none: bool = False,
                    tolerance: dict | None = None) -> RefSet:
    """The references: `baseline` (a file of any supported kind) or all of baselines/ (papers + embedded)."""
    rs = RefSet(tolerance_override=dict(tolerance or {}))
    if none:
        return rs
    if baseline is None:
        rs.rows = load_baselines()
        rs.kinds.append("paper")
        refs, claims = embedded_references()
        embedded = RefSet.of_documents(refs, claims)
        rs.cells, rs.claims = embedded.cells, embedded.claims
        rs.kinds += embedded.kinds
        return rs
    path = Path(baseline)
    if path.is_dir():
        raise CompareError(f"--baseline {baseline}: a directory; give one file (omit --baseline for all of baselines/)")
    data = read_json(path)
    if isinstance(data, dict) and data.get("kind") == REFERENCE_KIND:
        doc = load_reference_file(path)
        rs.cells = [(c, doc["tolerance"], str(path)) for c in doc["cells"]]
        rs.kinds.append("embedded")
    elif isinstance(data, dict) and data.get("kind") == CLAIMS_KIND:
        rs.claims = load_claims(path)
    elif isinstance(data, dict) and "rows" in data and "tolerance" in data:
        rs.rows = load_file(path)
        rs.kinds.append("paper")
    else:
        runs = load_run_file(path)
        tol = {m: {"rel": RUN_TOLERANCE[m], "gate": True, "same_hardware": m != "tau"} for m in METRICS}
        rs.cells = [(reference_cell(r), tol, str(path)) for r in runs]
        rs.kinds.append("run")
    return rs
