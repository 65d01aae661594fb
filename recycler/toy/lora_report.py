"""The LoRA section of the reproduce report (recycler.toy.lora_costs): two tables and one figure.

The rank table is the one a team reads to decide whether a Δ can ship as an adapter: accuracy of
M_i + (Δ as a rank-r adapter) next to M_i + Δ, the gap in points against the noise floor, and what the
truncation lost (‖Δ − BA‖/‖Δ‖).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from recycler.toy.findings import accuracy_noise
from recycler.toy.plots import _figure


def _cell(values: list[float], scale: float = 100, signed: bool = False) -> str:
    """'mean (seed 0, seed 1, …)'; one seed prints its value."""
    fmt = "{:+.1f}" if signed else "{:.1f}"
    vals = [v * scale for v in values]
    if len(vals) == 1:
        return fmt.format(vals[0])
    return f"{fmt.format(np.mean(vals))} ({', '.join(fmt.format(v) for v in vals)})"


CASES = ("own", "recycled")


def case_title(case: str, runs: list[dict]) -> str:
    V = runs[0]["versions"]
    return f"Δ^iter of {V[-1]} (its own fine-tune)" if case == "own" else f"Δ^iter of {V[-2]} (recycled)"


def smallest_rank_within_noise(runs: list[dict], case: str) -> str | None:
    """The lowest rank label whose accuracy is at most one noise floor below the exact Δ's, in every seed."""
    noise = accuracy_noise(0.5, runs[0]["n_test"])
    tables = [r["lora"]["cases"][case] for r in runs]
    for label in tables[0]["ranks"]:
        if min(t["ranks"][label]["accuracy"] - t["exact"] for t in tables) >= -noise:
            return label
    return None


def _rank_rows(runs: list[dict]) -> list[list[str]]:
    target = runs[0]["lora"]["target"]
    tables = {c: [r["lora"]["cases"][c] for r in runs] for c in CASES}
    rows = [
        ["M_i alone (no Δ)", "–", *(c for _ in CASES for c in (_cell([r["base"][target] for r in runs]), "", ""))],
        ["M_i + Δ (exact)", "–", *(c for k in CASES for c in (_cell([t["exact"] for t in tables[k]]), "", "0 / 0"))],
    ]  # fmt: skip
    for label in tables["own"][0]["ranks"]:
        used = {str(t["ranks"][label]["max_rank"]) for k in CASES for t in tables[k]}
        cells = []
        for k in CASES:
            got = [t["ranks"][label] for t in tables[k]]
            cells.append(_cell([g["accuracy"] for g in got]))
            cells.append(
                _cell([g["accuracy"] - t["exact"] for g, t in zip(got, tables[k], strict=True)], signed=True)
            )
            cells.append(
                f"{np.mean([g['error_matrices'] for g in got]):.3f} / {np.mean([g['error_all'] for g in got]):.3f}"
            )
        rows.append([f"M_i + rank-{label} adapter", "/".join(sorted(used)), *cells])
    return rows


def lora_section(runs: list[dict]) -> list[str]:
    lo = [r["lora"] for r in runs]
    target = lo[0]["target"]
    noise = accuracy_noise(0.5, runs[0]["n_test"])
    enough = []
    for case in CASES:
        label = smallest_rank_within_noise(runs, case)
        text = f"{case_title(case, runs)}: **{label or 'none, full rank included'}**"
        gain = np.mean([r["lora"]["cases"][case]["exact"] - r["base"][target] for r in runs])
        if gain < noise:  # every rank "keeps" an accuracy that Δ never added
            text += (
                f" (uninformative: M_i + Δ is within the noise floor of M_i alone, {gain * 100:+.1f} points)"
            )
        enough.append(text)
    header = ["model", "rank used"]
    for case in CASES:
        header += [
            f"{case_title(case, runs)}: accuracy %",
            "vs exact Δ (points)",
            "‖Δ−BA‖/‖Δ‖ matrices / all",
        ]
    cfg = lo[0]["finetune_config"]
    ft_rows = [
        ["full FT from M_i (the cycle's)", _cell([r["ft"][target] for r in runs])],
        ["full FT from M_i + Δ^iter (the cycle's)", _cell([r["iter_ft"][target] for r in runs])],
        ["LoRA FT from M_i", _cell([x["ft"]["base"] for x in lo])],
        ["LoRA FT from M_i + Δ^iter", _cell([x["ft"]["recycled"] for x in lo])],
    ]
    return [
        "## 6. LoRA adapters: what the adapter form costs",
        "",
        f"On the newest version M_i = {target}, with two Δs the iterative chain registered: M_i's own fine-tune "
        f"(M_i + Δ is the cycle's fine-tuned {target}: can it ship as an adapter?) and the previous version's, "
        "recycled (M_i + Δ is the recycled start: can a recycled Δ ship as an adapter for the new base?). "
        f"Accuracy in % (mean, then per seed); the noise floor is {noise * 100:.1f} points, as in the findings above.",
        "",
        '**Δ as an adapter.** `delta_to_lora` at each rank (truncated SVD per matrix; "full" keeps every '
        "matrix at full rank), applied to M_i as its B·A. ‖Δ−BA‖/‖Δ‖ is over the adapted matrices, then over "
        "all of Δ: an adapter cannot carry the norm vectors' Δ, which is left out (and listed in its manifest).",
        "",
        *_table(header, _rank_rows(runs)),
        "",
        f"Smallest rank within the noise floor of the exact Δ in every seed: {'; '.join(enough)}.",
        "",
        f"**LoRA fine-tuning** (`finetune.method: lora`, r {cfg['r']}, alpha {cfg['alpha']:g}, lr "
        f"{cfg['learning_rate']:g}, the cycle's steps and seed; the merged model is scored) against the "
        f"cycle's full fine-tunes of M_i = {target}; Δ^iter is the previous version's:",
        "",
        *_table(["fine-tune", "accuracy %"], ft_rows),
        "",
        "![LoRA: accuracy against rank, and LoRA fine-tuning](lora.png)",
        "",
    ]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def plot_lora(path: Path, runs: list[dict]) -> None:
    """Left: accuracy against adapter rank for both Δs (one thin line per seed, the mean bold), the
    exact Δ's mean with the noise band. Right: the LoRA fine-tunes' curves from M_i and M_i + Δ^iter."""
    lo = [r["lora"] for r in runs]
    labels = list(lo[0]["cases"]["own"]["ranks"])
    x = np.arange(len(labels))
    noise = accuracy_noise(0.5, runs[0]["n_test"]) * 100
    fig = _figure((11, 4))
    left, right = fig.subplots(1, 2)
    for case, color in zip(CASES, ("C0", "C1"), strict=True):
        tables = [s["cases"][case] for s in lo]
        name = case_title(case, runs)
        acc = np.array([[t["ranks"][k]["accuracy"] for k in labels] for t in tables]) * 100
        for row in acc:
            left.plot(x, row, color=color, alpha=0.35, lw=1)
        left.plot(x, acc.mean(axis=0), "o-", color=color, lw=2, label=f"{name} as a rank-r adapter")
        exact = np.mean([t["exact"] for t in tables]) * 100
        left.axhline(exact, color=color, ls="--", label=f"{name} exact, ± noise floor")
        left.axhspan(exact - noise, exact + noise, color=color, alpha=0.12)
    full = lo[0]["cases"]["own"]["ranks"][labels[-1]]["max_rank"]
    left.set_xticks(x, [*labels[:-1], f"full ({full})"])
    title = f"{lo[0]['target']} + Δ as an adapter"
    left.set(xlabel="adapter rank", ylabel="accuracy % (thin: one line per seed)", title=title)
    left.legend(fontsize=7)
    for key, label, color in (
        ("base", "LoRA FT from M_i", "C0"),
        ("recycled", "LoRA FT from M_i + Δ^iter", "C2"),
    ):
        for k, s in enumerate(lo):
            if s["ft_curve"][key]:
                steps, a = zip(*s["ft_curve"][key], strict=True)
                right.plot(steps, np.array(a) * 100, color=color, alpha=0.9 if k == 0 else 0.45,
                           label=label if k == 0 else None)  # fmt: skip
    right.set(
        xlabel="fine-tuning step",
        ylabel="accuracy % (one line per seed)",
        title=f"LoRA fine-tuning of {lo[0]['target']}",
    )
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
