"""The fidelity study's plan, runs, table and command, on a tiny random Llama with a toy tokenizer."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from test_runner_cli import ToyTokenizer

from specbench import cli
from specbench.bench import compare as C
from specbench.bench import fidelity as F
from specbench.bench.runner import Runner
from specbench.errors import UsageError
from specbench.models import tiny_llama

CLAIMS = [{"id": "e2_gt_pld", "text": "eagle2 beats pld", "better": "eagle2", "worse": "pld", "metric": "tau",
           "datasets": ["humaneval"], "temperatures": [0]},
          {"id": "pld_gt_lookahead", "text": "pld beats lookahead", "better": "pld", "worse": "lookahead",
           "metric": "tau"}]


@pytest.fixture(scope="module")
def runner():
    loaded = tiny_llama(seed=3)
    loaded.tokenizer = ToyTokenizer(64)
    return Runner(loaded=loaded)


def _head(runner, d, seed: int, variant=None):
    from specbench.models.draft_heads import save_head
    from specbench.training.eagle import EagleOptions, EagleTask

    save_head(EagleTask(EagleOptions(embed_init_scale=1.0)).make_head(runner.target.model, seed=seed).eval(),
              "eagle", d)
    (d / "MANIFEST.json").write_text(json.dumps({
        "method": "eagle", "variant": variant, "seed": seed, "data": {"source_id": "x", "corpus": {"content_sha256":
                                                                                                 "c0"}},
        "training": {"seed": seed, "epochs": 1, "max_steps": None}}))
    return str(d)


def _plan(tmp_path, arms: dict, **kw) -> F.Plan:
    doc = {"kind": F.KIND, "schema_version": 1, "target": "tiny", "datasets": ["mt_bench", "humaneval"],
           "temperatures": [0], "limit": 1, "max_new_tokens": 6, "runtime": "auto", "threads": 0, "arms": arms,
           "claims": [c["id"] for c in CLAIMS], "table": None} | kw
    p = tmp_path / "fidelity.json"
    p.write_text(json.dumps(doc))
    (tmp_path / "claims.json").write_text(json.dumps({"kind": "specbench.claims", "schema_version": 1,
                                                      "claims": CLAIMS}))
    return F.load_plan(p)


def test_the_study_runs_every_cell_and_judges_its_claims_over_seeds(runner, tmp_path, capsys, monkeypatch):
    heads = [_head(runner, tmp_path / f"head{s}", s) for s in (3, 7)]  # files are named by seed, not position
    plan = _plan(tmp_path, {"eagle2": {"method": "eagle2", "params": {}, "checkpoints": heads},
                            "pld": {"method": "pld", "params": {}}, "lookahead": {"method": "lookahead"}})
    res = tmp_path / "res"
    paths = F.run_plan(plan, res, runner=runner, progress=False)
    assert sorted(p.name for p in paths) == sorted(
        [f"eagle2-s{s}-{d}-t0.json" for s in (3, 7) for d in ("mt_bench", "humaneval")]
        + [f"{m}-{d}-t0.json" for m in ("pld", "lookahead") for d in ("mt_bench", "humaneval")])
    runs = [r for r in C.load_inputs([str(res)]) if r.method != "vanilla"]
    claims = F.study_claims(plan, tmp_path / "claims.json")
    rows = F.measure(plan, runs, claims)
    assert [(r["claim"], r["dataset"], r["in_paper"]) for r in rows] == [
        ("e2_gt_pld", "mt_bench", False), ("e2_gt_pld", "humaneval", True),
        ("pld_gt_lookahead", "mt_bench", True), ("pld_gt_lookahead", "humaneval", True)]
    for r in rows[:2]:  # eagle2's two seeds, each against the one pld run
        mine = [x for x in runs if x.dataset == r["dataset"]]
        taus = {str(x.draft_seed): x.value("tau") for x in mine if x.method == "eagle2"}
        assert r["better"]["tau"] == taus and r["better"]["min"] == min(taus.values())
        assert [p["seeds"] for p in r["pairs"]] == [[3, None], [7, None]]
        assert r["verdict"] in ("holds", "violated", "within noise")
    # the command: measured and recorded, then printed from the record
    rc = cli.main(["fidelity", "table", "--plan", str(plan.path), "--claims", str(tmp_path / "claims.json"),
                   "--results", str(res), "--record"])
    measured = capsys.readouterr().out
    assert rc == 0 and "recorded 4 rows" in measured
    table = json.loads(plan.path.read_text())["table"]
    assert table["runs"] == len(paths) == 8 and json.loads(json.dumps(rows)) == table["rows"]
    assert table["results"] == str(res)  # outside the working directory: as given
    monkeypatch.chdir(tmp_path)
    assert cli.main(["fidelity", "table", "--plan", str(plan.path), "--claims", str(tmp_path / "claims.json"),
                     "--results", str(res), "--record"]) == 0 and capsys.readouterr().out == measured
    assert json.loads(plan.path.read_text())["table"]["results"] == "res"  # below it: relative, no home dirs
    rc = cli.main(["fidelity", "table", "--plan", str(plan.path), "--claims", str(tmp_path / "claims.json")])
    assert rc == 0 and capsys.readouterr().out.strip() == measured.split("\n", 1)[1].strip()
    # resuming finds every run complete and leaves them as they are
    before = {p.name: p.read_bytes() for p in res.iterdir()}
    F.run_plan(plan, res, runner=runner, progress=False)
    assert {p.name: p.read_bytes() for p in res.iterdir()} == before
    # a seed's run missing (an interrupted study): its rows keep their values but have no verdict
    (res / "eagle2-s7-humaneval-t0.json").unlink()
    rows = F.measure(plan, [r for r in C.load_inputs([str(res)]) if r.method != "vanilla"], claims)
    assert [r["verdict"] == "incomplete" for r in rows] == [False, True, False, False]
    assert rows[1]["reason"] == "eagle2 has 1 of its 2 seeds" and rows[1]["better"]["tau"].keys() == {"3"}
    assert "incomplete: eagle2 has 1 of its 2 seeds" in F.table_lines(rows, claims)


def test_a_plot_shows_every_arm(runner, tmp_path):
    pytest.importorskip("matplotlib")
    from specbench.bench.compare.plot import plot_fidelity

    out = plot_fidelity({"eagle2": {"mt_bench": {0.0: [1.5, 1.7]}}, "pld": {"mt_bench": {0.0: [1.2]}}},
                        ["eagle2", "pld", "hass"], tmp_path / "f.png", "t")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_arm_must_be_what_its_checkpoint_trained(runner, tmp_path):
    head = _head(runner, tmp_path / "h", 0, variant="official")
    plan = _plan(tmp_path, {"eagle2": {"method": "eagle2", "params": {}, "checkpoints": [head]},
                            "pld": {"method": "pld"}, "lookahead": {"method": "lookahead"}}, datasets=["mt_bench"])
    with pytest.raises(UsageError, match=r"trains arm eagle2\[official\], the plan runs it as eagle2"):
        F.run_plan(plan, tmp_path / "res", runner=runner, progress=False)
    assert not (tmp_path / "res").exists()  # refused before anything ran
    assert F._trained_arm("fspad", "fspad-wofs-smollm2-135m") == "fspad[wofs]"  # a committed head, by name


def test_the_committed_plans_checkpoints_pass_the_checks():
    """Every checkpoint the committed plan runs resolves, is its arm's, and its claims' arms are alike (the
    untrained prefix draft `prefix:3` included: no manifest, alone in its arm, no seed)."""
    plan = F.load_plan()
    pairs = {(a.name, c) for a, c, _, _ in plan.cells() if c is not None}
    seeds = F.checkpoint_seeds(plan, pairs, F.study_claims(plan))
    assert set(seeds) == pairs and seeds[("sps", "prefix:3")] is None


def test_a_missing_checkpoint_or_unlike_claim_arms_are_refused_before_decoding(runner, tmp_path):
    a = _head(runner, tmp_path / "h0", 0)
    arms = {"eagle2": {"method": "eagle2", "params": {}, "checkpoints": [a, str(tmp_path / "nowhere")]},
            "pld": {"method": "pld"}, "lookahead": {"method": "lookahead"}}
    plan = _plan(tmp_path, arms, datasets=["mt_bench"])
    with pytest.raises(UsageError, match="nowhere: no such checkpoint"):
        F.run_plan(plan, tmp_path / "res", runner=runner, progress=False)
    b = _head(runner, tmp_path / "h1", 1)
    man = Path(b) / "MANIFEST.json"
    man.write_text(json.dumps(json.loads(man.read_text()) | {"method": "hass"}))
    arms = {"eagle2": {"method": "eagle2", "params": {}, "checkpoints": [a]},
            "hass": {"method": "hass", "params": {}, "checkpoints": [b]}, "pld": {"method": "pld"}}
    plan = _plan(tmp_path, arms, datasets=["mt_bench"], claims=[])
    claim = {"id": "h", "better": "hass", "worse": "eagle2"}
    F.checkpoint_seeds(plan, {("eagle2", a), ("hass", b)}, [claim])  # alike: passes
    man.write_text(json.dumps(json.loads(man.read_text()) | {"training": {"seed": 1, "epochs": 3}}))
    with pytest.raises(UsageError, match="claim h: .* were trained with other epochs"):
        F.run_plan(plan, tmp_path / "res", runner=runner, progress=False, claims=[claim])
    assert not (tmp_path / "res").exists()


@pytest.mark.parametrize("edit,message", [
    ({"seed": 0}, "both trained with seed 0"),
    ({"data": {"source_id": "y"}}, "differ in data"),
    ({"training": {"seed": 1, "epochs": 3, "max_steps": None}}, "differ in epochs"),
    ({"seed": None, "training": {"epochs": 1}}, "does not record a training seed"),
    ({"training": {"seed": 1, "epochs": 1, "max_steps": None, "lr": 0.1}}, "differ in recipe"),
    ({"method": "hass"}, "trained for hass, the plan runs it as arm eagle2"),
])
def test_an_arms_checkpoints_must_be_seeds_of_one_budget(runner, tmp_path, edit, message):
    a, b = _head(runner, tmp_path / "h0", 0), _head(runner, tmp_path / "h1", 1)
    man = Path(b) / "MANIFEST.json"
    man.write_text(json.dumps(json.loads(man.read_text()) | edit))
    plan = _plan(tmp_path, {"eagle2": {"method": "eagle2", "params": {}, "checkpoints": [a, b]},
                            "pld": {"method": "pld"}, "lookahead": {"method": "lookahead"}}, datasets=["mt_bench"])
    with pytest.raises(UsageError, match=message):
        F.run_plan(plan, tmp_path / "res", runner=runner, progress=False)
    assert not (tmp_path / "res").exists()


@pytest.mark.parametrize("edit,message", [
    ({"arms": {"x": {"method": "medusa2"}}}, "arm x: unknown method 'medusa2'"),
    ({"arms": {"pld": {"method": "pld", "params": {"bogus": 1}}}}, "has no parameter bogus"),
    ({"datasets": ["mt_bench", "mtbench"]}, "unknown dataset.s. mtbench"),
    ({"limit": "twenty"}, "malformed fidelity plan"),
    ({"kind": "specbench.claims"}, "not a fidelity plan"),
])
def test_a_bad_plan_is_refused_before_anything_runs(tmp_path, edit, message):
    with pytest.raises(UsageError, match=message):
        _plan(tmp_path, **({"arms": {"pld": {"method": "pld"}}} | edit))


def test_claims_must_name_the_plans_arms(tmp_path):
    plan = _plan(tmp_path, {"pld": {"method": "pld"}, "lookahead": {"method": "lookahead"}})
    with pytest.raises(UsageError, match="claim e2_gt_pld names arm 'eagle2', which the plan does not run"):
        F.study_claims(plan, tmp_path / "claims.json")


def test_the_committed_plan_loads_and_names_committed_claims():
    plan = F.load_plan()
    claims = F.study_claims(plan)
    assert {c["id"] for c in claims} == set(plan.claims)
    assert set(plan.datasets) == {"mt_bench", "humaneval", "gsm8k", "alpaca", "summarization"}
    assert plan.temperatures == (0.0, 1.0) and plan.limit >= 20


def test_the_committed_training_jobs_parse_and_share_one_corpus_and_budget(capsys):
    """Every job's command line is one its method's trainer accepts (parsed up to a deliberate --threads 0
    refusal, before anything loads); the jobs of one family share epochs and corpus; an untrained arm runs
    nothing."""
    from specbench.methods import get_method

    plan = F.load_plan()
    jobs = F.training_jobs(plan)
    for job in jobs:
        argv = job["argv"]
        with pytest.raises(SystemExit):
            get_method(argv[2]).train(argv[3:] + ["--threads", "0"])  # what `specbench train --method M` passes on
        err = capsys.readouterr().err
        assert "--threads must be >= 1" in err, (job["out"], err)
        corpus = plan.doc["training"]["corpus"]
        assert argv[argv.index("--corpus") + 1:argv.index("--corpus") + 1 + len(corpus)] == corpus
    epochs = {j["argv"][j["argv"].index("--epochs") + 1] for j in jobs}
    assert epochs == {"1"}
    for family in (("eagle", "hass", "fspad"), ("kld", "tvd", "tvdpp")):  # one budget per family: all but the arm
        recipes = set()
        for job in (j for j in plan.doc["training"]["jobs"] if j["method"] in family):
            args = job["args"]
            cut = {i for i, a in enumerate(args) if a in ("--variant", "--mask-mode")}
            recipes.add(tuple(a for i, a in enumerate(args) if i not in cut and i - 1 not in cut))
        assert len(recipes) == 1, (family, recipes)
    assert {j["seed"] for j in jobs if "hass" in j["arms"]} == {0, 1}
    assert not [c for c in plan.cells() if c[0].name == "hass[official]"]  # no checkpoint listed yet


def test_train_skips_finished_heads_and_lists_the_rest(tmp_path, capsys):
    done = tmp_path / "h0"
    done.mkdir()
    training = {"corpus": ["c1"], "common": ["--max-tokens", "64"],
                "jobs": [{"arms": ["eagle2"], "method": "eagle", "seeds": [0, 1], "out": str(tmp_path / "h{seed}")}]}
    plan = _plan(tmp_path, {"eagle2": {"method": "eagle2"}, "fspad[wofs]": {"method": "fspad"}}, training=training)
    job = F.training_jobs(plan)[0]
    man = {"training": {"finished": True}, "command": "specbench " + " ".join(job["argv"])}
    (done / "MANIFEST.json").write_text(json.dumps(man))
    assert cli.main(["fidelity", "train", "--plan", str(plan.path), "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("done specbench train --method eagle --out " + str(done))
    assert out[1].startswith("train specbench train") and out[1].endswith("--max-tokens 64 --seed 1")
    # the plan's recipe changed after the head was trained: refused, not skipped
    (done / "MANIFEST.json").write_text(json.dumps(dict(man, command=man["command"].replace("64", "128"))))
    assert cli.main(["fidelity", "train", "--plan", str(plan.path), "--dry-run"]) != 0
    assert re.search("holds a head trained by .*--max-tokens 128.* the plan's job is now", capsys.readouterr().err)
    bad = _plan(tmp_path, {"pld": {"method": "pld"}}, training=dict(training, jobs=[{"arms": ["x"], "method": "eagle",
                                                                                      "seeds": [0], "out": "o"}]))
    with pytest.raises(UsageError, match="training names arm.s. x that the plan does not run"):
        F.training_jobs(bad)
    for job in ({"arms": ["fspad[wofs]"], "method": "fspad", "args": ["--variant", "mlplin"]},
                {"arms": ["fspad[wofs]"], "method": "fspad"}, {"arms": ["eagle2"], "method": "hass"}):
        with pytest.raises(UsageError, match=r"does not train arm (fspad\[wofs\]|eagle2)"):
            F.training_jobs(F.Plan(**{**plan.__dict__, "doc": dict(plan.doc, training=dict(
                training, jobs=[dict(job, seeds=[0], out="o")]))}))
    with pytest.raises(UsageError, match="malformed training block"):
        F.training_jobs(_plan(tmp_path, {"pld": {"method": "pld"}}, training={"jobs": [{}]}))


def test_install_copies_finished_heads_and_points_the_arms_at_them(runner, tmp_path, monkeypatch):
    """Seed 0 goes to <install>-<target>, seed k to <install>-s<k>-<target>, files unchanged but the
    manifest's `installed_as` / `replaces`; an arm lists its finished heads in seed order (by name when
    installed under specbench/checkpoints/), an arm with none lists none."""
    from specbench.artifacts import sha256_file
    from specbench.methods import head_drafters

    dest = tmp_path / "ckpts"
    dest.mkdir()
    monkeypatch.setattr(head_drafters, "CHECKPOINTS_DIR", dest)  # where the methods find heads by name
    training = {"corpus": ["c1"], "common": ["--max-tokens", "64"],
                "jobs": [{"arms": ["eagle2"], "method": "eagle", "seeds": [1, 0], "out": str(tmp_path / "h{seed}"),
                          "install": "eagle"},
                         {"arms": ["fspad[wofs]"], "method": "fspad", "args": ["--variant", "wofs"], "seeds": [0],
                          "out": str(tmp_path / "w{seed}"), "install": "fspad-wofs"}]}
    plan = _plan(tmp_path, {"eagle2": {"method": "eagle2", "checkpoints": ["old-head"]},
                            "fspad[wofs]": {"method": "fspad", "checkpoints": ["old-wofs"]},
                            "pld": {"method": "pld"}, "lookahead": {"method": "lookahead"}}, training=training)
    jobs = F.training_jobs(plan)
    assert [j["install"] for j in jobs] == ["eagle-s1-tiny", "eagle-tiny", "fspad-wofs-tiny"]

    def finish(job):
        d = Path(_head(runner, Path(job["out"]), job["seed"]))
        man = json.loads((d / "MANIFEST.json").read_text())
        man.update(command="specbench " + " ".join(job["argv"]), weights_sha256=sha256_file(d / "model.safetensors"),
                   replaces={"stale": 1})
        man["training"]["finished"] = True
        (d / "MANIFEST.json").write_text(json.dumps(man))

    old = Path(_head(runner, dest / "eagle-tiny", 7))  # the head installed before, other weights
    (old / "MANIFEST.json").write_text(json.dumps({"weights_sha256": "0ld", "heldout": {"top1": 0.39},
                                                   "command": "old cmd", "replaces": {"weights_sha256": "older"}}))
    finish(jobs[1])
    lines = F.install_heads(plan)
    assert any(line.startswith("not trained yet: " + jobs[0]["out"]) for line in lines)
    assert (dest / "eagle-tiny" / "model.safetensors").read_bytes() == (tmp_path / "h0" /
                                                                         "model.safetensors").read_bytes()
    man = json.loads((dest / "eagle-tiny" / "MANIFEST.json").read_text())
    assert man["replaces"] == {"weights_sha256": "0ld", "heldout": {"top1": 0.39}, "command": "old cmd",
                               "replaces": {"weights_sha256": "older"}}
    assert "h0" in man["installed_as"] and [p.name for p in dest.iterdir()] == ["eagle-tiny"]  # nothing left aside
    arms = json.loads(plan.path.read_text())["arms"]
    assert arms["eagle2"]["checkpoints"] == ["eagle-tiny"]
    assert arms["fspad[wofs]"]["checkpoints"] == []  # not a head of another recipe
    assert arms["pld"] == {"method": "pld"}

    finish(jobs[0])
    lines = F.install_heads(F.load_plan(plan.path))
    assert f"{jobs[1]['out']}: already installed as eagle-tiny" in lines
    assert json.loads((dest / "eagle-tiny" / "MANIFEST.json").read_text())["replaces"]["command"] == "old cmd"
    assert "replaces" not in json.loads((dest / "eagle-s1-tiny" / "MANIFEST.json").read_text())
    again = F.load_plan(plan.path)
    assert again.arms["eagle2"].checkpoints == ("eagle-tiny", "eagle-s1-tiny")
    pairs = {(a.name, c) for a, c, _, _ in again.cells() if c is not None}
    assert F.checkpoint_seeds(again, pairs) == {("eagle2", "eagle-tiny"): 0, ("eagle2", "eagle-s1-tiny"): 1}
    assert not [c for c in again.cells() if c[0].name == "fspad[wofs]"]

    # an install interrupted with the old head moved aside and the new one not yet in place: the old one
    # comes back, and the new one replaces it
    first = json.loads((dest / "eagle-tiny" / "MANIFEST.json").read_text())["weights_sha256"]
    (dest / "eagle-tiny").rename(dest / ".eagle-tiny.old")
    (tmp_path / "h0" / "model.safetensors").write_bytes((tmp_path / "h1" / "model.safetensors").read_bytes())
    F.install_heads(again, tmp_path / "elsewhere")  # another directory: nothing under dest is touched
    assert not (dest / "eagle-tiny").exists()
    assert json.loads(plan.path.read_text())["arms"]["eagle2"]["checkpoints"][0] == str(tmp_path / "elsewhere" /
                                                                                          "eagle-tiny")
    F.install_heads(again)
    man = json.loads((dest / "eagle-tiny" / "MANIFEST.json").read_text())
    assert man["replaces"]["weights_sha256"] == first and man["replaces"]["replaces"]["command"] == "old cmd"
    assert sorted(p.name for p in dest.iterdir()) == ["eagle-s1-tiny", "eagle-tiny"]
