"""Paper mode end to end without a GPU: the path a GPU runner takes, on models small enough for CI.

A tiny Llama stands in for meta-llama/Llama-2-7b-chat-hf and a random EAGLE head for
yuhuili/EAGLE-llama2-chat-7B, both written in the official layouts (an HF model directory with a
tokenizer; an EAGLE config.json naming no specbench architecture + pytorch_model.bin) under their hub
ids in a `--paper-models` directory, as a user's would hold them. One EAGLE-2 Table 1 case runs through
pytest-benchmark to a results file, which `specbench compare` reads and judges."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CASE = "suites/test_eagle2_table1.py::test_eagle2_table1[paper-llama2-chat-7b-eagle2-mt_bench-T0]"
# The inner pytest is a fresh session: under `pytest -n` the xdist worker's variables would make
# pytest-benchmark believe it is a worker too and refuse --benchmark-only.
INNER_ENV = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}


def _paper_models(root: Path) -> Path:
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from specbench.models import load_model
    from specbench.models.draft_heads import ARCH_KEY, save_head
    from specbench.models.loading import tiny_random, tiny_sizes
    from specbench.training.eagle import EagleOptions, EagleTask

    tok = load_model("smollm2-135m").tokenizer  # a real chat template over a real vocabulary
    model = tiny_random(LlamaForCausalLM, LlamaConfig(**tiny_sizes(len(tok), 32, 2, 4, 2, 64, 2048)), 0)
    target = root / "meta-llama" / "Llama-2-7b-chat-hf"
    model.save_pretrained(target)
    tok.save_pretrained(target)
    head_dir = root / "yuhuili" / "EAGLE-llama2-chat-7B"
    save_head(EagleTask(EagleOptions(embed_init_scale=1.0)).make_head(model, seed=0).eval(), "eagle", head_dir)
    cfg = json.loads((head_dir / "config.json").read_text())
    cfg.pop(ARCH_KEY)  # the official layout names no architecture ...
    (head_dir / "config.json").write_text(json.dumps(cfg))
    torch.save(load_file(str(head_dir / "model.safetensors")), head_dir / "pytorch_model.bin")  # ... and ships .bin
    (head_dir / "model.safetensors").unlink()
    return head_dir / "pytorch_model.bin"


def test_a_paper_case_runs_to_a_results_file_and_a_compare_verdict(tmp_path):
    from specbench.artifacts import sha256_file

    head_weights = _paper_models(tmp_path / "models")
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", CASE, "-m", "paper", "-p", "no:cacheprovider", "-q", "--benchmark-only",
         "--paper-models", str(tmp_path / "models"), "--suite-limit", "1", "--suite-max-new-tokens", "8",
         "--suite-results", str(out), "--benchmark-json", str(out / "benchmark.json")],
        cwd=REPO, env=INNER_ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [record] = (out / "paper" / "llama2-chat-7b").glob("eagle2-*mt_bench-t0.json")
    doc = json.loads(record.read_text())
    cfg = doc["config"]
    assert doc["suite"]["mode"] == "paper" and doc["suite"]["paper_target"] == "llama2-chat-7b"
    assert cfg["target"]["source"] != "embedded" and cfg["timing"] == "step"
    assert cfg["draft_checkpoint_sha256"] == sha256_file(head_weights)  # the official layout's head was loaded
    assert doc["summary"]["greedy_identical"]["identical"] == doc["summary"]["greedy_identical"]["compared"] == 2

    for inputs in ([str(record)], [str(out / "benchmark.json")]):  # the record, and pytest-benchmark's JSON
        cmp = subprocess.run([sys.executable, "-m", "specbench.cli", "compare", *inputs], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
        assert cmp.returncode == 0, cmp.stderr
        assert "llama2-chat-7b" in cmp.stdout and "run used 1 of the 80 prompts" in cmp.stdout, cmp.stdout


@pytest.mark.parametrize("case,why", [
    ("paper-vicuna-13b-v1.3-eagle2-mt_bench-T0", "target vicuna-13b-v1.3 absent: download lmsys/vicuna-13b-v1.3"),
])
def test_a_paper_case_without_its_models_is_skipped_with_what_to_download(tmp_path, case, why):
    (tmp_path / "models").mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", f"suites/test_eagle2_table1.py::test_eagle2_table1[{case}]", "-m", "paper",
         "-p", "no:cacheprovider", "-q", "-rs", "--benchmark-only", "--paper-models", str(tmp_path / "models"),
         "--suite-results", str(tmp_path / "out")], cwd=REPO, env=INNER_ENV, capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 0 and "1 skipped" in proc.stdout and why in proc.stdout, proc.stdout[-2000:]
