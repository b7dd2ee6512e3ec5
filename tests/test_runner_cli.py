"""Runner, results files, metrics and CLI errors, on a tiny random Llama with a toy tokenizer."""

from __future__ import annotations

import json

import pytest
import torch

from specbench import cli
from specbench.bench import metrics, results
from specbench.bench.datasets import load_prompts
from specbench.bench.runner import RunConfig, Runner, default_out, plan_run
from specbench.errors import ContextLengthError, UsageError
from specbench.methods.pld import lookup
from specbench.models import tiny_llama


class ToyTokenizer:
    """Characters -> ids modulo a small vocabulary; enough for chat formatting and decode."""

    chat_template = "toy"
    eos_token_id = None

    def __init__(self, vocab: int):
        self.vocab = vocab

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % self.vocab for c in text[:48]]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i % 26) for i in ids)


@pytest.fixture(scope="module")
def runner():
    loaded = tiny_llama(seed=3)
    loaded.tokenizer = ToyTokenizer(64)
    return Runner(loaded=loaded)


def _cfg(**kw):
    base = dict(method="pld", dataset="mt_bench", limit=2, max_new_tokens=12)
    base.update(kw)
    return RunConfig(**base)


def test_run_writes_a_complete_versioned_results_file(runner, tmp_path):
    out = tmp_path / "r.json"
    doc = runner.run(_cfg(), out=out, progress=False)
    disk = results.load(out)
    assert disk["schema_version"] == results.SCHEMA_VERSION and disk["status"] == "complete"
    assert disk["config"]["prompt_ids"] == ["mt_bench/81", "mt_bench/82"]
    assert disk["config"]["params"] == {"max_ngram_size": 3, "num_pred_tokens": 10}
    for key in ("torch", "transformers", "cpu", "threads", "date", "git_commit"):
        assert key in disk["environment"]
    assert len(disk["samples"]) == 4  # MT-bench: two turns each
    s = doc["summary"]
    assert s["greedy_identical"] == {"identical": 4, "compared": 4, "numerical_ties": 0}
    pld = s["pld"]
    assert pld["new_tokens"] == 48 and pld["tau"] == pytest.approx(48 / pld["steps"])
    assert pld["speedup"] == pytest.approx(pld["tokens_per_s"] / s["vanilla"]["tokens_per_s"])
    assert set(disk["definitions"]) >= {"tau", "alpha_k", "speedup"}
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write leaves no temp file


def test_second_turn_sees_the_models_own_first_answer(runner, monkeypatch, tmp_path):
    seen = []
    real = runner.loaded.tokenizer.apply_chat_template
    monkeypatch.setattr(runner.loaded.tokenizer, "apply_chat_template",
                        lambda messages, **kw: seen.append(messages) or real(messages, **kw))
    runner.run(_cfg(limit=1), out=tmp_path / "r.json", progress=False)
    second = [m for m in seen if len(m) == 3]  # the up-front context check comes first; the decodes' prompts last
    assert second and second[-1][1]["role"] == "assistant" and second[-1][1]["content"]


def test_resume_keeps_finished_prompts(runner, tmp_path):
    out = tmp_path / "r.json"
    first = runner.run(_cfg(limit=1), out=out, progress=False)
    again = runner.run(_cfg(limit=2), out=out, progress=False)
    assert again["samples"][:2] == first["samples"]  # not re-run: identical timings
    assert len(again["samples"]) == 4


def test_resume_refuses_other_settings_and_corrupt_files(runner, tmp_path):
    out = tmp_path / "r.json"
    runner.run(_cfg(limit=1), out=out, progress=False)
    before = out.read_bytes()
    with pytest.raises(UsageError, match="other settings"):
        runner.run(_cfg(limit=1, max_new_tokens=5), out=out, progress=False)
    out.write_text(before.decode()[:100])
    with pytest.raises(results.ResultsError, match="not valid JSON"):
        runner.run(_cfg(limit=1), out=out, progress=False)
    assert out.read_text() == before.decode()[:100]  # nothing overwritten


def test_newer_schema_is_refused(tmp_path):
    p = tmp_path / "r.json"
    p.write_text(json.dumps({"kind": results.KIND, "schema_version": results.SCHEMA_VERSION + 1}))
    with pytest.raises(results.ResultsError, match="newer"):
        results.load(p)


def test_prompt_longer_than_context_fails_before_writing(tmp_path):
    loaded = tiny_llama(seed=1, max_position_embeddings=40)
    loaded.tokenizer = ToyTokenizer(64)
    out = tmp_path / "r.json"
    with pytest.raises(ContextLengthError, match="exceeds the context"):
        Runner(loaded=loaded).run(_cfg(), out=out, progress=False)
    assert not out.exists()


def test_sampled_run_records_no_greedy_check(runner, tmp_path):
    doc = runner.run(_cfg(limit=1, temperature=1.0, top_k=20), out=tmp_path / "r.json", progress=False)
    assert "greedy_identical" not in doc["summary"]
    assert doc["config"]["sampling"] == {"temperature": 1.0, "top_k": 20, "top_p": 1.0}


def test_metrics_definitions():
    a = {"new_tokens": 6, "steps": [3, 2, 1], "reached": [3, 2, 1], "accepted": [2, 1, 0], "drafted": 9,
         "wall_s": 1.0, "draft_s": 0.1, "verify_s": 0.8}
    b = {"new_tokens": 2, "steps": [1, 1], "reached": [1], "accepted": [0], "drafted": 2,
         "wall_s": 1.0, "draft_s": 0.1, "verify_s": 0.8}
    s = metrics.summarize([a, b])
    assert s["tau"] == pytest.approx(8 / 5)
    assert s["tau_macro"] == pytest.approx((2 + 1) / 2)
    assert s["alpha_k"] == [pytest.approx(2 / 4), pytest.approx(1 / 2), pytest.approx(0.0)]
    assert s["tokens_per_s"] == pytest.approx(4.0)


@pytest.mark.parametrize("seed", range(20))
def test_pld_lookup_matches_transformers_prompt_lookup(seed):
    from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 6, (1, int(torch.randint(2, 40, (1,), generator=g))), generator=g)
    ref = PromptLookupCandidateGenerator(num_output_tokens=4, max_matching_ngram_size=3, max_length=10_000)
    cand, _ = ref.get_candidates(ids)
    assert lookup(ids[0], 3, 4) == cand[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("argv, message", [
    (["run", "--method", "nope", "--dataset", "mt_bench"], "unknown method 'nope'"),
    (["run", "--method", "pld", "--dataset", "nope"], "unknown dataset 'nope'"),
    (["run", "--method", "pld", "--dataset", "mt_bench", "--param", "bogus=1"], "has no parameter bogus"),
    (["run", "--method", "pld", "--dataset", "mt_bench", "--param", "max_ngram_size=x"], "not a valid int"),
    (["run", "--method", "pld", "--dataset", "mt_bench", "--target", "/no/such/model"], "not an embedded model"),
])
def test_cli_bad_input_is_one_line_and_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv + ["--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "results").exists()


# ------------------------------------------------------------------ the command line, end to end on a tiny target


@pytest.fixture
def cli_env(tmp_path, monkeypatch):
    """`specbench run` in an empty directory, its target a tiny model; `loads` counts model loads."""
    import specbench.models

    loads = []

    def fake_load(spec, **kw):
        loads.append(spec)
        loaded = tiny_llama(seed=3)
        loaded.tokenizer = ToyTokenizer(64)
        return loaded

    monkeypatch.setattr(specbench.models, "load_model", fake_load)
    monkeypatch.chdir(tmp_path)
    return loads


RUN = ["run", "--method", "pld", "--dataset", "mt_bench", "--limit", "1", "--max-new-tokens", "8", "--no-progress"]


def _one_line_exit_2(argv, capsys) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_first_command_twice_resumes_its_own_file_and_never_touches_results(cli_env, capsys, tmp_path):
    assert cli.main(RUN) == 0
    (out,) = (tmp_path / "runs").glob("*.json")
    assert out.name.startswith("pld-mt_bench-t0-n1-8new-")
    first = results.load(out)
    assert cli.main(RUN) == 0  # the same settings: resumes (nothing left to do), same file
    assert list((tmp_path / "runs").glob("*.json")) == [out]
    assert results.load(out)["samples"] == first["samples"]
    assert cli.main(RUN[:-3] + ["--max-new-tokens", "9", "--no-progress"]) == 0  # other settings: another file
    assert len(list((tmp_path / "runs").glob("*.json"))) == 2
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("extra, message", [
    (["--threads", "-1"], "--threads must be >= 1"),
    (["--limit", "-1"], "--limit must be >= 1"),
    (["--limit", "0"], "--limit must be >= 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--out", "afile/r.json"], "--out afile/r.json: cannot write in afile"),
    (["--out", "."], "is a directory"),
    (["--dataset", "missing.jsonl"], "--dataset missing.jsonl: cannot read the prompt file"),
])
def test_bad_run_input_fails_before_loading_a_model(cli_env, capsys, tmp_path, extra, message):
    (tmp_path / "afile").write_text("")
    err = _one_line_exit_2(RUN + extra, capsys)
    assert message in err
    assert cli_env == [] and not (tmp_path / "runs").exists()


def test_resume_refusal_names_the_settings_and_comes_before_the_model_load(cli_env, capsys, tmp_path):
    assert cli.main(RUN + ["--out", "r.json"]) == 0
    before = (tmp_path / "r.json").read_bytes()
    cli_env.clear()
    err = _one_line_exit_2(RUN + ["--out", "r.json", "--max-new-tokens", "5", "--param", "num_pred_tokens=4"], capsys)
    assert "max_new_tokens: file 8, now 5" in err and "params.num_pred_tokens: file 10, now 4" in err
    assert cli_env == [] and (tmp_path / "r.json").read_bytes() == before


def test_smaller_limit_on_a_finished_file_is_refused(cli_env, capsys, tmp_path):
    two = [a if a != "1" else "2" for a in RUN]
    assert cli.main(two + ["--out", "r.json"]) == 0
    before = (tmp_path / "r.json").read_bytes()
    err = _one_line_exit_2(RUN + ["--out", "r.json"], capsys)
    assert "holds 2 prompts, 1 of them beyond the 1 asked for now" in err
    assert (tmp_path / "r.json").read_bytes() == before
    assert cli.main(two + ["--out", "r.json"]) == 0  # the same --limit reuses it


def test_model_dependent_settings_are_checked_after_the_load(runner, tmp_path):
    out = tmp_path / "r.json"
    runner.run(_cfg(limit=1), out=out, progress=False)
    doc = json.loads(out.read_text())
    doc["config"]["target"]["weights_sha256"] = "0" * 64
    out.write_text(json.dumps(doc))
    with pytest.raises(UsageError, match=r"target.weights_sha256: file '0000"):
        runner.run(_cfg(limit=1), out=out, progress=False)


def test_the_runtime_is_recorded_and_a_resume_on_another_is_refused(tmp_path):
    """Vanilla and the method run on one runtime, which the file records; resuming it on the other runtime would
    mix two runtimes' timings in one file, so it is refused."""
    loaded = tiny_llama(seed=3)
    loaded.tokenizer = ToyTokenizer(64)
    out = tmp_path / "r.json"
    fast = Runner(loaded=loaded)  # auto: fast for a Llama on CPU
    assert fast.target.runtime_name == "fast"
    fast.run(_cfg(limit=1), out=out, progress=False)
    config = json.loads(out.read_text())["config"]
    assert config["runtime"] == "fast" and config["timing"] == "sync"
    with pytest.raises(UsageError, match=r"runtime: file 'fast'"):
        Runner(loaded=loaded, runtime="hf").run(_cfg(limit=2), out=out, progress=False)


def test_second_turn_that_could_overflow_the_context_is_refused_before_decoding(tmp_path, monkeypatch):
    import specbench.bench.runner as runner_mod

    monkeypatch.setattr(runner_mod, "generate", lambda *a, **k: pytest.fail("decoded before the context check"))
    loaded = tiny_llama(seed=1, max_position_embeddings=65)  # turn 1: 48 + 12 fits; turn 2: 48 + 12 + 12 does not
    loaded.tokenizer = ToyTokenizer(64)
    out = tmp_path / "r.json"
    with pytest.raises(ContextLengthError, match="mt_bench/81 turn 2 .counting each earlier answer at 12 tokens"):
        Runner(loaded=loaded).run(_cfg(), out=out, progress=False)
    assert not out.exists()


def test_unknown_target_lists_the_embedded_models(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = _one_line_exit_2(["run", "--method", "pld", "--dataset", "mt_bench", "--target", "smollm9", "--no-progress"],
                           capsys)
    assert "not an embedded model (smollm2-135m" in err


def test_progress_counts_decodes_and_tokens(runner, tmp_path, capsys):
    runner.run(_cfg(limit=1), out=tmp_path / "r.json", progress=True)
    err = capsys.readouterr().err
    assert "4/4" in err and "decode" in err and "tokens" in err  # 2 turns x (vanilla, pld)


# ------------------------------------------------------------------ prompt files


def _write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_prompt_file_run_records_its_hash_ids_and_own_dataset_name(runner, tmp_path):
    import hashlib

    f = _write_jsonl(tmp_path / "mine.jsonl", [{"question_id": 7, "category": "chat", "turns": ["Hi there", "And?"]},
                                                {"question_id": "b", "turns": ["One more"]}])
    doc = runner.run(_cfg(dataset=f, limit=None), out=tmp_path / "r.json", progress=False)
    sha = hashlib.sha256((tmp_path / "mine.jsonl").read_bytes()).hexdigest()
    c = doc["config"]
    assert c["dataset"] == f"mine@{sha[:8]}" and c["dataset_file"] == {"path": f, "sha256": sha}
    assert c["prompt_ids"] == [f"mine@{sha[:8]}/7", f"mine@{sha[:8]}/b"]
    assert [(s["id"], s["turn"], s["category"]) for s in doc["samples"]] == [
        (f"mine@{sha[:8]}/7", 0, "chat"), (f"mine@{sha[:8]}/7", 1, "chat"), (f"mine@{sha[:8]}/b", 0, "")]


@pytest.mark.parametrize("line, message", [
    ("{not json", ":2: not a JSON object"),
    ("[1, 2]", ":2: expected a JSON object"),
    ({"turns": ["x"]}, ":2: field 'question_id'"),
    ({"question_id": True, "turns": ["x"]}, ":2: field 'question_id'"),
    ({"question_id": 2}, ":2: field 'turns'"),
    ({"question_id": 2, "turns": []}, ":2: field 'turns'"),
    ({"question_id": 2, "turns": ["ok", ""]}, ":2: field 'turns'"),
    ({"question_id": 2, "turns": ["x"], "category": 3}, ":2: field 'category'"),
    ({"question_id": 1, "turns": ["x"]}, ":2: question_id 1 appears twice"),
])
def test_bad_prompt_file_names_the_line_and_field(cli_env, capsys, tmp_path, line, message):
    f = _write_jsonl(tmp_path / "p.jsonl", [{"question_id": 1, "category": "c", "turns": ["x"]}, line])
    err = _one_line_exit_2(["run", "--method", "pld", "--dataset", f, "--no-progress"], capsys)
    assert f"{f}{message}" in err
    assert cli_env == []


def test_empty_prompt_file_is_refused(cli_env, capsys, tmp_path):
    f = _write_jsonl(tmp_path / "p.jsonl", ["", "  "])
    assert "no questions" in _one_line_exit_2(["run", "--method", "pld", "--dataset", f], capsys)


def test_a_finished_file_is_not_rewritten_and_a_partial_resume_keeps_earlier_fingerprints(runner, tmp_path):
    out = tmp_path / "r.json"
    runner.run(_cfg(limit=1), out=out, progress=False)
    before = out.read_bytes()
    runner.run(_cfg(limit=1), out=out, progress=False)  # nothing to do: no new stamp, no rewrite
    assert out.read_bytes() == before
    first_env = json.loads(before)["environment"]
    doc = runner.run(_cfg(limit=2), out=out, progress=False)  # resumed in another session: both fingerprints
    assert doc["environment_earlier"] == [first_env] and doc["status"] == "complete"


def test_resume_refuses_another_thread_count(cli_env, capsys, tmp_path):
    assert cli.main(RUN + ["--out", "r.json", "--threads", "1"]) == 0
    err = _one_line_exit_2(RUN + ["--out", "r.json", "--threads", "2"], capsys)
    assert "threads: file 1, now 2" in err


def test_a_prompt_file_resumes_under_another_spelling_of_its_path(runner, tmp_path, monkeypatch):
    f = _write_jsonl(tmp_path / "q.jsonl", [{"question_id": 1, "turns": ["a"]}, {"question_id": 2, "turns": ["b"]}])
    out = tmp_path / "r.json"
    runner.run(_cfg(dataset=f, limit=1), out=out, progress=False)
    monkeypatch.chdir(tmp_path)
    doc = runner.run(_cfg(dataset="q.jsonl", limit=2), out=out, progress=False)
    assert len(doc["samples"]) == 2
    same = [plan_run(_cfg(dataset=d, limit=1)) for d in (f, "q.jsonl")]
    assert default_out(same[0]) == default_out(same[1])


def test_prompt_file_lines_split_only_on_newlines(tmp_path):
    f = _write_jsonl(tmp_path / "q.jsonl", [json.dumps({"question_id": 1, "turns": ["a\u2028b\x0bc"]},
                                                       ensure_ascii=False)])
    assert load_prompts(f)[0].turns == ("a\u2028b\x0bc",)


def test_seed_out_of_range_and_a_malformed_resume_file_are_one_line(cli_env, capsys, tmp_path):
    assert "--seed must be in [0, 2**32)" in _one_line_exit_2(RUN + ["--seed", str(2**40)], capsys)
    doc = {"schema_version": 1, "kind": results.KIND, "config": [], "environment": {}, "samples": [],
           "summary": {}}
    (tmp_path / "r.json").write_text(json.dumps(doc))
    assert "'config' is not a JSON object" in _one_line_exit_2(RUN + ["--out", "r.json"], capsys)
    assert cli_env == []


def test_a_head_run_records_how_its_checkpoint_was_trained(runner, tmp_path):
    """config.draft carries the head manifest's seed, arm and data (what claims group seeds and check like
    with like by); it is read, not compared, when a run resumes: the weights' sha256 pins the head."""
    from specbench.models.draft_heads import save_head
    from specbench.training.eagle import EagleOptions, EagleTask

    head_dir = tmp_path / "head"
    save_head(EagleTask(EagleOptions(embed_init_scale=1.0)).make_head(runner.target.model, seed=0).eval(), "eagle",
              head_dir)
    manifest = {"method": "eagle", "variant": None, "seed": 7,
                "data": {"source_id": "corpus:sha256=c0", "corpus": {"content_sha256": "c0"}, "tokens": 10},
                "training": {"seed": 7, "epochs": 2, "max_steps": None}}
    (head_dir / "MANIFEST.json").write_text(json.dumps(manifest))
    out = tmp_path / "r.json"
    cfg = _cfg(method="eagle2", limit=1, max_new_tokens=6, params={"checkpoint": str(head_dir)})
    doc = runner.run(cfg, out=out, progress=False)
    draft = doc["config"]["draft"]
    assert {k: v for k, v in draft.items() if k != "recipe"} == {
        "method": "eagle", "variant": None, "seed": 7, "data": "corpus:sha256=c0", "tokens": 10, "epochs": 2,
        "max_steps": None, "draft_vocab": None}
    assert len(draft["recipe"]) == 16  # a hash of the other training options
    (head_dir / "MANIFEST.json").write_text(json.dumps(manifest | {"variant": "x"}))
    doc = runner.run(_cfg(method="eagle2", limit=2, max_new_tokens=6, params={"checkpoint": str(head_dir)}), out=out,
                     progress=False)
    assert doc["config"]["draft"]["variant"] == "x" and len({s["id"] for s in doc["samples"]}) == 2
    doc = runner.run(_cfg(limit=1), out=tmp_path / "pld.json", progress=False)
    assert "draft" not in doc["config"]  # no checkpoint, nothing recorded
