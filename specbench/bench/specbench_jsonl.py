"""Spec-Bench answer JSONL: import into results documents, export from them.

Spec-Bench (hemingkx/Spec-Bench, `evaluation/eval.py`) writes one line per question::

    {"question_id": 81, "category": "writing", "answer_id": "...", "model_id": "vicuna-7b-v1.3-eagle-...",
     "choices": [{"index": 0, "turns": [text, ...], "decoding_steps": [per turn], "new_tokens": [per turn],
                  "wall_time": [per turn, s], "accept_lengths": [per step, all turns]}], "tstamp": 1700000000.0}

(older scripts write ``idxs`` = last loop index instead of ``decoding_steps``; the vanilla
baseline has ``accept_lengths`` = [1] * new tokens).  `evaluation/speed.py` then reports, per
task (mt_bench = its 8 categories; translation, summarization, qa, math_reasoning, rag; overall):

- "#Mean accepted tokens" = mean of all ``accept_lengths`` (= this project's pooled tau: an
  accept length counts the accepted drafts + the bonus token of one step);
- tokens/s = the MEAN over questions of sum(new_tokens)/sum(wall_time) (a macro average,
  unlike this project's pooled tokens / wall time), the baseline's tokens counted by
  re-tokenizing its answer text (``len(tokenizer(turn).input_ids) - 1``);
- speedup = mean method tokens/s / mean baseline tokens/s.

`speed()` reproduces those numbers (baseline tokens from ``new_tokens`` instead of
re-tokenizing), and `import_results` stores them under ``compare_extra.specbench_speed``
next to this project's own pooled metrics.

Export writes, per run, ``DIR/<bench>/<model_id>.jsonl`` for the method and
``DIR/<bench>/<target>-vanilla-...-for-<method>.jsonl`` for the vanilla loop timed alongside
it (<bench> = ``spec_bench`` for the Spec-Bench subsets, else the dataset), so
``python evaluation/speed.py --file-path A --base-path B --tokenizer-path T`` reads them.  Each
line carries extra keys (``dataset``, ``specbench_run``, ``choices[0].specbench``: per-turn
steps, alpha counts, token ids) that Spec-Bench ignores and that make the round trip exact.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
import uuid
from datetime import datetime
from pathlib import Path

from ..artifacts import write_text
from ..errors import SpecbenchError
from ..methods import catalogue
from . import metrics, results

MT_BENCH_CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
SPEC_BENCH_TASKS = ("mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag")


class SpecBenchError(SpecbenchError):
    """An unusable Spec-Bench answer file (message names the file and line)."""


# ---------------------------------------------------------------- reading


def read_answers(path: Path) -> list[dict]:
    """Validated answer lines of a Spec-Bench answer file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise SpecBenchError(f"{path}: cannot read ({e.strerror})") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            a = json.loads(line)
        except json.JSONDecodeError:
            raise SpecBenchError(f"{path}: line {n} is not valid JSON (truncated or corrupt answer file)") from None
        ch = a.get("choices") if isinstance(a, dict) else None
        if not isinstance(a, dict) or "question_id" not in a or not isinstance(ch, list) or not ch:
            raise SpecBenchError(f"{path}: line {n} is not a Spec-Bench answer (needs question_id and choices)")
        c = ch[0]
        for k in ("turns", "new_tokens", "wall_time"):
            if not isinstance(c.get(k), list):
                raise SpecBenchError(f"{path}: line {n}: choices[0].{k} missing or not a list")
        if len(c["new_tokens"]) != len(c["wall_time"]):
            raise SpecBenchError(f"{path}: line {n}: new_tokens and wall_time differ in length")
        out.append(a)
    if not out:
        raise SpecBenchError(f"{path}: no answers")
    return out


def parse_model_id(model_id: str) -> dict:
    """Best-effort (target, method, temperature, dtype) from a Spec-Bench model_id such as
    ``vicuna-7b-v1.3-eagle-float16-temperature-0.0`` or ``vicuna-7b-v1.3-vanilla-float16-temp-0.0``."""
    s = str(model_id)
    temp = 0.0
    m = re.search(r"-(?:temperature|temp)-([0-9.]+)", s)
    if m:
        temp = float(m.group(1).rstrip("."))
        s = s[:m.start()] + s[m.end():]
    dtype = None
    m = re.search(r"-(float16|float32|bfloat16|fp16|fp32|bf16)\b", s)
    if m:
        dtype = m.group(1)
        s = s[:m.start()] + s[m.end():]
    method, target = None, s
    parts = s.split("-")
    for i in range(len(parts) - 1, 0, -1):
        # the last method name or alias in the id; a hyphenated alias ("eagle-2") before its first part
        alias = catalogue.canonical("-".join(parts[i:i + 2])) or catalogue.canonical(parts[i])
        if alias:
            method, target = alias, "-".join(parts[:i])
            break
    return {"target": target or str(model_id), "method": method or str(model_id), "temperature": temp,
            "dtype": dtype}


def _dataset_of(a: dict) -> str:
    if isinstance(a.get("dataset"), str):
        return a["dataset"]
    cat = str(a.get("category", ""))
    if cat in MT_BENCH_CATEGORIES:
        return "mt_bench"
    return cat or "spec_bench"


def _qid(prompt_id: str):
    q = str(prompt_id).split("/", 1)[-1]
    return int(q) if q.isdigit() else q


def _record(choice: dict, turns: list[int] | None) -> dict:
    """A metrics.record-style sample record of the given turns (None: all turns merged)."""
    ext = choice.get("specbench") if isinstance(choice.get("specbench"), dict) else None
    idx = range(len(choice["new_tokens"])) if turns is None else turns
    new = sum(int(choice["new_tokens"][t]) for t in idx)
    wall = sum(float(choice["wall_time"][t]) for t in idx)
    if ext and turns is not None:
        t = turns[0]
        steps = list(ext["steps"][t])
        return {"new_tokens": new, "steps": steps, "reached": list(ext.get("reached", [[]])[t]),
                "accepted": list(ext.get("accepted", [[]])[t]), "drafted": int(ext.get("drafted", [0])[t]),
                "stop": ext.get("stop", ["length"])[t], "tokens": list(ext.get("token_ids", [[]])[t]),
                "wall_s": wall, "wall_s_repeats": [wall], "prefill_s": float(ext.get("prefill_s", [0.0])[t]),
                "draft_s": float(ext.get("draft_s", [0.0])[t]), "verify_s": float(ext.get("verify_s", [0.0])[t])}
    if isinstance(choice.get("accept_lengths"), list) and choice["accept_lengths"]:
        steps = [int(x) for x in choice["accept_lengths"]]
    elif isinstance(choice.get("decoding_steps"), list):
        steps = [1] * sum(int(x) for x in choice["decoding_steps"])
    elif isinstance(choice.get("idxs"), list):
        steps = [1] * sum(int(x) + 1 for x in choice["idxs"])
    else:
        steps = [1] * new
    return {"new_tokens": new, "steps": steps, "reached": [], "accepted": [], "drafted": 0, "stop": "unknown",
            "tokens": [], "wall_s": wall, "wall_s_repeats": [wall], "prefill_s": 0.0, "draft_s": 0.0, "verify_s": 0.0}


def _samples(a: dict, role: str, dataset: str) -> list[dict]:
    choice = a["choices"][0]
    pid = f"{dataset}/{a['question_id']}"
    if isinstance(choice.get("specbench"), dict):
        return [{"id": pid, "turn": t, "category": a.get("category", ""), "runs": {role: _record(choice, [t])}}
                for t in range(len(choice["new_tokens"]))]
    return [{"id": pid, "turn": 0, "category": a.get("category", ""), "runs": {role: _record(choice, None)}}]


def speed(answers: list[dict], base: list[dict] | None) -> dict:
    """Spec-Bench speed.py's numbers over `answers` (already selected for one task)."""
    def per_q(ans):
        out = []
        for a in ans:
            c = a["choices"][0]
            w = sum(float(x) for x in c["wall_time"])
            if w > 0:
                out.append(sum(int(x) for x in c["new_tokens"]) / w)
        return out

    acc = [int(x) for a in answers for x in (a["choices"][0].get("accept_lengths") or [])]
    tps = per_q(answers)
    res = {"tokens_per_second": statistics.fmean(tps) if tps else None,
           "mean_accepted_tokens": statistics.fmean(acc) if acc else None,
           "tokens_per_second_baseline": None, "speedup_ratio": None, "questions": len(answers)}
    if base:
        b = per_q(base)
        if b and tps:
            res["tokens_per_second_baseline"] = statistics.fmean(b)
            res["speedup_ratio"] = res["tokens_per_second"] / res["tokens_per_second_baseline"]
    return res


def import_results(path: Path, base_path: Path | None = None) -> list[dict]:
    """Results documents (kind specbench.run), one per task/dataset, from a Spec-Bench answer file
    (+ the vanilla answers of the same questions for speedup)."""
    path = Path(path)
    answers = read_answers(path)
    base = read_answers(base_path) if base_path else None
    first = answers[0]
    run_info = first.get("specbench_run") if isinstance(first.get("specbench_run"), dict) else {}
    parsed = parse_model_id(first.get("model_id", path.stem))
    cfg0 = run_info.get("config") or {}
    method = cfg0.get("method") or parsed["method"]
    if method == "vanilla" and base is None:
        base = answers
    base_by_key = {(_dataset_of(b), str(b["question_id"])): b for b in (base or [])}
    by_ds: dict[str, list[dict]] = {}
    for a in answers:
        by_ds.setdefault(_dataset_of(a), []).append(a)
    docs = []
    for ds, ans in by_ds.items():
        samples = []
        paired_base = []
        for a in ans:
            s = _samples(a, method, ds)
            b = base_by_key.get((ds, str(a["question_id"])))
            if b is not None and method != "vanilla":
                paired_base.append(b)
                bs = _samples(b, "vanilla", ds)
                if len(bs) == len(s):
                    for x, y in zip(s, bs):
                        x["runs"]["vanilla"] = y["runs"]["vanilla"]
                else:  # per-turn on one side only: merge both to one sample per question
                    s = [{"id": s[0]["id"], "turn": 0, "category": s[0]["category"],
                          "runs": {method: _record(a["choices"][0], None),
                                   "vanilla": _record(b["choices"][0], None)}}]
            elif method == "vanilla":
                paired_base.append(a)
            samples += s
        summary = {}
        for role in dict.fromkeys([method, "vanilla"]):
            recs = [x["runs"][role] for x in samples if role in x["runs"]]
            if recs:
                summary[role] = metrics.summarize(recs)
        if method in summary and "vanilla" in summary and method != "vanilla":
            pairs = [(x["runs"][method], x["runs"]["vanilla"]) for x in samples if "vanilla" in x["runs"]]
            if len(pairs) == len(samples):
                summary[method].update(metrics.speedups(summary[method], summary["vanilla"], pairs))
        if method == "vanilla":
            summary["vanilla"]["speedup"] = 1.0
        config = {
            "method": method, "params": cfg0.get("params", {}), "baseline": "vanilla", "dataset": ds,
            "limit": cfg0.get("limit"), "prompt_ids": [f"{ds}/{a['question_id']}" for a in ans],
            "target": cfg0.get("target") or {"name": parsed["target"], "weights_sha256": None,
                                             "source": f"spec-bench:{first.get('model_id', '')}"},
            "draft_checkpoint_sha256": cfg0.get("draft_checkpoint_sha256"),
            "sampling": cfg0.get("sampling") or {"temperature": parsed["temperature"], "top_k": 0, "top_p": 1.0},
            "seed": cfg0.get("seed"), "max_new_tokens": cfg0.get("max_new_tokens"), "repeats": 1,
            "dtype": cfg0.get("dtype") or parsed["dtype"], "device": cfg0.get("device"),
            "hf_generate": False,
        }
        docs.append({
            "schema_version": results.SCHEMA_VERSION, "kind": results.KIND, "definitions": metrics.DEFINITIONS,
            "config": config, "environment": run_info.get("environment") or {}, "samples": samples,
            "summary": summary, "status": "complete", "suite": run_info.get("suite"),
            "compare_extra": {"specbench_speed": speed(ans, paired_base or None), "imported_from": str(path)},
        })
    return docs


# ---------------------------------------------------------------- writing


def _short_target(cfg: dict) -> str:
    tgt = cfg.get("target") or {}
    name = str(tgt.get("name") if isinstance(tgt, dict) else tgt)
    return name.rstrip("/").rsplit("/", 1)[-1]


def model_id(cfg: dict, method: str | None = None, suffix: str = "") -> str:
    t = cfg.get("sampling", {}).get("temperature", 0.0)
    return (f"{_short_target(cfg)}-{method or cfg['method']}-{cfg.get('dtype') or 'float32'}"
            f"-temperature-{float(t)}{suffix}")


def _load_tokenizer(cfg: dict, tokenizer):
    """A tokenizer for the answer text: an explicit directory, else the target's own (embedded cache / local dir)."""
    if tokenizer is False:
        return None
    try:
        from transformers import AutoTokenizer
    except ImportError:  # pragma: no cover
        return None
    cands = []
    if tokenizer:
        cands.append(Path(tokenizer))
    else:
        tgt = cfg.get("target") or {}
        name = str(tgt.get("name") if isinstance(tgt, dict) else tgt)
        try:
            from ..models.loading import _embedded_cache
            from ..models.registry import EMBEDDED, cache_dir

            if name.lower() in EMBEDDED:
                cands.append(_embedded_cache(EMBEDDED[name.lower()], cache_dir()))
        except ImportError:  # pragma: no cover
            pass
        cands.append(Path(name).expanduser())
    for d in cands:
        if d.is_dir() and any((d / f).is_file()
                              for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            try:
                return AutoTokenizer.from_pretrained(str(d), local_files_only=True)
            except Exception:  # noqa: BLE001 - unusable tokenizer dir: fall through to the next candidate
                continue
    if tokenizer:
        raise SpecBenchError(f"--tokenizer {tokenizer}: no loadable tokenizer there")
    return None


def from_results(doc: dict, tokenizer=None) -> tuple[list[dict], list[dict]]:
    """(method answers, vanilla answers) of a results document, Spec-Bench style."""
    cfg = doc["config"]
    method = cfg["method"]
    env = doc.get("environment") or {}
    try:
        ts = datetime.fromisoformat(str(env.get("date"))).timestamp()
    except (TypeError, ValueError):
        ts = 0.0
    run_info = {"config": {k: v for k, v in cfg.items() if k != "prompt_ids"}, "environment": env,
                "suite": doc.get("suite")}
    by_prompt: dict[str, list[dict]] = {}
    for s in doc["samples"]:
        by_prompt.setdefault(s["id"], []).append(s)
    out = {method: [], "vanilla": []}
    for pid in sorted(by_prompt, key=lambda p: (str(type(_qid(p))), _qid(p))):
        turns = sorted(by_prompt[pid], key=lambda s: s["turn"])
        for role in dict.fromkeys([method, "vanilla"]):
            recs = [s["runs"].get(role) for s in turns]
            if any(r is None for r in recs):
                continue
            texts = [tokenizer.decode(r["tokens"], skip_special_tokens=True) if tokenizer is not None else ""
                     for r in recs]
            mid = model_id(cfg) if role == method else model_id(cfg, "vanilla", f"-for-{method}")
            choice = {
                "index": 0, "turns": texts, "decoding_steps": [len(r["steps"]) for r in recs],
                "new_tokens": [r["new_tokens"] for r in recs], "wall_time": [r["wall_s"] for r in recs],
                "accept_lengths": [x for r in recs for x in r["steps"]],
                "specbench": {k: [r.get(src, d) for r in recs] for k, src, d in (
                    ("steps", "steps", []), ("reached", "reached", []), ("accepted", "accepted", []),
                    ("drafted", "drafted", 0), ("stop", "stop", "length"), ("token_ids", "tokens", []),
                    ("prefill_s", "prefill_s", 0.0), ("draft_s", "draft_s", 0.0), ("verify_s", "verify_s", 0.0))},
            }
            out[role].append({
                "question_id": _qid(pid), "category": turns[0].get("category", ""),
                "answer_id": uuid.uuid5(uuid.NAMESPACE_URL, f"{mid}/{pid}").hex[:22], "model_id": mid,
                "choices": [choice], "tstamp": ts, "dataset": cfg["dataset"],
                "specbench_run": dict(run_info, config=dict(run_info["config"], method=role, **(
                    {"params": {}} if role == "vanilla" else {}))),
            })
    return out[method], (out["vanilla"] if method != "vanilla" else [])


def write_answers(path: Path, answers: list[dict]) -> None:
    """Write answer lines atomically, sorted by question id (Spec-Bench's reorg_answer_file order)."""
    ordered = sorted(answers, key=lambda a: (str(type(a["question_id"])), a["question_id"]))
    write_text(path, "".join(json.dumps(a) + "\n" for a in ordered))


def export_runs(paths: list[str], out_dir: Path, tokenizer=None) -> list[Path]:
    """Export results files as Spec-Bench answer files under `out_dir`; returns the files written."""
    files: dict[Path, list[dict]] = {}
    warned = False
    for p in paths:
        doc = results.load(Path(p))
        cfg = doc["config"]
        tok = _load_tokenizer(cfg, tokenizer)
        if tok is None and not warned and tokenizer is not False:
            print("specbench: no tokenizer found for the answer text; turns are empty strings (Spec-Bench's "
                  "speed.py counts the baseline's tokens from that text: pass --tokenizer DIR)", file=sys.stderr)
            warned = True
        bench = "spec_bench" if cfg["dataset"] in SPEC_BENCH_TASKS + ("spec_bench",) else cfg["dataset"]
        mine, base = from_results(doc, tok)
        for ans in (mine, base):
            if not ans:
                continue
            f = Path(out_dir) / bench / f"{ans[0]['model_id']}.jsonl"
            have = files.setdefault(f, [])
            keys = {(a["dataset"], a["question_id"]) for a in ans}
            clash = [a for a in have if (a["dataset"], a["question_id"]) in keys]
            if clash:
                raise SpecBenchError(f"two runs export question {clash[0]['question_id']} of {clash[0]['dataset']} "
                                     f"to {f}; export them separately")
            have += ans
    for f, ans in files.items():
        write_answers(f, ans)
    return sorted(files)
