"""specbench command line: run | list | models | compare | train."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import SpecbenchError, UsageError


def _params(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--param expects KEY=VALUE, got {pair!r}")
        out[key] = value
    return out


def cmd_run(args) -> int:
    from tabulate import tabulate

    from .bench.runner import RunConfig, Runner, default_out, open_output, plan_run

    if args.threads < 0:
        raise UsageError(f"--threads must be >= 1, or 0 for torch's default (got {args.threads})")
    cfg = RunConfig(method=args.method, dataset=args.dataset, target=args.target, params=_params(args.param),
                    limit=args.limit, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    max_new_tokens=args.max_new_tokens, seed=args.seed, repeats=args.repeats, dtype=args.dtype,
                    device=args.device, hf_generate=args.hf_generate, runtime=args.runtime, timing=args.timing,
                    device_map=args.device_map, max_memory=args.max_memory)
    if args.threads:  # before planning: the thread count is one of the run's recorded settings
        import torch
        torch.set_num_threads(args.threads)
    # Settings, prompts, the output file and a resumable run are all checked before any model is loaded.
    plan = plan_run(cfg)
    out = Path(args.out) if args.out else default_out(plan)
    open_output(plan, out, resume=not args.no_resume)
    runner = Runner(args.target, dtype=args.dtype, device=args.device, runtime=args.runtime,
                    device_map=args.device_map, max_memory=args.max_memory)
    doc = runner.run(cfg, out=out, resume=not args.no_resume, progress=not args.no_progress, plan=plan)
    s = doc["summary"]
    rows = []
    for name in dict.fromkeys(["vanilla", args.method, "hf_generate"]):
        if name in s:
            m = s[name]
            rows.append([name, m["tau"], m["tau_macro"], m["tokens_per_s"],
                         m.get("speedup", 1.0 if name == "vanilla" else None),
                         m.get("speedup_vs_hf_generate"), m["draft_fraction"], m["new_tokens"], m["steps"]])
    print(tabulate(rows, headers=["run", "tau", "tau_macro", "tokens/s", "speedup", "vs HF generate", "draft frac",
                                  "new tokens", "steps"], floatfmt=".3f", missingval="-"))
    if "greedy_identical" in s:
        g = s["greedy_identical"]
        line = f"greedy outputs identical to vanilla: {g['identical']}/{g['compared']}"
        ties = g.get("numerical_ties")
        if g["identical"] != g["compared"] and ties is None:  # written before divergences were classified
            line += " (see the samples' divergence: a numerical tie or a losslessness bug)"
        elif g["identical"] != g["compared"]:
            line += (f" ({ties} parted at a numerical tie, {g['compared'] - g['identical'] - ties} NOT at a tie: "
                     "a losslessness bug; see the samples' divergence)")
        print(line)
    print(f"results: {out}")
    return 0


def cmd_list(args) -> int:
    from tabulate import tabulate

    from .bench.datasets import DATASETS
    from .methods import available_methods
    from .models.registry import EMBEDDED

    print(tabulate([[m.name, "yes" if m.train else "no", m.description] for m in available_methods().values()],
                   headers=["method", "trainable", "description"]))
    print()
    print(tabulate([[d.name, d.description] for d in DATASETS.values()], headers=["dataset", "description"]))
    print()
    seen = set()
    rows = []
    for m in EMBEDDED.values():
        if m.name not in seen:
            seen.add(m.name)
            rows.append([m.name, m.hf_id, f"{m.package}=={m.version}", m.license])
    print(tabulate(rows, headers=["embedded model", "original", "package", "license"]))
    return 0


def cmd_train(args) -> int:
    from .methods import get_method

    method = get_method(args.method)
    if method.train is None:
        raise UsageError(f"method {args.method!r} is training-free; nothing to train")
    return method.train(args.train_args)


def cmd_distill(args) -> int:
    from .training.corpus import main as distill_main

    return distill_main(args.train_args)


def cmd_models(args) -> int:
    from .models import load_model

    loaded = load_model(args.name, dtype=args.dtype, device=args.device)
    print(f"{loaded.name}: {loaded.source}, weights sha256 {loaded.weights_sha256}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .models.registry import DEFAULT_TARGET

    p = argparse.ArgumentParser(prog="specbench", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="decode a prompt set with a method and the vanilla baseline; write results JSON")
    r.add_argument("--method", required=True)
    r.add_argument("--dataset", required=True,
                   help="a vendored set (specbench list) or PATH.jsonl of questions: question_id, category, turns")
    r.add_argument("--target", default=DEFAULT_TARGET, help="embedded name, local HF directory or cached HF id")
    r.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="method parameter (repeatable)")
    r.add_argument("--limit", type=int, default=None, help="first N prompts")
    r.add_argument("--temperature", type=float, default=0.0)
    r.add_argument("--top-k", type=int, default=0)
    r.add_argument("--top-p", type=float, default=1.0)
    r.add_argument("--max-new-tokens", type=int, default=64)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--repeats", type=int, default=1, help="time each prompt N times, keep the median")
    r.add_argument("--dtype", default="auto")
    r.add_argument("--device", default="auto")
    r.add_argument("--runtime", default="auto", choices=("auto", "hf", "fast"),
                   help="the target's decoder: hf (transformers' forward, the reference), fast "
                        "(specbench.models.fast_runtime; CPU, Llama-family) or auto (fast where supported)")
    r.add_argument("--device-map", choices=("auto",), default=None,
                   help="spread the target over the visible devices with accelerate (targets larger than one GPU); "
                        "the draft head goes with the LM head")
    r.add_argument("--max-memory", help="with --device-map auto: memory per device, e.g. 0=20GiB,1=20GiB,cpu=64GiB")
    r.add_argument("--timing", default="sync", choices=("sync", "step"),
                   help="phase timing on a GPU: sync (the device synchronised at every phase boundary: exact "
                        "draft/verify split) or step (CUDA events, no timer syncs); the same on a CPU")
    r.add_argument("--out", help="results file (default runs/<method>-<dataset>-t<T>-n<limit>-<N>new-<hash>.json, "
                                 "a name unique to the settings)")
    r.add_argument("--no-resume", action="store_true", help="replace an existing results file instead of resuming")
    r.add_argument("--hf-generate", action="store_true",
                   help="also time transformers' generate() as a second denominator")
    r.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: steady timings, and no oversubscription on a busy "
                        "machine; 0 = torch's default, one per core)")
    r.add_argument("--no-progress", action="store_true")
    r.set_defaults(func=cmd_run)

    t = sub.add_parser("train", help="train a method's drafter (arguments after --method go to the method's trainer; "
                                     "`specbench train --method eagle --help` lists them)", add_help=False)
    t.add_argument("--method", required=True)
    t.set_defaults(func=cmd_train)

    d = sub.add_parser("distill", help="generate a distillation corpus: the target's answers to training "
                                       "conversations, as token ids (`specbench distill --help`)", add_help=False)
    d.set_defaults(func=cmd_distill)

    lst = sub.add_parser("list", help="methods, datasets and embedded models")
    lst.set_defaults(func=cmd_list)

    m = sub.add_parser("models", help="fetch and cache a model (embedded name, local path or cached HF id)")
    m.add_argument("name", nargs="?", default=DEFAULT_TARGET)
    m.add_argument("--dtype", default="auto")
    m.add_argument("--device", default="auto")
    m.set_defaults(func=cmd_models)

    from .bench.compare import add_parser as _add_compare
    _add_compare(sub)
    from .bench.fidelity import add_parser as _add_fidelity
    _add_fidelity(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command in ("train", "distill"):  # their own parsers take the rest
        args.train_args = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.func(args)
    except SpecbenchError as e:
        print(f"specbench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("specbench: interrupted; finished prompts are saved and the run resumes from them", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
