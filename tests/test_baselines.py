"""Tests for baselines/*.json and specbench.bench.baselines (standard library + pytest only)."""

from __future__ import annotations

import ast
import json
import shutil
from collections import defaultdict
from pathlib import Path

import pytest

from specbench.bench import baselines as B
from specbench.bench.baselines import BaselineError, find, judge, load_baselines, load_file

REPO = Path(__file__).resolve().parents[1]
ROOT = REPO / "baselines"
FILES = {
    "hass_2408.15766.json": 620,
    "eagle2_2406.16858.json": 320,
    "fspad_2408.15562.json": 1,
    "tvdpp_2403.00858.json": 3,
}
# names the task fixed, plus the documented additions (baselines/README.md)
BRIEF_METHODS = {"vanilla", "pld", "lookahead", "eagle", "eagle2", "hass", "fspad", "tvdpp", "kld", "tvd"}
DOCUMENTED_EXTRA_METHODS = {"sps", "medusa", "hydra"}
BRIEF_DATASETS = {"mt_bench", "humaneval", "gsm8k", "alpaca", "nq", "cnn_dm", "translation",
                  "summarization", "qa", "math_reasoning", "rag", "spec_bench"}
DOCUMENTED_EXTRA_DATASETS = {"mean", "dolly", "xsum"}


@pytest.fixture(scope="module")
def rows():
    return load_baselines()


def one(rows, **kw):
    got = find(rows, **kw)
    assert len(got) == 1, f"expected exactly one row for {kw}, got {len(got)}"
    return got[0]


# ------------------------------------------------------------------ files / schema

def test_default_root_is_repo_baselines():
    assert B.DEFAULT_ROOT == ROOT
    assert (ROOT / "README.md").is_file()
    assert (ROOT / "embedded" / ".gitkeep").is_file()


def test_every_file_validates_with_expected_row_count():
    found = sorted(p.name for p in ROOT.glob("*.json"))
    assert found == sorted(FILES)
    for name, n in FILES.items():
        got = load_file(ROOT / name)
        assert len(got) == n, name
        assert all(r.source_file == name for r in got)


def test_hass_tables_complete(rows):
    hass = find(rows, paper="HASS")
    per = defaultdict(int)
    for r in hass:
        per[r.table] += 1
    # T1: 2 models x (2 training-free methods x 4 T=0 cells + 3 methods x 8) + 2 models x 3 x 8
    assert per == {"Table 1": 112, "Table 2": 96, "Table 3": 21, "Table 4": 40, "Table 5": 12,
                   "Table 6": 15, "Table 7": 160, "Table 8": 64, "Table 9": 100}
    # PLD / Lookahead have no T=1 cells and no speedup rows in the paper
    assert not find(hass, method=["pld", "lookahead"], temperature=1.0)
    assert not find(hass, method=["pld", "lookahead"], metric="speedup")


def test_names_are_canonical(rows):
    for r in rows:
        assert r.method in BRIEF_METHODS | DOCUMENTED_EXTRA_METHODS, r
        assert r.dataset is None or r.dataset in BRIEF_DATASETS | DOCUMENTED_EXTRA_DATASETS, r
        assert r.target in B.KNOWN_TARGETS, r
        assert r.metric in {"tau", "speedup", "tau_ratio"}, r
        assert r.provenance in {"[paper]", "[code]", "[abstract]", "[secondary]", "[derived]"}
        if r.dataset == "mean":
            assert set(r.extra["mean_over"]) <= BRIEF_DATASETS
    for name in FILES:
        data = json.loads((ROOT / name).read_text())
        for target, spec in data["targets"].items():
            assert target in B.KNOWN_TARGETS
            assert spec["hf_id"].split("/")[0] in {"lmsys", "meta-llama"}, spec
    hass_targets = json.loads((ROOT / "hass_2408.15766.json").read_text())["targets"]
    assert hass_targets["llama2-chat-7b"]["hf_id"] == "meta-llama/Llama-2-7b-chat-hf"
    assert hass_targets["llama2-chat-7b"]["drafts"]["eagle"] == "yuhuili/EAGLE-llama2-chat-7B"


def test_no_duplicate_rows_in_raw_json():
    # independent of the loader's own duplicate check
    for name in FILES:
        data = json.loads((ROOT / name).read_text())
        seen = set()
        for r in data["rows"]:
            k = (data["paper"], r["table"], r["target"], r["method"], r["dataset"],
                 r["temperature"], r["metric"], r.get("setting"))
            assert k not in seen, (name, k)
            seen.add(k)


def test_ablation_tables_always_carry_a_setting(rows):
    main = {("HASS", "Table 1"), ("HASS", "Table 2"), ("EAGLE-2", "Table 1"), ("EAGLE-2", "Table 2"),
            ("EAGLE-2", "EAGLE-3 Table 1")}
    for r in rows:
        if r.paper in ("HASS", "EAGLE-2"):
            assert (r.setting is None) == ((r.paper, r.table) in main), r


def test_provenance_and_hardware_policy(rows):
    for r in find(rows, paper="HASS"):
        assert r.provenance == "[paper]" and r.hardware == "NVIDIA H800" and r.hardware_class == "H800"
    for r in find(rows, paper="EAGLE-2"):
        assert r.provenance == "[secondary]", r  # third-party transcription, never the paper's own
        assert r.hardware is None and r.hardware_class is None
    for r in find(rows, paper=["FSPAD", "TVD++"]):
        assert r.hardware_class is None
    for r in rows:
        assert r.tolerance_rel == {"tau": 0.03, "speedup": 0.15, "tau_ratio": 0.06}[r.metric]


# ------------------------------------------------------------------ spot checks (read in the papers' text)

SPOT = [
    # HASS Table 1 (tau): "HASS 4.99 5.29 5.17 5.15 4.84 4.91 5.01 4.92" under L2 7B
    (dict(paper="HASS", table="Table 1", target="llama2-chat-7b", method="hass", dataset="mt_bench",
          temperature=0.0, metric="tau"), 4.99),
    # HASS Table 1: L2 13B "PLD 1.46 1.70 1.44 1.53"
    (dict(paper="HASS", table="Table 1", target="llama2-chat-13b", method="pld", dataset="gsm8k",
          temperature=0.0, metric="tau"), 1.44),
    # HASS Table 1: L3 70B "EAGLE-2 4.10 5.02 4.37 4.50 4.00 4.93 4.35 4.43"
    (dict(paper="HASS", table="Table 1", target="llama3-instruct-70b", method="eagle2", dataset="humaneval",
          temperature=1.0, metric="tau"), 4.93),
    # HASS Table 2 (speedup): L3 70B HASS T=0 Mean 4.05x (the abstract's upper end)
    (dict(paper="HASS", table="Table 2", target="llama3-instruct-70b", method="hass", dataset="mean",
          temperature=0.0, metric="speedup"), 4.05),
    # HASS Table 2: L3 8B "EAGLE 1.29x 2.00x 1.85x 1.71x 1.25x 1.41x 1.67x 1.44x"
    (dict(paper="HASS", table="Table 2", target="llama3-instruct-8b", method="eagle", dataset="humaneval",
          temperature=1.0, metric="speedup"), 1.41),
    # HASS Table 3: "BiLD Loss 5.04 4.75 4.90"
    (dict(paper="HASS", table="Table 3", setting="loss=bild", temperature=0.0), 5.04),
    # HASS Table 4: T=1 "HASS Align-5 4.71 4.92 4.95 4.86"
    (dict(paper="HASS", table="Table 4", setting="align_steps=5", dataset="gsm8k", temperature=1.0), 4.95),
    # HASS Table 5: beta 0.5 at T=0 = 4.67 (LLaMA3-Instruct 70B)
    (dict(paper="HASS", table="Table 5", setting="beta=0.5", temperature=0.0,
          target="llama3-instruct-70b"), 4.67),
    # HASS Table 6: "Feature + Token (1.0) 4.28 4.11 4.20"
    (dict(paper="HASS", table="Table 6", setting="alignment=feature+token,token_p=1.0", temperature=1.0), 4.11),
    # HASS Table 7, T=1: "50 1.0 2.62x 4.77 3.01x 4.88 2.99x 5.03 2.87x 4.89"
    (dict(paper="HASS", table="Table 7", setting="topk_k=50,topk_w=1.0", temperature=1.0,
          dataset="humaneval", metric="speedup"), 3.01),
    (dict(paper="HASS", table="Table 7", setting="topk_k=50,topk_w=1.0", temperature=1.0,
          dataset="humaneval", metric="tau"), 4.88),
    # HASS Table 7, T=0: "10 0.1 2.98x 4.96 3.40x 5.26 3.51x 5.16 3.30x 5.13"
    (dict(paper="HASS", table="Table 7", setting="topk_k=10,topk_w=0.1", temperature=0.0,
          dataset="gsm8k", metric="speedup"), 3.51),
    # HASS Table 8: L2 13B MG T=0 "3.34x 5.27 4.42x 6.00 ..."
    (dict(paper="HASS", table="Table 8", target="llama2-chat-13b", setting="data=model_generated",
          temperature=0.0, dataset="humaneval", metric="tau"), 6.00),
    # HASS Table 8: L2 7B MG T=0 mean tau, from the garbled fragment "16x 5.51"
    (dict(paper="HASS", table="Table 8", target="llama2-chat-7b", setting="data=model_generated",
          temperature=0.0, dataset="mean", metric="tau"), 5.51),
    # HASS Table 9: L2 13B T=1 HASS-MG, depth 7 / 80 tokens = 3.24x; L2 7B T=0 EAGLE-2 depth 9 / 40 = 2.28x
    (dict(paper="HASS", table="Table 9", target="llama2-chat-13b", method="hass", temperature=1.0,
          setting="data=model_generated,depth=7,total_tokens=80"), 3.24),
    (dict(paper="HASS", table="Table 9", target="llama2-chat-7b", method="eagle2", temperature=0.0,
          setting="depth=9,total_tokens=40"), 2.28),
    # EAGLE-2 [secondary] Table 1: V13B T=0 EAGLE-2 MT-bench "4.26x / 4.83" (abstract's upper end)
    (dict(paper="EAGLE-2", table="Table 1", target="vicuna-13b-v1.3", method="eagle2", dataset="mt_bench",
          temperature=0.0, metric="speedup"), 4.26),
    (dict(paper="EAGLE-2", table="Table 1", target="vicuna-13b-v1.3", method="eagle2", dataset="mt_bench",
          temperature=0.0, metric="tau"), 4.83),
    # EAGLE-2 Table 1: V7B T=1 EAGLE-2 MT-bench 3.05x (abstract's lower end)
    (dict(paper="EAGLE-2", table="Table 1", target="vicuna-7b-v1.3", method="eagle2", dataset="mt_bench",
          temperature=1.0, metric="speedup"), 3.05),
    # EAGLE-2 Table 1: L2-13B T=1 EAGLE Nat. Ques. "2.37x / 3.31"
    (dict(paper="EAGLE-2", table="Table 1", target="llama2-chat-13b", method="eagle", dataset="nq",
          temperature=1.0, metric="tau"), 3.31),
    # EAGLE-2 Table 2: LLaMA3-Instruct 8B EAGLE-2 "3.46x | 4.53"
    (dict(paper="EAGLE-2", table="Table 2", target="llama3-instruct-8b", method="eagle2",
          metric="speedup"), 3.46),
    # EAGLE-2 ablation: "w/o reranking | 3.48x / 4.86 | 3.50x / 4.85"
    (dict(paper="EAGLE-2", table="Ablation", setting="ablation=wo_reranking", dataset="gsm8k",
          metric="tau"), 4.85),
    # EAGLE-3 Table 1 via note: Hydra CNN/DM "2.05x / 2.81"
    (dict(paper="EAGLE-2", table="EAGLE-3 Table 1", method="hydra", dataset="cnn_dm", metric="tau"), 2.81),
    # FSPAD summary: "12.3% enhancement in average acceptance length" on summarization, Vicuna 33B
    (dict(paper="FSPAD", target="vicuna-33b-v1.3", method="fspad", dataset="summarization",
          metric="tau_ratio"), 1.123),
    # TVD++ abstract: "up to 2.3 block efficiency and 2.4x speed-up"
    (dict(paper="TVD++", table="Abstract", metric="tau"), 2.3),
    (dict(paper="TVD++", table="Abstract", metric="speedup"), 2.4),
]


@pytest.mark.parametrize("filters,value", SPOT, ids=[f"{f.get('paper')}-{i}" for i, (f, _) in enumerate(SPOT)])
def test_spot_values_from_the_papers(rows, filters, value):
    assert one(rows, **filters).value == pytest.approx(value, abs=1e-9)


def test_spot_checks_cover_every_file():
    assert {f["paper"] for f, _ in SPOT} == {"HASS", "EAGLE-2", "FSPAD", "TVD++"}


def test_secondary_and_special_rows_are_labelled(rows):
    fs = one(rows, paper="FSPAD", metric="tau_ratio")
    assert fs.provenance == "[secondary]" and fs.extra["baseline_method"] == "eagle2"
    tv = one(rows, paper="TVD++", table="Abstract", metric="tau")
    assert tv.provenance == "[abstract]" and tv.extra["bound"] == "max" and tv.dataset is None
    assert one(rows, paper="TVD++", table="Third-party note").provenance == "[secondary]"
    sps = find(rows, paper="EAGLE-2", method="sps")
    assert sps and all(r.extra.get("draft") == "Vicuna-68M" for r in sps)


# ------------------------------------------------------------------ internal consistency of the transcription

def test_mean_cells_equal_the_mean_of_their_cells(rows):
    # catches a mis-transcribed cell or column shift: every printed Mean must match (to rounding)
    known_off = {("EAGLE-2", "Table 1", "llama2-chat-7b", "eagle2", 1.0, "speedup")}  # 3.158 printed 3.15
    checked = 0
    for r in find(rows, dataset="mean"):
        parts = [one(rows, paper=r.paper, table=r.table, target=r.target, method=r.method, dataset=d,
                     temperature=r.temperature, metric=r.metric, setting=r.setting).value
                 for d in r.extra["mean_over"]]
        tol = 0.0051 if (r.paper, r.table, r.target, r.method, r.temperature, r.metric) not in known_off else 0.011
        assert abs(sum(parts) / len(parts) - r.value) <= tol, (r, parts)
        checked += 1
    for r in find(rows, temperature=None):
        if "mean_over_temperatures" not in r.extra:
            continue
        parts = [one(rows, paper=r.paper, table=r.table, target=r.target, method=r.method, dataset=r.dataset,
                     temperature=t, metric=r.metric, setting=r.setting).value
                 for t in r.extra["mean_over_temperatures"]]
        assert abs(sum(parts) / len(parts) - r.value) <= 0.0051, (r, parts)
        checked += 1
    assert checked > 150


def test_hass_ablation_defaults_repeat_the_main_tables(rows):
    h = find(rows, paper="HASS")

    def main(table, target, method, ds, t):
        return one(h, table=table, target=target, method=method, dataset=ds, temperature=t, setting=None).value

    for t in (0.0, 1.0):
        for ds in ("mt_bench", "humaneval", "gsm8k", "mean"):
            # Table 7 default (K=10, w=1.0) and Table 8 'F' = Tables 1/2 HASS on L2 7B
            for table, setting in (("Table 7", "topk_k=10,topk_w=1.0"), ("Table 8", "data=fixed")):
                assert one(h, table=table, setting=setting, target="llama2-chat-7b", dataset=ds, temperature=t,
                           metric="tau").value == main("Table 1", "llama2-chat-7b", "hass", ds, t)
                assert one(h, table=table, setting=setting, target="llama2-chat-7b", dataset=ds, temperature=t,
                           metric="speedup").value == main("Table 2", "llama2-chat-7b", "hass", ds, t)
            assert one(h, table="Table 8", setting="data=fixed", target="llama2-chat-13b", dataset=ds,
                       temperature=t, metric="tau").value == main("Table 1", "llama2-chat-13b", "hass", ds, t)
            # Table 4 Align-3 is the default HASS
            assert one(h, table="Table 4", setting="align_steps=3", dataset=ds, temperature=t).value == \
                main("Table 1", "llama2-chat-7b", "hass", ds, t)
        assert one(h, table="Table 3", setting="loss=top_k", temperature=t).value == \
            main("Table 1", "llama2-chat-7b", "hass", "mt_bench", t)
        assert one(h, table="Table 5", setting="beta=1.0", temperature=t).value == \
            main("Table 1", "llama3-instruct-70b", "hass", "mt_bench", t)
        assert one(h, table="Table 6", method="eagle2", temperature=t).value == \
            main("Table 1", "llama2-chat-7b", "eagle2", "mt_bench", t)
        # Table 9 at the default tree (depth 6, 60 tokens) = Table 2 EAGLE-2 MT-bench
        for target in ("llama2-chat-7b", "llama2-chat-13b"):
            assert one(h, table="Table 9", method="eagle2", target=target, temperature=t,
                       setting="depth=6,total_tokens=60").value == main("Table 2", target, "eagle2", "mt_bench", t)
    # ... and HASS-MG there = Table 8 MG
    assert one(h, table="Table 9", method="hass", target="llama2-chat-13b", temperature=1.0,
               setting="data=model_generated,depth=6,total_tokens=60").value == \
        one(h, table="Table 8", setting="data=model_generated", target="llama2-chat-13b", dataset="mt_bench",
            temperature=1.0, metric="speedup").value


def test_hass_abstract_claim_matches_table_2(rows):
    means = [r.value for r in find(rows, paper="HASS", table="Table 2", method="hass", dataset="mean")]
    assert (min(means), max(means)) == (2.81, 4.05)  # "2.81x-4.05x ... averaging across three datasets"


def test_trees(rows):
    for r in find(rows, paper="HASS", method=["eagle2", "hass"]):
        if r.table != "Table 9":
            assert r.tree == {"depth": 6, "top_k": 10, "total_tokens": 60}
    for r in find(rows, method=["pld", "lookahead", "eagle"]):
        assert r.tree is None
    assert one(rows, paper="EAGLE-2", table="Table 2", target="llama2-chat-70b", method="eagle2",
               metric="tau").tree == {"depth": 6, "top_k": 10, "total_tokens": 48}
    assert one(rows, paper="EAGLE-2", table="Table 1", target="vicuna-13b-v1.3", method="eagle2",
               dataset="gsm8k", temperature=0.0, metric="tau").tree["total_tokens"] == 50


# ------------------------------------------------------------------ loader behaviour

def _corrupt(tmp_path, mutate, name="hass_2408.15766.json"):
    shutil.copy(ROOT / name, tmp_path / name)
    data = json.loads((tmp_path / name).read_text())
    mutate(data)
    (tmp_path / name).write_text(json.dumps(data))
    return tmp_path / name


CORRUPTIONS = {
    "method": lambda d: d["rows"][3].__setitem__("method", "EAGLE-2"),
    "dataset": lambda d: d["rows"][5].__setitem__("dataset", "MT-bench"),
    "target": lambda d: d["rows"][0].__setitem__("target", "llama-2-7b"),
    "provenance": lambda d: d["rows"][7].__setitem__("provenance", "paper"),
    "value": lambda d: d["rows"][2].__setitem__("value", "4.99"),
    "temperature": lambda d: d["rows"][2].__setitem__("temperature", "greedy"),
    "tree": lambda d: d["rows"][20].__setitem__("tree", {"depth": 6}),
    "metric": lambda d: d["rows"][1].__setitem__("metric", "acceptance_length"),
    "settng": lambda d: d["rows"][300].__setitem__("settng", "x"),
    "hardware_class": lambda d: d["tolerance"]["speedup"].pop("hardware_class"),
    "arxiv": lambda d: d.__setitem__("arxiv", "arXiv:2408.15766"),
    "rows[1]": lambda d: d["rows"].__setitem__(1, dict(d["rows"][0])),  # duplicate
    "mean_over": lambda d: next(r for r in d["rows"] if r["dataset"] == "mean").pop("mean_over"),
}


@pytest.mark.parametrize("field", sorted(CORRUPTIONS))
def test_corrupted_file_raises_naming_file_and_field(tmp_path, field):
    _corrupt(tmp_path, CORRUPTIONS[field])
    with pytest.raises(BaselineError) as ei:
        load_baselines(tmp_path)
    msg = str(ei.value)
    assert "hass_2408.15766.json" in msg and field in msg, msg
    assert "\n" not in msg
    assert isinstance(ei.value, ValueError)


def test_tau_below_one_and_invalid_json_rejected(tmp_path):
    _corrupt(tmp_path, lambda d: d["rows"][0].__setitem__("value", 0.99))
    with pytest.raises(BaselineError, match=r"hass_2408\.15766\.json: rows\[0\]\.value"):
        load_baselines(tmp_path)
    (tmp_path / "hass_2408.15766.json").write_text('{"schema_version": 1,')
    with pytest.raises(BaselineError, match=r"hass_2408\.15766\.json: .*invalid JSON"):
        load_baselines(tmp_path)


def test_intact_copy_loads_and_embedded_dir_is_ignored(tmp_path):
    shutil.copy(ROOT / "tvdpp_2403.00858.json", tmp_path)
    (tmp_path / "embedded").mkdir()
    (tmp_path / "embedded" / "junk.json").write_text("not json")
    assert len(load_baselines(tmp_path)) == 3
    with pytest.raises(BaselineError):
        load_baselines(tmp_path / "missing")


def test_find_filters(rows):
    assert len(find(rows, paper="HASS", setting=None)) == 112 + 96
    assert len(find(rows, paper="HASS", table="Table 1", method=["pld", "lookahead"])) == 16
    assert find(rows, paper="nope") == []
    assert all(r.setting == "beta=0.3" for r in find(rows, setting="beta=0.3"))


def test_judge_policy(rows):
    tau = one(rows, paper="HASS", table="Table 1", target="llama2-chat-7b", method="hass", dataset="mt_bench",
              temperature=0.0, metric="tau")
    assert judge(tau, 4.99 * 1.029) == "pass"
    assert judge(tau, 4.99 * 0.96) == "fail"
    assert judge(tau, float("nan")) == "fail"
    sp = one(rows, paper="HASS", table="Table 2", target="llama2-chat-7b", method="hass", dataset="mt_bench",
             temperature=0.0, metric="speedup")
    assert judge(sp, 2.99, "NVIDIA H800 PCIe") == "pass"
    assert judge(sp, 2.0, "NVIDIA H800") == "fail"
    # other hardware, or unknown: never pass
    for env in ("NVIDIA A100-SXM4-40GB", "NVIDIA H100 80GB HBM3", None, "cpu"):
        assert judge(sp, 2.99, env) == "not_comparable"
    e2 = one(rows, paper="EAGLE-2", table="Table 2", target="llama3-instruct-8b", method="eagle2", metric="speedup")
    assert judge(e2, 3.46, "NVIDIA A100-SXM4-80GB") == "not_comparable"  # hardware not stated by the source
    tv = one(rows, paper="TVD++", table="Abstract", metric="tau")
    assert judge(tv, 2.3) == "not_comparable"  # an "up to" claim is not a cell
    assert B.hardware_matches("A100", "NVIDIA A100-SXM4-40GB")
    assert not B.hardware_matches("A10", "NVIDIA A100-SXM4-40GB")


def test_loader_uses_only_the_standard_library():
    src = (REPO / "specbench" / "bench" / "baselines.py").read_text()
    mods = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Import):
            mods |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            mods.add(node.module.split(".")[0])
    assert mods <= {"__future__", "collections", "json", "math", "re", "dataclasses", "pathlib", "typing",
                    "specbench"}, mods
