"""The compare table (plain, github, markdown via tabulate; csv long form) and the notes under it."""

from __future__ import annotations

import csv
import io

from ...errors import UsageError
from .common import METRIC_LABEL, METRICS, VERDICTS
from .references import RefSet
from .runs import Run, label_sort_key
from .verdicts import Cell

FORMATS = {"plain": "simple", "github": "github", "markdown": "pipe", "csv": None}
CSV_FIELDS = ["target", "dataset", "temperature", "method", "metric", "value", "reference", "reference_source",
              "delta_rel", "tolerance_rel", "verdict", "reason", "source"]
_SHORT = {"pass": "pass", "regress": "REGRESS", "improve": "improve", "not comparable": "n/c"}


def fmt(metric: str, v: float | None) -> str:
    """A metric value as the tables print it."""
    if v is None:
        return "-"
    if metric == "tau":
        return f"{v:.3f}"
    if metric == "speedup":
        return f"{v:.2f}x"
    return f"{v:.1f}"


def _cell_text(c: Cell) -> str:
    s = fmt(c.metric, c.value)
    if c.ref is not None and c.value is not None:
        d = c.delta_rel
        s += f" vs {fmt(c.metric, c.ref.value)} ({d:+.1%}) {_SHORT[c.verdict]}" if d is not None else ""
    return s


def table_rows(cells: list[Cell], vanilla: list[Run]) -> tuple[list[str], list[list[str]]]:
    labels = sorted({c.run.label for c in cells} | ({"vanilla"} if vanilla else set()), key=label_sort_key)
    grid: dict[tuple, dict[str, dict[str, str]]] = {}
    for c in cells:
        grid.setdefault(c.run.setting_key(), {}).setdefault(c.run.label, {})[c.metric] = _cell_text(c)
    for v in vanilla:
        d = grid.setdefault(v.setting_key(), {}).setdefault("vanilla", {})
        d.setdefault("tau", "1.000")
        d.setdefault("speedup", "1.00x")
        d.setdefault("tokens_per_s", fmt("tokens_per_s", v.value("tokens_per_s")))
    headers = ["target", "dataset", "T", "metric"] + labels
    rows = []
    for key in sorted(grid, key=lambda k: (k[0], k[1], k[2])):
        for i, m in enumerate(METRICS):
            lead = [key[0], key[1], f"{key[2]:g}"] if i == 0 else ["", "", ""]
            rows.append(lead + [METRIC_LABEL[m]] + [grid[key].get(lab, {}).get(m, "") for lab in labels])
    return headers, rows


def _csv_num(v) -> str:
    return "" if v is None else f"{v:.6g}"


def render_csv(cells: list[Cell], vanilla: list[Run]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_FIELDS)
    for v in sorted(vanilla, key=lambda r: r.setting_key()):
        for m in METRICS:
            w.writerow([v.target_key, v.dataset, f"{v.temperature:g}", "vanilla", m, _csv_num(v.value(m)),
                        "", "", "", "", "not comparable", "the denominator", v.source])
    for c in sorted(cells, key=lambda c: (c.run.setting_key(), label_sort_key(c.run.label), METRICS.index(c.metric))):
        r = c.run
        w.writerow([r.target_key, r.dataset, f"{r.temperature:g}", r.label, c.metric, _csv_num(c.value),
                    _csv_num(c.ref.value if c.ref else None), c.ref.source if c.ref else "",
                    _csv_num(c.delta_rel), _csv_num(c.ref.tolerance_rel if c.ref else None), c.verdict, c.reason,
                    r.source])
    return buf.getvalue()


def render(cells: list[Cell], vanilla: list[Run], fmt_name: str = "plain") -> str:
    if fmt_name not in FORMATS:
        raise UsageError(f"--format {fmt_name!r}: use one of {', '.join(FORMATS)}")
    if fmt_name == "csv":
        return render_csv(cells, vanilla)
    from tabulate import tabulate

    headers, rows = table_rows(cells, vanilla)
    return tabulate(rows, headers=headers, tablefmt=FORMATS[fmt_name], disable_numparse=True) + "\n"


def notes(runs: list[Run], cells: list[Cell], rs: RefSet, claim_results: list[dict]) -> list[str]:
    out = []
    counts = {v: sum(c.verdict == v for c in cells) for v in VERDICTS}
    src = " + ".join(rs.kinds) if rs.kinds else "none"
    out.append(f"verdicts ({len(cells)} cells, references: {src}): " + ", ".join(f"{counts[v]} {v}" for v in VERDICTS))
    reasons: dict[str, int] = {}
    for c in cells:
        if c.verdict == "not comparable" and c.run.method != "vanilla":
            reasons[c.reason] = reasons.get(c.reason, 0) + 1
    for r, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
        out.append(f"  n/c x{n}: {r}")
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
            out.append(f"warning: {r.source}: greedy output equals vanilla on {g.get('identical')}/{g.get('compared')} "
                       f"samples (see the samples' divergence: a numerical tie or a losslessness bug)")
        sb = r.extra.get("specbench_speed")
        if sb:
            out.append(f"{r.source}: Spec-Bench speed.py convention (mean of per-question tokens/s): speedup "
                       f"{fmt('speedup', sb.get('speedup_ratio'))}, mean accepted tokens "
                       f"{fmt('tau', sb.get('mean_accepted_tokens'))}")
    for cr in claim_results:
        cl = cr["claim"]
        out.append(f"claim {cl['better']} {cl['metric']} > {cl['worse']} {cl['metric']} ({cl.get('source', '')}) on "
                   f"{cr['target']} {cr['dataset']} T={cr['temperature']:g}: "
                   f"{'holds' if cr['holds'] else 'VIOLATED'} ({fmt(cl['metric'], cr['better'])} vs "
                   f"{fmt(cl['metric'], cr['worse'])})")
    return out
