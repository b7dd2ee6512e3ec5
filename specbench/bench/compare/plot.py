"""`specbench compare --plot FILE.png`: acceptance rate per draft depth, and speedup bars.

matplotlib is an optional extra (`pip install 'specbench[plot]'`), imported only here.
"""

from __future__ import annotations

from pathlib import Path

from ...artifacts import atomic_path
from ...errors import UsageError
from .common import machine_label
from .runs import label_sort_key


def _matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise UsageError("--plot needs matplotlib, which is not installed: pip install 'specbench[plot]' "
                         "(or pip install matplotlib)") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path) -> Path:
    """Lay out `fig`, write it to `path` atomically (the format by its suffix) and free it."""
    fig.tight_layout()
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
    return path


def _alpha_curves(runs) -> dict[tuple, tuple[list[int], list[float], list[int]]]:
    """(label, T) -> (depths, pooled alpha_k, reached counts), pooled over datasets."""
    acc: dict[tuple, tuple[list[float], list[float]]] = {}
    for r in runs:
        a, n = r.summary.get("alpha_k") or [], r.summary.get("reached_k") or []
        key = (r.label, r.temperature)
        accepted, reached = acc.setdefault(key, ([], []))
        for k, (ak, nk) in enumerate(zip(a, n)):
            if ak is None or not nk:
                continue
            while len(reached) <= k:
                reached.append(0)
                accepted.append(0.0)
            reached[k] += nk
            accepted[k] += ak * nk
    out = {}
    for key, (accepted, reached) in acc.items():
        ks = [k for k in range(len(reached)) if reached[k]]
        if ks:
            out[key] = ([k + 1 for k in ks], [accepted[k] / reached[k] for k in ks], [reached[k] for k in ks])
    return out


def plot_runs(runs, vanilla, path: Path) -> Path:
    """Draw the figure for compare's runs (method runs; `vanilla` pooled runs give the 1.0 line)."""
    plt = _matplotlib()
    labels = sorted({r.label for r in runs}, key=label_sort_key)
    cmap = plt.get_cmap("tab10")
    color = {lab: cmap(i % 10) for i, lab in enumerate(labels)}
    temps = sorted({r.temperature for r in runs})
    styles = ["-", "--", ":", "-."]

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5.2), gridspec_kw={"width_ratios": [1, 1.35]})

    curves = _alpha_curves(runs)
    for (lab, t), (ks, alphas, reached) in sorted(curves.items(), key=lambda kv: (label_sort_key(kv[0][0]), kv[0][1])):
        name = lab if len(temps) == 1 else f"{lab} (T={t:g})"
        ax1.plot(ks, alphas, styles[temps.index(t) % len(styles)], marker="o", color=color[lab], label=name)
        for k, a, n in zip(ks, alphas, reached):
            if k == ks[-1] or n < 10:
                ax1.annotate(f"n={n}", (k, a), textcoords="offset points", xytext=(4, 4), fontsize=7,
                             color=color[lab])
    ax1.set_xlabel("draft depth k")
    ax1.set_ylabel("alpha_k = accepted / reached at depth k")
    ax1.set_ylim(0, 1.05)
    ax1.set_title("acceptance rate per draft depth (pooled over datasets)")
    if curves:
        ax1.set_xticks(range(1, max(max(c[0]) for c in curves.values()) + 1))
        ax1.legend(fontsize=8)
    else:
        ax1.text(0.5, 0.5, "no per-depth counts in these runs", ha="center", va="center", transform=ax1.transAxes)
    ax1.grid(alpha=0.3)

    targets = sorted({r.target_key for r in runs})
    groups = sorted({(r.target_key, r.dataset, r.temperature) for r in runs})
    width = 0.8 / max(len(labels), 1)
    for i, lab in enumerate(labels):
        for g, key in enumerate(groups):
            run = next((r for r in runs if r.label == lab and (r.target_key, r.dataset, r.temperature) == key), None)
            if run is None or run.value("speedup") is None:
                continue
            x = g - 0.4 + width * (i + 0.5)
            s = run.value("speedup")
            ax2.bar(x, s, width * 0.9, color=color[lab], label=lab if g == 0 or lab not in
                    ax2.get_legend_handles_labels()[1] else None)
            tau = run.value("tau")
            ax2.annotate(f"{s:.2f}x\n\u03c4 {tau:.2f}" if tau else f"{s:.2f}x", (x, s), ha="center", va="bottom",
                         fontsize=7, textcoords="offset points", xytext=(0, 2))
    ax2.axhline(1.0, color="black", lw=1, ls="--", label="vanilla (1.0)")
    names = [(f"{t}\n" if len(targets) > 1 else "") + f"{d}\nT={temp:g}" for t, d, temp in groups]
    ax2.set_xticks(range(len(groups)), names, fontsize=8)
    ax2.set_ylabel("speedup = tokens/s / vanilla tokens/s (same process)")
    top = max([r.value("speedup") or 0 for r in runs] + [1.0])
    ax2.set_ylim(0, top * 1.25)
    ax2.set_title("speedup over this project's vanilla loop (tau annotated)")
    handles, labs = ax2.get_legend_handles_labels()
    uniq = dict(zip(labs, handles))
    ax2.legend(uniq.values(), uniq.keys(), fontsize=8, loc="upper right")
    ax2.grid(axis="y", alpha=0.3)

    env = runs[0].env if runs else {}
    hw = machine_label(env) or "unknown hardware"
    fig.suptitle(f"specbench: {', '.join(targets)} on {hw}"
                 + (f", {env.get('threads')} threads" if env.get("threads") and not env.get("gpu") else ""),
                 fontsize=11)
    return _save(plt, fig, path)


def plot_fidelity(taus: dict, arms: list[str], path: Path, title: str) -> Path:
    """The fidelity study's figure: tau of each arm per (dataset, temperature), the bar at the mean over the
    arm's training seeds and the whisker from the lowest seed to the highest (`fidelity.arm_taus`)."""
    plt = _matplotlib()
    arms = [a for a in arms if a in taus]
    rows = sorted({(ds, t) for a in arms for ds, by_t in taus[a].items() for t in by_t})
    cmap = plt.get_cmap("tab20")
    fig, ax = plt.subplots(figsize=(max(8.0, 1.1 * len(rows) + 2), 5.2))
    width = 0.84 / max(len(arms), 1)
    for i, arm in enumerate(arms):
        xs, means, lo, hi = [], [], [], []
        for g, (ds, t) in enumerate(rows):
            vals = taus[arm].get(ds, {}).get(t)
            if not vals:
                continue
            m = sum(vals) / len(vals)
            xs.append(g - 0.42 + width * (i + 0.5))
            means.append(m)
            lo.append(m - min(vals))
            hi.append(max(vals) - m)
        seeds = max((len(v) for by_t in taus[arm].values() for v in by_t.values()), default=0)
        ax.bar(xs, means, width * 0.9, color=cmap(i % 20), yerr=[lo, hi], capsize=2,
               label=f"{arm} ({seeds} seed{'s' if seeds != 1 else ''})")
    ax.set_xticks(range(len(rows)), [f"{ds}\nT={t:g}" for ds, t in rows], fontsize=8)
    ax.set_ylabel("tau = new tokens / target forward (bars: seed mean; whiskers: seed min-max)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncol=2, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    return _save(plt, fig, path)
