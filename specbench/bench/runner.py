"""Run a method and the vanilla baseline on a prompt set, in one process, and record the results.

Per prompt (and per turn: MT-bench's second turn sees the model's own first answer), the
vanilla loop and the method run back to back on the same tokens, so speedup is a ratio of
two measurements taken under the same machine load.  The results file is rewritten
atomically after every prompt; a stopped run resumes from the prompts it finished.
"""

from __future__ import annotations

import json
import logging
import resource
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from ..artifacts import check_writable, environment, sha256_bytes, write_json
from ..decoding import SamplingConfig, generate, make_generator
from ..decoding.loop import TIMINGS
from ..decoding.numerics import classify_divergence
from ..errors import ContextLengthError, UsageError
from ..methods import get_method
from . import metrics, results
from .datasets import open_prompts

log = logging.getLogger(__name__)


@dataclass
class RunConfig:
    method: str
    dataset: str
    target: str = "smollm2-135m"
    params: dict = field(default_factory=dict)
    limit: int | None = None
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 64
    seed: int = 0
    repeats: int = 1
    dtype: str = "auto"
    device: str = "auto"
    hf_generate: bool = False
    runtime: str = "auto"  # the target's decoder runtime (specbench.models.target.RUNTIMES, or auto)
    timing: str = "sync"  # how phases are timed on an accelerator (specbench.decoding.loop.TIMINGS)
    device_map: str | None = None  # "auto": the target spread over the devices by accelerate
    max_memory: str | None = None  # with device_map: "0=20GiB,1=20GiB,cpu=64GiB"


def _chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    if tokenizer is None:
        raise UsageError("the target has no tokenizer; text prompts need one")
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    # Base models without a template: plain concatenation of the turns.
    return tokenizer("\n\n".join(m["content"] for m in messages))["input_ids"]


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# Config keys that depend on the loaded model or drafter; every other key is known before loading.
_MODEL_KEYS = ("target", "dtype", "device", "device_map", "runtime", "draft_checkpoint_sha256", "draft_vocab_sha256")
# a resumed run may extend the prompt list; the draft's provenance is read from the manifest of the
# checkpoint whose weights draft_checkpoint_sha256 already pins (files older than it lack it)
_UNCHECKED_KEYS = ("prompt_ids", "limit", "draft")
_SPELLING_KEYS = ("dataset_file.path",)  # how the file was named; its sha256 is what must match


@dataclass
class Plan:
    """What a run will do, settled before any model is loaded: a bad input fails here, losing nothing."""

    cfg: RunConfig
    params: dict
    sampling: SamplingConfig
    prompts: list
    settings: dict  # the results file's config, less the model-dependent keys
    existing: dict | None = None  # the results file this run resumes (set by open_output)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# What a file written before a setting existed ran with.
_LEGACY_DEFAULTS = {"runtime": "hf", "timing": "sync", "device_map": None}


def parse_max_memory(text: str | None) -> dict | None:
    """--max-memory "0=20GiB,1=20GiB,cpu=64GiB" -> {0: "20GiB", 1: "20GiB", "cpu": "64GiB"} (accelerate's form)."""
    if not text:
        return None
    out: dict = {}
    for part in text.split(","):
        dev, sep, size = part.partition("=")
        if not sep or not dev.strip() or not size.strip():
            raise UsageError(f"--max-memory expects DEVICE=SIZE,... (e.g. 0=20GiB,cpu=64GiB), got {text!r}")
        dev = dev.strip()
        out[int(dev) if dev.isdigit() else dev] = size.strip()
    return out


def _differences(old: dict, new: dict, keys) -> list[str]:
    """`key: file X, now Y` for each setting in `keys` that differs (nested settings by dotted name)."""
    a = _flat({k: old.get(k, _LEGACY_DEFAULTS.get(k)) for k in keys})
    b = _flat(json.loads(json.dumps({k: new.get(k) for k in keys})))
    return [f"{k}: file {a.get(k)!r}, now {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and k not in _SPELLING_KEYS]


def _refuse_resume(out: Path, diffs: list[str]) -> UsageError:
    return UsageError(f"{out} holds a run with other settings ({'; '.join(diffs)}); pass --no-resume to replace it "
                      f"or choose another --out")


def plan_run(cfg: RunConfig, out: Path | None = None, resume: bool = True) -> Plan:
    """Validate a run's settings, prompts and output file without loading a model."""
    method = get_method(cfg.method)
    params = method.params(cfg.params)
    sampling = SamplingConfig(cfg.temperature, cfg.top_k, cfg.top_p)
    if cfg.repeats < 1 or cfg.max_new_tokens < 1:
        raise UsageError("--repeats and --max-new-tokens must be >= 1")
    parse_max_memory(cfg.max_memory)  # malformed: refused before any load
    if cfg.max_memory and not cfg.device_map:
        raise UsageError("--max-memory applies to --device-map auto; pass both")
    if cfg.timing not in TIMINGS:
        raise UsageError(f"--timing must be one of {', '.join(TIMINGS)}, not {cfg.timing!r}")
    if not 0 <= cfg.seed < 2**32:  # per-prompt generator seeds are derived from it and must fit int64
        raise UsageError(f"--seed must be in [0, 2**32), got {cfg.seed}")
    if cfg.limit is not None and cfg.limit < 1:
        raise UsageError(f"--limit must be >= 1 (got {cfg.limit}); leave it out for every prompt")
    dataset, dataset_file, prompts = open_prompts(cfg.dataset, cfg.limit)
    settings = {"method": cfg.method, "params": params, "baseline": "vanilla", "dataset": dataset}
    if dataset_file is not None:
        settings["dataset_file"] = dataset_file
    if not prompts:
        raise UsageError(f"dataset {cfg.dataset!r} has no prompts for --limit {cfg.limit}")
    settings.update({
        "limit": cfg.limit, "prompt_ids": [p.id for p in prompts], "sampling": sampling.to_dict(),
        "seed": cfg.seed, "max_new_tokens": cfg.max_new_tokens, "repeats": cfg.repeats,
        "hf_generate": cfg.hf_generate, "timing": cfg.timing,
        "threads": torch.get_num_threads(),  # timings depend on it: a resume must not mix thread counts
    })
    plan = Plan(cfg, params, sampling, prompts, settings, None)
    if out is not None:
        open_output(plan, out, resume)
    return plan


def open_output(plan: Plan, out: Path, resume: bool = True) -> None:
    """Check that `out` can be written and, when resuming, that it holds a run of these settings (plan.existing)."""
    check_writable(out, "--out")
    plan.existing = None
    if not (resume and Path(out).exists()):
        return
    existing = results.load(out)
    old, settings = existing["config"], plan.settings
    keys = (set(old) | set(settings)) - set(_MODEL_KEYS) - set(_UNCHECKED_KEYS)
    diffs = _differences(old, settings, keys)
    if diffs:
        raise _refuse_resume(out, diffs)
    extra = [pid for pid in old.get("prompt_ids", []) if pid not in settings["prompt_ids"]]
    if extra:
        raise UsageError(f"{out} holds {len(old['prompt_ids'])} prompts, {len(extra)} of them beyond the "
                         f"{len(settings['prompt_ids'])} asked for now (--limit {plan.cfg.limit}); a resumed file "
                         "must describe every prompt it holds: pass --no-resume to replace it, the same --limit "
                         "to reuse it, or another --out")
    plan.existing = existing


def default_out(plan: Plan) -> Path:
    """runs/<method>-<dataset>-t<T>-n<limit>-<N>new-<hash>.json: the hash covers every other setting, so a run
    resumes only its own file and never lands on the project's records in results/."""
    cfg = plan.cfg
    # The settings a resume checks (the path's spelling is not one), plus what only the load would show.
    settings = {k: v for k, v in _flat(plan.settings).items() if k not in _SPELLING_KEYS and k != "prompt_ids"}
    identity = {"settings": settings, "target": cfg.target, "dtype": cfg.dtype, "device": cfg.device,
                "runtime": cfg.runtime, "device_map": cfg.device_map}
    digest = sha256_bytes(json.dumps(identity, sort_keys=True, default=str).encode())[:6]
    dataset = plan.settings["dataset"].replace("/", "_")
    n = cfg.limit if cfg.limit is not None else "all"
    return Path("runs") / f"{cfg.method}-{dataset}-t{cfg.temperature:g}-n{n}-{cfg.max_new_tokens}new-{digest}.json"


class Runner:
    """Holds the loaded target so several runs (e.g. a benchmark suite) share one load."""

    def __init__(self, target_spec: str = "smollm2-135m", dtype: str = "auto", device: str = "auto", loaded=None,
                 runtime: str = "auto", device_map: str | None = None, max_memory: str | None = None):
        from ..models import load_model
        from ..models.target import Target

        self.loaded = loaded or load_model(target_spec, dtype=dtype, device=device, device_map=device_map,
                                           max_memory=parse_max_memory(max_memory))
        self.target = Target.from_loaded(self.loaded, runtime=runtime)

    def run(self, cfg: RunConfig, out: Path | None = None, resume: bool = True, progress: bool = True,
            plan: Plan | None = None) -> dict:
        if plan is None:
            plan = plan_run(cfg, out, resume)
        if cfg.runtime != "auto" and cfg.runtime != self.target.runtime_name:
            raise UsageError(f"the run asks for runtime {cfg.runtime}, the loaded target runs "
                             f"{self.target.runtime_name}; load it with that runtime (Runner(runtime=...))")
        method, params, sampling, prompts = get_method(cfg.method), plan.params, plan.sampling, plan.prompts
        tok = self.loaded.tokenizer
        first_turns = [_chat_ids(tok, [{"role": "user", "content": p.turns[0]}]) for p in prompts]
        for p in prompts:  # every turn, before anything is decoded or written
            self._check_context(p, cfg.max_new_tokens)
        gen0 = make_generator(cfg.seed, self.target.device)
        drafter = method.drafter(self.target, sampling, gen0, **params)
        vanilla = get_method("vanilla").drafter(self.target, sampling, gen0)

        config = self._config(plan)
        # Drafters with weights expose the hash of the checkpoint they actually loaded.
        config["draft_checkpoint_sha256"] = getattr(drafter, "checkpoint_sha256", None)
        provenance = getattr(drafter, "draft_provenance", None)  # seed, variant, data: what claims group by
        if provenance:
            config["draft"] = provenance
        vocab_sha = getattr(drafter, "draft_vocab_sha256", None)  # the ranking a reduced draft vocabulary follows
        if vocab_sha:
            config["draft_vocab_sha256"] = vocab_sha
        doc = plan.existing
        if doc is not None:
            diffs = _differences(doc["config"], config, (set(doc["config"]) | set(config)) - set(_UNCHECKED_KEYS))
            if diffs:
                raise _refuse_resume(out, diffs)
            doc["config"] = config
        else:
            doc = {"schema_version": results.SCHEMA_VERSION, "kind": results.KIND,
                   "definitions": metrics.DEFINITIONS, "config": config, "samples": [], "summary": {}}
        done = {(s["id"], s["turn"]) for s in doc["samples"]}
        roles = 3 if cfg.hf_generate else 2  # decodes per turn: vanilla, the method (and generate())
        todo = [p for p in prompts if not all((p.id, t) in done for t in range(len(p.turns)))]
        todo_ids = {p.id for p in todo}
        if plan.existing is not None:
            if not todo:  # finished: the file stays exactly as measured (no new stamp, no rewrite)
                log.info("%s already holds all %d prompts; pass --no-resume to measure again", out, len(prompts))
                return doc
            # The samples come from more than one process: keep each earlier session's fingerprint.
            doc["environment_earlier"] = doc.get("environment_earlier", []) + [doc["environment"]]
        self._warm_up(first_turns[0], sampling)
        bar = tqdm(total=roles * sum(len(p.turns) for p in todo), desc=f"{cfg.method} on {config['dataset']}",
                   disable=not progress, file=sys.stderr, unit="decode", dynamic_ncols=True)
        if len(todo) < len(prompts):
            log.info("resuming %s: %d of %d prompts already done", out, len(prompts) - len(todo), len(prompts))
        new_tokens = 0

        def on_decode(n: int) -> None:
            nonlocal new_tokens
            new_tokens += n
            bar.set_postfix_str(f"{new_tokens} tokens", refresh=False)
            bar.update(1)

        with bar:
            for index, prompt in enumerate(prompts):
                if prompt.id not in todo_ids:
                    continue
                doc["samples"] = [s for s in doc["samples"] if s["id"] != prompt.id]
                doc["samples"] += self._run_prompt(index, prompt, drafter, vanilla, sampling, cfg, on_decode)
                self._finish(doc, cfg)
                if out:
                    write_json(out, doc)
        self._finish(doc, cfg)
        if out:
            write_json(out, doc)
        return doc

    def _check_context(self, prompt, max_new: int) -> None:
        """Turn k's prompt holds the k earlier answers: bound each by max_new tokens, so a later turn that
        could overflow the context is refused before turn 1 is decoded. The answers are re-tokenized from
        their text, which can (rarely) give more tokens than were generated; `generate` checks the exact
        prompt again, and a run stopped there keeps its finished prompts."""
        tok = self.loaded.tokenizer
        messages: list[dict] = []
        for turn, text in enumerate(prompt.turns):
            messages = messages + [{"role": "user", "content": text}]
            n = len(_chat_ids(tok, messages)) + turn * max_new
            try:
                self.target.check_fits(n, max_new)
            except ContextLengthError as e:
                where = f"{prompt.id}" + (f" turn {turn + 1} (counting each earlier answer at {max_new} tokens)"
                                          if turn else "")
                raise ContextLengthError(f"{where}: {e}") from None
            messages = messages + [{"role": "assistant", "content": ""}]

    def _config(self, plan: Plan) -> dict:
        config = dict(plan.settings)
        config.update({
            "target": {"name": self.loaded.name, "weights_sha256": self.loaded.weights_sha256,
                       "source": self.loaded.source},
            "dtype": str(self.target.dtype).removeprefix("torch."), "device": str(self.target.device),
            "runtime": self.target.runtime_name,  # vanilla and the method alike: one runtime per run
            # a target spread over devices: where each part ran
            "device_map": {k: str(v) for k, v in (getattr(self.loaded.model, "hf_device_map", None) or {}).items()}
            or None,
        })
        return config

    def _warm_up(self, ids: list[int], sampling: SamplingConfig) -> None:
        # First forwards pay one-off allocation/threading costs; keep them out of the timings.
        from ..methods import DrafterBase

        generate(self.target, DrafterBase(), ids, 4, SamplingConfig(), None, stop_ids=set())

    def _run_prompt(self, index, prompt, drafter, vanilla, sampling, cfg, on_decode=lambda n: None) -> list[dict]:
        tok, dev = self.loaded.tokenizer, self.target.device
        history = {"method": [], "vanilla": []}
        samples = []
        for turn, text in enumerate(prompt.turns):
            sample = {"id": prompt.id, "turn": turn, "category": prompt.category, "runs": {}}
            for role, d in (("vanilla", vanilla), ("method", drafter)):
                messages = history[role] + [{"role": "user", "content": text}]
                ids = _chat_ids(tok, messages)
                walls, gen = [], None
                for _ in range(cfg.repeats):
                    g = make_generator(cfg.seed * 1_000_003 + index * 16 + turn, dev)
                    gen = generate(self.target, d, ids, cfg.max_new_tokens, sampling, g, timing=cfg.timing)
                    walls.append(gen.wall_s)
                sample["runs"][cfg.method if role == "method" else "vanilla"] = metrics.record(gen, walls)
                on_decode(len(gen.tokens))
                answer = tok.decode(gen.tokens, skip_special_tokens=True)
                history[role] = messages + [{"role": "assistant", "content": answer}]
            if cfg.hf_generate:
                sample["runs"]["hf_generate"] = self._hf_generate(
                    _chat_ids(tok, history["vanilla"][:-1]), sampling, cfg)
                on_decode(sample["runs"]["hf_generate"]["new_tokens"])
            if sampling.greedy and cfg.method != "vanilla":
                ref, got = sample["runs"]["vanilla"]["tokens"], sample["runs"][cfg.method]["tokens"]
                sample["greedy_identical"] = ref == got
                if ref != got:
                    sample["divergence"] = self._divergence(_chat_ids(tok, history["vanilla"][:-1]), ref, got)
            samples.append(sample)
        return samples

    def _divergence(self, ids: list[int], ref: list[int], got: list[int]) -> dict:
        """Where greedy outputs first differ, the target's top-2 logit gap there and whether that is a
        numerical tie at the model's dtype (`decoding.numerics`) or a losslessness bug."""
        pos = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
        out = self.target.prefill(ids + ref[:pos])
        return {"position": pos, **classify_divergence(out.logits[-1], self.target.dtype)}

    def _hf_generate(self, ids: list[int], sampling: SamplingConfig, cfg: RunConfig) -> dict:
        from ..decoding.loop import Generation, wall_clock

        model, dev = self.loaded.model, self.target.device
        kwargs = ({"do_sample": False} if sampling.greedy else
                  {"do_sample": True, "temperature": sampling.temperature, "top_k": sampling.top_k or None,
                   "top_p": sampling.top_p})
        walls, new = [], []
        for _ in range(cfg.repeats):
            torch.manual_seed(cfg.seed)
            t0 = wall_clock(dev)
            with torch.inference_mode():
                out = model.generate(torch.tensor([ids], device=dev), max_new_tokens=cfg.max_new_tokens,
                                     pad_token_id=self.loaded.tokenizer.eos_token_id, **kwargs)
            walls.append(wall_clock(dev) - t0)
            new = out[0, len(ids):].tolist()
        gen = Generation(tokens=new, steps=[1] * len(new))
        return metrics.record(gen, walls)

    def _finish(self, doc: dict, cfg: RunConfig) -> None:
        by_run: dict[str, list[dict]] = {}
        for s in doc["samples"]:
            for name, rec in s["runs"].items():
                by_run.setdefault(name, []).append(rec)
        summary = {name: metrics.summarize(recs) for name, recs in by_run.items()}
        if cfg.method in summary and "vanilla" in summary:
            pairs = [(s["runs"][cfg.method], s["runs"]["vanilla"]) for s in doc["samples"]]
            summary[cfg.method].update(metrics.speedups(summary[cfg.method], summary["vanilla"], pairs))
            if "hf_generate" in summary:
                hf = summary["hf_generate"]["tokens_per_s"]
                for name in (cfg.method, "vanilla"):
                    summary[name]["speedup_vs_hf_generate"] = summary[name]["tokens_per_s"] / hf if hf else None
        greedy = [s["greedy_identical"] for s in doc["samples"] if "greedy_identical" in s]
        if greedy:
            ties = sum(bool(s.get("divergence", {}).get("numerical_tie")) for s in doc["samples"])
            summary["greedy_identical"] = {"identical": sum(greedy), "compared": len(greedy), "numerical_ties": ties}
        earlier_peak = (doc.get("summary") or {}).get("peak_memory_mb") or 0.0  # a resumed run's first session
        summary["peak_memory_mb"] = max(_peak_memory_mb(self.target.device), earlier_peak)
        doc["summary"] = summary
        doc["environment"] = environment(self.target.device)  # the fast runtime's kernel plan included
        doc["status"] = ("complete" if {(s["id"], s["turn"]) for s in doc["samples"]} >=
                         {(pid, 0) for pid in doc["config"]["prompt_ids"]} else "partial")
