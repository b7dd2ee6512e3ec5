"""`specbench compare`: its options and the command (tables, notes, plot, exports, reference, gate)."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from ...artifacts import check_writable, write_json
from ...errors import SpecbenchError, UsageError
from .claims import check_claims
from .common import METRIC_LABEL, METRICS, CompareError
from .inputs import expand_inputs, load_inputs
from .record import reference_document
from .references import load_references
from .render import FORMATS, fmt, notes, render
from .runs import pooled_vanilla
from .verdicts import compare, gate_failures

DESCRIPTION = "Runs side by side, deltas against references, a verdict per cell, a CI gate."


def configure(c: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add compare's arguments to `c` (the `specbench compare` subparser, or a parser of its own)."""
    c.add_argument("files", nargs="*", metavar="FILE",
                   help="results JSON, pytest-benchmark JSON, Spec-Bench answers JSONL, directories or quoted globs")
    c.add_argument("--baseline", metavar="FILE",
                   help="reference file: results / pytest-benchmark JSON, baselines/embedded/*.json or a papers' "
                        "baselines file (default: all of baselines/)")
    c.add_argument("--no-baseline", action="store_true", help="no references: only the table")
    c.add_argument("--format", default="plain", choices=list(FORMATS))
    c.add_argument("--metric", action="append", choices=list(METRICS), metavar="METRIC",
                   help=f"only this metric's table ({', '.join(METRICS)}; repeatable; default: all, one table each)")
    c.add_argument("--gate", action="store_true", help="exit 1 if any cell regressed beyond tolerance")
    c.add_argument("--tolerance", action="append", default=[], metavar="METRIC=REL",
                   help="override a relative tolerance, e.g. tau=0.01 (repeatable)")
    c.add_argument("--allow-mixed-targets", action="store_true", help="allow runs on different targets in one table")
    c.add_argument("--plot", metavar="FILE.png", help="alpha_k per draft depth and speedup bars (needs matplotlib)")
    c.add_argument("--specbench-base", metavar="FILE.jsonl",
                   help="Spec-Bench vanilla answers paired with the *.jsonl inputs (for speedup)")
    c.add_argument("--export-specbench", metavar="DIR",
                   help="write Spec-Bench answer JSONL files (method + its vanilla) for each run")
    c.add_argument("--tokenizer", metavar="DIR", help="tokenizer for the exported answer text (default: the target's)")
    c.add_argument("--write-reference", metavar="FILE",
                   help="record the inputs as a reference file (e.g. baselines/embedded/smollm2-135m-quick.json)")
    c.set_defaults(func=cmd_compare)
    return c


def add_parser(sub) -> argparse.ArgumentParser:
    """The `compare` subcommand of the specbench command line."""
    return configure(sub.add_parser("compare", help="table of runs with deltas and verdicts against baselines; "
                                                    "CI gate", description=DESCRIPTION))


def _tolerances(pairs: list[str]) -> dict:
    out = {}
    for p in pairs:
        k, sep, v = p.partition("=")
        try:
            rel = float(v)
        except ValueError:
            rel = -1.0
        if not sep or k not in METRICS or not 0 < rel < 1:
            raise UsageError(f"--tolerance expects METRIC=REL with METRIC in {', '.join(METRICS)} and 0<REL<1, "
                             f"got {p!r}")
        out[k] = rel
    return out


def _check_outputs(args, inputs: list[Path]) -> None:
    ins = {p.resolve() for p in inputs}
    if args.baseline:
        ins.add(Path(args.baseline).resolve())
    for opt in ("plot", "write_reference"):
        out = getattr(args, opt)
        if out and Path(out).resolve() in ins:
            raise UsageError(f"--{opt.replace('_', '-')} {out} is one of the inputs; refusing to overwrite it")
    if args.plot and not str(args.plot).lower().endswith((".png", ".svg", ".pdf")):
        raise UsageError(f"--plot {args.plot}: give a .png (or .svg/.pdf) file name")
    for opt in ("plot", "write_reference"):  # a probe write now, not a traceback after the tables
        if getattr(args, opt):
            check_writable(getattr(args, opt), f"--{opt.replace('_', '-')}")
    if args.export_specbench:
        check_writable(Path(args.export_specbench), "--export-specbench", directory=True)


def _command_line(args) -> str:
    """The compare command as given (for the reference's provenance)."""
    parts = ["specbench", "compare", *args.files]
    for opt in ("baseline", "format", "plot", "specbench_base", "write_reference"):
        v = getattr(args, opt)
        if v is not None and not (opt == "format" and v == "plain"):
            parts += [f"--{opt.replace('_', '-')}", str(v)]
    for flag in ("no_baseline", "allow_mixed_targets", "gate"):
        if getattr(args, flag):
            parts.append(f"--{flag.replace('_', '-')}")
    parts += [f"--tolerance={t}" for t in args.tolerance]
    return shlex.join(parts)


def cmd_compare(args) -> int:
    tol = _tolerances(args.tolerance)
    if args.no_baseline and args.baseline:
        raise UsageError("--baseline and --no-baseline exclude each other")
    if not args.files:
        raise CompareError("no results files given (the glob matched nothing?); expected results/*.json, "
                           "a directory or a pytest-benchmark JSON")
    paths = expand_inputs(args.files)
    _check_outputs(args, paths)
    # skip notices go to stderr as they come, like the CLI's errors, whatever logging is set up
    runs = load_inputs([str(p) for p in paths], args.specbench_base, args.allow_mixed_targets,
                       on_skip=lambda msg: print(f"specbench: {msg}", file=sys.stderr))
    rs = load_references(args.baseline, none=args.no_baseline, tolerance=tol)
    method_runs = [r for r in runs if r.method != "vanilla"]
    vanilla = pooled_vanilla(runs)
    cells = compare(method_runs, rs)
    claim_results = check_claims(method_runs, rs.claims)
    if args.plot:  # before any output: a missing matplotlib is a usage error (exit 2), nothing half-done
        from .plot import plot_runs

        plot_runs(method_runs, vanilla, Path(args.plot))
    metrics = tuple(m for m in METRICS if m in args.metric) if args.metric else METRICS
    shown = [c for c in cells if c.metric in metrics]  # --metric selects what is printed; the gate sees all
    sys.stdout.write(render(shown, vanilla, args.format, metrics))
    info = sys.stderr if args.format == "csv" else sys.stdout
    for line in notes(runs, shown, rs, claim_results):
        print(line, file=info)
    if args.plot:
        print(f"plot: {args.plot}", file=info)
    if args.export_specbench:
        from .. import specbench_jsonl

        written = specbench_jsonl.export_runs([r.source for r in runs if r.source.endswith(".json")
                                               and "::" not in r.source], Path(args.export_specbench),
                                              tokenizer=args.tokenizer)
        for p in written:
            print(f"spec-bench answers: {p}", file=info)
    if args.write_reference:
        write_json(Path(args.write_reference), reference_document(method_runs, command=_command_line(args)))
        print(f"reference written: {args.write_reference} ({len(method_runs)} cells)", file=info)
    if args.gate:
        bad = gate_failures(cells)
        if bad:
            for c in bad:
                print(f"gate: REGRESS {c.run.label} {METRIC_LABEL[c.metric]} on {c.run.target_key} {c.run.dataset} "
                      f"T={c.run.temperature:g}: {fmt(c.metric, c.value)} vs {fmt(c.metric, c.ref.value)} "
                      f"({c.delta_rel:+.1%}, tolerance {c.ref.tolerance_rel:.0%}, {c.ref.source})", file=sys.stderr)
            return 1
        gated = sum(c.verdict in ("pass", "improve") for c in cells)
        if gated == 0:
            print("gate: nothing was comparable with a reference (no cell could be gated)", file=sys.stderr)
        else:
            print(f"gate: ok ({gated} gated cells within tolerance or better)", file=info)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m specbench.bench.compare ...`: the same as `specbench compare ...`."""
    args = configure(argparse.ArgumentParser(prog="python -m specbench.bench.compare",
                                             description=DESCRIPTION)).parse_args(argv)
    try:
        return args.func(args)
    except SpecbenchError as e:
        print(f"specbench: error: {e}", file=sys.stderr)
        return 2
