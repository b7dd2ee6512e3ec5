"""Evaluation prompt sets vendored in specbench/data (see its README for provenance).

Loaded with `datasets` (json builder over the vendored files, so nothing is fetched).
These prompts are for evaluation only; no training code reads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
_SPEC_BENCH = "spec_bench/question.jsonl"
_MT_BENCH_CATEGORIES = ["writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"]


@dataclass(frozen=True)
class EvalSet:
    name: str
    file: str
    categories: tuple[str, ...] | None  # None: every record of the file
    description: str


DATASETS: dict[str, EvalSet] = {s.name: s for s in [
    EvalSet("mt_bench", _SPEC_BENCH, tuple(_MT_BENCH_CATEGORIES), "MT-bench, 80 two-turn questions (Spec-Bench ids 81-160)"),
    EvalSet("translation", _SPEC_BENCH, ("translation",), "Spec-Bench translation (WMT14 DE-EN), 80"),
    EvalSet("summarization", _SPEC_BENCH, ("summarization",), "Spec-Bench summarization (CNN/DM), 80"),
    EvalSet("qa", _SPEC_BENCH, ("qa",), "Spec-Bench question answering (Natural Questions), 80"),
    EvalSet("math_reasoning", _SPEC_BENCH, ("math_reasoning",), "Spec-Bench math reasoning (GSM8K), 80"),
    EvalSet("rag", _SPEC_BENCH, ("rag",), "Spec-Bench retrieval-augmented generation, 80"),
    EvalSet("spec_bench", _SPEC_BENCH, None, "all 480 Spec-Bench questions (6 categories)"),
    EvalSet("humaneval", "eagle_eval/humaneval.jsonl", None, "HumanEval prompts as in EAGLE/HASS"),
    EvalSet("gsm8k", "eagle_eval/gsm8k.jsonl", None, "GSM8K test questions as in EAGLE/HASS"),
    EvalSet("alpaca", "eagle_eval/alpaca.jsonl", None, "Alpaca instructions as in EAGLE"),
    EvalSet("nq", "eagle_eval/qa.jsonl", None, "Natural Questions QA as in EAGLE"),
    EvalSet("cnn_dm", "eagle_eval/sum.jsonl", None, "CNN/DailyMail summarization as in EAGLE"),
]}


@dataclass(frozen=True)
class Prompt:
    id: str  # "<dataset>/<question_id>"
    category: str
    turns: tuple[str, ...]


def load_prompts(name: str, limit: int | None = None) -> list[Prompt]:
    if name not in DATASETS:
        raise UsageError(f"unknown dataset {name!r}; available: {', '.join(DATASETS)}")
    spec = DATASETS[name]
    import datasets  # heavy import, only when prompts are needed

    datasets.disable_progress_bars()
    rows = datasets.load_dataset("json", data_files=str(DATA_DIR / spec.file), split="train")
    prompts = [Prompt(f"{name}/{r['question_id']}", r["category"], tuple(r["turns"]))
               for r in rows if spec.categories is None or r["category"] in spec.categories]
    return prompts[:limit] if limit is not None else prompts
