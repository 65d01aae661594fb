"""What a person sees on a cycle's MLflow run: a description that tells the cycle's story (scores of
M, M + Δ, FT(M + Δ) and FT(M), the steps saved, the gate's decision, links to every version it
registered), the comparison as one chart, the convergence curves and the lineage picture.

MLflow renders a run's description (the `mlflow.note.content` tag) as Markdown on the run page, with
in-app links; the gate's decision is also a run tag (`gate`), so it can be searched and compared.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from recycler.registry import runlog
from recycler.registry.links import version_link

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from recycler.service.cycle import CycleResult
    from recycler.service.services import Services
    from recycler.service.transfer import TransferResult

ROWS = (("base", "M: the new base, untouched"), ("merged", "M + Δ, no training"), ("ft", "FT(start): the fine-tune of this cycle"), ("ft_from_base", "FT(M): the baseline, fine-tuned from the plain base"), ("lora", "M + B·A: the new Δ as a LoRA adapter"))  # fmt: skip


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def cycle_note(result: CycleResult, ui: str = "") -> str:
    """The Markdown description of a cycle's run (with `ui`, full URLs: for pages outside MLflow)."""
    link = {k: version_link(v, ui) for k, v in result.registered.items() if v}
    start = {
        "first": "the plain base (first cycle)",
        "iterative": "the base + the family's Δ^iter",
        "direct": "the base + Δ^dir",
    }
    lines = [
        f"**Release cycle {result.family} {result.version}**: fine-tuned from {start.get(result.mode or '', '?')}."
    ]
    if result.parent_diff:
        lines.append(f"Start: {link.get('merged', '?')} = base + Δ {version_link(result.parent_diff, ui)}.")
    champion = "none" if result.champion_before is None else _pct(result.champion_before)
    lines += ["", f"**Gate: {verdict(result)}** ({result.gate}; champion before: {champion})", "", "| model | accuracy | version |", "|---|---|---|"]  # fmt: skip
    version_of = {"base": "base", "merged": "merged", "ft": "ft", "ft_from_base": "baseline", "lora": "lora"}
    for key, label in ROWS:
        if key in result.scores:
            lines.append(
                f"| {label} | {_pct(result.scores[key])} | {link.get(version_of.get(key, ''), '')} |"
            )
    if s := result.savings:
        reached = s.get("steps_to_target")
        lines += ["", f"Steps to reach FT(M)'s final accuracy ({_pct(s.get('target_accuracy'))}): "
                  f"{'never' if reached is None else reached} from the recycled start vs {s.get('baseline_steps')} from the base."]  # fmt: skip
    if "diff" in link:
        nxt = (
            "the next release starts from it (next-diff)"
            if result.promoted
            else "not promoted: next-diff stays where it was"
        )
        lines += ["", f"Registered Δ: {link['diff']}, {nxt}."]
    return "\n".join(lines) + "\n"


def verdict(result: CycleResult) -> str:
    return "promoted" if result.promoted else "refused, champion kept"


def transfer_note(result: TransferResult, ui: str = "") -> str:
    """The Markdown description of a backport's or recycle's run."""
    gain = result.scores["merged"] - result.scores["base"]
    applied = "base + B·A (LoRA adapter of α·Δ)" if result.output == "adapter" else "base + α·Δ"
    return "\n".join([
        f"**{result.how.capitalize()}** of Δ {version_link(result.diff, ui)} onto base "
        f"{version_link(result.base, ui)} (release {result.target}), α = {result.alpha:g}, no training.",
        "", "| model | accuracy |", "|---|---|",
        f"| base {result.target} | {_pct(result.scores['base'])} |",
        f"| {applied}: {version_link(result.registered, ui)} | {_pct(result.scores['merged'])} ({100 * gain:+.1f} points) |",
    ]) + "\n"  # fmt: skip


def scores_figure(result: CycleResult) -> Figure:
    """The cycle's comparison in one chart: accuracy of M, M + Δ, FT and FT(M)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    bars = {  # score → (bar label, colour)
        "base": ("M", "#9aa"),
        "merged": ("M + Δ\n(no training)", "#e9a545"),
        "ft": ("FT(start)", "#4a8"),
        "ft_from_base": ("FT(M)", "#68c"),
        "lora": ("M + B·A\n(adapter)", "#c68"),
    }
    keys = [k for k in bars if k in result.scores]
    fig = Figure(figsize=(6, 3.6))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    drawn = ax.bar(
        [bars[k][0] for k in keys], [100 * result.scores[k] for k in keys], color=[bars[k][1] for k in keys]
    )
    ax.bar_label(drawn, fmt="%.1f%%")
    ax.set(
        ylabel="accuracy (%)",
        ylim=(0, 105),
        title=f"cycle {result.family} {result.version}: {'promoted' if result.promoted else 'refused'}",
    )
    fig.tight_layout()
    return fig


def log_cycle(svc: Services, result: CycleResult, record: dict, baseline: dict | None) -> None:
    """Scores, savings, curves, the story and the lineage picture into the cycle's run (if tracked)."""
    if (run_id := result.run_id) is None:
        return
    metrics = {f"accuracy_{k}": v for k, v in result.scores.items()}
    metrics |= {f"precheck_{k}": v for k, v in (result.precheck or {}).items()}
    metrics |= {f"savings_{k}": v for k, v in result.savings.items()}
    runlog.log_metrics(metrics, run_id=run_id)
    runlog.log_curve("eval_curve_ft", [tuple(p) for p in record.get("curve") or []], run_id=run_id)
    runlog.log_figure(scores_figure(result), "comparison.png", run_id=run_id)
    if baseline:
        runlog.log_curve(
            "eval_curve_ft_from_base", [tuple(p) for p in baseline.get("curve") or []], run_id=run_id
        )
        runlog.log_figure(
            runlog.convergence_figure(record, baseline, result.version), "savings.png", run_id=run_id
        )
    gate = "promoted" if result.promoted else f"refused: {result.gate}"
    runlog.set_run_tags(run_id, {"gate": gate, "candidate": result.candidate or ""})
    runlog.set_note(run_id, cycle_note(result))
    if diff := result.registered.get("diff"):
        runlog.log_lineage(svc.registry, svc.registry.resolve(diff), run_id=run_id)


def log_transfer(svc: Services, result: TransferResult) -> None:
    """Scores and the story into a backport's or recycle's run (if tracked)."""
    if (run_id := result.run_id) is None:
        return
    runlog.log_metrics({f"accuracy_{k}": v for k, v in result.scores.items()}, run_id=run_id)
    runlog.set_run_tags(run_id, {"transfer": result.how, "registered": result.registered})
    runlog.set_note(run_id, transfer_note(result))
    runlog.log_lineage(svc.registry, svc.registry.resolve(result.registered), run_id=run_id)
