"""Runner, results files, metrics and CLI errors, on a tiny random Llama with a toy tokenizer."""

from __future__ import annotations

import json

import pytest
import torch

from specbench import cli
from specbench.bench import metrics, results
from specbench.bench.runner import RunConfig, Runner
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
    assert s["greedy_identical"] == {"identical": 4, "compared": 4}
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
    second = [m for m in seen if len(m) == 3]
    assert second and second[0][1]["role"] == "assistant" and second[0][1]["content"]


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
