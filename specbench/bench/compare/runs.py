"""The unit compare works on: one method's run on one (target, dataset, temperature), with its vanilla twin."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

from ...methods import catalogue
from ..baselines import DEFAULT_ROOT, KNOWN_TARGETS
from .common import CompareError, is_num, machine_label, normalized


@dataclass
class Run:
    """One method's measurement on one (target, dataset, temperature), with its vanilla twin."""

    source: str
    target: str  # as recorded (embedded name, local path or HF id)
    target_key: str  # canonical baselines name when known (e.g. llama2-chat-7b), else `target`
    target_sha: str | None
    method: str
    params: dict
    dataset: str  # a vendored set's name, or a prompt file's `<stem>@<sha8>` (see `dataset_name`)
    temperature: float
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    limit: int | None = None
    max_new_tokens: int | None = None
    prompt_ids: list | None = None
    dataset_file: dict | None = None  # {path, sha256} of a user's prompt file; None for a vendored set
    summary: dict = field(default_factory=dict)
    vanilla: dict | None = None
    env: dict = field(default_factory=dict)
    status: str = "complete"
    greedy: dict | None = None
    suite: dict | None = None
    label: str = ""
    extra: dict = field(default_factory=dict)  # e.g. Spec-Bench speed.py numbers of an imported file
    runtime: str = "hf"  # the target's decoder runtime (files written before there was a choice ran hf)
    # (prompt id, turn) -> (new tokens, steps) of the method on each finished sample; None when not recorded
    per_sample: dict | None = None
    # how the run's draft checkpoint was trained (seed, variant, data, epochs), when its manifest says
    draft: dict | None = None
    draft_sha: str | None = None  # sha256 of the draft checkpoint's weights (None: no checkpoint, or older file)

    @property
    def arm(self) -> str:
        """What claims name a run by: the method, or `method[variant]` for a head trained as another arm
        of it (FSPAD's ablations `fspad[wofs]`, `fspad[mlplin]`; HASS's masking `hass[official]`)."""
        variant = (self.draft or {}).get("variant")
        return f"{self.method}[{variant}]" if variant else self.method

    @property
    def draft_seed(self) -> int | None:
        """The training seed of the run's draft checkpoint (None: no checkpoint, or not recorded)."""
        seed = (self.draft or {}).get("seed")
        return int(seed) if is_num(seed) else None

    @property
    def hardware(self) -> str | None:
        """Accelerator name (GPU) of the run, None on CPU."""
        return self.env.get("gpu")

    @property
    def machine(self) -> str | None:
        return machine_label(self.env)

    def value(self, metric: str) -> float | None:
        if self.method == "vanilla":
            if metric == "tokens_per_s":
                return (self.vanilla or self.summary).get("tokens_per_s")
            return 1.0
        v = self.summary.get(metric)
        return float(v) if is_num(v) else None

    def setting_key(self) -> tuple:
        return (self.target_key, self.dataset, self.temperature)


def label_sort_key(label: str) -> tuple:
    """Sort key of a run label (`method` or `method#n`): the methods' display order, then the label."""
    return (catalogue.sort_key(label.split("#", 1)[0]), label)


_TARGET_MAP: dict[str, str] | None = None


def _target_aliases() -> dict[str, str]:
    """hf id / hf id basename (lowercase) -> canonical target name, from the papers' baselines files."""
    global _TARGET_MAP
    if _TARGET_MAP is None:
        m: dict[str, str] = {}
        for path in sorted(DEFAULT_ROOT.glob("*.json")):
            try:
                targets = json.loads(path.read_text()).get("targets", {})
            except (OSError, ValueError, AttributeError):
                continue
            for name, spec in targets.items():
                hf = str(spec.get("hf_id", "")).lower()
                if hf:
                    m.setdefault(hf, name)
                    m.setdefault(hf.rsplit("/", 1)[-1], name)
                m.setdefault(name.lower(), name)
        _TARGET_MAP = m
    return _TARGET_MAP


def canonical_target(name: str, suite: dict | None = None) -> str:
    """The baselines' target name for a recorded target (path, HF id or name); `name` when unknown."""
    if suite and suite.get("paper_target"):
        return str(suite["paper_target"])
    if name in KNOWN_TARGETS:
        return name
    aliases = _target_aliases()
    low = str(name).lower().rstrip("/")
    for key in (low, low.rsplit("/", 1)[-1], "/".join(low.split("/")[-2:])):
        if key in aliases:
            return aliases[key]
    return str(name)


def dataset_name(cfg: dict) -> str:
    """The dataset a run is keyed by: the recorded name, tied to the content hash of a prompt file.

    Runs on a user's prompt file (``config.dataset_file``) are named ``<stem>@<sha8>`` by the
    runner; a name that lacks its file's hash gets it appended here, so such a run is its own
    dataset even if the file is called e.g. ``mt_bench.jsonl``: no paper row, recorded
    reference or claim about a vendored set ever applies to it.
    """
    name = str(cfg["dataset"])
    file = cfg.get("dataset_file")
    sha = str(file.get("sha256") or "") if isinstance(file, dict) else ""
    if isinstance(file, dict) and not (sha and name.endswith("@" + sha[:8])):
        name = f"{name}@{sha[:8] or 'unhashed'}"
    return name


def run_from_document(doc: dict, source: str) -> Run:
    """The method run of a results document (config / summary / environment; `specbench.run`, or a suite's
    benchmark record); `source` names it in messages and tables. Its label is the method name until
    `inputs.assign_labels` sees the other runs."""
    cfg = doc.get("config")
    summ = doc.get("summary")
    if not isinstance(cfg, dict) or not isinstance(summ, dict):
        raise CompareError(f"{source}: no config/summary")
    try:
        method = str(cfg["method"])
        dataset = dataset_name(cfg)
        sampling = cfg.get("sampling") or {}
        temperature = float(sampling.get("temperature", cfg.get("temperature", 0.0)))
        tgt = cfg.get("target") or {}
        tname = str(tgt.get("name") if isinstance(tgt, dict) else tgt)
    except (KeyError, TypeError, ValueError) as e:
        raise CompareError(f"{source}: config lacks {e} (method, dataset, sampling.temperature, target)") from None
    suite = doc.get("suite") if isinstance(doc.get("suite"), dict) else None
    vanilla = summ.get("vanilla") if isinstance(summ.get("vanilla"), dict) else None
    mine = summ.get(method)
    if not isinstance(mine, dict):
        if doc.get("samples") == [] or not summ:
            raise CompareError(f"{source}: the run holds no finished prompt (status {doc.get('status', '?')}); "
                               f"resume it or delete it")
        raise CompareError(f"{source}: summary has no entry for method {method!r}")
    return Run(
        source=source, target=tname, target_key=canonical_target(tname, suite),
        target_sha=(tgt.get("weights_sha256") if isinstance(tgt, dict) else None),
        method=method, params=normalized(cfg.get("params") or {}), dataset=dataset, temperature=temperature,
        top_k=int(sampling.get("top_k", 0) or 0), top_p=float(sampling.get("top_p", 1.0) or 1.0),
        seed=cfg.get("seed"), limit=cfg.get("limit"), max_new_tokens=cfg.get("max_new_tokens"),
        prompt_ids=_finished_prompts(cfg.get("prompt_ids"), doc.get("samples")),
        dataset_file=cfg["dataset_file"] if isinstance(cfg.get("dataset_file"), dict) else None,
        summary=mine, vanilla=vanilla, env=doc.get("environment") or {},
        status=str(doc.get("status", "complete")), greedy=summ.get("greedy_identical"), suite=suite,
        label=method, extra=dict(doc.get("compare_extra") or {}), runtime=str(cfg.get("runtime") or "hf"),
        per_sample=_per_sample(doc.get("samples"), method),
        draft=cfg["draft"] if isinstance(cfg.get("draft"), dict) else None,
        draft_sha=str(cfg["draft_checkpoint_sha256"]) if cfg.get("draft_checkpoint_sha256") else None,
    )


def _per_sample(samples, method: str) -> dict | None:
    """(prompt id, turn) -> (new tokens, steps) of `method` in each sample, or None if any sample lacks them."""
    if not isinstance(samples, list) or not samples:
        return None
    out = {}
    for s in samples:
        r = (s.get("runs") or {}).get(method) if isinstance(s, dict) else None
        if not isinstance(r, dict) or not is_num(r.get("new_tokens")) or not isinstance(r.get("steps"), list):
            return None
        out[(str(s.get("id")), int(s.get("turn") or 0))] = (int(r["new_tokens"]), len(r["steps"]))
    return out


def _finished_prompts(planned, samples) -> list | None:
    """The planned prompt ids that the run holds samples of: a partial run is judged on what it measured,
    so it never matches a complete run of the same plan."""
    if not isinstance(planned, list) or not isinstance(samples, list):
        return planned
    done = {s.get("id") for s in samples if isinstance(s, dict)}
    return [pid for pid in planned if pid in done]


def pooled_vanilla(runs: list[Run]) -> list[Run]:
    """One vanilla pseudo-run per (target, dataset, T): the vanilla twins pooled (tokens / wall time)."""
    pooled: dict[tuple, dict] = {}
    proto: dict[tuple, Run] = {}
    for r in runs:
        v = r.vanilla if r.method != "vanilla" else (r.vanilla or r.summary)
        if not v:
            continue
        k = r.setting_key()
        acc = pooled.setdefault(k, {"new_tokens": 0, "wall_s": 0.0, "tps": []})
        if is_num(v.get("new_tokens")) and is_num(v.get("wall_s")) and v["wall_s"] > 0:
            acc["new_tokens"] += v["new_tokens"]
            acc["wall_s"] += v["wall_s"]
        elif is_num(v.get("tokens_per_s")):
            acc["tps"].append(v["tokens_per_s"])
        proto.setdefault(k, r)
    out = []
    for k, acc in pooled.items():
        tps = acc["new_tokens"] / acc["wall_s"] if acc["wall_s"] else (
            sum(acc["tps"]) / len(acc["tps"]) if acc["tps"] else None)
        p = proto[k]
        out.append(replace(p, method="vanilla", label="vanilla", params={}, summary={"tokens_per_s": tps},
                           vanilla={"tokens_per_s": tps}, source=p.source))
    return out
