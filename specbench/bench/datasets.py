"""Evaluation prompt sets: the ones vendored in specbench/data (see its README for provenance), or
a user's own JSONL file in the Spec-Bench / FastChat question format.

Vendored sets load with `datasets` (json builder over the vendored files, so nothing is fetched).
These prompts are for evaluation only; no training code reads them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..artifacts import sha256_bytes
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
    EvalSet("mt_bench", _SPEC_BENCH, tuple(_MT_BENCH_CATEGORIES),
            "MT-bench, 80 two-turn questions (Spec-Bench ids 81-160)"),
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


@dataclass(frozen=True)
class PromptFile:
    """A user's prompt file: its name in results (`<stem>@<sha8>`, never a vendored set's name) and content hash."""

    name: str
    path: Path
    sha256: str

    def record(self) -> dict:
        return {"path": str(self.path), "sha256": self.sha256}


def is_prompt_file(spec: str) -> bool:
    """`--dataset` names a file (rather than a vendored set) when it ends in .jsonl or contains a path separator."""
    return spec.endswith(".jsonl") or "/" in spec


def read_prompt_file(spec: str) -> tuple[PromptFile, list[Prompt]]:
    """Spec-Bench / FastChat questions, one JSON object a line: question_id, turns, and optionally category.

    The file is read once, so the recorded sha256 is the hash of exactly the prompts decoded.
    """
    path = Path(spec).expanduser()
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UsageError(f"--dataset {spec}: cannot read the prompt file ({e.strerror})") from None
    sha = sha256_bytes(data)
    pf = PromptFile(f"{path.stem}@{sha[:8]}", path, sha)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    prompts: list[Prompt] = []
    seen: set[str] = set()
    for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 may sit inside a string
        if not line.strip():
            continue
        where = f"{pf.path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{where}: not a JSON object ({e.msg}); expected one question per line with "
                             "question_id, category and turns") from None
        if not isinstance(row, dict):
            raise UsageError(f"{where}: expected a JSON object with question_id, category and turns")
        qid = row.get("question_id")
        if not isinstance(qid, (int, str)) or isinstance(qid, bool) or str(qid) == "":
            raise UsageError(f"{where}: field 'question_id' must be an integer or a non-empty string")
        if str(qid) in seen:
            raise UsageError(f"{where}: question_id {qid!r} appears twice")
        seen.add(str(qid))
        turns = row.get("turns")
        if (not isinstance(turns, list) or not turns
                or not all(isinstance(t, str) and t.strip() for t in turns)):
            raise UsageError(f"{where}: field 'turns' must be a non-empty list of non-empty strings")
        category = row.get("category", "")
        if not isinstance(category, str):
            raise UsageError(f"{where}: field 'category' must be a string")
        prompts.append(Prompt(f"{pf.name}/{qid}", category, tuple(turns)))
    if not prompts:
        raise UsageError(f"{path}: no questions in the file")
    return pf, prompts


def open_prompts(spec: str, limit: int | None = None) -> tuple[str, dict | None, list[Prompt]]:
    """(dataset name, the prompt file's record or None, the first `limit` prompts) of `--dataset SPEC`."""
    if is_prompt_file(spec):
        pf, prompts = read_prompt_file(spec)
        name, record = pf.name, pf.record()
    else:
        name, record, prompts = spec, None, _vendored(spec)
    return name, record, (prompts[:limit] if limit is not None else prompts)


def load_prompts(name: str, limit: int | None = None) -> list[Prompt]:
    """The first `limit` prompts of a vendored set or of a prompt file (see `is_prompt_file`)."""
    return open_prompts(name, limit)[2]


def _vendored(name: str) -> list[Prompt]:
    if name not in DATASETS:
        raise UsageError(f"unknown dataset {name!r}; available: {', '.join(DATASETS)}, "
                         "or a prompt file PATH.jsonl (question_id, category, turns per line)")
    spec = DATASETS[name]
    import datasets  # heavy import, only when prompts are needed

    datasets.disable_progress_bars()
    rows = datasets.load_dataset("json", data_files=str(DATA_DIR / spec.file), split="train")
    return [Prompt(f"{name}/{r['question_id']}", r["category"], tuple(r["turns"]))
            for r in rows if spec.categories is None or r["category"] in spec.categories]
