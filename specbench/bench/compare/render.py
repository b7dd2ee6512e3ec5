"""What compare prints: one table per metric (plain, github, markdown via tabulate), or csv long form,
and the notes under the tables (legend, verdict reasons, references, warnings, claims).

A table's rows are (target,) dataset and temperature, its columns the run labels, vanilla
first. A cell is the value; where a reference measured the same settings it adds the
reference, the relative delta and the verdict (``1.253 vs 1.253 +0.0% pass``); a cell that is
not comparable for a reason other than having no reference is marked ``n/c[a]``, the reason
given once under the tables. Labels are method names (``eagle2#1``, ``eagle2#2`` when one
method ran with several settings), their parameters listed in the legend.
"""

from __future__ import annotations

import csv
import io
import string
import textwrap

from ...errors import UsageError
from .claims import claim_statement, seed_spread
from .common import METRIC_LABEL, METRICS, VERDICTS
from .references import RefSet
from .runs import Run, label_sort_key
from .verdicts import Cell

FORMATS = {"plain": "simple", "github": "github", "markdown": "pipe", "csv": None}
CSV_FIELDS = ["target", "dataset", "temperature", "method", "metric", "value", "reference", "reference_source",
              "delta_rel", "tolerance_rel", "verdict", "reason", "source"]
METRIC_TITLE = {"tau": "new tokens per target forward, pooled (vanilla 1)",
                "speedup": "tokens/s over the vanilla loop timed alongside",
                "tokens_per_s": "new tokens / wall time"}
NOTE_WIDTH = 100  # notes wrap here, so an 80-120 column terminal shows them whole
_SHORT = {"pass": "pass", "regress": "REGRESS", "improve": "improve", "not comparable": "n/c"}
_UNMARKED = ("no reference", "the denominator")  # n/c reasons that need no footnote


def fmt(metric: str, v: float | None) -> str:
    """A metric value as the tables print it."""
    if v is None:
        return "-"
    if metric == "tau":
        return f"{v:.3f}"
    if metric == "speedup":
        return f"{v:.2f}x"
    return f"{v:.1f}"


def footnotes(cells: list[Cell]) -> dict[str, str]:
    """n/c reason -> its footnote mark (a, b, ...), most frequent first."""
    counts: dict[str, int] = {}
    for c in cells:
        if c.verdict == "not comparable" and c.reason not in _UNMARKED:
            counts[c.reason] = counts.get(c.reason, 0) + 1
    ordered = sorted(counts, key=lambda r: -counts[r])
    marks = list(string.ascii_lowercase) + [f"z{i}" for i in range(len(ordered))]
    return dict(zip(ordered, marks))


def _cell_text(c: Cell, marks: dict[str, str]) -> str:
    s = fmt(c.metric, c.value)
    if c.matched and c.ref is not None and c.delta_rel is not None:
        s += f" vs {fmt(c.metric, c.ref.value)} {c.delta_rel:+.1%}"
    if c.verdict != "not comparable":
        return f"{s} {_SHORT[c.verdict]}"
    return f"{s} n/c[{marks[c.reason]}]" if c.reason in marks else s


def tables(cells: list[Cell], vanilla: list[Run],
           metrics: tuple[str, ...] = METRICS) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, headers, rows) of one table per metric."""
    marks = footnotes(cells)
    labels = sorted({c.run.label for c in cells} | ({"vanilla"} if vanilla else set()), key=label_sort_key)
    targets = sorted({c.run.target_key for c in cells} | {v.target_key for v in vanilla})
    grid: dict[tuple, dict[str, dict[str, str]]] = {}
    for c in cells:
        grid.setdefault(c.run.setting_key(), {}).setdefault(c.run.label, {})[c.metric] = _cell_text(c, marks)
    for v in vanilla:
        d = grid.setdefault(v.setting_key(), {}).setdefault("vanilla", {})
        d.setdefault("tau", fmt("tau", 1.0))
        d.setdefault("speedup", fmt("speedup", 1.0))
        d.setdefault("tokens_per_s", fmt("tokens_per_s", v.value("tokens_per_s")))
    mixed = len(targets) > 1
    out = []
    for m in metrics:
        title = f"{METRIC_LABEL[m]}: {METRIC_TITLE[m]}" + ("" if mixed else f", {targets[0]}" if targets else "")
        headers = (["target"] if mixed else []) + ["dataset", "T"] + labels
        rows = [([key[0]] if mixed else []) + [key[1], f"{key[2]:g}"]
                + [grid[key].get(lab, {}).get(m, "") for lab in labels] for key in sorted(grid)]
        out.append((title, headers, rows))
    return out


def _csv_num(v) -> str:
    return "" if v is None else f"{v:.6g}"


def render_csv(cells: list[Cell], vanilla: list[Run], metrics: tuple[str, ...] = METRICS) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_FIELDS)
    for v in sorted(vanilla, key=lambda r: r.setting_key()):
        for m in metrics:
            w.writerow([v.target_key, v.dataset, f"{v.temperature:g}", "vanilla", m, _csv_num(v.value(m)),
                        "", "", "", "", "not comparable", "the denominator", v.source])
    for c in sorted(cells, key=lambda c: (c.run.setting_key(), label_sort_key(c.run.label), METRICS.index(c.metric))):
        if c.metric not in metrics:
            continue
        r = c.run
        w.writerow([r.target_key, r.dataset, f"{r.temperature:g}", r.label, c.metric, _csv_num(c.value),
                    _csv_num(c.ref.value if c.ref else None), c.ref.source if c.ref else "",
                    _csv_num(c.delta_rel), _csv_num(c.ref.tolerance_rel if c.ref else None), c.verdict, c.reason,
                    r.source])
    return buf.getvalue()


def render(cells: list[Cell], vanilla: list[Run], fmt_name: str = "plain", metrics: tuple[str, ...] = METRICS) -> str:
    """The tables of `metrics` in a `FORMATS` format (csv: one long table)."""
    if fmt_name not in FORMATS:
        raise UsageError(f"--format {fmt_name!r}: use one of {', '.join(FORMATS)}")
    if fmt_name == "csv":
        return render_csv(cells, vanilla, metrics)
    from tabulate import tabulate

    blocks = []
    for title, headers, rows in tables(cells, vanilla, metrics):
        table = tabulate(rows, headers=headers, tablefmt=FORMATS[fmt_name], disable_numparse=True)
        # markdown needs a blank line between the title paragraph and the table
        blocks.append(title + ("\n\n" if fmt_name != "plain" else "\n") + table)
    return "\n\n".join(blocks) + "\n\n"


def _wrap(line: str) -> list[str]:
    """A long note on several lines, its continuation indented past the note's own indent."""
    indent = " " * (len(line) - len(line.lstrip()) + 4)
    return textwrap.wrap(line, NOTE_WIDTH, subsequent_indent=indent, break_long_words=False,
                         break_on_hyphens=False)


def legend(runs: list[Run]) -> list[str]:
    """One line per label: the parameters it ran with (the committed default head left implicit), and its
    runtime and machine where the runs shown differ in them."""
    seen: dict[str, Run] = {}
    for r in sorted(runs, key=lambda r: label_sort_key(r.label)):
        if r.method != "vanilla":
            seen.setdefault(r.label, r)
    if not seen:
        return []
    several_runtimes = len({r.runtime for r in seen.values()}) > 1
    several_machines = len({r.machine for r in seen.values()}) > 1
    width = max(len(lab) for lab in seen)
    out = ["methods:"]
    for lab, r in seen.items():
        shown = " ".join(f"{k}={v}" for k, v in r.params.items() if not (k == "checkpoint" and v in ("", None)))
        shown = shown or "(no parameters)"
        if several_runtimes:
            shown += f"  runtime {r.runtime}"
        if several_machines:
            shown += f"  on {r.machine or 'unknown hardware'}"
        out.append(f"  {lab:<{width}}  {shown}")
    return out


def _where(cl: dict, cr: dict, several_targets: bool, labels: tuple | None = None) -> str:
    """The row of a claim result, with the runs' labels when they are not the claim's own names."""
    labels = labels or cr["labels"]
    return ((f"{cr['target']} " if several_targets else "") + f"{cr['dataset']} T={cr['temperature']:g}"
            + ("" if labels == (cl["better"], cl["worse"]) else " ({} vs {})".format(*labels)))


def _claim_lines(claim_results: list[dict], several_targets: bool) -> list[str]:
    if not claim_results:
        return []
    out = ["claims (the papers' orderings; judged only between comparable runs, see the README):"]
    by_claim: dict[str, list[dict]] = {}
    for cr in claim_results:
        by_claim.setdefault(cr["claim"].get("id") or cr["claim"]["text"], []).append(cr)
    for results in by_claim.values():
        cl = results[0]["claim"]
        out.append(f"  {claim_statement(cl)}" + (f" ({cl['source']})" if cl.get("source") else ""))
        unchecked: dict[str, list[str]] = {}
        for group in seed_spread(results):
            verdict = {"violated": "VIOLATED"}.get(group["verdict"], group["verdict"])
            if len(group["pairs"]) == 1:
                [cr] = group["pairs"]
                ci = cr.get("interval")
                out.append(f"    {verdict} on {_where(cl, cr, several_targets)}: {fmt(cl['metric'], cr['better'])} vs "
                           f"{fmt(cl['metric'], cr['worse'])}" + (f" (margin, 95% over prompts: {ci[0]:+.3f} "
                                                                  f"to {ci[1]:+.3f})" if ci else ""))
                continue
            # seed replicas: each arm's values over its seeds, one verdict over every pair of seeds
            cr = group["pairs"][0]
            arms = tuple(r.arm for r in cr["runs"])
            vals = ["/".join(fmt(cl["metric"], v) for _, v in sorted(group[side].items(), key=lambda kv: str(kv[0])))
                    for side in ("better", "worse")]
            seeds = ["/".join(str(s) for s in sorted(group[side], key=str)) for side in ("better", "worse")]
            row = _where(cl, cr, several_targets, arms)
            if group["problem"]:
                out.append(f"    not judged on {row}: {group['problem']}")
                continue
            how = ("; the seeds disagree" if group["seeds_disagree"] else "" if group["verdict"] == "within noise"
                   else f"; {group['verdict']} on all {len(group['pairs'])} pairs of seeds")
            out.append(f"    {verdict} on {row}: {vals[0]} (seeds {seeds[0]}) vs {vals[1]} (seeds {seeds[1]}){how}")
        for cr in results:
            if not cr["checked"]:
                unchecked.setdefault(cr["reason"], []).append(_where(cl, cr, several_targets))
        for reason, wheres in unchecked.items():
            out.append(f"    not checked on {', '.join(wheres)}: {reason}")
    return out


def notes(runs: list[Run], cells: list[Cell], rs: RefSet, claim_results: list[dict]) -> list[str]:
    """The lines under the tables, each at most NOTE_WIDTH wide where its words allow."""
    out = legend(runs)
    counts = {v: sum(c.verdict == v for c in cells) for v in VERDICTS}
    src = " + ".join(rs.kinds) if rs.kinds else "none"
    no_ref = sum(c.reason == "no reference" for c in cells)
    out.append(f"verdicts ({len(cells)} cells, references: {src}): " + ", ".join(f"{counts[v]} {v}" for v in VERDICTS)
               + (f"; {no_ref} without a reference (a value alone)" if no_ref else ""))
    marks = footnotes(cells)
    for reason, mark in marks.items():
        n = sum(c.reason == reason and c.verdict == "not comparable" for c in cells)
        out.append(f"  n/c[{mark}] x{n}: {reason}")
    pooled: dict[tuple, int] = {}
    for r in runs:
        if r.method != "vanilla" and r.vanilla:
            pooled[r.setting_key()] = pooled.get(r.setting_key(), 0) + 1
    if any(n > 1 for n in pooled.values()):
        out.append("vanilla tokens/s: pooled over the vanilla twins of the runs in a row; each method's speedup "
                   "divides by its own twin, timed alongside it")
    refs_used = sorted({c.ref.source for c in cells if c.ref is not None})
    if refs_used:
        out.append("reference values from: " + "; ".join(refs_used))
    for r in runs:
        if r.status != "complete":
            out.append(f"warning: {r.source} is a {r.status} run (resume it to finish)")
        g = r.greedy
        if isinstance(g, dict) and g.get("compared") and g.get("identical") != g.get("compared"):
            ties = g.get("numerical_ties")
            why = ("see the samples' divergence: a numerical tie or a losslessness bug" if ties is None else
                   f"{ties} at a numerical tie, {g['compared'] - g['identical'] - ties} not: a losslessness bug")
            out.append(f"warning: {r.source}: greedy output equals vanilla on {g.get('identical')}/{g.get('compared')} "
                       f"samples ({why})")
        sb = r.extra.get("specbench_speed")
        if sb:
            out.append(f"{r.source}: Spec-Bench speed.py convention (mean of per-question tokens/s): speedup "
                       f"{fmt('speedup', sb.get('speedup_ratio'))}, mean accepted tokens "
                       f"{fmt('tau', sb.get('mean_accepted_tokens'))}")
    out += _claim_lines(claim_results, len({r.target_key for r in runs}) > 1)
    return [w for line in out for w in (_wrap(line) if len(line) > NOTE_WIDTH else [line])]
