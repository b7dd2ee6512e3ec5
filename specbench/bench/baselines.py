"""The papers' result tables (``baselines/*.json``) as validated rows.

Standard library only. See ``baselines/README.md`` for the schema, the names and the
tolerance policy. Typical use::

    rows = load_baselines()
    [r] = find(rows, paper="HASS", table="Table 1", target="llama2-chat-7b",
               method="hass", dataset="mt_bench", temperature=0.0, metric="tau")
    verdict = judge(r, measured=4.91, env_hardware="NVIDIA H800 PCIe")
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from specbench.errors import SpecbenchError
from specbench.methods import catalogue

__all__ = [
    "BaselineError",
    "BaselineRow",
    "DEFAULT_ROOT",
    "METHODS",
    "DATASETS",
    "METRICS",
    "PROVENANCES",
    "KNOWN_TARGETS",
    "load_baselines",
    "load_file",
    "find",
    "hardware_matches",
    "judge",
]

SCHEMA_VERSION = 1
DEFAULT_ROOT = Path(__file__).resolve().parents[2] / "baselines"

# the canonical method names: the methods' catalogue (implemented or not; see baselines/README.md)
METHODS = catalogue.NAMES
DATASETS = frozenset({
    "mt_bench", "humaneval", "gsm8k", "alpaca", "nq", "cnn_dm",
    "translation", "summarization", "qa", "math_reasoning", "rag", "spec_bench",
    # TVD++ evaluation sets (no rows yet), and the aggregate "mean" column of a table
    "dolly", "xsum", "mean",
})
METRICS = frozenset({"tau", "speedup", "alpha", "tau_ratio", "tokens_per_s", "accuracy"})
PROVENANCES = frozenset({"[paper]", "[code]", "[abstract]", "[secondary]", "[derived]"})
KNOWN_TARGETS = frozenset({
    "vicuna-7b-v1.3", "vicuna-13b-v1.3", "vicuna-33b-v1.3", "vicuna-7b-v1.5",
    "llama2-chat-7b", "llama2-chat-13b", "llama2-chat-70b",
    "llama3-instruct-8b", "llama3-instruct-70b",
})
_TARGET_RE = re.compile(r"^[a-z0-9]+(?:[-.][a-z0-9]+)*$")
_ARXIV_RE = re.compile(r"^\d{4}\.\d{4,5}$")

_TOP_REQUIRED = ("schema_version", "paper", "title", "arxiv", "tolerance", "targets", "rows")
_TOP_OPTIONAL = ("venue", "source", "notes", "claims", "setup")
_ROW_REQUIRED = ("table", "target", "method", "dataset", "temperature", "metric", "value",
                 "hardware", "tree", "provenance")
_ROW_OPTIONAL = ("note",)
_TREE_KEYS = ("depth", "top_k", "total_tokens")
# extra row keys, each with a checker returning an error string or None
_EXTRA_KEYS = {
    "setting": lambda v: None if isinstance(v, str) and v.strip() else "must be a non-empty string",
    "mean_over": lambda v: None if isinstance(v, list) and len(v) >= 2 and all(
        x in DATASETS and x != "mean" for x in v) else "must be a list of >=2 canonical datasets",
    "mean_over_temperatures": lambda v: None if isinstance(v, list) and len(v) >= 2 and all(
        _is_num(x) for x in v) else "must be a list of >=2 temperatures",
    "bound": lambda v: None if v in ("max", "min") else "must be 'max' or 'min'",
    "depth": lambda v: None if _is_int(v) and v >= 0 else "must be an int >= 0",
    "gamma": lambda v: None if _is_int(v) and v >= 1 else "must be an int >= 1",
    "reported_as": lambda v: None if isinstance(v, str) and v else "must be a string",
    "baseline_method": lambda v: None if v in METHODS else "must be a canonical method",
    "draft": lambda v: None if isinstance(v, str) and v else "must be a string",
    "source_paper": lambda v: None if isinstance(v, str) and v else "must be a string",
    "hardware_class": lambda v: None if v is None or (isinstance(v, str) and v) else "must be a string or null",
}


class BaselineError(SpecbenchError, ValueError):
    """A baselines file does not follow the schema (message names the file and the field)."""


@dataclass(frozen=True)
class BaselineRow:
    paper: str
    arxiv: str
    table: str
    target: str
    method: str
    dataset: str | None
    temperature: float | None
    metric: str
    value: float
    hardware: str | None
    tree: dict | None = field(hash=False)
    provenance: str
    note: str | None
    tolerance_rel: float
    hardware_class: str | None
    extra: dict = field(default_factory=dict, hash=False)
    source_file: str = ""

    @property
    def setting(self) -> str | None:
        """Ablation setting (e.g. ``"topk_k=10,topk_w=1.0"``); None for main-table rows."""
        return self.extra.get("setting")

    def key(self) -> tuple:
        """Identity of a row; no two rows of the data share it."""
        return (self.paper, self.table, self.target, self.method, self.dataset,
                self.temperature, self.metric, self.setting)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _fail(path: Path, where: str, msg: str) -> BaselineError:
    return BaselineError(f"{path.name}: {where}: {msg}")


def _check_tolerance(path: Path, tol: Any) -> dict[str, dict]:
    if not isinstance(tol, dict) or not tol:
        raise _fail(path, "tolerance", "must be a non-empty object {metric: {rel: ...}}")
    for metric, spec in tol.items():
        where = f"tolerance.{metric}"
        if metric not in METRICS:
            raise _fail(path, where, f"unknown metric {metric!r}")
        if not isinstance(spec, dict):
            raise _fail(path, where, "must be an object")
        unknown = set(spec) - {"rel", "hardware_class"}
        if unknown:
            raise _fail(path, where, f"unknown key(s) {sorted(unknown)}")
        rel = spec.get("rel")
        if not _is_num(rel) or not 0 < rel < 1:
            raise _fail(path, f"{where}.rel", f"must be a number in (0, 1), got {rel!r}")
        if metric == "speedup" and "hardware_class" not in spec:
            raise _fail(path, f"{where}.hardware_class", "required for speedup (null if unknown)")
        hc = spec.get("hardware_class")
        if hc is not None and not (isinstance(hc, str) and hc.strip()):
            raise _fail(path, f"{where}.hardware_class", "must be a non-empty string or null")
    return tol


def _check_targets(path: Path, targets: Any) -> dict:
    if not isinstance(targets, dict) or not targets:
        raise _fail(path, "targets", "must be a non-empty object {name: {hf_id, drafts}}")
    for name, spec in targets.items():
        where = f"targets.{name}"
        if not _TARGET_RE.match(name):
            raise _fail(path, where, "target names are lowercase-hyphenated")
        if not isinstance(spec, dict) or not isinstance(spec.get("hf_id"), str) or "/" not in spec["hf_id"]:
            raise _fail(path, f"{where}.hf_id", "must be a Hugging Face id 'org/name'")
        drafts = spec.get("drafts", {})
        if not isinstance(drafts, dict) or any(m not in METHODS or not isinstance(d, str)
                                               for m, d in drafts.items()):
            raise _fail(path, f"{where}.drafts", "must map canonical methods to strings")
        unknown = set(spec) - {"hf_id", "drafts", "note"}
        if unknown:
            raise _fail(path, where, f"unknown key(s) {sorted(unknown)}")
    return targets


def _check_row(path: Path, i: int, r: Any, targets: dict, tol: dict) -> None:
    w = f"rows[{i}]"
    if not isinstance(r, dict):
        raise _fail(path, w, "must be an object")
    for k in _ROW_REQUIRED:
        if k not in r:
            raise _fail(path, f"{w}.{k}", "missing")
    for k in r:
        if k not in _ROW_REQUIRED and k not in _ROW_OPTIONAL and k not in _EXTRA_KEYS:
            raise _fail(path, f"{w}.{k}", "unknown key (see baselines/README.md for the allowed extra keys)")
    if not isinstance(r["table"], str) or not r["table"].strip():
        raise _fail(path, f"{w}.table", "must be a non-empty string")
    if r["target"] not in targets:
        raise _fail(path, f"{w}.target", f"{r['target']!r} is not in the file's targets map")
    if r["method"] not in METHODS:
        raise _fail(path, f"{w}.method", f"{r['method']!r} is not a canonical method")
    ds = r["dataset"]
    if ds is not None and ds not in DATASETS:
        raise _fail(path, f"{w}.dataset", f"{ds!r} is not a canonical dataset")
    if (ds == "mean") != ("mean_over" in r):
        raise _fail(path, f"{w}.mean_over", "required exactly when dataset is 'mean'")
    t = r["temperature"]
    if t is not None and (not _is_num(t) or t < 0):
        raise _fail(path, f"{w}.temperature", f"must be a number >= 0 or null, got {t!r}")
    if "mean_over_temperatures" in r and t is not None:
        raise _fail(path, f"{w}.temperature", "must be null on a mean over temperatures")
    m = r["metric"]
    if m not in METRICS:
        raise _fail(path, f"{w}.metric", f"{m!r} is not a known metric")
    if m not in tol:
        raise _fail(path, f"{w}.metric", f"no tolerance given for metric {m!r}")
    v = r["value"]
    if not _is_num(v):
        raise _fail(path, f"{w}.value", f"must be a finite number, got {v!r}")
    if m == "tau" and v < 1.0:
        raise _fail(path, f"{w}.value", f"tau is at least 1 token per cycle, got {v}")
    if m == "alpha" and not 0.0 <= v <= 1.0:
        raise _fail(path, f"{w}.value", f"alpha must be in [0, 1], got {v}")
    if m == "alpha" and "depth" not in r:
        raise _fail(path, f"{w}.depth", "required for metric alpha")
    if m in ("speedup", "tau_ratio", "tokens_per_s") and v <= 0:
        raise _fail(path, f"{w}.value", f"must be > 0, got {v}")
    if m == "tau_ratio" and "baseline_method" not in r:
        raise _fail(path, f"{w}.baseline_method", "required for metric tau_ratio")
    hw = r["hardware"]
    if hw is not None and not (isinstance(hw, str) and hw.strip()):
        raise _fail(path, f"{w}.hardware", "must be a non-empty string or null")
    tree = r["tree"]
    if tree is not None:
        if not isinstance(tree, dict) or set(tree) != set(_TREE_KEYS):
            raise _fail(path, f"{w}.tree", f"must be null or an object with exactly {list(_TREE_KEYS)}")
        for k in _TREE_KEYS:
            if tree[k] is not None and not (_is_int(tree[k]) and tree[k] >= 1):
                raise _fail(path, f"{w}.tree.{k}", f"must be a positive int or null, got {tree[k]!r}")
    if r["provenance"] not in PROVENANCES:
        raise _fail(path, f"{w}.provenance", f"{r['provenance']!r} is not one of {sorted(PROVENANCES)}")
    if "note" in r and not (isinstance(r["note"], str) and r["note"].strip()):
        raise _fail(path, f"{w}.note", "must be a non-empty string")
    for k, check in _EXTRA_KEYS.items():
        if k in r:
            err = check(r[k])
            if err:
                raise _fail(path, f"{w}.{k}", err)


def _check_claims(path: Path, claims: Any) -> None:
    if not isinstance(claims, list):
        raise _fail(path, "claims", "must be a list")
    for i, c in enumerate(claims):
        if not isinstance(c, dict) or not isinstance(c.get("text"), str):
            raise _fail(path, f"claims[{i}].text", "missing")
        if c.get("provenance") not in PROVENANCES:
            raise _fail(path, f"claims[{i}].provenance", f"{c.get('provenance')!r} is not a provenance label")


def load_file(path: Path) -> list[BaselineRow]:
    """Validate one baselines file and return its rows; raise BaselineError on any violation."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise _fail(path, f"line {e.lineno}", f"invalid JSON: {e.msg}") from None
    except OSError as e:
        raise _fail(path, "file", f"cannot read: {e.strerror}") from None
    if not isinstance(data, dict):
        raise _fail(path, "top level", "must be an object")
    for k in _TOP_REQUIRED:
        if k not in data:
            raise _fail(path, k, "missing")
    unknown = set(data) - set(_TOP_REQUIRED) - set(_TOP_OPTIONAL)
    if unknown:
        raise _fail(path, sorted(unknown)[0], "unknown top-level key")
    if data["schema_version"] != SCHEMA_VERSION:
        raise _fail(path, "schema_version", f"expected {SCHEMA_VERSION}, got {data['schema_version']!r}")
    for k in ("paper", "title"):
        if not isinstance(data[k], str) or not data[k].strip():
            raise _fail(path, k, "must be a non-empty string")
    if not isinstance(data["arxiv"], str) or not _ARXIV_RE.match(data["arxiv"]):
        raise _fail(path, "arxiv", f"must look like '2408.15766', got {data['arxiv']!r}")
    tol = _check_tolerance(path, data["tolerance"])
    targets = _check_targets(path, data["targets"])
    if "claims" in data:
        _check_claims(path, data["claims"])
    if not isinstance(data["rows"], list):
        raise _fail(path, "rows", "must be a list")

    out: list[BaselineRow] = []
    seen: dict[tuple, int] = {}
    for i, r in enumerate(data["rows"]):
        _check_row(path, i, r, targets, tol)
        extra = {k: r[k] for k in r if k in _EXTRA_KEYS}
        spec = tol[r["metric"]]
        # the paper's hardware class (speedup tolerance entry), unless the row overrides it
        hw_class = extra.pop("hardware_class", tol.get("speedup", {}).get("hardware_class"))
        row = BaselineRow(
            paper=data["paper"], arxiv=data["arxiv"], table=r["table"], target=r["target"],
            method=r["method"], dataset=r["dataset"],
            temperature=None if r["temperature"] is None else float(r["temperature"]),
            metric=r["metric"], value=float(r["value"]), hardware=r["hardware"],
            tree=None if r["tree"] is None else dict(r["tree"]), provenance=r["provenance"],
            note=r.get("note"), tolerance_rel=float(spec["rel"]),
            hardware_class=hw_class,
            extra=extra, source_file=path.name,
        )
        k = row.key()
        if k in seen:
            raise _fail(path, f"rows[{i}]", f"duplicate of rows[{seen[k]}] (same table/target/method/"
                                            f"dataset/temperature/metric/setting)")
        seen[k] = i
        out.append(row)
    return out


def load_baselines(root: Path | None = None) -> list[BaselineRow]:
    """All rows of every ``*.json`` directly under ``root`` (default: the repo's baselines/).

    ``baselines/embedded/`` (numbers recorded by this project's own runs) is not read here.
    """
    root = DEFAULT_ROOT if root is None else Path(root)
    if not root.is_dir():
        raise BaselineError(f"{root}: baselines directory not found")
    rows: list[BaselineRow] = []
    for path in sorted(root.glob("*.json")):
        rows.extend(load_file(path))
    return rows


_MISSING = object()


def find(rows: Iterable[BaselineRow], **filters: Any) -> list[BaselineRow]:
    """Rows whose attributes equal every filter.

    A filter names a BaselineRow field (``method="hass"``) or an extra key
    (``setting="topk_k=5,topk_w=1.0"``); ``setting=None`` selects main-table rows
    (no ablation setting). A value that is a list/tuple/set matches any of its members.
    """
    names = set(BaselineRow.__dataclass_fields__) | {"setting"}
    out = []
    for row in rows:
        ok = True
        for k, want in filters.items():
            if k in names:
                got = getattr(row, k)
            else:
                got = row.extra.get(k, None)
            if isinstance(want, (list, tuple, set, frozenset)):
                if got not in want:
                    ok = False
                    break
            elif got != want:
                ok = False
                break
        if ok:
            out.append(row)
    return out


def hardware_matches(hardware_class: str | None, env_hardware: str | None) -> bool:
    """True when the environment's accelerator name belongs to the paper's hardware class.

    ``hardware_class`` is a short token such as ``"H800"`` or ``"A100"``; ``env_hardware``
    is what the environment fingerprint reports (e.g. ``"NVIDIA H800 PCIe"``). Unknown on
    either side never matches.
    """
    if not hardware_class or not env_hardware:
        return False
    cls = hardware_class.strip().lower()
    tokens = re.split(r"[\s_/,()-]+", env_hardware.strip().lower())
    return cls in tokens  # exact token: "A10" must not match "A100"


def judge(row: BaselineRow, measured: float, env_hardware: str | None = None) -> str:
    """'pass', 'fail' or 'not_comparable' for a measured value against one baseline row.

    - speedup: 'not_comparable' unless the row has a hardware class that the environment
      matches (never 'pass' on other hardware);
    - rows that are bounds ("up to X", ``bound`` key) or have no dataset/temperature
      are headline claims, not cells: 'not_comparable';
    - otherwise pass iff |measured - value| <= tolerance_rel * |value|.
    """
    if not _is_num(measured):
        return "fail"
    if row.metric == "speedup" and not hardware_matches(row.hardware_class, env_hardware):
        return "not_comparable"
    if "bound" in row.extra or row.dataset is None or (
            row.temperature is None and "mean_over_temperatures" not in row.extra):
        return "not_comparable"
    return "pass" if abs(measured - row.value) <= row.tolerance_rel * abs(row.value) + 1e-12 else "fail"
