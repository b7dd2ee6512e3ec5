"""Run a method and the vanilla baseline on a prompt set, in one process, and record the results.

Per prompt (and per turn: MT-bench's second turn sees the model's own first answer), the
vanilla loop and the method run back to back on the same tokens, so speedup is a ratio of
two measurements taken under the same machine load.  The results file is rewritten
atomically after every prompt; a stopped run resumes from the prompts it finished.
"""

from __future__ import annotations

import json
import resource
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from ..decoding import SamplingConfig, generate, make_generator
from ..errors import ContextLengthError, UsageError
from ..methods import get_method
from . import metrics, results
from .datasets import load_prompts


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
    max_new_tokens: int = 128
    seed: int = 0
    repeats: int = 1
    dtype: str = "auto"
    device: str = "auto"
    hf_generate: bool = False


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


class Runner:
    """Holds the loaded target so several runs (e.g. a benchmark suite) share one load."""

    def __init__(self, target_spec: str = "smollm2-135m", dtype: str = "auto", device: str = "auto", loaded=None):
        from ..models import load_model
        from ..models.target import Target

        self.loaded = loaded or load_model(target_spec, dtype=dtype, device=device)
        self.target = Target.from_loaded(self.loaded)

    def run(self, cfg: RunConfig, out: Path | None = None, resume: bool = True, progress: bool = True) -> dict:
        method = get_method(cfg.method)
        params = method.params(cfg.params)
        sampling = SamplingConfig(cfg.temperature, cfg.top_k, cfg.top_p)
        if cfg.repeats < 1 or cfg.max_new_tokens < 1:
            raise UsageError("--repeats and --max-new-tokens must be >= 1")
        prompts = load_prompts(cfg.dataset, cfg.limit)
        if not prompts:
            raise UsageError(f"dataset {cfg.dataset!r} has no prompts for --limit {cfg.limit}")
        tok = self.loaded.tokenizer
        first_turns = [_chat_ids(tok, [{"role": "user", "content": p.turns[0]}]) for p in prompts]
        for p, ids in zip(prompts, first_turns):  # fail before anything is written
            try:
                self.target.check_fits(len(ids), cfg.max_new_tokens)
            except ContextLengthError as e:
                raise ContextLengthError(f"{p.id}: {e}") from None
        gen0 = make_generator(cfg.seed, self.target.device)
        drafter = method.drafter(self.target, sampling, gen0, **params)
        vanilla = get_method("vanilla").drafter(self.target, sampling, gen0)

        config = self._config(cfg, params, prompts)
        # Drafters with weights expose the hash of the checkpoint they actually loaded.
        config["draft_checkpoint_sha256"] = getattr(drafter, "checkpoint_sha256", None)
        vocab_sha = getattr(drafter, "draft_vocab_sha256", None)  # the ranking a reduced draft vocabulary follows
        if vocab_sha:
            config["draft_vocab_sha256"] = vocab_sha
        doc = self._resume(out, config) if (out and resume) else None
        if doc is None:
            doc = {"schema_version": results.SCHEMA_VERSION, "kind": results.KIND,
                   "definitions": metrics.DEFINITIONS, "config": config, "samples": [], "summary": {}}
        done = {(s["id"], s["turn"]) for s in doc["samples"]}
        self._warm_up(first_turns[0], sampling)

        bar = tqdm(prompts, desc=f"{cfg.method} on {cfg.dataset}", disable=not progress, file=sys.stderr,
                   unit="prompt")
        for index, prompt in enumerate(bar):
            if all((prompt.id, t) in done for t in range(len(prompt.turns))):
                continue
            doc["samples"] = [s for s in doc["samples"] if s["id"] != prompt.id]
            doc["samples"] += self._run_prompt(index, prompt, drafter, vanilla, sampling, cfg)
            self._finish(doc, cfg)
            if out:
                results.write_atomic(out, doc)
        self._finish(doc, cfg)
        if out:
            results.write_atomic(out, doc)
        return doc

    def _config(self, cfg: RunConfig, params: dict, prompts) -> dict:
        return {
            "method": cfg.method, "params": params, "baseline": "vanilla", "dataset": cfg.dataset,
            "limit": cfg.limit, "prompt_ids": [p.id for p in prompts],
            "target": {"name": self.loaded.name, "weights_sha256": self.loaded.weights_sha256,
                       "source": self.loaded.source},
            "sampling": SamplingConfig(cfg.temperature, cfg.top_k, cfg.top_p).to_dict(),
            "seed": cfg.seed, "max_new_tokens": cfg.max_new_tokens, "repeats": cfg.repeats,
            "dtype": str(self.target.dtype).removeprefix("torch."), "device": str(self.target.device),
            "hf_generate": cfg.hf_generate,
        }

    @staticmethod
    def _resume(out: Path, config: dict) -> dict | None:
        if not Path(out).exists():
            return None
        doc = results.load(out)
        old = {k: v for k, v in doc["config"].items() if k not in ("prompt_ids", "limit")}
        new = {k: v for k, v in config.items() if k not in ("prompt_ids", "limit")}
        if json.loads(json.dumps(old)) != json.loads(json.dumps(new)):
            raise UsageError(f"{out} holds a run with other settings; pass --no-resume to replace it "
                             f"or choose another --out")
        doc["config"] = config
        return doc

    def _warm_up(self, ids: list[int], sampling: SamplingConfig) -> None:
        # First forwards pay one-off allocation/threading costs; keep them out of the timings.
        from ..methods import DrafterBase

        generate(self.target, DrafterBase(), ids, 4, SamplingConfig(), None, stop_ids=set())

    def _run_prompt(self, index, prompt, drafter, vanilla, sampling, cfg) -> list[dict]:
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
                    gen = generate(self.target, d, ids, cfg.max_new_tokens, sampling, g)
                    walls.append(gen.wall_s)
                sample["runs"][cfg.method if role == "method" else "vanilla"] = metrics.record(gen, walls)
                answer = tok.decode(gen.tokens, skip_special_tokens=True)
                history[role] = messages + [{"role": "assistant", "content": answer}]
            if cfg.hf_generate:
                sample["runs"]["hf_generate"] = self._hf_generate(_chat_ids(tok, history["vanilla"][:-1]), sampling, cfg)
            if sampling.greedy and cfg.method != "vanilla":
                ref, got = sample["runs"]["vanilla"]["tokens"], sample["runs"][cfg.method]["tokens"]
                sample["greedy_identical"] = ref == got
                if ref != got:
                    sample["divergence"] = self._divergence(_chat_ids(tok, history["vanilla"][:-1]), ref, got)
            samples.append(sample)
        return samples

    def _divergence(self, ids: list[int], ref: list[int], got: list[int]) -> dict:
        """Where greedy outputs first differ, and the target's top-2 logit gap there (a tie if ~0)."""
        pos = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
        out = self.target.prefill(ids + ref[:pos])
        top2 = out.logits[-1].topk(2).values.tolist()
        return {"position": pos, "top2_logit_gap": top2[0] - top2[1]}

    def _hf_generate(self, ids: list[int], sampling: SamplingConfig, cfg: RunConfig) -> dict:
        from ..decoding.loop import Generation, _clock

        model, dev = self.loaded.model, self.target.device
        kwargs = ({"do_sample": False} if sampling.greedy else
                  {"do_sample": True, "temperature": sampling.temperature, "top_k": sampling.top_k or None,
                   "top_p": sampling.top_p})
        walls, new = [], []
        for _ in range(cfg.repeats):
            torch.manual_seed(cfg.seed)
            t0 = _clock(dev)
            with torch.inference_mode():
                out = model.generate(torch.tensor([ids], device=dev), max_new_tokens=cfg.max_new_tokens,
                                     pad_token_id=self.loaded.tokenizer.eos_token_id, **kwargs)
            walls.append(_clock(dev) - t0)
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
            summary["greedy_identical"] = {"identical": sum(greedy), "compared": len(greedy)}
        summary["peak_memory_mb"] = _peak_memory_mb(self.target.device)
        doc["summary"] = summary
        doc["environment"] = results.environment(self.target.device)
        doc["status"] = ("complete" if {(s["id"], s["turn"]) for s in doc["samples"]} >=
                         {(pid, 0) for pid in doc["config"]["prompt_ids"]} else "partial")
