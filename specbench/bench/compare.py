"""`specbench compare`: runs side by side, deltas against references, a verdict per cell, a CI gate.

Inputs (files, directories or quoted globs):

- results JSON written by `specbench run` or by the suites (`pytest suites/`);
- pytest-benchmark JSON written by `pytest suites/ --benchmark-json FILE` (each suite case
  stores its run under ``extra_info["specbench"]``);
- Spec-Bench answer JSONL (``*.jsonl``; the vanilla answers with ``--specbench-base``).

References (``--baseline FILE``, else everything under ``baselines/``):

- the papers' tables (``baselines/*.json``, main-table rows), judged by
  ``baselines.judge`` (tau 3 %; speedup 15 % and only on the paper's GPU class);
- this project's recorded embedded runs (``baselines/embedded/*.json``, kind
  ``specbench.reference``): tau gated, speedup and tokens/s shown but never gated;
- another results / pytest-benchmark file given with ``--baseline``: run against run
  (speed metrics only when both ran on the same hardware).

Verdicts: ``pass`` (within tolerance), ``regress`` / ``improve`` (worse / better beyond
tolerance), ``not comparable`` (no reference, other hardware, other settings, a headline
claim ...).  Exit status: 0; 1 with ``--gate`` when a cell regressed; 2 on unusable input
(one line on stderr, nothing written).
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable

from ..errors import SpecbenchError, UsageError
from . import results as _results
from .baselines import DEFAULT_ROOT, KNOWN_TARGETS, BaselineRow, find, judge, load_file

__all__ = [
    "CompareError", "Run", "Cell", "Reference", "METRICS", "VERDICTS",
    "load_inputs", "load_references", "compare", "render", "gate_failures",
    "benchmark_record", "reference_document", "load_reference_file", "load_claims", "check_claims",
    "add_parser", "cmd_compare", "main",
]

REFERENCE_KIND = "specbench.reference"
CLAIMS_KIND = "specbench.claims"
REFERENCE_SCHEMA = 1
EMBEDDED_DIR = DEFAULT_ROOT / "embedded"

METRICS = ("tau", "speedup", "tokens_per_s")
METRIC_LABEL = {"tau": "tau", "speedup": "speedup", "tokens_per_s": "tokens/s"}
VERDICTS = ("pass", "regress", "improve", "not comparable")
# run-against-run tolerances (relative); the papers' files and reference files carry their own
RUN_TOLERANCE = {"tau": 0.03, "speedup": 0.15, "tokens_per_s": 0.15}
# the embedded reference: tau deterministic at T=0 -> tight; speed on a shared CPU -> never gated
EMBEDDED_TOLERANCE = {"tau": {"rel": 0.02, "gate": True}, "speedup": {"rel": 0.15, "gate": False},
                      "tokens_per_s": {"rel": 0.15, "gate": False}}
_PROVENANCE_RANK = {"[paper]": 0, "[code]": 1, "[abstract]": 2, "[secondary]": 3, "[derived]": 4}
_METHOD_ORDER = ["vanilla", "pld", "lookahead", "sps", "medusa", "hydra", "eagle", "eagle2", "hass", "fspad",
                 "kld", "tvd", "tvdpp"]
_FORMATS = {"plain": "simple", "github": "github", "markdown": "pipe", "csv": None}


class CompareError(SpecbenchError):
    """Unusable compare input (the CLI prints it as one line and exits 2)."""


def _one_line(msg: str) -> str:
    return " ".join(str(msg).split())


# ---------------------------------------------------------------- runs


@dataclass
class Run:
    """One method's measurement on one (target, dataset, temperature), with its vanilla twin."""

    source: str
    target: str  # as recorded (embedded name, local path or HF id)
    target_key: str  # canonical baselines name when known (e.g. llama2-chat-7b), else `target`
    target_sha: str | None
    method: str
    params: dict
    dataset: str
    temperature: float
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    limit: int | None = None
    max_new_tokens: int | None = None
    prompt_ids: list | None = None
    summary: dict = field(default_factory=dict)
    vanilla: dict | None = None
    env: dict = field(default_factory=dict)
    status: str = "complete"
    greedy: dict | None = None
    suite: dict | None = None
    label: str = ""
    extra: dict = field(default_factory=dict)  # e.g. Spec-Bench speed.py numbers of an imported file

    @property
    def hardware(self) -> str | None:
        """Accelerator name (GPU) of the run, None on CPU."""
        return self.env.get("gpu")

    @property
    def machine(self) -> str | None:
        return self.env.get("gpu") or self.env.get("cpu")

    def value(self, metric: str) -> float | None:
        if self.method == "vanilla":
            if metric == "tokens_per_s":
                return (self.vanilla or self.summary).get("tokens_per_s")
            return 1.0
        v = self.summary.get(metric)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None

    def setting_key(self) -> tuple:
        return (self.target_key, self.dataset, self.temperature)


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _norm(obj):
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


_TARGET_MAP: dict[str, str] | None = None


def _target_aliases() -> dict[str, str]:
    """hf id / hf id basename (lowercase) -> canonical target name, from the papers' baselines files."""
    global _TARGET_MAP
    if _TARGET_MAP is None:
        m: dict[str, str] = {}
        for path in sorted(DEFAULT_ROOT.glob("*.json")):
            try:
                targets = json.loads(path.read_text()).get("targets", {})
            except (OSError, ValueError, AttributeError):
                continue
            for name, spec in targets.items():
                hf = str(spec.get("hf_id", "")).lower()
                if hf:
                    m.setdefault(hf, name)
                    m.setdefault(hf.rsplit("/", 1)[-1], name)
                m.setdefault(name.lower(), name)
        _TARGET_MAP = m
    return _TARGET_MAP


def canonical_target(name: str, suite: dict | None = None) -> str:
    """The baselines' target name for a recorded target (path, HF id or name); `name` when unknown."""
    if suite and suite.get("paper_target"):
        return str(suite["paper_target"])
    if name in KNOWN_TARGETS:
        return name
    aliases = _target_aliases()
    low = str(name).lower().rstrip("/")
    for key in (low, low.rsplit("/", 1)[-1], "/".join(low.split("/")[-2:])):
        if key in aliases:
            return aliases[key]
    return str(name)


def _runs_from_doc(doc: dict, source: str) -> list[Run]:
    """The method run of a results document (config/summary/environment), or its vanilla run."""
    cfg = doc.get("config")
    summ = doc.get("summary")
    if not isinstance(cfg, dict) or not isinstance(summ, dict):
        raise CompareError(f"{source}: no config/summary")
    try:
        method = str(cfg["method"])
        dataset = str(cfg["dataset"])
        sampling = cfg.get("sampling") or {}
        temperature = float(sampling.get("temperature", cfg.get("temperature", 0.0)))
        tgt = cfg.get("target") or {}
        tname = str(tgt.get("name") if isinstance(tgt, dict) else tgt)
    except (KeyError, TypeError, ValueError) as e:
        raise CompareError(f"{source}: config lacks {e} (method, dataset, sampling.temperature, target)") from None
    suite = doc.get("suite") if isinstance(doc.get("suite"), dict) else None
    vanilla = summ.get("vanilla") if isinstance(summ.get("vanilla"), dict) else None
    mine = summ.get(method)
    if not isinstance(mine, dict):
        if doc.get("samples") == [] or not summ:
            raise CompareError(f"{source}: the run holds no finished prompt (status {doc.get('status', '?')}); "
                               f"resume it or delete it")
        raise CompareError(f"{source}: summary has no entry for method {method!r}")
    run = Run(
        source=source, target=tname, target_key=canonical_target(tname, suite),
        target_sha=(tgt.get("weights_sha256") if isinstance(tgt, dict) else None),
        method=method, params=_norm(cfg.get("params") or {}), dataset=dataset, temperature=temperature,
        top_k=int(sampling.get("top_k", 0) or 0), top_p=float(sampling.get("top_p", 1.0) or 1.0),
        seed=cfg.get("seed"), limit=cfg.get("limit"), max_new_tokens=cfg.get("max_new_tokens"),
        prompt_ids=cfg.get("prompt_ids"), summary=mine, vanilla=vanilla, env=doc.get("environment") or {},
        status=str(doc.get("status", "complete")), greedy=summ.get("greedy_identical"), suite=suite,
        extra=dict(doc.get("compare_extra") or {}),
    )
    return [run]


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
        for r in _runs_from_doc(rec, f"{source}::{b.get('name', '?')}"):
            r.extra["results_file"] = rec.get("results_file")
            runs.append(r)
    if not runs:
        raise CompareError(f"{source}: a pytest-benchmark file without specbench runs (no extra_info['specbench']; "
                           f"write it with `pytest suites/ --benchmark-only --benchmark-json FILE`)")
    return runs


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text()
    except OSError as e:
        raise CompareError(f"{path}: cannot read ({e.strerror})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        _results.load(path)  # raises the project's one-line "truncated or corrupt" error
        raise  # pragma: no cover


def load_run_file(path: Path, specbench_base: Path | None = None) -> list[Run]:
    """Runs held by one input file (results JSON, pytest-benchmark JSON or Spec-Bench answers JSONL)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        from . import specbench_jsonl

        return [r for doc in specbench_jsonl.import_results(path, specbench_base)
                for r in _runs_from_doc(doc, str(path) + (f"::{doc['config']['dataset']}"))]
    data = _read_json(path)
    if _is_benchmark_json(data):
        return _runs_from_benchmark_json(data, str(path))
    if isinstance(data, dict) and data.get("kind") in (REFERENCE_KIND, CLAIMS_KIND):
        raise CompareError(f"{path}: a {data['kind']} file is a reference, not a run; pass it with --baseline")
    if isinstance(data, dict) and "rows" in data and "tolerance" in data:
        raise CompareError(f"{path}: a papers' baselines file is a reference, not a run; pass it with --baseline")
    doc = _results.load(path)
    return _runs_from_doc(doc, str(path))


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
                allow_mixed_targets: bool = False) -> list[Run]:
    patterns = list(patterns)
    if not patterns:
        raise CompareError("no results files given (expected results/*.json, a directory or a pytest-benchmark JSON)")
    paths = expand_inputs(patterns)
    base = Path(specbench_base) if specbench_base else None
    runs: list[Run] = []
    for p in paths:
        runs += load_run_file(p, base)
    # a pytest-benchmark record of a run whose results file is also an input: keep the results file
    given = {p.resolve() for p in paths}
    runs = [r for r in runs if not (r.extra.get("results_file") and Path(r.extra["results_file"]).resolve() in given)]
    _check_targets(runs, allow_mixed_targets)
    _assign_labels(runs)
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


def _assign_labels(runs: list[Run]) -> None:
    by_method: dict[str, list[Run]] = {}
    for r in runs:
        by_method.setdefault(r.method, []).append(r)
    for method, rs in by_method.items():
        distinct = {json.dumps(r.params, sort_keys=True) for r in rs}
        if len(distinct) <= 1:
            for r in rs:
                r.label = method
            continue
        keys = sorted({k for r in rs for k in r.params})
        differing = [k for k in keys if len({json.dumps(r.params.get(k), sort_keys=True) for r in rs}) > 1]
        for r in rs:
            r.label = method + "[" + ",".join(f"{k}={r.params.get(k)}" for k in differing) + "]"


def _check_duplicates(runs: list[Run]) -> None:
    seen: dict[tuple, Run] = {}
    for r in runs:
        key = (*r.setting_key(), r.label)
        if key in seen and r.method != "vanilla":
            o = seen[key]
            raise CompareError(f"mismatched runs: {o.source} and {r.source} both hold {r.label} on {r.dataset} "
                               f"T={r.temperature:g} for {r.target_key}; pass one of them")
        seen.setdefault(key, r)


# ---------------------------------------------------------------- references


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
    rows: list[BaselineRow] = field(default_factory=list)
    cells: list[tuple[dict, dict, str]] = field(default_factory=list)  # (cell, tolerance, source)
    kinds: list[str] = field(default_factory=list)
    claims: list[dict] = field(default_factory=list)
    tolerance_override: dict = field(default_factory=dict)


def _cell_from_run(r: Run) -> dict:
    return {
        "target": r.target_key, "target_sha256": r.target_sha, "method": r.method, "params": r.params,
        "dataset": r.dataset, "temperature": r.temperature, "top_k": r.top_k, "top_p": r.top_p, "seed": r.seed,
        "limit": r.limit, "max_new_tokens": r.max_new_tokens, "prompt_ids": r.prompt_ids,
        "tau": r.value("tau"), "tau_macro": r.summary.get("tau_macro"), "alpha_k": r.summary.get("alpha_k"),
        "reached_k": r.summary.get("reached_k"), "speedup": r.value("speedup"),
        "tokens_per_s": r.value("tokens_per_s"),
        "vanilla_tokens_per_s": (r.vanilla or {}).get("tokens_per_s"),
        "new_tokens": r.summary.get("new_tokens"), "steps": r.summary.get("steps"),
        "greedy_identical": r.greedy, "hardware": {"gpu": r.env.get("gpu"), "cpu": r.env.get("cpu")},
        "source": r.source,
    }


def load_reference_file(path: Path) -> dict:
    """A `specbench.reference` file (baselines/embedded/*.json), validated."""
    path = Path(path)
    data = _read_json(path)
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
        if not isinstance(spec, dict) or not _num(spec.get("rel")) or not 0 < spec["rel"] < 1:
            raise CompareError(f"{path}: tolerance.{m}.rel must be a number in (0, 1)")
    data["tolerance"] = tol
    return data


def _display(p: Path) -> str:
    """A path relative to the working directory when it lies below it (shorter table notes)."""
    try:
        return str(Path(p).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


def load_claims(path: Path) -> list[dict]:
    data = _read_json(Path(path))
    if not isinstance(data, dict) or data.get("kind") != CLAIMS_KIND or not isinstance(data.get("claims"), list):
        raise CompareError(f"{path}: not a specbench claims file (kind {CLAIMS_KIND!r} with a claims list)")
    for i, c in enumerate(data["claims"]):
        if not isinstance(c, dict) or not all(isinstance(c.get(k), str) for k in ("better", "worse", "metric")):
            raise CompareError(f"{path}: claims[{i}] needs better, worse and metric")
    return data["claims"]


def embedded_references(root: Path = EMBEDDED_DIR) -> tuple[list[dict], list[dict]]:
    """(reference documents, claims) under baselines/embedded/."""
    refs, claims = [], []
    if Path(root).is_dir():
        for p in sorted(Path(root).glob("*.json")):
            data = _read_json(p)
            kind = data.get("kind") if isinstance(data, dict) else None
            if kind == REFERENCE_KIND:
                doc = load_reference_file(p)
                doc["_path"] = _display(p)
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
        from .baselines import load_baselines

        rs.rows = load_baselines()
        rs.kinds.append("paper")
        refs, rs.claims = embedded_references()
        for doc in refs:
            rs.cells += [(c, doc["tolerance"], doc["_path"]) for c in doc["cells"]]
        if refs:
            rs.kinds.append("embedded")
        return rs
    path = Path(baseline)
    if path.is_dir():
        raise CompareError(f"--baseline {baseline}: a directory; give one file (omit --baseline for all of baselines/)")
    data = _read_json(path)
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
        rs.cells = [(_cell_from_run(r), tol, str(path)) for r in runs]
        rs.kinds.append("run")
    return rs


# ---------------------------------------------------------------- verdicts


@dataclass
class Cell:
    run: Run
    metric: str
    value: float | None
    ref: Reference | None = None
    verdict: str = "not comparable"
    reason: str = "no reference"
    others: list[Reference] = field(default_factory=list)  # further matching references (not gated)

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


def _dataset_size(name: str) -> int | None:
    """Prompts in a vendored evaluation set (None if unknown); json only, no `datasets` import."""
    if name not in _DATASET_SIZES:
        try:
            from .datasets import DATA_DIR, DATASETS

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


_MATCH_FIELDS = ("target_sha256", "params", "top_k", "top_p", "seed", "max_new_tokens", "prompt_ids")


def _cell_mismatch(cell: dict, run: Run) -> str | None:
    mine = _cell_from_run(run)
    for k in _MATCH_FIELDS:
        a, b = cell.get(k), mine.get(k)
        if k == "target_sha256" and (a is None or b is None):
            continue
        if k == "seed" and (a is None or b is None):
            continue
        if _norm(a) != _norm(b):
            if k == "prompt_ids":
                return (f"other prompts ({len(a or [])} in the reference, {len(b or [])} here)"
                        if a and b else "prompt set unknown")
            if k == "target_sha256":
                return "other target weights"
            if k == "params":
                diff = sorted(set(a or {}) | set(b or {}))
                diff = [d for d in diff if _norm((a or {}).get(d)) != _norm((b or {}).get(d))]
                return "other method parameters (" + ", ".join(
                    f"{d}: {(a or {}).get(d)!r} vs {(b or {}).get(d)!r}" for d in diff) + ")"
            return f"other {k} ({a!r} in the reference, {b!r} here)"
    return None


def _cell_refs(rs: RefSet, run: Run, metric: str) -> tuple[list[Reference], str | None]:
    cands = [(c, tol, src) for c, tol, src in rs.cells
             if c.get("target") == run.target_key and c.get("method") == run.method
             and c.get("dataset") == run.dataset and _num(c.get("temperature"))
             and abs(float(c["temperature"]) - run.temperature) < 1e-9]
    out, why = [], None
    for c, tol, src in cands:
        v = c.get(metric)
        if not _num(v):
            continue
        spec = tol.get(metric, {"rel": RUN_TOLERANCE.get(metric, 0.03), "gate": False})
        rel = float(rs.tolerance_override.get(metric, spec["rel"]))
        kind = "run" if spec.get("same_hardware") is not None else "embedded"
        ref = Reference(float(v), src, rel, bool(spec.get("gate", True)), cell=c, kind=kind)
        mism = _cell_mismatch(c, run)
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
        if _cell_mismatch(c, run) is not None:
            cell.reason = mismatch or "other settings"
            return
        if not ref.gated:
            cell.reason = f"{METRIC_LABEL[metric]} is recorded, not gated, on this reference (a shared CPU)"
            return
        spec_same_hw = ref.kind == "run" and metric != "tau"
        if spec_same_hw:
            hw_ref = (c.get("hardware") or {})
            here, there = run.machine, hw_ref.get("gpu") or hw_ref.get("cpu")
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
        size = _dataset_size(run.dataset)
        if size and n and n < size:
            cell.reason = f"run used {n} of the {size} prompts"
            return
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
             if row.tree.get(k) is not None and k in run.params and _num(run.params[k])
             and int(run.params[k]) != int(row.tree[k])]
    return ("other draft tree (" + ", ".join(diffs) + ")") if diffs else None


def compare(runs: list[Run], rs: RefSet) -> list[Cell]:
    cells = []
    for run in runs:
        for m in METRICS:
            c = Cell(run, m, run.value(m))
            _judge_cell(c, rs)
            cells.append(c)
    return cells


def gate_failures(cells: list[Cell]) -> list[Cell]:
    return [c for c in cells if c.verdict == "regress"]


# ---------------------------------------------------------------- claims


def check_claims(runs: list[Run], claims: list[dict]) -> list[dict]:
    """Ordering claims (e.g. tau(hass) > tau(eagle2)) on every (target, dataset, T) holding both methods."""
    by_setting: dict[tuple, dict[str, Run]] = {}
    for r in runs:
        by_setting.setdefault(r.setting_key(), {}).setdefault(r.method, r)
    out = []
    for cl in claims:
        for key, methods in sorted(by_setting.items(), key=lambda kv: str(kv[0])):
            a, b = methods.get(cl["better"]), methods.get(cl["worse"])
            if a is None or b is None:
                continue
            if cl.get("datasets") and key[1] not in cl["datasets"]:
                continue
            if cl.get("temperatures") is not None and key[2] not in [float(t) for t in cl["temperatures"]]:
                continue
            va, vb = a.value(cl["metric"]), b.value(cl["metric"])
            holds = va is not None and vb is not None and va > vb
            out.append({"claim": cl, "target": key[0], "dataset": key[1], "temperature": key[2],
                        "better": va, "worse": vb, "holds": holds})
    return out


# ---------------------------------------------------------------- rendering


def _fmt(metric: str, v: float | None) -> str:
    if v is None:
        return "-"
    if metric == "tau":
        return f"{v:.3f}"
    if metric == "speedup":
        return f"{v:.2f}x"
    return f"{v:.1f}"


_SHORT = {"pass": "pass", "regress": "REGRESS", "improve": "improve", "not comparable": "n/c"}


def _cell_text(c: Cell) -> str:
    s = _fmt(c.metric, c.value)
    if c.ref is not None and c.value is not None:
        d = c.delta_rel
        s += f" vs {_fmt(c.metric, c.ref.value)} ({d:+.1%}) {_SHORT[c.verdict]}" if d is not None else ""
    return s


def _method_sort_key(label: str) -> tuple:
    base = label.split("[", 1)[0]
    return (_METHOD_ORDER.index(base) if base in _METHOD_ORDER else len(_METHOD_ORDER), label)


def _vanilla_runs(runs: list[Run]) -> list[Run]:
    """One vanilla pseudo-run per (target, dataset, T): the vanilla twins pooled (tokens / wall time)."""
    pooled: dict[tuple, dict] = {}
    proto: dict[tuple, Run] = {}
    for r in runs:
        v = r.vanilla if r.method != "vanilla" else (r.vanilla or r.summary)
        if not v:
            continue
        k = r.setting_key()
        acc = pooled.setdefault(k, {"new_tokens": 0, "wall_s": 0.0, "tps": []})
        if _num(v.get("new_tokens")) and _num(v.get("wall_s")) and v["wall_s"] > 0:
            acc["new_tokens"] += v["new_tokens"]
            acc["wall_s"] += v["wall_s"]
        elif _num(v.get("tokens_per_s")):
            acc["tps"].append(v["tokens_per_s"])
        proto.setdefault(k, r)
    out = []
    for k, acc in pooled.items():
        tps = acc["new_tokens"] / acc["wall_s"] if acc["wall_s"] else (
            sum(acc["tps"]) / len(acc["tps"]) if acc["tps"] else None)
        p = proto[k]
        out.append(replace(p, method="vanilla", label="vanilla", params={}, summary={"tokens_per_s": tps},
                           vanilla={"tokens_per_s": tps}, source=p.source))
    return out


def table_rows(cells: list[Cell], vanilla: list[Run]) -> tuple[list[str], list[list[str]]]:
    labels = sorted({c.run.label for c in cells} | ({"vanilla"} if vanilla else set()), key=_method_sort_key)
    grid: dict[tuple, dict[str, dict[str, str]]] = {}
    for c in cells:
        grid.setdefault(c.run.setting_key(), {}).setdefault(c.run.label, {})[c.metric] = _cell_text(c)
    for v in vanilla:
        d = grid.setdefault(v.setting_key(), {}).setdefault("vanilla", {})
        d.setdefault("tau", "1.000")
        d.setdefault("speedup", "1.00x")
        d.setdefault("tokens_per_s", _fmt("tokens_per_s", v.value("tokens_per_s")))
    headers = ["target", "dataset", "T", "metric"] + labels
    rows = []
    for key in sorted(grid, key=lambda k: (k[0], k[1], k[2])):
        for i, m in enumerate(METRICS):
            lead = [key[0], key[1], f"{key[2]:g}"] if i == 0 else ["", "", ""]
            rows.append(lead + [METRIC_LABEL[m]] + [grid[key].get(lab, {}).get(m, "") for lab in labels])
    return headers, rows


CSV_FIELDS = ["target", "dataset", "temperature", "method", "metric", "value", "reference", "reference_source",
              "delta_rel", "tolerance_rel", "verdict", "reason", "source"]


def render_csv(cells: list[Cell], vanilla: list[Run]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_FIELDS)
    for v in sorted(vanilla, key=lambda r: r.setting_key()):
        for m in METRICS:
            w.writerow([v.target_key, v.dataset, f"{v.temperature:g}", "vanilla", m, _csv_num(v.value(m)),
                        "", "", "", "", "not comparable", "the denominator", v.source])
    for c in sorted(cells, key=lambda c: (c.run.setting_key(), _method_sort_key(c.run.label), METRICS.index(c.metric))):
        r = c.run
        w.writerow([r.target_key, r.dataset, f"{r.temperature:g}", r.label, c.metric, _csv_num(c.value),
                    _csv_num(c.ref.value if c.ref else None), c.ref.source if c.ref else "",
                    _csv_num(c.delta_rel), _csv_num(c.ref.tolerance_rel if c.ref else None), c.verdict, c.reason,
                    r.source])
    return buf.getvalue()


def _csv_num(v) -> str:
    return "" if v is None else f"{v:.6g}"


def render(cells: list[Cell], vanilla: list[Run], fmt: str = "plain") -> str:
    if fmt not in _FORMATS:
        raise UsageError(f"--format {fmt!r}: use one of {', '.join(_FORMATS)}")
    if fmt == "csv":
        return render_csv(cells, vanilla)
    from tabulate import tabulate

    headers, rows = table_rows(cells, vanilla)
    return tabulate(rows, headers=headers, tablefmt=_FORMATS[fmt], disable_numparse=True) + "\n"


def notes(runs: list[Run], cells: list[Cell], rs: RefSet, claim_results: list[dict]) -> list[str]:
    out = []
    counts = {v: sum(c.verdict == v for c in cells) for v in VERDICTS}
    src = " + ".join(rs.kinds) if rs.kinds else "none"
    out.append(f"verdicts ({len(cells)} cells, references: {src}): " + ", ".join(f"{counts[v]} {v}" for v in VERDICTS))
    reasons: dict[str, int] = {}
    for c in cells:
        if c.verdict == "not comparable" and c.run.method != "vanilla":
            reasons[c.reason] = reasons.get(c.reason, 0) + 1
    for r, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
        out.append(f"  n/c x{n}: {r}")
    pooled = {}
    for r in runs:
        if r.method != "vanilla" and r.vanilla:
            pooled[r.setting_key()] = pooled.get(r.setting_key(), 0) + 1
    if any(n > 1 for n in pooled.values()):
        out.append("vanilla tokens/s: pooled over the vanilla twins of the runs in a row; each method's speedup "
                   "divides by its own twin, timed alongside it")
    refs_used = sorted({c.ref.source for c in cells if c.ref is not None})
    if refs_used:
        out.append("reference values from: " + "; ".join(refs_used))
    for r in runs:
        if r.status != "complete":
            out.append(f"warning: {r.source} is a {r.status} run (resume it to finish)")
        g = r.greedy
        if isinstance(g, dict) and g.get("compared") and g.get("identical") != g.get("compared"):
            out.append(f"warning: {r.source}: greedy output equals vanilla on {g.get('identical')}/{g.get('compared')} "
                       f"samples (see the samples' divergence: a numerical tie or a losslessness bug)")
        sb = r.extra.get("specbench_speed")
        if sb:
            out.append(f"{r.source}: Spec-Bench speed.py convention (mean of per-question tokens/s): speedup "
                       f"{_fmt('speedup', sb.get('speedup_ratio'))}, mean accepted tokens "
                       f"{_fmt('tau', sb.get('mean_accepted_tokens'))}")
    for cr in claim_results:
        cl = cr["claim"]
        out.append(f"claim {cl['better']} {cl['metric']} > {cl['worse']} {cl['metric']} ({cl.get('source', '')}) on "
                   f"{cr['target']} {cr['dataset']} T={cr['temperature']:g}: "
                   f"{'holds' if cr['holds'] else 'VIOLATED'} ({_fmt(cl['metric'], cr['better'])} vs "
                   f"{_fmt(cl['metric'], cr['worse'])})")
    return out


# ---------------------------------------------------------------- records for the suites / references


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
    cells = [_cell_from_run(r) for r in sorted(runs, key=lambda r: (r.setting_key(), r.label)) if r.method != "vanilla"]
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


# ---------------------------------------------------------------- CLI


def add_parser(sub) -> argparse.ArgumentParser:
    c = sub.add_parser("compare", help="table of runs with deltas and verdicts against baselines; CI gate",
                       description=__doc__.split("\n\n")[0])
    c.add_argument("files", nargs="*", metavar="FILE",
                   help="results JSON, pytest-benchmark JSON, Spec-Bench answers JSONL, directories or quoted globs")
    c.add_argument("--baseline", metavar="FILE",
                   help="reference file: results / pytest-benchmark JSON, baselines/embedded/*.json or a papers' "
                        "baselines file (default: all of baselines/)")
    c.add_argument("--no-baseline", action="store_true", help="no references: only the table")
    c.add_argument("--format", default="plain", choices=list(_FORMATS))
    c.add_argument("--gate", action="store_true", help="exit 1 if any cell regressed beyond tolerance")
    c.add_argument("--tolerance", action="append", default=[], metavar="METRIC=REL",
                   help="override a relative tolerance, e.g. tau=0.01 (repeatable)")
    c.add_argument("--allow-mixed-targets", action="store_true", help="allow runs on different targets in one table")
    c.add_argument("--plot", metavar="FILE.png", help="alpha_k per draft depth and speedup bars (needs matplotlib)")
    c.add_argument("--specbench-base", metavar="FILE.jsonl",
                   help="Spec-Bench vanilla answers paired with the *.jsonl inputs (for speedup)")
    c.add_argument("--export-specbench", metavar="DIR",
                   help="write Spec-Bench answer JSONL files (method + its vanilla) for each run")
    c.add_argument("--tokenizer", metavar="DIR", help="tokenizer for the exported answer text (default: the target's)")
    c.add_argument("--write-reference", metavar="FILE",
                   help="record the inputs as a reference file (e.g. baselines/embedded/smollm2-135m-quick.json)")
    c.set_defaults(func=cmd_compare)
    return c


def _tolerances(pairs: list[str]) -> dict:
    out = {}
    for p in pairs:
        k, sep, v = p.partition("=")
        try:
            rel = float(v)
        except ValueError:
            rel = -1.0
        if not sep or k not in METRICS or not 0 < rel < 1:
            raise UsageError(f"--tolerance expects METRIC=REL with METRIC in {', '.join(METRICS)} and 0<REL<1, got {p!r}")
        out[k] = rel
    return out


def _check_outputs(args, inputs: list[Path]) -> None:
    ins = {p.resolve() for p in inputs}
    if args.baseline:
        ins.add(Path(args.baseline).resolve())
    for opt in ("plot", "write_reference"):
        out = getattr(args, opt)
        if out and Path(out).resolve() in ins:
            raise UsageError(f"--{opt.replace('_', '-')} {out} is one of the inputs; refusing to overwrite it")
        if out and Path(out).is_dir():
            raise UsageError(f"--{opt.replace('_', '-')} {out} is a directory; give a file name")
    if args.plot and not str(args.plot).lower().endswith((".png", ".svg", ".pdf")):
        raise UsageError(f"--plot {args.plot}: give a .png (or .svg/.pdf) file name")


def _command_line(args) -> str:
    """The compare command as given (for the reference's provenance)."""
    import shlex

    parts = ["specbench", "compare", *args.files]
    for opt in ("baseline", "format", "plot", "specbench_base", "write_reference"):
        v = getattr(args, opt)
        if v is not None and not (opt == "format" and v == "plain"):
            parts += [f"--{opt.replace('_', '-')}", str(v)]
    for flag in ("no_baseline", "allow_mixed_targets", "gate"):
        if getattr(args, flag):
            parts.append(f"--{flag.replace('_', '-')}")
    parts += [f"--tolerance={t}" for t in args.tolerance]
    return shlex.join(parts)


def cmd_compare(args) -> int:
    tol = _tolerances(args.tolerance)
    if args.no_baseline and args.baseline:
        raise UsageError("--baseline and --no-baseline exclude each other")
    if not args.files:
        raise CompareError("no results files given (the glob matched nothing?); expected results/*.json, "
                           "a directory or a pytest-benchmark JSON")
    paths = expand_inputs(args.files)
    _check_outputs(args, paths)
    runs = load_inputs([str(p) for p in paths], args.specbench_base, args.allow_mixed_targets)
    rs = load_references(args.baseline, none=args.no_baseline, tolerance=tol)
    method_runs = [r for r in runs if r.method != "vanilla"]
    vanilla = _vanilla_runs(runs)
    cells = compare(method_runs, rs)
    claim_results = check_claims(method_runs, rs.claims)
    if args.plot:  # before any output: a missing matplotlib is a usage error (exit 2), nothing half-done
        from .plot import plot_runs

        plot_runs(method_runs, vanilla, Path(args.plot))
    text = render(cells, vanilla, args.format)
    sys.stdout.write(text)
    info = sys.stderr if args.format == "csv" else sys.stdout
    for line in notes(runs, cells, rs, claim_results):
        print(line, file=info)
    if args.plot:
        print(f"plot: {args.plot}", file=info)
    if args.export_specbench:
        from . import specbench_jsonl

        written = specbench_jsonl.export_runs([r.source for r in runs if r.source.endswith(".json")
                                               and "::" not in r.source], Path(args.export_specbench),
                                              tokenizer=args.tokenizer)
        for p in written:
            print(f"spec-bench answers: {p}", file=info)
    if args.write_reference:
        cmd = _command_line(args)
        _results.write_atomic(Path(args.write_reference), reference_document(method_runs, command=cmd))
        print(f"reference written: {args.write_reference} ({len(method_runs)} cells)", file=info)
    if args.gate:
        bad = gate_failures(cells)
        if bad:
            for c in bad:
                print(f"gate: REGRESS {c.run.label} {METRIC_LABEL[c.metric]} on {c.run.target_key} {c.run.dataset} "
                      f"T={c.run.temperature:g}: {_fmt(c.metric, c.value)} vs {_fmt(c.metric, c.ref.value)} "
                      f"({c.delta_rel:+.1%}, tolerance {c.ref.tolerance_rel:.0%}, {c.ref.source})", file=sys.stderr)
            return 1
        gated = sum(c.verdict in ("pass", "improve") for c in cells)
        if gated == 0:
            print("gate: nothing was comparable with a reference (no cell could be gated)", file=sys.stderr)
        else:
            print(f"gate: ok ({gated} gated cells within tolerance or better)", file=info)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m specbench.bench.compare ...` (same as `specbench compare ...`)."""
    from ..cli import main as cli_main

    return cli_main(["compare", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
