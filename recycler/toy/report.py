"""report.md, results.json and PNG plots for `recycler reproduce` (matplotlib Agg, no display)."""

from __future__ import annotations

import json
import math
from itertools import pairwise
from pathlib import Path

import numpy as np

from recycler.toy.findings import (
    PRECHECK_TARGET,
    accuracy_noise,
    precheck_rho,
    steps_or_inf,
    summarize,
)
from recycler.toy.lora_report import lora_section, plot_lora
from recycler.toy.plots import plot_convergence, plot_iterative, plot_precheck, plot_transfer

CEILING = 0.97
FAST_NOTE = (
    "**Fast mode: a smoke test.** The smaller, shorter-pretrained fast family, evaluated every 20 steps. These "
    "numbers check that the pipeline runs end to end; they are not evidence for or against the paper."
)


def _cell(values: list[float], pct: bool = True) -> str:
    """'mean (v0, v1)' over seeds; one seed prints its value."""
    scale = 100 if pct else 1
    vals = [v * scale for v in values]
    if len(vals) == 1:
        return f"{vals[0]:.1f}"
    return f"{np.mean(vals):.1f} ({', '.join(f'{v:.1f}' for v in vals)})"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def _steps(x: float) -> str:
    return "never" if math.isinf(x) else f"{x:.0f}"


# ---- sections -------------------------------------------------------------------------------------------


def base_ft_section(runs: list[dict]) -> list[str]:
    V = runs[0]["versions"]
    rows = [
        ["base", *(_cell([r["base"][v] for r in runs]) for v in V)],
        ["fine-tuned", *(_cell([r["ft"][v] for r in runs]) for v in V)],
    ]
    return ["## 1. Base and fine-tuned accuracy (%)", "", *_table(["", *V], rows), ""]


def transfer_section(runs: list[dict]) -> list[str]:
    V = runs[0]["versions"]
    rows = [["base M_j (no Δ)", *(_cell([r["base"][t] for r in runs]) for t in V)]]
    for s in V:
        rows.append(
            [
                f"M_j + Δ_{s}",
                *(
                    f"*{_cell([r['ft'][t] for r in runs])}*"
                    if s == t
                    else _cell([r["transfer"][s][t] for r in runs])
                    for t in V
                ),
            ]
        )
    return [
        "## 2. Transfer without training: accuracy (%) of M_j + Δ_i",
        "",
        "Rows: the Δ's source version i; columns: target base j. The diagonal (italic) is M_j + Δ_j = FT(M_j).",
        "",
        *_table(["", *(f"M_j = {t}" for t in V)], rows),
        "",
    ]


def convergence_section(runs: list[dict]) -> list[str]:
    V = runs[0]["versions"]
    rows = []
    for prev, v in pairwise(V):
        reach = {
            key: [steps_or_inf(r[curve][v], r["ft"][v] * f) for r in runs]
            for key, curve, f in (
                ("ft", "ft_curve", 1.0),
                ("rec", "recycled_curve", 1.0),
                ("rec90", "recycled_curve", 0.9),
                ("ft90", "ft_curve", 0.9),
            )
        }
        rows.append(
            [
                v,
                f"Δ_{prev}",
                _cell([r["ft"][v] for r in runs]),
                _cell([r["recycled_ft"][v] for r in runs]),
                " / ".join(_steps(x) for x in reach["ft90"]),
                " / ".join(_steps(x) for x in reach["rec90"]),
                " / ".join(_steps(x) for x in reach["ft"]),
                " / ".join(_steps(x) for x in reach["rec"]),
            ]
        )
    header = [
        "target", "recycled Δ", "FT from base: final", "FT from M+Δ: final", "steps to 90% (base)",
        "steps to 90% (M+Δ)", "steps to FT final (base)", "steps to FT final (M+Δ)",
    ]  # fmt: skip
    return [
        "## 3. Recycling-then-fine-tuning: convergence",
        "",
        "Accuracy in %; steps are per seed (seed 0 / seed 1 …), the first evaluated step at which the run reaches "
        "90% of (or all of) FT-from-base's final accuracy on that seed.",
        "",
        *_table(header, rows),
        "",
        "![convergence](convergence.png)",
        "",
    ]


def iterative_section(runs: list[dict]) -> list[str]:
    V = runs[0]["versions"]
    rows = []
    for prev, v in pairwise(V[1:]):
        rows.append(
            [
                v,
                _cell([r["transfer"][prev][v] for r in runs]),
                _cell([r["iter_start"][v] for r in runs]),
                _cell([r["ft"][v] for r in runs]),
                _cell([r["recycled_ft"][v] for r in runs]),
                _cell([r["iter_ft"][v] for r in runs]),
            ]
        )
    header = [
        "target M_i",
        "M_i + Δ^dir (no training)",
        "M_i + Δ^iter (no training)",
        "FT(M_i)",
        "FT(M_i + Δ^dir)",
        "FT(M_i + Δ^iter)",
    ]
    return [
        "## 4. Iterative (Algorithm 1) vs direct recycling (accuracy %)",
        "",
        "Δ^dir_{i−1} = FT(M_{i−1}) − M_{i−1}; Δ^iter_{i−1} = M*_{i−1} − M_{i−1} with M*_1 = FT(M_1), "
        f"M*_i = FT(M_i + Δ^iter_{{i−1}}). For {V[1]}, both Δs are Δ_{V[0]}, so the chain starts differing at {V[2]}.",
        "",
        *_table(header, rows),
        "",
        "![iterative vs direct](iterative.png)",
        "",
    ]


def precheck_section(runs: list[dict], findings: dict) -> list[str]:
    signals = {
        "score (combined)": "score",
        "probe gain alone": "probe_gain",
        "proximity 1/(1+d) alone": "proximity",
        "cosine alone": "cosine",
    }
    rows = [
        [
            label,
            *(f"{precheck_rho(r, key):+.2f}" if precheck_rho(r, key) is not None else "n/a" for r in runs),
        ]
        for label, key in signals.items()
    ]
    within = findings["precheck_spearman_within_target"]
    return [
        "## 5. Transferability pre-check vs measured transfer",
        "",
        "`recycler precheck` scored every Δ_i for every M_j from the source base's distance and cosine and a "
        "64-example held-out loss probe at α ∈ {0.5, 1}; the table gives Spearman's ρ against the measured "
        f"no-training gain acc(M_j + Δ_i) − acc(M_j) over all pairs (target ρ ≥ {PRECHECK_TARGET}). Mean ρ within a "
        f"target (ranking the Δs for one base): {within.get('mean', float('nan')):+.2f}.",
        "",
        *_table(["signal", *(f"seed {r['seed']}" for r in runs)], rows),
        "",
        "![pre-check](precheck.png)",
        "",
    ]


def _margin_format(name: str, pct: bool):
    if pct:
        return lambda x: f"{x * 100:+.1f}"
    return (lambda x: f"{x:+.2f}") if name.startswith("precheck") else (lambda x: f"{x:+.0f}")


def verdict_lines(findings: dict, runs: list[dict]) -> list[str]:
    """A plain-language summary derived from the verdicts, plus ceiling warnings."""
    groups: dict[str, list[str]] = {}
    for name, f in findings.items():
        groups.setdefault(f["verdict"], []).append(f"`{name}`")
    lines = [f"- **{verdict}**: {', '.join(names)}" for verdict, names in groups.items()]
    ceiling = sorted(
        {f"{v} (seed {r['seed']})" for r in runs for v in r["versions"] if r["ft"][v] >= CEILING}
    )
    if ceiling:
        lines.append(
            f"- Fine-tuning from the base is at the ceiling (≥ {CEILING:.0%}) for {', '.join(ceiling)}: there, "
            "'ends higher' margins are bounded by the few points left and say little either way."
        )
    return ["## Summary", "", *lines, ""]


def findings_section(findings: dict, runs: list[dict]) -> list[str]:
    rows = []
    for name, f in findings.items():
        pct = not name.startswith(("recycled_ft_converges", "precheck"))
        fmt = _margin_format(name, pct)
        per_seed = ", ".join("n/a" if v is None else fmt(v) for v in f["per_seed"])
        mean = fmt(f["mean"]) if "mean" in f else "n/a"
        spread = fmt(f["spread"]).lstrip("+") if "spread" in f else "n/a"
        noise = f"{f['noise'] * (100 if pct else 1):.1f}" if f["noise"] else "–"
        rows.append([name, f["measures"], per_seed, mean, spread, noise, f["verdict"]])
    n_test = runs[0]["n_test"]
    return [
        "## Findings: margins over the spread across seeds",
        "",
        "Accuracy margins in points, step margins in optimizer steps, ρ unitless. Spread = max − min over seeds. "
        f"Noise floor: the standard error of a difference of two accuracies near 50% on {n_test} problems "
        f"({accuracy_noise(0.5, n_test) * 100:.1f} points), or one evaluation interval for step counts; a mean margin "
        "below it is 'within noise', and 'holds in every seed' needs every seed's margin above it.",
        "",
        *_table(["claim", "margin measured", "per seed", "mean", "spread", "noise floor", "verdict"], rows),
        "",
    ]


# ---- driver ---------------------------------------------------------------------------------------------


def write_report(
    out: Path, runs: list[dict], *, fast: bool, wall_time_s: float
) -> tuple[Path, Path, dict[str, Path], dict]:
    out.mkdir(parents=True, exist_ok=True)
    findings = summarize(runs)
    plots = {name: out / f"{name}.png" for name in ("transfer", "convergence", "iterative", "precheck")}
    plot_transfer(plots["transfer"], runs)
    plot_convergence(plots["convergence"], runs)
    plot_iterative(plots["iterative"], runs)
    plot_precheck(plots["precheck"], runs)
    if has_lora(runs):
        plots["lora"] = out / "lora.png"
        plot_lora(plots["lora"], runs)
    results = out / "results.json"
    body = {"fast": fast, "seeds": len(runs), "wall_time_s": wall_time_s, "findings": findings, "runs": runs}
    results.write_text(json.dumps(body, indent=1, default=_json_default) + "\n")
    report = out / "report.md"
    report.write_text("\n".join(_markdown(runs, findings, fast, wall_time_s)) + "\n")
    return report, results, plots, findings


def has_lora(runs: list[dict]) -> bool:
    return all("lora" in r for r in runs)


def _json_default(x: object) -> object:
    if isinstance(x, float) and math.isinf(x):
        return None
    raise TypeError(f"not JSON-serialisable: {type(x).__name__}")


TASK_EXAMPLES = {"add": "`Q:32+54?` → `860`", "sub": "`Q:54-32?` → `22`", "mul3": "`Q:321*4?` → `2940`",
                 "mul": "`Q:32*4?` → `821`"}  # fmt: skip


def task_line(cfg: dict) -> str:
    """The task's operations as examples (numbers least-significant digit first)."""
    ops = cfg.get("task_ops", ["add"])
    return ", ".join(TASK_EXAMPLES.get(op, op) for op in ops)


def _markdown(runs: list[dict], findings: dict, fast: bool, wall: float) -> list[str]:
    cfg, ft = runs[0]["family"]["config"], runs[0]["finetune_config"]
    timing = "; ".join(
        f"seed {r['seed']}: family {r['timings']['family_s']:.0f} s, experiments {r['timings']['total_s']:.0f} s"
        for r in runs
    )
    lines = [
        f"# Fine-tuning transfer on a toy model family{' (fast smoke test)' if fast else ''}",
        "",
        *([FAST_NOTE, ""] if fast else []),
        "Reproduces the experiments of Lin et al. 2025 (arXiv 2503.20110) on a tiny Llama "
        f"(d={cfg['hidden']}, {cfg['layers']} layers, character tokens, context {cfg['context']}) pretrained in two stages "
        "on a synthetic corpus (made-up text and arithmetic facts with numbers written least-significant digit first), "
        f"with base versions {', '.join(runs[0]['versions'])}. The instruction task asks {task_line(cfg)} in chat format; "
        f"fine-tuning: {ft['max_steps']} steps, batch {ft['batch_size']}, lr {ft['learning_rate']:g} "
        f"({100 * ft['warmup_ratio']:.0f}% warm-up, then linear decay); accuracy "
        f"is exact match by greedy decoding on {runs[0]['n_test']} held-out problems that neither pretraining nor fine-tuning saw. "
        f"Each seed is a separately pretrained family and fine-tuning seed. Seeds: {len(runs)}.",
        "",
        "Every fine-tune, Δ and recycled start below was made by the release cycle itself: per seed, the watcher "
        "ran one cycle per release in mode `direct` with FT(M_i) baselines (registered family `toy-direct`) and in "
        "mode `iterative`, Algorithm 1 (`toy-iterative`), every cycle promoted, and the tables are read back from "
        "their registry and cycle runs (open one with `mlflow ui --backend-store-uri "
        f"sqlite:///{Path(runs[0]['service_home'])}/mlflow.db`). The transfer table applies the Δs those "
        "cycles registered to every other base.",
        "",
        f"Wall time {wall:.0f} s ({timing}).",
        "",
        *verdict_lines(findings, runs),
        *findings_section(findings, runs),
        *base_ft_section(runs),
        *transfer_section(runs),
        "![transfer heatmap](transfer.png)",
        "",
        *convergence_section(runs),
        *iterative_section(runs),
        *precheck_section(runs, findings),
        *(lora_section(runs) if has_lora(runs) else []),
    ]
    return lines
