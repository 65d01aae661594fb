"""PNG plots for `recycler reproduce`: transfer heatmap, convergence curves, iterative vs direct, pre-check.

Drawn on a bare Agg canvas (no pyplot state, no display), one function per figure.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from recycler.toy.findings import gain


def _figure(size: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig


def plot_transfer(path: Path, runs: list[dict]) -> None:
    V = runs[0]["versions"]
    grid = (
        np.array(
            [[np.mean([r["ft"][t] if s == t else r["transfer"][s][t] for r in runs]) for t in V] for s in V]
        )
        * 100
    )
    fig = _figure((1.2 * len(V) + 2, 1.0 * len(V) + 1.5))
    ax = fig.subplots()
    im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=100)
    for i in range(len(V)):
        for j in range(len(V)):
            ax.text(
                j, i, f"{grid[i, j]:.0f}", ha="center", va="center", color="w" if grid[i, j] < 60 else "k"
            )
    ax.set_xticks(range(len(V)), [f"M {t}" for t in V])
    ax.set_yticks(range(len(V)), [f"Δ {s}" for s in V])
    ax.set(title="accuracy % of M_j + Δ_i (diagonal: FT)", xlabel="target base", ylabel="Δ source")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path)


def plot_convergence(path: Path, runs: list[dict]) -> None:
    targets = list(runs[0]["recycled_curve"])
    fig = _figure((4 * len(targets), 3.5))
    axes = np.atleast_1d(fig.subplots(1, len(targets), sharey=True))
    styles = (
        ("ft_curve", "FT from base", "C0"),
        ("recycled_curve", "FT from M+Δ_prev", "C1"),
        ("iter_curve", "FT from M+Δ^iter", "C2"),
    )
    for ax, v in zip(axes, targets, strict=True):
        for key, label, color in styles:
            for k, r in enumerate(runs):
                if v in r.get(key, {}):
                    steps, acc = zip(*r[key][v], strict=True)
                    ax.plot(
                        steps,
                        np.array(acc) * 100,
                        color=color,
                        alpha=0.9 if k == 0 else 0.45,
                        label=label if k == 0 else None,
                    )
        ax.set(title=f"target {v}", xlabel="fine-tuning step")
    axes[0].set_ylabel("accuracy % (one line per seed)")
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def plot_iterative(path: Path, runs: list[dict]) -> None:
    V = runs[0]["versions"][2:]
    bars = (
        ("M + Δ^dir", lambda r, v, p: r["transfer"][p][v]),
        ("M + Δ^iter", lambda r, v, p: r["iter_start"][v]),
        ("FT(M)", lambda r, v, p: r["ft"][v]),
        ("FT(M + Δ^dir)", lambda r, v, p: r["recycled_ft"][v]),
        ("FT(M + Δ^iter)", lambda r, v, p: r["iter_ft"][v]),
    )
    allv = runs[0]["versions"]
    fig = _figure((2 + 1.8 * len(V), 3.8))
    ax = fig.subplots()
    width = 0.8 / len(bars)
    for b, (label, get) in enumerate(bars):
        vals = np.array([[get(r, v, allv[allv.index(v) - 1]) for r in runs] for v in V]) * 100
        mean = vals.mean(axis=1)
        err = np.vstack([mean - vals.min(axis=1), vals.max(axis=1) - mean])
        ax.bar(np.arange(len(V)) + b * width, mean, width, yerr=err, label=label, capsize=2)
    ax.set_xticks(np.arange(len(V)) + 0.4 - width / 2, V)
    ax.set(
        ylabel="accuracy % (bars: mean; whiskers: min–max over seeds)", title="iterative vs direct recycling"
    )
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)


def plot_precheck(path: Path, runs: list[dict]) -> None:
    fig = _figure((5, 4))
    ax = fig.subplots()
    for r in runs:
        xs = [r["precheck"][t][s]["score"] for s in r["versions"] for t in r["versions"] if s != t]
        ys = [gain(r, s, t) * 100 for s in r["versions"] for t in r["versions"] if s != t]
        ax.scatter(xs, ys, label=f"seed {r['seed']}", alpha=0.7)
    ax.set(
        xlabel="pre-check score",
        ylabel="measured gain, points (M_j + Δ_i − M_j)",
        title="pre-check vs transfer",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
