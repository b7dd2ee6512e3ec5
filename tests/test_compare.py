"""`specbench compare`, the embedded reference, pytest-benchmark input and Spec-Bench JSONL (no model needed)."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

import pytest

from specbench.bench import compare as C
from specbench.bench import metrics
from specbench.bench import specbench_jsonl as SB
from specbench.bench.baselines import find, load_baselines
from specbench.cli import main

ENV = {"date": "2025-01-01T00:00:00+00:00", "python": "3.11", "torch": "2.x", "transformers": "5.x",
       "specbench": "0.1.0", "cpu": "Test CPU", "cpu_count": 2, "threads": 2, "gpu": None, "cuda": None}


def _rec(tokens: int, step_sizes: list[int], wall: float, depth: int = 3) -> dict:
    reached, accepted = [0] * depth, [0] * depth
    for s in step_sizes:
        acc = s - 1
        for k in range(min(acc + 1, depth)):
            reached[k] += 1
            accepted[k] += k < acc
    return {"new_tokens": tokens, "steps": step_sizes, "reached": reached, "accepted": accepted,
            "drafted": depth * len(step_sizes), "stop": "length", "tokens": list(range(tokens)), "wall_s": wall,
            "wall_s_repeats": [wall], "prefill_s": 0.01, "draft_s": 0.1 * wall, "verify_s": 0.8 * wall}


def make_doc(method="pld", dataset="mt_bench", target="smollm2-135m", sha="a" * 64, temperature=0.0,
             step=2, n=3, tokens=24, params=None, gpu=None, limit=3) -> dict:
    samples = []
    for i in range(n):
        steps = [step] * (tokens // step) + ([tokens % step] if tokens % step else [])
        samples.append({"id": f"{dataset}/{81 + i}", "turn": 0, "category": "writing",
                        "runs": {"vanilla": _rec(tokens, [1] * tokens, 2.0),
                                 method: _rec(tokens, steps, 2.0 / (1 + 0.3 * (step - 1)))}})
    summary = {name: metrics.summarize([s["runs"][name] for s in samples]) for name in ("vanilla", method)}
    summary[method].update(metrics.speedups(summary[method], summary["vanilla"],
                                            [(s["runs"][method], s["runs"]["vanilla"]) for s in samples]))
    summary["greedy_identical"] = {"identical": n, "compared": n}
    return {
        "schema_version": 1, "kind": "specbench.run", "definitions": metrics.DEFINITIONS,
        "config": {"method": method, "params": params if params is not None else {"max_ngram_size": 3},
                   "baseline": "vanilla", "dataset": dataset, "limit": limit,
                   "prompt_ids": [s["id"] for s in samples],
                   "target": {"name": target, "weights_sha256": sha, "source": "embedded"},
                   "draft_checkpoint_sha256": None,
                   "sampling": {"temperature": temperature, "top_k": 0, "top_p": 1.0}, "seed": 0,
                   "max_new_tokens": tokens, "repeats": 1, "dtype": "float32", "device": "cpu", "hf_generate": False},
        "environment": dict(ENV, gpu=gpu), "samples": samples, "summary": summary, "status": "complete",
    }


def write(path: Path, doc: dict) -> Path:
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture
def runs_dir(tmp_path):
    d = tmp_path / "results"
    d.mkdir()
    write(d / "pld-mt.json", make_doc("pld", "mt_bench", step=2))
    write(d / "lookahead-mt.json", make_doc("lookahead", "mt_bench", step=3, params={"level": 5}))
    write(d / "pld-he.json", make_doc("pld", "humaneval", step=4))
    return d


def run_cli(argv, capsys):
    rc = main(["compare", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def snapshot(d: Path) -> dict:
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(d.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- table rendering


def _tables(out: str) -> dict[str, list[list[str]]]:
    """Plain-format tables of compare's output: title word ('tau', 'speedup', 'tokens/s') -> split lines."""
    blocks = {}
    for block in out.split("\n\n"):
        lines = block.splitlines()
        if len(lines) > 2 and set(lines[2].replace(" ", "")) == {"-"}:
            blocks[lines[0].split(":")[0]] = [line.split() for line in lines[1:]]
    return blocks


def test_plain_table_rows_and_columns(runs_dir, capsys):
    rc, out, err = run_cli([str(runs_dir / "*.json"), "--no-baseline"], capsys)
    assert rc == 0, err
    tables = _tables(out)
    assert list(tables) == ["tau", "speedup", "tokens/s"]  # one table per metric
    for rows in tables.values():
        header = rows[0]
        assert header[:2] == ["dataset", "T"]  # one target: named in the title, not in a column
        assert header[2:] == ["vanilla", "pld", "lookahead"]  # vanilla first, then the project's method order
        assert [r[0] for r in rows[2:]] == ["humaneval", "mt_bench"]
    assert "smollm2-135m" in out.splitlines()[0]
    taus = {tuple(r[:2]): r[2:] for r in tables["tau"][2:]}
    assert taus[("mt_bench", "0")] == ["1.000", "2.000", "3.000"] and taus[("humaneval", "0")] == ["1.000", "4.000"]
    assert "humaneval" in out and "mt_bench" in out
    assert "verdicts (" in out


@pytest.mark.parametrize("fmt,marker", [("github", "| dataset"), ("markdown", "|:")])
def test_markdown_formats(runs_dir, capsys, fmt, marker):
    rc, out, _ = run_cli([str(runs_dir), "--no-baseline", "--format", fmt], capsys)
    assert rc == 0
    assert marker in out
    lines = out.splitlines()
    assert lines[0].startswith("tau") and lines[1] == ""  # a title paragraph, then the table
    assert all(line.startswith("|") for line in lines[2:6])


def test_metric_option_and_width(runs_dir, capsys):
    rc, out, err = run_cli([str(runs_dir), "--no-baseline", "--metric", "speedup"], capsys)
    assert rc == 0, err
    assert list(_tables(out)) == ["speedup"]
    rc, out, _ = run_cli([str(runs_dir), "--no-baseline", "--format", "csv", "--metric", "tau"], capsys)
    assert rc == 0 and {r["metric"] for r in csv.DictReader(io.StringIO(out))} == {"tau"}
    with pytest.raises(SystemExit) as e:  # argparse: not a metric
        run_cli([str(runs_dir), "--metric", "alpha"], capsys)
    assert e.value.code == 2 and "invalid choice: 'alpha'" in capsys.readouterr().err


def test_several_settings_of_one_method_get_short_labels_and_a_legend(tmp_path, capsys):
    d = tmp_path / "res"
    d.mkdir()
    for i, k in enumerate((1, 5, 10)):
        write(d / f"pld-{k}.json", make_doc("pld", "mt_bench", step=2 + i,
                                            params={"max_ngram_size": 3, "num_pred_tokens": k}))
    rc, out, err = run_cli([str(d), "--no-baseline"], capsys)
    assert rc == 0, err
    assert _tables(out)["tau"][0] == ["dataset", "T", "vanilla", "pld#1", "pld#2", "pld#3"]
    legend = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith("  pld#")}
    assert sorted(legend.values()) == sorted([["max_ngram_size=3", f"num_pred_tokens={k}"] for k in (1, 5, 10)])
    assert max(len(line) for line in out.splitlines()) <= 120


def test_cells_show_a_reference_only_when_it_measured_the_same_settings(tmp_path, capsys):
    ref_runs = tmp_path / "ref-runs"
    ref_runs.mkdir()
    write(ref_runs / "pld.json", make_doc("pld", step=2))
    ref = tmp_path / "ref.json"
    assert run_cli([str(ref_runs), "--no-baseline", "--write-reference", str(ref)], capsys)[0] == 0
    same = write(tmp_path / "same.json", make_doc("pld", step=2))
    rc, out, _ = run_cli([str(same), "--baseline", str(ref), "--metric", "tau"], capsys)
    assert rc == 0 and "2.000 vs 2.000 +0.0% pass" in out
    other = write(tmp_path / "other.json", make_doc("pld", step=3, params={"max_ngram_size": 4}))
    rc, out, _ = run_cli([str(other), "--baseline", str(ref), "--metric", "tau"], capsys)
    assert rc == 0 and "3.000 n/c[a]" in out and " vs " not in _tables(out)["tau"][2]
    assert "n/c[a] x1: other method parameters (max_ngram_size: 3 vs 4)" in out  # tau row only: 1 cell


def test_committed_results_print_a_readable_table_without_false_violations(capsys, monkeypatch):
    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)
    for pattern in ("results/*.json", "results/*-t[01].json"):
        rc, out, err = run_cli([pattern], capsys)
        assert rc == 0, err
        assert list(_tables(out)) == ["tau", "speedup", "tokens/s"]
        assert max(len(line) for line in out.splitlines()) <= 120, pattern
        assert "VIOLATED" not in out and "not checked" in out


def test_csv_format_is_pure_csv(runs_dir, capsys):
    rc, out, err = run_cli([str(runs_dir), "--no-baseline", "--format", "csv"], capsys)
    assert rc == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert list(rows[0]) == C.CSV_FIELDS
    taus = {(r["dataset"], r["method"]): float(r["value"]) for r in rows if r["metric"] == "tau"}
    assert taus[("mt_bench", "pld")] == 2.0 and taus[("mt_bench", "lookahead")] == 3.0
    assert taus[("mt_bench", "vanilla")] == 1.0
    assert "verdicts" in err  # notes go to stderr so stdout stays CSV


# ---------------------------------------------------------------- verdicts


def _cells(run_doc, ref_cells, tol=C.EMBEDDED_TOLERANCE, rows=()):
    run = C.run_from_document(run_doc, "run.json")
    rs = C.RefSet(rows=list(rows), cells=[(c, tol, "ref.json") for c in ref_cells])
    return {c.metric: c for c in C.compare([run], rs)}


def _ref_cell(doc):
    return C.reference_cell(C.run_from_document(doc, "ref-run.json"))


def test_verdict_pass_regress_improve_on_embedded_reference():
    ref = _ref_cell(make_doc(step=2))
    edited_down, edited_up = dict(ref, tau=ref["tau"] * 1.05), dict(ref, tau=ref["tau"] * 0.95)
    assert _cells(make_doc(step=2), [ref])["tau"].verdict == "pass"
    assert _cells(make_doc(step=2), [edited_down])["tau"].verdict == "regress"
    assert _cells(make_doc(step=2), [edited_up])["tau"].verdict == "improve"
    within = dict(ref, tau=ref["tau"] * 1.01)  # 1 % < the 2 % tau tolerance
    assert _cells(make_doc(step=2), [within])["tau"].verdict == "pass"


def test_speed_is_recorded_not_gated_on_embedded_reference():
    ref = _ref_cell(make_doc(step=2))
    cells = _cells(make_doc(step=2), [dict(ref, speedup=ref["speedup"] * 2, tokens_per_s=ref["tokens_per_s"] * 2)])
    assert cells["speedup"].verdict == "not comparable" and "not gated" in cells["speedup"].reason
    assert cells["speedup"].ref is not None  # the delta is still shown
    assert cells["tokens_per_s"].verdict == "not comparable"


def test_other_settings_are_not_comparable():
    ref = _ref_cell(make_doc(step=2))
    c = _cells(make_doc(step=2, params={"max_ngram_size": 4}), [ref])["tau"]
    assert c.verdict == "not comparable" and "max_ngram_size" in c.reason
    c = _cells(make_doc(step=2, tokens=48), [ref])["tau"]
    assert c.verdict == "not comparable" and "max_new_tokens" in c.reason
    assert _cells(make_doc(step=2), [])["tau"].reason == "no reference"


def test_paper_rows_use_judge_and_hardware_class():
    rows = load_baselines()
    [tau_row] = find(rows, paper="HASS", table="Table 1", target="llama2-chat-7b", method="pld",
                     dataset="mt_bench", temperature=0.0, metric="tau")
    full = [f"mt_bench/{i}" for i in range(81, 161)]

    def paper_doc(tau_step, gpu=None):
        d = make_doc("pld", "mt_bench", target="meta-llama/Llama-2-7b-chat-hf", step=tau_step, gpu=gpu, limit=None,
                     n=len(full))  # a sample for every prompt: judged against the paper only when complete
        assert d["config"]["prompt_ids"] == full
        return d

    doc = paper_doc(2)
    doc["summary"]["pld"]["tau"] = tau_row.value * 1.01
    c = _cells(doc, [], rows=rows)
    assert c["tau"].ref.value == tau_row.value and c["tau"].verdict == "pass"
    assert c["tau"].run.target_key == "llama2-chat-7b"  # HF id -> the baselines' name
    doc["summary"]["pld"]["tau"] = tau_row.value * 0.9
    assert _cells(doc, [], rows=rows)["tau"].verdict == "regress"
    # speedup: HASS numbers are H800; elsewhere never "pass"
    [sp_row] = find(rows, paper="HASS", table="Table 2", target="llama2-chat-7b", method="eagle2",
                    dataset="mt_bench", temperature=0.0, metric="speedup")
    d2 = paper_doc(3)
    d2["config"]["method"] = "eagle2"
    d2["summary"]["eagle2"] = dict(d2["summary"].pop("pld"), speedup=sp_row.value)
    d2["config"]["params"] = {"depth": 6, "top_k": 10, "total_tokens": 60}
    assert _cells(d2, [], rows=rows)["speedup"].verdict == "not comparable"
    d2["environment"]["gpu"] = "NVIDIA H800 PCIe"
    assert _cells(d2, [], rows=rows)["speedup"].verdict == "pass"
    d2["config"]["params"]["total_tokens"] = 16  # another tree than the paper's: not comparable
    assert "tree" in _cells(d2, [], rows=rows)["tau"].reason
    # a prompt subset is not the paper's measurement
    d3 = paper_doc(2)
    d3["config"]["prompt_ids"] = full[:3]
    assert "3 of the 80" in _cells(d3, [], rows=rows)["tau"].reason


# ---------------------------------------------------------------- claims

EAGLE_CPU10 = {"checkpoint": "", "tree": "cpu_10", "draft_vocab": 0}  # 10 drafts + the root: 11 tree nodes
EAGLE2_AT = {"checkpoint": "", "depth": 2, "top_k": 10, "draft_vocab": 0}


def test_speed_is_judged_only_between_runs_of_one_runtime():
    """A reference measured on the hf runtime says nothing of a fast-runtime run's speed (tau it does); a file
    written before there was a choice counts as hf."""
    ref_doc, run_doc = make_doc(step=2), make_doc(step=2)
    ref_doc["config"]["runtime"], run_doc["config"]["runtime"] = "hf", "fast"
    cells = _cells(run_doc, [_ref_cell(ref_doc)])
    assert cells["tau"].verdict == "pass"
    for metric in ("speedup", "tokens_per_s"):
        assert cells[metric].verdict == "not comparable"
        assert cells[metric].reason == "other runtime (hf in the reference, fast here)"
    legacy = _ref_cell(make_doc(step=2))  # no config.runtime: hf
    assert legacy["runtime"] == "hf" and "not gated" in _cells(ref_doc, [legacy])["speedup"].reason


def test_a_tau_claim_spans_runtimes_and_a_speed_claim_does_not(tmp_path, capsys):
    d = _claim_dir(tmp_path, EAGLE_CPU10, dict(EAGLE2_AT, total_tokens=11))
    doc = json.loads((d / "eagle2.json").read_text())
    doc["config"]["runtime"] = "fast"
    write(d / "eagle2.json", doc)
    rc, out, err = run_cli([str(d), "--baseline", str(CLAIMS_FILE)], capsys)
    assert rc == 0, err
    assert "VIOLATED on mt_bench T=0: 2.000 vs 3.000" in out  # tau: the runtime does not matter
    speed = {"id": "eagle2_faster", "better": "eagle2", "worse": "eagle", "metric": "speedup"}
    [cr] = C.check_claims(C.load_inputs([str(d)]), [speed])
    assert not cr["checked"] and "other runtimes (fast vs hf)" in cr["reason"]


def _claim_dir(tmp_path, eagle_params, eagle2_params, eagle2_tokens=24) -> Path:
    d = tmp_path / "claims"
    d.mkdir(exist_ok=True)
    for f in d.iterdir():
        f.unlink()
    # eagle2 accepts less than eagle here (tau 2 vs 3): the claim eagle2 > eagle is violated where it applies
    write(d / "eagle.json", make_doc("eagle", "mt_bench", step=3, params=eagle_params))
    write(d / "eagle2.json", make_doc("eagle2", "mt_bench", step=2, params=eagle2_params, tokens=eagle2_tokens))
    return d


CLAIMS_FILE = Path(__file__).resolve().parents[1] / "baselines" / "embedded" / "claims.json"


def test_a_violated_claim_between_comparable_runs_is_reported(tmp_path, capsys):
    from specbench.methods import available_methods

    cases = {  # (eagle params, eagle2 params) -> comparable?
        "equal tree size": (EAGLE_CPU10, dict(EAGLE2_AT, total_tokens=11)),
        "both at the papers' settings": (available_methods()["eagle"].defaults,
                                         available_methods()["eagle2"].defaults),
    }
    for name, (pe, pe2) in cases.items():
        d = _claim_dir(tmp_path, pe, pe2)
        rc, out, err = run_cli([str(d), "--baseline", str(CLAIMS_FILE)], capsys)
        assert rc == 0, err
        assert "VIOLATED on mt_bench T=0: 2.000 vs 3.000" in out, (name, out)
        assert "not checked" not in out, name
    [cr] = [c for c in C.check_claims(C.load_inputs([str(d)]), C.load_claims(CLAIMS_FILE))
            if c["claim"]["id"] == "eagle2_gt_eagle"]
    assert cr["checked"] and not cr["holds"] and cr["reason"] == ""


def _doc_per_prompt(method: str, params: dict, steps_per_prompt: list[list[int]]) -> dict:
    """make_doc with each prompt's own step sizes (24 tokens each), the summary recomputed from them."""
    doc = make_doc(method, "mt_bench", params=params, n=len(steps_per_prompt), limit=len(steps_per_prompt))
    for smp, steps in zip(doc["samples"], steps_per_prompt):
        assert sum(steps) == 24
        smp["runs"][method] = _rec(24, steps, 1.0)
    doc["summary"][method].update(metrics.summarize([smp["runs"][method] for smp in doc["samples"]]))
    return doc


def test_a_tau_claim_verdict_carries_a_paired_prompt_bootstrap_interval(tmp_path):
    """Prompts differ a lot in how much any method accepts; eagle2 beats eagle by a little on every one: the
    paired interval lies above 0 (holds), though the two runs' tau ranges overlap. A gap on some prompts and
    a loss on others: within noise. Identical per-prompt figures: a zero-width interval."""
    claim = {"id": "e2", "better": "eagle2", "worse": "eagle", "metric": "tau"}
    easy, hard = [6, 6, 6, 6], [1] * 24  # tau 6 and 1
    easier, harder = [8, 8, 8], [2] * 12  # tau 8 and 2: one step size more than eagle's on each prompt
    prompts_e = [easy, hard] * 5
    d = tmp_path / "paired"
    d.mkdir()
    write(d / "eagle.json", _doc_per_prompt("eagle", EAGLE_CPU10, prompts_e))
    write(d / "eagle2.json", _doc_per_prompt("eagle2", dict(EAGLE2_AT, total_tokens=11), [easier, harder] * 5))
    [cr] = C.check_claims(C.load_inputs([str(d)]), [claim])
    lo, hi = cr["interval"]
    assert cr["verdict"] == "holds" and cr["holds"] and 0 < lo <= hi
    # margins: tau 3.2 vs 1.71 clears 1.5 x eagle's but not eagle's + 3 (a resample gains 2 at most: 8 vs 6)
    ratio, delta = dict(claim, min_ratio=1.5), dict(claim, min_delta=3.0)
    assert C.claim_statement(ratio) == "eagle2 tau > 1.5 x eagle tau"
    assert C.claim_statement(delta) == "eagle2 tau > eagle tau + 3"
    [cr] = C.check_claims(C.load_inputs([str(d)]), [ratio])
    assert cr["holds"] and cr["verdict"] == "holds" and cr["interval"][0] > 0
    [cr] = C.check_claims(C.load_inputs([str(d)]), [delta])
    assert not cr["holds"] and cr["verdict"] == "violated" and cr["interval"][1] < 0
    assert C.claim_threshold(ratio, 2.0) == 3.0 and C.claim_threshold(delta, 2.0) == 5.0
    # mixed: eagle2 wins big on three prompts (12 vs 6) and loses on two (1 vs 6)
    write(d / "eagle2.json", _doc_per_prompt("eagle2", dict(EAGLE2_AT, total_tokens=11),
                                             [[12, 12], hard, hard, hard] * 2 + [[12, 12], hard]))
    [cr] = C.check_claims(C.load_inputs([str(d)]), [claim])
    lo, hi = cr["interval"]
    assert cr["verdict"] == "within noise" and lo < 0 < hi
    write(d / "eagle2.json", _doc_per_prompt("eagle2", dict(EAGLE2_AT, total_tokens=11), prompts_e))
    [cr] = C.check_claims(C.load_inputs([str(d)]), [claim])
    assert cr["interval"] == (0.0, 0.0) and cr["verdict"] == "within noise" and not cr["holds"]
    # a speed claim is judged on the point values
    [cr] = C.check_claims(C.load_inputs([str(d)]), [dict(claim, metric="speedup")])
    assert cr["interval"] is None and cr["verdict"] in ("holds", "violated")


@pytest.mark.parametrize("eagle2_params,tokens,why", [
    (dict(EAGLE2_AT, total_tokens=8), 24, "eagle2 verifies 8 tree nodes (draft_vocab 0), eagle 11 tree nodes"),
    (dict(EAGLE2_AT, total_tokens=11, draft_vocab=4096), 24, "(draft_vocab 4096)"),
    (dict(EAGLE2_AT, total_tokens=11), 12, "other token budgets (12 vs 24 new tokens)"),
])
def test_a_claim_between_mismatched_runs_is_not_checked(tmp_path, capsys, eagle2_params, tokens, why):
    d = _claim_dir(tmp_path, EAGLE_CPU10, eagle2_params, eagle2_tokens=tokens)
    rc, out, err = run_cli([str(d), "--baseline", str(CLAIMS_FILE)], capsys)
    assert rc == 0, err
    assert "VIOLATED" not in out and "holds" not in out
    notes = " ".join(out.split())  # the note may wrap
    assert "not checked on mt_bench T=0:" in notes and why in notes, notes


def test_a_partial_run_is_judged_on_the_prompts_it_finished(tmp_path):
    e2 = make_doc("eagle2", step=2, params=dict(EAGLE2_AT, total_tokens=11))
    e2["samples"], e2["status"] = e2["samples"][:1], "partial"  # planned 3 prompts, finished 1
    runs = [C.run_from_document(make_doc("eagle", step=3, params=EAGLE_CPU10), "e.json"),
            C.run_from_document(e2, "e2.json")]
    assert runs[1].prompt_ids == ["mt_bench/81"]
    [cr] = [c for c in C.check_claims(runs, C.load_claims(CLAIMS_FILE)) if c["claim"]["id"] == "eagle2_gt_eagle"]
    assert not cr["checked"] and "other prompts (1 vs 3)" in cr["reason"]


def test_claims_name_unimplemented_methods(tmp_path):
    claim = {**next(c for c in C.load_claims(CLAIMS_FILE) if c["id"] == "hass_gt_eagle2"), "id": "medusa_gt_hydra",
             "better": "medusa", "worse": "hydra"}  # two catalogue methods no plugin implements
    runs = [C.run_from_document(make_doc("medusa", step=3, params={}), "medusa.json"),
            C.run_from_document(make_doc("hydra", step=2, params={}), "hydra.json")]
    [cr] = C.check_claims(runs, [claim])
    assert not cr["checked"] and "medusa and hydra not implemented here" in cr["reason"]


# ---------------------------------------------------------------- gate


@pytest.fixture
def recorded(tmp_path, capsys):
    res = tmp_path / "res"
    res.mkdir()
    write(res / "pld-mt.json", make_doc("pld", "mt_bench", step=2))
    write(res / "pld-he.json", make_doc("pld", "humaneval", step=3))
    ref = tmp_path / "ref.json"
    rc, _, err = run_cli([str(res), "--no-baseline", "--write-reference", str(ref)], capsys)
    assert rc == 0, err
    return res, ref


def test_write_reference_records_cells_and_command(recorded):
    _, ref = recorded
    data = json.loads(ref.read_text())
    assert data["kind"] == C.REFERENCE_KIND and len(data["cells"]) == 2
    assert data["recorded_by"]["record_command"].startswith("specbench compare")
    assert data["recorded_by"]["environment"]["cpu"] == "Test CPU"
    assert data["tolerance"]["tau"]["gate"] is True and data["tolerance"]["speedup"]["gate"] is False


@pytest.mark.parametrize("factor,rc_want", [(0.95, 1), (0.99, 0), (1.0, 0), (1.05, 0)])
def test_gate_fails_when_tau_is_edited_down_beyond_tolerance(recorded, capsys, factor, rc_want):
    res, ref = recorded
    f = res / "pld-mt.json"
    doc = json.loads(f.read_text())
    doc["summary"]["pld"]["tau"] *= factor
    f.write_text(json.dumps(doc))
    rc, out, err = run_cli([str(res / "*.json"), "--baseline", str(ref), "--gate"], capsys)
    assert rc == rc_want, out + err
    if rc_want:
        assert "REGRESS" in out and "gate: REGRESS pld tau" in err
    else:
        assert "gate: ok" in out


def test_gate_against_default_baselines_dir(recorded, capsys, monkeypatch, tmp_path):
    res, ref = recorded
    emb = tmp_path / "embedded"
    emb.mkdir()
    (emb / "ref.json").write_text(ref.read_text())
    monkeypatch.setattr(C, "EMBEDDED_DIR", emb)
    monkeypatch.setattr(C.embedded_references, "__defaults__", (emb,))
    rc, out, _ = run_cli([str(res), "--gate"], capsys)
    assert rc == 0 and "pass" in out and "paper + embedded" in out


def test_run_against_run_baseline(tmp_path, capsys):
    a = write(tmp_path / "a.json", make_doc("pld", step=2))
    b = write(tmp_path / "b.json", make_doc("pld", step=2))
    rc, out, err = run_cli([str(a), "--baseline", str(b), "--gate"], capsys)
    assert rc == 0 and "pass" in out
    doc = make_doc("pld", step=2)
    doc["summary"]["pld"]["tau"] *= 0.9
    write(a, doc)
    rc, _, err = run_cli([str(a), "--baseline", str(b), "--gate"], capsys)
    assert rc == 1 and "REGRESS" in err


def test_run_baseline_speed_needs_the_same_cpu_isa(tmp_path, capsys):
    """One CPU name covers VMs with other vector ISAs (AVX2 vs AVX512) and other speeds: speed against a run
    baseline is judged only where the recorded ISA matches too; tau is judged regardless."""
    base, mine = make_doc("pld", step=2), make_doc("pld", step=2)
    base["environment"]["cpu_isa"], mine["environment"]["cpu_isa"] = "AVX2", "AVX512"
    b = write(tmp_path / "b.json", base)
    ref = C.reference_cell(C.load_run_file(b)[0])
    assert ref["hardware"]["cpu_isa"] == "AVX2"
    tol = {m: {"rel": C.RUN_TOLERANCE[m], "gate": True, "same_hardware": m != "tau"} for m in C.METRICS}
    cells = _cells(mine, [ref], tol=tol)
    assert cells["speedup"].verdict == "not comparable"
    assert "Test CPU (AVX2) vs Test CPU (AVX512)" in cells["speedup"].reason
    assert cells["tau"].verdict == "pass"
    mine["environment"]["cpu_isa"] = "AVX2"
    assert _cells(mine, [ref], tol=tol)["speedup"].verdict == "pass"


# ---------------------------------------------------------------- bad input


def _bad_inputs(tmp_path) -> dict:
    good = make_doc()
    text = json.dumps(good)
    d = tmp_path / "bad"
    d.mkdir()
    write(d / "good.json", good)
    (d / "corrupt.json").write_text("{this is not json")
    (d / "truncated.json").write_text(text[: len(text) // 2])
    write(d / "newer.json", dict(good, schema_version=99))
    write(d / "other-target.json", make_doc(target="meta-llama/Llama-2-7b-chat-hf", sha="b" * 64))
    return {"dir": d, "good": d / "good.json"}


@pytest.mark.parametrize("case,expect", [
    ("corrupt", "not valid JSON"),
    ("truncated", "truncated or corrupt"),
    ("newer", "schema version 99 is newer"),
    ("mixed", "mismatched runs"),
    ("empty-glob", "no results files match"),
    ("no-args", "no results files given"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, case, expect):
    b = _bad_inputs(tmp_path)
    d = b["dir"]
    args = {"corrupt": [str(b["good"]), str(d / "corrupt.json")],
            "truncated": [str(d / "truncated.json")],
            "newer": [str(b["good"]), str(d / "newer.json")],
            "mixed": [str(b["good"]), str(d / "other-target.json")],
            "empty-glob": [str(tmp_path / "nothing" / "*.json")],
            "no-args": []}[case]
    before = snapshot(d)
    ref, png = tmp_path / "out-ref.json", tmp_path / "out.png"
    rc, out, err = run_cli(args + ["--write-reference", str(ref), "--plot", str(png), "--gate"], capsys)
    assert rc == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("specbench: error:") and expect in lines[0], err
    assert snapshot(d) == before  # inputs untouched
    assert not ref.exists() and not png.exists()  # nothing written


@pytest.mark.parametrize("case", ["foreign", "corrupt"])
def test_a_glob_over_studies_skips_them_but_not_a_bad_file(tmp_path, capsys, case):
    d = tmp_path / "results"
    d.mkdir()
    write(d / "pld-mt.json", make_doc("pld", "mt_bench", step=2))
    write(d / "tree_cost.json", {"schema_version": 1, "kind": "specbench.study", "what": "a cost curve"})
    write(d / "later.json", {"kind": "specbench.something-new", "rows": []})
    rc, out, err = run_cli([str(d / "*.json"), "--no-baseline"], capsys)
    assert rc == 0, err
    assert "2.000" in out and "pld" in out  # the run's table is printed
    lines = err.strip().splitlines()
    assert len(lines) == 2, err  # one line per skipped file, naming it and its kind
    assert any("skipped" in x and "tree_cost.json" in x and "specbench.study" in x for x in lines), err
    assert any("skipped" in x and "later.json" in x and "specbench.something-new" in x for x in lines), err
    # a foreign or corrupt JSON among them is still unusable input: exit 2, one line, nothing written
    if case == "foreign":
        write(d / "other.json", {"kind": "someone.else", "config": {}})
    else:
        (d / "other.json").write_text('{"kind": "specbench.run", "config": {"meth')
    ref = tmp_path / "ref.json"
    rc, out, err = run_cli([str(d / "*.json"), "--no-baseline", "--write-reference", str(ref)], capsys)
    assert rc == 2 and out == "" and not ref.exists()
    errors = [x for x in err.strip().splitlines() if x.startswith("specbench: error:")]
    assert len(errors) == 1 and "other.json" in errors[0], err
    # only skipped files: nothing to compare
    rc, _, err = run_cli([str(d / "tree_cost.json")], capsys)
    assert rc == 2 and "no runs in the inputs" in err


def test_a_prompt_file_is_its_own_dataset(tmp_path, capsys):
    """Runs on a user's prompt file (`--dataset PATH.jsonl`) never meet a vendored set's references or claims."""
    sha = "1a2b3c4d" + "e" * 56
    refs_dir = tmp_path / "ref-runs"
    refs_dir.mkdir()
    ref = tmp_path / "ref.json"
    write(refs_dir / "pld-mt.json", make_doc("pld", "mt_bench", step=2))
    assert run_cli([str(refs_dir), "--no-baseline", "--write-reference", str(ref)], capsys)[0] == 0

    def custom(name, method="pld", **kw):
        doc = make_doc(method, "mt_bench", step=2, **kw)
        doc["config"]["dataset"] = name
        doc["config"]["dataset_file"] = {"path": "/data/mt_bench.jsonl", "sha256": sha}
        return doc

    d = tmp_path / "custom"
    d.mkdir()
    # as the runner names it, and a name without its hash (a file called like a vendored set)
    write(d / "pld.json", custom("mt_bench@1a2b3c4d"))
    write(d / "la.json", custom("mt_bench", method="lookahead", params={"level": 5}))
    for baseline in ([], ["--baseline", str(ref)]):
        rc, out, err = run_cli([str(d), "--format", "csv", *baseline], capsys)
        assert rc == 0, err
        rows = list(csv.DictReader(io.StringIO(out)))
        assert {r["dataset"] for r in rows} == {"mt_bench@1a2b3c4d"}  # one dataset, never plain mt_bench
        assert all(r["reference"] == "" and r["verdict"] == "not comparable" for r in rows), rows
    run = C.run_from_document(custom("mt_bench"), "x.json")
    assert run.dataset == "mt_bench@1a2b3c4d" and run.dataset_file["sha256"] == sha
    assert C.dataset_size(run.dataset) is None
    rc, out, err = run_cli([str(d)], capsys)  # the plain table and notes (claims, papers) do not crash on it
    assert rc == 0 and "mt_bench@1a2b3c4d" in out, err


def test_mixed_targets_allowed_on_request(tmp_path, capsys):
    b = _bad_inputs(tmp_path)
    rc, out, _ = run_cli([str(b["good"]), str(b["dir"] / "other-target.json"), "--allow-mixed-targets",
                          "--no-baseline"], capsys)
    assert rc == 0 and "llama2-chat-7b" in out and "smollm2-135m" in out


def test_same_target_other_weights_is_always_an_error(tmp_path, capsys):
    a = write(tmp_path / "a.json", make_doc(sha="a" * 64))
    b = write(tmp_path / "b.json", make_doc("lookahead", sha="c" * 64))
    rc, _, err = run_cli([str(a), str(b), "--allow-mixed-targets"], capsys)
    assert rc == 2 and "different weights" in err


def test_duplicate_runs_are_an_error(tmp_path, capsys):
    a = write(tmp_path / "a.json", make_doc())
    b = write(tmp_path / "b.json", make_doc())
    rc, _, err = run_cli([str(a), str(b)], capsys)
    assert rc == 2 and "both hold pld" in err


def test_runs_on_two_runtimes_or_machines_are_two_labels_not_duplicates(tmp_path, capsys):
    """The same method and parameters on the hf and fast runtimes, or on two CPU ISAs, are two results: each
    gets a label and the legend says what sets it apart."""
    docs = [make_doc(), make_doc(), make_doc()]
    docs[1]["config"]["runtime"] = "fast"
    docs[2]["config"]["runtime"] = "fast"
    docs[2]["environment"]["cpu_isa"] = "AVX512"
    paths = [str(write(tmp_path / f"{i}.json", d)) for i, d in enumerate(docs)]
    rc, out, err = run_cli(paths, capsys)
    assert rc == 0, err
    assert all(f"pld#{n}" in out for n in (1, 2, 3))
    legend = out[out.index("methods:"):]
    assert "runtime hf" in legend and "runtime fast" in legend and "on Test CPU (AVX512)" in legend
    again = str(write(tmp_path / "again.json", docs[1]))
    rc, _, err = run_cli([paths[1], again], capsys)  # the same variant twice is still refused
    assert rc == 2 and "both hold pld" in err


def test_outputs_never_overwrite_inputs(tmp_path, capsys):
    a = write(tmp_path / "a.json", make_doc())
    before = a.read_bytes()
    rc, _, err = run_cli([str(a), "--write-reference", str(a)], capsys)
    assert rc == 2 and "refusing to overwrite" in err and a.read_bytes() == before


def test_a_reference_file_given_as_input_is_explained(recorded, capsys):
    _, ref = recorded
    rc, _, err = run_cli([str(ref)], capsys)
    assert rc == 2 and "pass it with --baseline" in err


# ---------------------------------------------------------------- pytest-benchmark JSON


def test_reads_pytest_benchmark_json(tmp_path, capsys):
    docs = [make_doc("pld", step=2), make_doc("lookahead", step=3, params={"level": 5})]
    bench = {"machine_info": {"cpu": {"brand_raw": "Test CPU"}}, "commit_info": {}, "version": "5.2.3",
             "datetime": "2025-01-01T00:00:00", "benchmarks": [
                 {"group": "g", "name": f"test_x[{d['config']['method']}]", "fullname": "suites/test_x.py::test_x",
                  "params": {}, "stats": {"min": 1.0, "max": 1.0, "mean": 1.0, "rounds": 1},
                  "extra_info": {"tau": d["summary"][d["config"]["method"]]["tau"],
                                 "specbench": C.benchmark_record(d, "results/x.json")}} for d in docs]
             + [{"name": "test_unrelated", "stats": {}, "extra_info": {}}]}
    f = write(tmp_path / "bench.json", bench)
    rc, out, err = run_cli([str(f), "--no-baseline", "--format", "csv"], capsys)
    assert rc == 0, err
    rows = [r for r in csv.DictReader(io.StringIO(out)) if r["metric"] == "tau"]
    assert {r["method"]: float(r["value"]) for r in rows} == {"vanilla": 1.0, "pld": 2.0, "lookahead": 3.0}
    assert all("bench.json::test_x" in r["source"] for r in rows if r["method"] != "vanilla")
    # a results file recorded as reference gates the benchmark file's runs as well
    ref = tmp_path / "ref.json"
    assert run_cli([str(f), "--no-baseline", "--write-reference", str(ref)], capsys)[0] == 0
    rc, _, _ = run_cli([str(f), "--baseline", str(ref), "--gate"], capsys)
    assert rc == 0


def test_benchmark_json_without_specbench_runs(tmp_path, capsys):
    f = write(tmp_path / "bench.json", {"machine_info": {}, "benchmarks": [{"name": "t", "extra_info": {}}]})
    rc, _, err = run_cli([str(f)], capsys)
    assert rc == 2 and "without specbench runs" in err


# ---------------------------------------------------------------- Spec-Bench JSONL


def test_specbench_jsonl_round_trip(tmp_path, capsys):
    doc = make_doc("lookahead", "mt_bench", step=3, params={"level": 5, "window": 7, "guess": 7})
    src = write(tmp_path / "la.json", doc)
    written = SB.export_runs([str(src)], tmp_path / "sb", tokenizer=False)
    assert [p.name for p in written] == ["smollm2-135m-lookahead-float32-temperature-0.0.jsonl",
                                         "smollm2-135m-vanilla-float32-temperature-0.0-for-lookahead.jsonl"]
    lines = [json.loads(x) for x in written[0].read_text().splitlines()]
    a = lines[0]
    assert set(a) >= {"question_id", "answer_id", "model_id", "choices", "tstamp", "category"}
    assert a["question_id"] == 81
    ch = a["choices"][0]
    assert set(ch) >= {"index", "turns", "decoding_steps", "new_tokens", "wall_time", "accept_lengths"}
    assert sum(ch["accept_lengths"]) == sum(ch["new_tokens"])
    [back] = SB.import_results(written[0], written[1])
    for name in ("lookahead", "vanilla"):
        for k in ("tau", "tau_macro", "alpha_k", "reached_k", "tokens_per_s", "new_tokens", "steps", "wall_s"):
            assert back["summary"][name][k] == pytest.approx(doc["summary"][name][k]), (name, k)
    assert back["summary"]["lookahead"]["speedup"] == pytest.approx(doc["summary"]["lookahead"]["speedup"])
    assert back["config"]["params"] == doc["config"]["params"]
    assert back["config"]["prompt_ids"] == doc["config"]["prompt_ids"]
    # compare reads the JSONL directly, paired with its vanilla file
    rc, out, err = run_cli([str(written[0]), "--specbench-base", str(written[1]), "--no-baseline",
                            "--format", "csv"], capsys)
    assert rc == 0, err
    taus = {r["method"]: float(r["value"]) for r in csv.DictReader(io.StringIO(out)) if r["metric"] == "tau"}
    assert taus["lookahead"] == pytest.approx(3.0)
    assert "Spec-Bench speed.py convention" in err


def test_specbench_foreign_answers_speed_py_conventions(tmp_path):
    def ans(qid, cat, new, wall, acc):
        return {"question_id": qid, "category": cat, "answer_id": "x",
                "model_id": "vicuna-7b-v1.3-eagle-float16-temperature-0.0",
                "choices": [{"index": 0, "turns": ["a", "b"], "idxs": [len(acc) - 1, 0], "new_tokens": new,
                             "wall_time": wall, "accept_lengths": acc}], "tstamp": 0.0}

    m = tmp_path / "m.jsonl"
    b = tmp_path / "b.jsonl"
    m.write_text("\n".join(json.dumps(x) for x in [
        ans(81, "writing", [6, 4], [1.0, 1.0], [3, 3, 2, 2]),
        ans(241, "summarization", [4, 0], [1.0, 0.0], [1, 3])]) + "\n")
    b.write_text("\n".join(json.dumps(dict(x, model_id="vicuna-7b-v1.3-vanilla-float16-temp-0.0")) for x in [
        ans(81, "writing", [6, 4], [2.0, 2.0], [1] * 10),
        ans(241, "summarization", [4, 0], [4.0, 0.0], [1] * 4)]) + "\n")
    assert SB.parse_model_id("vicuna-7b-v1.3-eagle-float16-temperature-0.0") == {
        "target": "vicuna-7b-v1.3", "method": "eagle", "temperature": 0.0, "dtype": "float16"}
    assert SB.parse_model_id("vicuna-7b-v1.3-lade-level-5-win-7-guess-7-float16")["method"] == "lookahead"
    docs = {d["config"]["dataset"]: d for d in SB.import_results(m, b)}
    assert set(docs) == {"mt_bench", "summarization"}
    mt = docs["mt_bench"]
    assert mt["summary"]["eagle"]["tau"] == pytest.approx(10 / 4)  # = mean of accept_lengths
    sp = mt["compare_extra"]["specbench_speed"]
    assert sp["mean_accepted_tokens"] == pytest.approx(2.5)
    assert sp["speedup_ratio"] == pytest.approx((10 / 2) / (10 / 4))
    assert mt["config"]["target"]["name"] == "vicuna-7b-v1.3"
    run = C.run_from_document(mt, "m.jsonl")
    assert run.target_key == "vicuna-7b-v1.3" and run.method == "eagle"


def test_specbench_truncated_jsonl(tmp_path, capsys):
    f = tmp_path / "x.jsonl"
    f.write_text('{"question_id": 1, "choices": [{"turns": [], "new_tokens": [], "wall_time": []}]}\n'
                 '{"question_id": 2, "cho')
    rc, _, err = run_cli([str(f)], capsys)
    assert rc == 2 and "line 2 is not valid JSON" in err


# ---------------------------------------------------------------- plot


def test_plot_writes_png(runs_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "fig.png"
    rc, out, err = run_cli([str(runs_dir), "--no-baseline", "--plot", str(png)], capsys)
    assert rc == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_plot_without_matplotlib_is_a_clear_error(runs_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    png = tmp_path / "fig.png"
    rc, out, err = run_cli([str(runs_dir), "--no-baseline", "--plot", str(png)], capsys)
    assert rc == 2 and "pip install 'specbench[plot]'" in err and not png.exists() and out == ""


# ---------------------------------------------------------------- the suites cover every table row


def test_suites_cover_every_table_cell():
    import re

    suites = Path(__file__).resolve().parents[1] / "suites"
    sys.path.insert(0, str(suites))
    try:
        import _harness
    finally:
        sys.path.remove(str(suites))
    declared = set()
    for f in suites.glob("test_*.py"):
        declared |= set(re.findall(r'cases\("([^"]+)", "([^"]+)"', f.read_text()))
    rows = load_baselines()
    cells = [r for r in rows if r.dataset is not None and r.temperature is not None and "bound" not in r.extra]
    assert {(r.paper, r.table) for r in cells} <= declared
    import warnings

    with warnings.catch_warnings():  # the suites' markers are registered by suites/conftest.py, not here
        warnings.simplefilter("ignore")
        params = [p for paper, table in declared for p in _harness.cases(paper, table)]
    covered = {r.key() for p in params if p.values[0].mode == "paper" for r in p.values[0].rows}
    missing = [r for r in cells if r.key() not in covered]
    assert not missing, missing[:3]
    for paper, table in declared:  # ids are unique within a file (nodeids differ across files)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t_ids = [p.id for p in _harness.cases(paper, table)]
        assert len(t_ids) == len(set(t_ids)), (paper, table)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t1 = _harness.cases("HASS", "Table 1", quick={"methods": ("pld", "lookahead"),
                                                      "datasets": ("mt_bench", "humaneval", "gsm8k"),
                                                      "temperatures": (0.0,)})
    quick = [p for p in t1 if "quick" in p.id]
    assert len(quick) == 6 and all(p.values[0].mode == "embedded" and p.values[0].profile == "quick" for p in quick)
    assert all(m.name != "slow" for p in quick for m in p.marks)  # selected by the default -m 'not slow'


def test_benchmark_record_of_an_input_results_file_is_not_a_duplicate(tmp_path, capsys):
    doc = make_doc("pld", step=2)
    res = write(tmp_path / "pld.json", doc)
    bench = {"machine_info": {}, "version": "5.2.3", "benchmarks": [
        {"name": "test_x[pld]", "extra_info": {"specbench": C.benchmark_record(doc, str(res))}}]}
    write(tmp_path / "benchmark.json", bench)
    rc, out, err = run_cli([str(tmp_path), "--no-baseline"], capsys)  # a directory holding both
    assert rc == 0, err
    assert out.count("2.000") == 1


@pytest.mark.parametrize("extra, message", [
    (["--write-reference", "afile/ref.json"], "--write-reference afile/ref.json: cannot write in afile"),
    (["--export-specbench", "afile/out"], "--export-specbench afile/out: cannot write in afile/out"),
])
def test_unwritable_outputs_fail_before_any_table(tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("")
    write(tmp_path / "r.json", make_doc())
    rc, out, err = run_cli(["r.json", "--no-baseline", *extra], capsys)
    assert rc == 2 and out == "" and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("claim, message", [
    ({"better": "eagle2", "worse": "eagle", "metric": "tau"}, "claims[0] needs id, text"),
    ({"id": "x", "text": "t", "better": "eagle2", "worse": "eagle", "metric": "tau", "temperatures": ["zero"]},
     "claims[0].temperatures must be a list of numbers"),
    ({"id": "x", "text": "t", "better": "eagle2", "worse": "eagle", "metric": "tau", "datasets": "mt_bench"},
     "claims[0].datasets must be a list"),
    ({"id": "x", "text": "t", "better": "eagle2", "worse": "eagle", "metric": "tau", "min_ratio": 0},
     "claims[0].min_ratio must be a number > 0"),
    ({"id": "x", "text": "t", "better": "eagle2", "worse": "eagle", "metric": "tau", "min_delta": "0.28"},
     "claims[0].min_delta must be a number"),
])
def test_a_malformed_claims_file_is_one_line(tmp_path, capsys, claim, message):
    c = tmp_path / "c.json"
    c.write_text(json.dumps({"kind": "specbench.claims", "claims": [claim]}))
    write(tmp_path / "r.json", make_doc())
    rc, out, err = run_cli([str(tmp_path / "r.json"), "--baseline", str(c)], capsys)
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1


def test_greedy_divergences_are_reported_as_ties_or_bugs(tmp_path, capsys):
    doc = make_doc("pld", "mt_bench", n=4)
    doc["summary"]["greedy_identical"] = {"identical": 1, "compared": 4, "numerical_ties": 2}
    write(tmp_path / "pld.json", doc)
    rc, out, err = run_cli([str(tmp_path / "pld.json"), "--no-baseline"], capsys)
    assert rc == 0, err
    assert "greedy output equals vanilla on 1/4 samples (2 at a numerical tie, 1 not: a losslessness bug)" in " ".join(
        (out + err).split())


def _seeded(method: str, params: dict, step: int, seed: int, variant=None, data="corpus:sha256=c0") -> dict:
    """A run whose draft checkpoint's manifest says: trained with `seed` on `data`, as arm `variant`."""
    doc = _doc_per_prompt(method, params, [[step] * (24 // step)] * 4)
    doc["config"]["draft"] = {"method": method, "variant": variant, "seed": seed, "data": data, "epochs": 1,
                              "max_steps": None, "tokens": 1000}
    doc["config"]["params"] = dict(params, checkpoint=f"/heads/{method}-{variant}-{seed}")
    return doc


def test_seed_replicas_of_an_arm_join_into_one_verdict(tmp_path, capsys):
    """fspad beats eagle2 with both of its seeds against both of eagle2's: one "holds" over the four pairs
    of seeds. A second fspad seed that loses makes the seeds disagree: within noise, whatever one pair says.
    A head trained as another arm (variant wofs) is its own arm, and heads trained on other data are not
    compared."""
    from specbench.methods import available_methods

    fs, e2 = (available_methods()[m].defaults for m in ("fspad", "eagle2"))
    claim = {"id": "f", "text": "fspad beats eagle2", "better": "fspad", "worse": "eagle2", "metric": "tau"}
    d = tmp_path / "seeds"
    d.mkdir()
    for seed, step in ((0, 3), (1, 4)):
        write(d / f"fspad{seed}.json", _seeded("fspad", fs, step, seed))
    for seed in (0, 1):
        write(d / f"eagle2{seed}.json", _seeded("eagle2", e2, 2, seed))
    write(d / "wofs.json", _seeded("fspad", fs, 1, 0, variant="wofs"))
    runs = C.load_inputs([str(d)])
    assert sorted(r.arm for r in runs) == ["eagle2", "eagle2", "fspad", "fspad", "fspad[wofs]"]
    results = C.check_claims(runs, [claim])
    assert len(results) == 4 and all(cr["verdict"] == "holds" for cr in results)
    [group] = C.seed_spread(results)
    assert group["verdict"] == "holds" and not group["seeds_disagree"] and len(group["pairs"]) == 4
    assert group["better"] == {0: 3.0, 1: 4.0} and group["worse"] == {0: 2.0, 1: 2.0}
    rc, out, err = run_cli([str(d), "--baseline", str(_claims_file(tmp_path, [claim]))], capsys)
    assert rc == 0, err
    assert "holds on mt_bench T=0: 3.000/4.000 (seeds 0/1) vs 2.000/2.000 (seeds 0/1); holds on all 4 pairs" in out
    # the ablation is judged as its own arm
    [cr] = C.check_claims(runs, [{"id": "a", "better": "fspad", "worse": "fspad[wofs]", "metric": "tau"}])[:1]
    assert cr["verdict"] == "holds" and cr["runs"][1].arm == "fspad[wofs]"
    # seed 1 now loses to eagle2: the pairs disagree
    write(d / "fspad1.json", _seeded("fspad", fs, 1, 1))
    [group] = C.seed_spread(C.check_claims(C.load_inputs([str(d)]), [claim]))
    assert group["verdict"] == "within noise" and group["seeds_disagree"]
    # other training data: not checked, and nothing to join
    write(d / "fspad1.json", _seeded("fspad", fs, 4, 1, data="corpus:sha256=other"))
    results = C.check_claims(C.load_inputs([str(d)]), [claim])
    unchecked = [cr for cr in results if not cr["checked"]]
    assert len(unchecked) == 2 and all("drafts trained on other data" in cr["reason"] for cr in unchecked)
    assert [len(g["pairs"]) for g in C.seed_spread(results)] == [2]


def test_arms_on_one_head_pair_head_by_head_and_a_duplicate_seed_is_no_verdict(tmp_path, capsys):
    """EAGLE-2 and EAGLE drafting with the same two heads: the claim is about the tree, so each head is
    paired with itself (head 1 is much better than head 0, and the cross pair eagle2-head0 vs eagle-head1
    would say violated). Two runs of one arm and seed would replace each other's value: no verdict."""
    from specbench.methods import available_methods

    e2, e1 = (available_methods()[m].defaults for m in ("eagle2", "eagle"))
    claim = {"id": "t", "text": "the dynamic tree beats the static", "better": "eagle2", "worse": "eagle",
             "metric": "tau"}
    d = tmp_path / "heads"
    d.mkdir()
    for seed, (s2, s1) in enumerate(((3, 2), (6, 4))):
        for m, params, step in (("eagle2", e2, s2), ("eagle", e1, s1)):
            doc = _seeded(m, params, step, seed)
            doc["config"]["draft_checkpoint_sha256"] = f"head{seed}"
            write(d / f"{m}{seed}.json", doc)
    results = C.check_claims(C.load_inputs([str(d)]), [claim])
    assert sorted(cr["verdict"] for cr in results) == ["holds", "holds", "holds", "violated"]  # all four pairs
    [group] = C.seed_spread(results)
    assert group["verdict"] == "holds" and len(group["pairs"]) == 2 and group["problem"] is None
    assert {(cr["runs"][0].draft_seed, cr["runs"][1].draft_seed) for cr in group["pairs"]} == {(0, 0), (1, 1)}
    # a second run of eagle2 with a seed-0 head (a copy elsewhere, another value)
    doc = _seeded("eagle2", e2, 4, 0)
    doc["config"]["draft_checkpoint_sha256"] = "head0"
    doc["config"]["params"]["checkpoint"] = "/elsewhere/eagle-s0"
    write(d / "eagle2-again.json", doc)
    [group] = C.seed_spread(C.check_claims(C.load_inputs([str(d)]), [claim]))
    assert group["verdict"] is None and "two runs of eagle2 with draft seed 0" in group["problem"]
    rc, out, err = run_cli([str(d), "--baseline", str(_claims_file(tmp_path, [claim]))], capsys)
    assert "not judged on" in out and "two runs of eagle2 with draft seed 0" in out, out + err


def _claims_file(tmp_path, claims: list[dict]) -> Path:
    p = tmp_path / "claims.json"
    p.write_text(json.dumps({"kind": "specbench.claims", "schema_version": 1, "claims": claims}))
    return p
