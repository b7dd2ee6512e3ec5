"""The fidelity study: every trained arm, with its training seeds, run on one set of prompts and
settings, and the papers' claims judged on those runs (`baselines/embedded/fidelity.json`).

The plan file names the arms (a method, its parameters and one draft checkpoint per training seed),
the datasets, temperatures, prompt count and token budget, the claims of `claims.json` to judge, and
the training of its heads (`training_jobs`; `install_heads` puts the finished ones where the arms and
the methods find them).
`run_plan` writes one results file per (arm, seed, dataset, temperature), resuming whatever is
there; `measure` judges each claim on every (dataset, temperature) of the plan with compare's rule
(`compare.claims`: like with like, the paired prompt bootstrap, seeds joined) and returns the table
rows that `record` stores in the plan file. A claim is judged on all of the study's rows, not only on
the datasets its paper reported (`in_paper` says which are): a claim about drafting should hold on
any prompt set, and where it does not, that is a finding.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from ..artifacts import display_path, write_json
from ..errors import UsageError
from .baselines import DEFAULT_ROOT

KIND = "specbench.fidelity"
SCHEMA_VERSION = 1
DEFAULT_PLAN = DEFAULT_ROOT / "embedded" / "fidelity.json"
DEFAULT_CLAIMS = DEFAULT_ROOT / "embedded" / "claims.json"


@dataclass(frozen=True)
class Arm:
    """One arm of the study: `method` with `params`, drafting with one checkpoint per training seed."""

    name: str
    method: str
    params: dict
    checkpoints: tuple[str, ...] = ()  # one per training seed
    needs_checkpoint: bool = False  # False: a training-free method (PLD, Lookahead), run once


@dataclass(frozen=True)
class Plan:
    path: Path
    target: str
    datasets: tuple[str, ...]
    temperatures: tuple[float, ...]
    limit: int
    max_new_tokens: int
    runtime: str
    threads: int
    arms: dict[str, Arm]
    claims: tuple[str, ...]
    doc: dict

    def cells(self):
        """(arm, checkpoint or None, dataset, temperature) of every run the study makes, in run order; an arm
        that needs a checkpoint and lists none is not trained yet, and makes none."""
        for arm in self.arms.values():
            for ckpt in arm.checkpoints or ((None,) if not arm.needs_checkpoint else ()):
                for ds in self.datasets:
                    for t in self.temperatures:
                        yield arm, ckpt, ds, t

    def out_name(self, arm: Arm, seed: int | None, dataset: str, temperature: float) -> str:
        """`<arm>[-s<seed>]-<dataset>-t<T>.json`, seed the training seed of the run's checkpoint (from its
        manifest; `checkpoint_seeds`), absent for a training-free arm."""
        tag = f"-s{seed}" if seed is not None else ""
        return f"{arm.name.replace('[', '-').replace(']', '')}{tag}-{dataset}-t{temperature:g}.json"


def load_plan(path: str | Path = DEFAULT_PLAN) -> Plan:
    """The study's plan, checked: known methods, parameters and datasets; a typo fails here, not mid-study."""
    from ..methods import available_methods
    from .datasets import DATASETS

    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: not a readable fidelity plan ({e})") from None
    if not isinstance(doc, dict) or doc.get("kind") != KIND:
        raise UsageError(f"{path}: not a fidelity plan (kind {KIND!r})")
    try:
        methods = available_methods()
        arms = {}
        for name, a in doc["arms"].items():
            if a["method"] not in methods:
                raise UsageError(f"{path}: arm {name}: unknown method {a['method']!r} "
                                 f"(known: {', '.join(sorted(methods))})")
            methods[a["method"]].params(a.get("params") or {})  # unknown or malformed parameters refused
            arms[name] = Arm(name, a["method"], dict(a.get("params") or {}), tuple(a.get("checkpoints") or ()),
                             methods[a["method"]].needs_checkpoint)
        plan = Plan(path, str(doc["target"]), tuple(doc["datasets"]), tuple(float(t) for t in doc["temperatures"]),
                    int(doc["limit"]), int(doc["max_new_tokens"]), str(doc.get("runtime", "auto")),
                    int(doc.get("threads", 0)), arms, tuple(doc["claims"]), doc)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UsageError(f"{path}: malformed fidelity plan ({type(e).__name__}: {e})") from None
    unknown = [d for d in plan.datasets if d not in DATASETS]
    if unknown:
        raise UsageError(f"{path}: unknown dataset(s) {', '.join(unknown)} (known: {', '.join(DATASETS)})")
    return plan


def study_claims(plan: Plan, claims_path: str | Path = DEFAULT_CLAIMS) -> list[dict]:
    """The plan's claims from the claims file, each widened to the study's datasets and temperatures (the
    paper's own rows kept as `paper_datasets` / `paper_temperatures`)."""
    from .compare import load_claims

    by_id = {c["id"]: c for c in load_claims(Path(claims_path))}
    missing = [c for c in plan.claims if c not in by_id]
    if missing:
        raise UsageError(f"{plan.path}: claims {', '.join(missing)} are not in {claims_path}")
    out = []
    for cid in plan.claims:
        c = by_id[cid]
        for side in ("better", "worse"):
            if c[side] not in plan.arms:
                raise UsageError(f"{plan.path}: claim {cid} names arm {c[side]!r}, which the plan does not run")
        out.append(dict(c, datasets=list(plan.datasets), temperatures=list(plan.temperatures),
                        paper_datasets=c.get("datasets"), paper_temperatures=c.get("temperatures")))
    return out


def run_plan(plan: Plan, results_dir: Path, runner=None, progress: bool = True, only=None,
             claims: list[dict] | None = None) -> list[Path]:
    """Run (or resume) every cell of the plan into `results_dir`; `only(arm, ckpt, dataset, T)` picks a
    subset. The checkpoints are checked first (`checkpoint_seeds`, with `claims` the study's claims)."""
    import torch

    from .runner import RunConfig, Runner

    cells = [c for c in plan.cells() if only is None or only(*c)]
    seeds = checkpoint_seeds(plan, {(arm.name, ckpt) for arm, ckpt, _, _ in cells if ckpt is not None}, claims)
    if plan.threads:
        torch.set_num_threads(plan.threads)
    results_dir.mkdir(parents=True, exist_ok=True)
    runner = runner or Runner(plan.target, runtime=plan.runtime)
    paths = []
    for arm, ckpt, ds, t in cells:
        params = dict(arm.params, **({"checkpoint": ckpt} if ckpt is not None else {}))
        cfg = RunConfig(method=arm.method, dataset=ds, target=plan.target, params=params, limit=plan.limit,
                        temperature=t, max_new_tokens=plan.max_new_tokens, runtime=plan.runtime)
        out = results_dir / plan.out_name(arm, seeds.get((arm.name, ckpt)), ds, t)
        runner.run(cfg, out=out, progress=progress)
        paths.append(out)
    return paths


def _checkpoint_dir(checkpoint: str) -> Path | None:
    """A checkpoint's directory (`head_drafters.checkpoint_dir`: a path, or a committed head's name), or None."""
    from ..methods.head_drafters import checkpoint_dir

    d = checkpoint_dir(checkpoint)
    return d if d.is_dir() else None


def _provenance(checkpoint: str) -> dict:
    """How a checkpoint was trained, from its manifest ({} if it has none, or is no directory)."""
    from ..models.draft_heads import checkpoint_provenance

    d = _checkpoint_dir(checkpoint)
    return (checkpoint_provenance(d) or {}) if d is not None else {}


def _arm_of(method: str, prov: dict) -> str:
    """The arm a checkpoint with provenance `prov` was trained as: `method`, or `method[variant]`."""
    variant = prov.get("variant")
    return f"{method}[{variant}]" if variant else method


def _trained_arm(method: str, checkpoint: str) -> str:
    """The arm a checkpoint was trained as (see `_arm_of`)."""
    return _arm_of(method, _provenance(checkpoint))


def _check_checkpoint(plan: Plan, arm: Arm, ckpt: str) -> dict:
    """`ckpt`'s provenance, refused with what to do when it cannot be one of `arm`'s seeds."""
    from ..methods.sps import PREFIX

    d = _checkpoint_dir(ckpt)
    several = len(arm.checkpoints) > 1
    if d is None and not ckpt.startswith(PREFIX):  # sps's prefix:K is a draft built at run time, no directory
        raise UsageError(f"{ckpt}: no such checkpoint (looked for {Path(ckpt).expanduser().resolve()} and under "
                         f"specbench/checkpoints/); train it (specbench fidelity train) or fix arm {arm.name} of "
                         f"{plan.path}")
    prov = _provenance(ckpt)
    if several and not prov:
        raise UsageError(f"{ckpt}: {'no MANIFEST.json' if d is not None else 'not a trained checkpoint'}, so it has "
                         f"no training seed; arm {arm.name} lists {len(arm.checkpoints)} checkpoints, one per seed")
    if several and prov.get("seed") is None:
        raise UsageError(f"{ckpt}: its manifest does not record a training seed; arm {arm.name} lists "
                         f"{len(arm.checkpoints)} checkpoints, one per seed; retrain it or fix {plan.path}")
    if prov.get("method") and prov["method"] not in _family(arm.method):
        raise UsageError(f"{ckpt}: its manifest says it was trained for {prov['method']}, the plan runs it as "
                         f"arm {arm.name}; fix the plan ({plan.path})")
    got = _arm_of(arm.method, prov)
    if got != arm.name:
        raise UsageError(f"{ckpt}: its manifest trains arm {got}, the plan runs it as {arm.name}; fix the plan "
                         f"({plan.path})")
    return prov


def checkpoint_seeds(plan: Plan, pairs, claims: list[dict] | None = None) -> dict:
    """(arm name, checkpoint) -> training seed (None: a checkpoint without one, alone in its arm), read from
    the manifests before anything decodes, so a wrong plan loses nothing. Refused: a checkpoint that is not
    there, or was trained for another method or arm; in an arm of several checkpoints, one without a recorded
    seed, two with one seed, or two trained on other data, budget or recipe (their spread would not be a seed
    spread); and, for each of `claims`, arms whose heads were trained on other data or for other epochs
    (every row of the claim would be "not measured", after hours of decoding)."""
    seeds: dict = {}
    provs: dict = {}
    for name, ckpt in sorted(pairs):
        arm = plan.arms[name]
        prov = _check_checkpoint(plan, arm, ckpt)
        for other, oprov in provs.get(name, []):
            if oprov["seed"] == prov["seed"]:
                raise UsageError(f"{plan.path}: arm {name} lists {other} and {ckpt}, both trained with seed "
                                 f"{prov['seed']}; a seed spread needs one checkpoint per seed")
            differs = [k for k in ("data", "epochs", "max_steps", "recipe") if oprov.get(k) != prov.get(k)]
            if differs:
                raise UsageError(f"{plan.path}: arm {name} lists {other} and {ckpt}, which differ in "
                                 f"{', '.join(differs)}; an arm's seeds share one data set, budget and recipe")
        provs.setdefault(name, []).append((ckpt, prov))
        seeds[(name, ckpt)] = None if prov.get("seed") is None else int(prov["seed"])
    for cl in claims or ():
        sides = [[(c, p) for c, p in provs.get(cl[s], []) if p.get("data")] for s in ("better", "worse")]
        for (ca, pa), (cb, pb) in ((a, b) for a in sides[0] for b in sides[1]):
            differs = [k for k in ("data", "epochs", "max_steps") if pa.get(k) != pb.get(k)]
            if differs:
                raise UsageError(f"claim {cl['id']}: {ca} ({cl['better']}) and {cb} ({cl['worse']}) were trained "
                                 f"with other {', '.join(differs)}; the claim would not be judged on any row. "
                                 f"Train both arms on the plan's corpus and budget, or fix {plan.path}")
    return seeds


def _side(arm: str, values: dict) -> dict:
    vals = [v for _, v in sorted(values.items(), key=lambda kv: str(kv[0]))]
    return {"arm": arm, "tau": {str(k): v for k, v in sorted(values.items(), key=lambda kv: str(kv[0]))},
            "mean": statistics.fmean(vals), "min": min(vals), "max": max(vals)}


def _n_seeds(arm: Arm) -> int:
    """How many seeds the plan runs the arm with (one run for a training-free arm)."""
    return len(arm.checkpoints) if arm.needs_checkpoint else 1


def measure(plan: Plan, runs, claims: list[dict]) -> list[dict]:
    """One row per claim, dataset and temperature of the plan: both arms' tau per training seed (mean, min,
    max: the seed spread), the joined verdict and each pair's paired-bootstrap interval. A row without a
    comparable pair says why (`verdict` "not measured"); one whose arms have fewer seeds than the plan
    trains (a run missing, or not comparable) keeps its values but is "incomplete", with the reason."""
    from .compare import check_claims, seed_spread

    results = check_claims(runs, claims)
    rows = []
    for cl in claims:
        for ds in plan.datasets:
            for t in plan.temperatures:
                mine = [r for r in results if r["claim"] is cl and r["dataset"] == ds and r["temperature"] == t]
                groups = seed_spread(mine)
                row = {"claim": cl["id"], "dataset": ds, "temperature": t,
                       "in_paper": (cl["paper_datasets"] is None or ds in cl["paper_datasets"])
                       and (cl["paper_temperatures"] is None or t in [float(x) for x in cl["paper_temperatures"]])}
                why = sorted({r["reason"] for r in mine if not r["checked"]})
                if len(groups) != 1:
                    row.update(verdict="not measured",
                               reason="; ".join(why) if why else "no runs of both arms" if not groups else
                               f"{len(groups)} settings of the arms, not one")
                    rows.append(row)
                    continue
                [g] = groups
                row.update(better=_side(cl["better"], g["better"]), worse=_side(cl["worse"], g["worse"]),
                           verdict=g["verdict"], seeds_disagree=g["seeds_disagree"],
                           pairs=[{"seeds": [p["runs"][0].draft_seed, p["runs"][1].draft_seed],
                                   "interval": list(p["interval"]) if p["interval"] else None,
                                   "verdict": p["verdict"]} for p in g["pairs"]])
                # a verdict over fewer seeds than the plan trains would read as the whole spread
                short = [f"{side_arm} has {len(g[side])} of its {_n_seeds(plan.arms[side_arm])} seeds"
                         for side, side_arm in (("better", cl["better"]), ("worse", cl["worse"]))
                         if len(g[side]) < _n_seeds(plan.arms[side_arm])]
                if g["problem"] or short:
                    row.update(verdict="not measured" if g["problem"] else "incomplete",
                               reason="; ".join(([g["problem"]] if g["problem"] else []) + short + why))
                rows.append(row)
    return rows


def arm_taus(plan: Plan, runs) -> dict:
    """arm -> dataset -> temperature -> [tau per seed], for the plot and the README table."""
    out: dict = {}
    for r in runs:
        if r.arm in plan.arms and r.dataset in plan.datasets:
            tau = r.value("tau")
            if tau is not None:
                out.setdefault(r.arm, {}).setdefault(r.dataset, {}).setdefault(r.temperature, []).append(tau)
    return out


def record(plan: Plan, rows: list[dict], runs, results_dir: Path) -> None:
    """Store the measured table in the plan file (atomically), with where its runs are and what ran them."""
    import datetime

    machines = sorted({(r.machine or "?", str(r.env.get("cpu_isa")), str(r.env.get("threads")), r.runtime)
                       for r in runs})
    doc = dict(plan.doc)
    doc["table"] = {"recorded": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "results": display_path(results_dir), "runs": len(runs),
                    "machines": [dict(zip(("machine", "cpu_isa", "threads", "runtime"), m)) for m in machines],
                    "specbench_commits": sorted({str(r.env.get("git_commit")) for r in runs}), "rows": rows}
    write_json(plan.path, doc, indent=1)


# ---------------------------------------------------------------- training


def training_jobs(plan: Plan) -> list[dict]:
    """The plan's `training` block as jobs, one per head and seed: {arms, seed, out, argv, install} where argv
    is the `specbench train` command line and install the name `install_heads` gives the head under
    specbench/checkpoints/: `<install>-<target>` for seed 0 (the method's default head), `<install>-s<seed>-
    <target>` for the others (None: the job has no `install`, its head is used in place). Every job shares
    the block's corpus and `common` options (one data set, one budget); `args` are a method's own (its
    learning rate, loss weights, variant)."""
    tr = plan.doc.get("training")
    if not tr:
        raise UsageError(f"{plan.path} has no training block")
    try:
        jobs = []
        for job in tr["jobs"]:
            for seed in job["seeds"]:
                out = str(job["out"]).format(seed=seed)
                argv = ["train", "--method", job["method"], "--out", out, "--corpus", *tr["corpus"], *tr["common"],
                        *job.get("args", []), "--seed", str(seed)]
                install = job.get("install")
                if install is not None:
                    install = f"{install}{f'-s{seed}' if int(seed) else ''}-{plan.target}"
                jobs.append({"arms": list(job["arms"]), "seed": int(seed), "out": out, "argv": argv,
                             "install": install})
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise UsageError(f"{plan.path}: malformed training block ({type(e).__name__}: {e})") from None
    names = [j["install"] for j in jobs if j["install"] is not None]
    if len(set(names)) < len(names):
        raise UsageError(f"{plan.path}: two training jobs install their heads under one name ({names})")
    unknown = sorted({a for j in jobs for a in j["arms"]} - set(plan.arms))
    if unknown:
        raise UsageError(f"{plan.path}: training names arm(s) {', '.join(unknown)} that the plan does not run")
    for job in tr["jobs"]:  # a job that trains another arm than it names would cost its hours for nothing
        args = list(job.get("args", []))
        flags = [args[i + 1] for i, a in enumerate(args[:-1]) if a in ("--variant", "--mask-mode")]
        for name in job["arms"]:
            want = name[name.index("[") + 1:-1] if name.endswith("]") else None
            if (flags[-1] if flags else None) != want or job["method"] not in _family(plan.arms[name].method):
                raise UsageError(f"{plan.path}: the training job of method {job['method']} with args {args} does "
                                 f"not train arm {name}")
    return jobs


def _family(method: str) -> set[str]:
    """The methods whose checkpoints `method` drafts with: its own, and its catalogue's `draft_of`."""
    from ..methods.catalogue import identity

    ident = identity(method)
    return {method, *([ident.draft_of] if ident is not None and ident.draft_of else [])}


def trained(job: dict) -> bool:
    """A finished checkpoint of `job` is at its `out` (its manifest says training finished). One finished
    with another command than the job's (the plan changed since) is refused: skipping it would run the
    study on a head the plan does not describe."""
    import shlex

    try:
        man = json.loads((Path(job["out"]) / "MANIFEST.json").read_text())
        finished = bool(man["training"]["finished"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    want = "specbench " + shlex.join(job["argv"])
    if finished and man.get("command") != want:
        raise UsageError(f"{job['out']} holds a head trained by `{man.get('command')}`, but the plan's job is now "
                         f"`{want}`; delete {job['out']} to train it again, or restore the plan")
    return finished


def install_heads(plan: Plan, dest: Path | None = None) -> list[str]:
    """Install every finished head of the plan's training block and point the plan's arms at them.

    A job's head is copied unchanged to `dest/<job's install name>` (default dest: specbench/checkpoints/,
    where the methods find their default heads and the study finds them by name), its manifest gaining
    `installed_as` and, where it replaces another head, `replaces` (that head's manifest, whole: its
    sha256, held-out top-1, command and own `replaces`, so the records measured with any earlier head stay
    traceable). A head
    already installed there is left alone. Each arm the block trains then lists its finished heads in seed
    order; one with none finished lists none (the study skips it) rather than keep a head of another
    recipe. Every job is checked before anything is copied. Returns what it did, one line each."""
    import shutil

    from ..artifacts import sha256_file
    from ..methods.head_drafters import CHECKPOINTS_DIR

    default = dest is None or Path(dest).resolve() == CHECKPOINTS_DIR.resolve()
    dest = CHECKPOINTS_DIR if default else Path(dest)
    jobs = training_jobs(plan)
    finished = [job for job in jobs if trained(job)]  # a head of a changed plan is refused here, before copying
    lines = [f"not trained yet: {job['out']} (specbench fidelity train)" for job in jobs if job not in finished]
    done = []
    for job in finished:
        if job["install"] is None:
            done.append((job, job["out"]))
            continue
        src, to = Path(job["out"]), dest / job["install"]
        ref = job["install"] if default else str(to)
        done.append((job, ref))
        aside = dest / f".{job['install']}.old"
        if aside.exists():  # an install interrupted after moving the old head aside: finish it
            if to.exists():
                shutil.rmtree(aside)
            else:
                aside.rename(to)
        sha = sha256_file(src / "model.safetensors")
        old = _read_manifest(to)
        if old.get("weights_sha256") == sha:
            lines.append(f"{job['out']}: already installed as {ref}")
            continue
        tmp = dest / f".{job['install']}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        man = _read_manifest(tmp)
        where = f"specbench/checkpoints/{job['install']}" if default else display_path(to)
        man["installed_as"] = f"{where} (the files of {job['out']}, copied unchanged; this key and `replaces` added)"
        man.pop("replaces", None)
        if old:
            man["replaces"] = old
        write_json(tmp / "MANIFEST.json", man, indent=2)
        # the old head moves aside until the new one is in place: an interruption leaves one of them whole
        if to.exists():
            to.rename(aside)
        tmp.rename(to)
        shutil.rmtree(aside, ignore_errors=True)
        lines.append(f"{job['out']}: installed as {ref} (sha256 {sha[:16]}...)"
                     + (f", replacing {str(old.get('weights_sha256'))[:16]}..." if old else ""))
    doc = json.loads(json.dumps(plan.doc))
    for name in dict.fromkeys(a for j in jobs for a in j["arms"]):
        doc["arms"][name]["checkpoints"] = [ref for j, ref in sorted(done, key=lambda d: d[0]["seed"])
                                            if name in j["arms"]]
        lines.append(f"arm {name}: " + (", ".join(doc["arms"][name]["checkpoints"]) or "no head trained yet"))
    write_json(plan.path, doc, indent=1)
    return lines


def _read_manifest(d: Path) -> dict:
    try:
        return json.loads((d / "MANIFEST.json").read_text())
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------- command line


def _fmt_side(side: dict) -> str:
    """One seed: its tau; several: their mean [min-max], so that seeds agreeing never look like one seed."""
    if len(side["tau"]) == 1:
        return f"{side['mean']:.3f}"
    return f"{side['mean']:.3f} [{side['min']:.3f}-{side['max']:.3f}]"


def table_lines(rows: list[dict], claims: list[dict]) -> str:
    """The table as text: a row per claim, dataset and temperature; tau as seed mean [min-max]."""
    from tabulate import tabulate

    from .compare import claim_statement

    by_id = {c["id"]: c for c in claims}
    out = []
    for r in rows:
        cl = by_id.get(r["claim"])
        stmt = claim_statement(cl) if cl else r["claim"]
        verdict = {"violated": "VIOLATED"}.get(r["verdict"], r["verdict"])
        if r.get("seeds_disagree"):
            verdict += " (seeds disagree)"
        out.append([stmt, r["dataset"], f"{r['temperature']:g}", "yes" if r["in_paper"] else "no",
                    _fmt_side(r["better"]) if "better" in r else "-", _fmt_side(r["worse"]) if "worse" in r else "-",
                    f"{verdict}: {r['reason']}" if r.get("reason") else verdict])
    return tabulate(out, headers=["claim", "dataset", "T", "paper's row", "better tau", "worse tau", "verdict"])


def cmd_fidelity(args) -> int:
    plan = load_plan(args.plan)
    if args.action == "run":
        if not args.results:
            raise UsageError("fidelity run needs --results DIR (where the study's results files go)")
        arms = set(args.arm or plan.arms)
        unknown = arms - set(plan.arms)
        if unknown:
            raise UsageError(f"unknown arm(s) {', '.join(sorted(unknown))} (the plan's: {', '.join(plan.arms)})")
        paths = run_plan(plan, Path(args.results), progress=not args.no_progress,
                         only=lambda arm, ckpt, ds, t: arm.name in arms, claims=study_claims(plan, args.claims))
        print(f"{len(paths)} runs in {args.results}")
        return 0
    if args.action == "train":
        import shlex

        from ..methods import get_method

        jobs = training_jobs(plan)
        for job in jobs:
            done = trained(job)
            print(("done " if done else "train ") + "specbench " + shlex.join(job["argv"]), flush=True)
            if not done and not args.dry_run:
                # `specbench train --method M ARGS`: resumes a job interrupted earlier (the trainer's own state)
                rc = get_method(job["argv"][2]).train(job["argv"][3:])
                if rc:
                    return rc
        if not args.dry_run:
            print("heads trained; `specbench fidelity install` installs them and points the plan's arms at them")
        return 0
    if args.action == "install":
        for line in install_heads(plan):
            print(line)
        return 0
    claims = study_claims(plan, args.claims)
    if args.results:
        from .compare import load_inputs

        runs = [r for r in load_inputs([args.results]) if r.method != "vanilla"]
        rows = measure(plan, runs, claims)
        if args.record:
            record(plan, rows, runs, Path(args.results))
            print(f"recorded {len(rows)} rows in {plan.path}")
        if args.plot:
            from .compare.plot import plot_fidelity

            plot_fidelity(arm_taus(plan, runs), list(plan.arms), Path(args.plot),
                          f"specbench fidelity study: {plan.target}, {plan.limit} prompts per set, "
                          f"{plan.max_new_tokens} new tokens")
            print(f"plot: {args.plot}")
    else:
        if args.record or args.plot:
            raise UsageError("--record and --plot need --results DIR (the runs to measure)")
        rows = (plan.doc.get("table") or {}).get("rows")
        if not rows:
            raise UsageError(f"{plan.path} holds no recorded table yet; measure one with --results DIR")
    print(table_lines(rows, claims))
    return 0


def add_parser(sub) -> None:
    f = sub.add_parser("fidelity", help="the fidelity study: train its heads (`train`), install them as the "
                                        "methods' heads and the plan's (`install`), run its plan (`run`), or "
                                        "judge the papers' claims on its runs, with seed spreads (`table`)")
    f.add_argument("action", choices=("train", "install", "run", "table"))
    f.add_argument("--plan", default=str(DEFAULT_PLAN), help="the study's plan (default: %(default)s)")
    f.add_argument("--claims", default=str(DEFAULT_CLAIMS), help="the claims file (default: %(default)s)")
    f.add_argument("--results", help="the study's results directory (run: written; table: read; table without "
                                     "it prints the plan's recorded table)")
    f.add_argument("--arm", action="append", help="run only this arm (repeatable)")
    f.add_argument("--record", action="store_true", help="table: store the measured table in the plan file")
    f.add_argument("--plot", metavar="FILE.png", help="table: tau per arm per dataset with seed bars (matplotlib)")
    f.add_argument("--dry-run", action="store_true", help="train: print the training commands, run none")
    f.add_argument("--no-progress", action="store_true")
    f.set_defaults(func=cmd_fidelity)
