"""The paper's claims as numbers: one margin per seed for each claim, then mean, spread and a verdict.

A margin is a difference that is positive when the claim holds (accuracy differences as fractions,
step differences in optimizer steps). Verdicts are mechanical, fixed before the full runs: a mean
margin smaller than the noise floor (one standard error of an accuracy difference at 50% on the test
set, or one evaluation interval for steps) is "within noise"; otherwise "holds in every seed" when every
seed's margin is positive and at least the noise floor, "holds on average only" when the mean is
positive, else "does not hold".
"""

from __future__ import annotations

import math
from collections.abc import Callable
from itertools import pairwise

import numpy as np

from recycler.stages.evaluate.curves import steps_to_reach

PRECHECK_TARGET = 0.7  # Spearman ρ the pre-check aims for


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's ρ (average ranks for ties); None when either side is constant or too short."""
    if len(x) < 2:
        return None

    def ranks(v: list[float]) -> np.ndarray:
        a = np.asarray(v, dtype=float)
        order = a.argsort(kind="stable")
        r = np.empty(len(a))
        r[order] = np.arange(len(a), dtype=float)
        for value in np.unique(a):  # ties share their mean rank
            r[a == value] = r[a == value].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def steps_or_inf(curve: list[list[float]], level: float) -> float:
    """`steps_to_reach`, with inf for "never" so that margins can be computed and capped."""
    reached = steps_to_reach(curve, level)
    return math.inf if reached is None else float(reached)


def gain(r: dict, src: str, tgt: str) -> float:
    """No-training transfer gain: acc(M_tgt + Δ_src) − acc(M_tgt)."""
    return r["transfer"][src][tgt] - r["base"][tgt]


def pairs(r: dict) -> list[tuple[str, str]]:
    V = r["versions"]
    return [(s, t) for s in V for t in V if s != t]


# ---- per-seed margins -----------------------------------------------------------------------------------


def _close_vs_far(r: dict) -> float:
    V = r["versions"]
    dist = {(s, t): abs(V.index(s) - V.index(t)) for s, t in pairs(r)}
    close = [gain(r, s, t) for (s, t), d in dist.items() if d == 1]
    far = [gain(r, s, t) for (s, t), d in dist.items() if d > (len(V) - 1) / 2]
    return float(np.mean(close) - np.mean(far))


def _convergence(r: dict, fraction: float) -> float:
    """Mean over versions of (steps FT-from-base needs − steps recycled-then-FT needs) to reach
    `fraction` of FT-from-base's final accuracy; a curve that never gets there counts as last step + 1 eval."""
    margins = []
    for v, curve in r["recycled_curve"].items():
        base_curve = r["ft_curve"][v]
        level = fraction * base_curve[-1][1]
        cap = base_curve[-1][0] + (base_curve[-1][0] - base_curve[-2][0])
        margins.append(min(steps_or_inf(base_curve, level), cap) - min(steps_or_inf(curve, level), cap))
    return float(np.mean(margins))


def precheck_rho(r: dict, signal: str = "score") -> float | None:
    """Pooled Spearman ρ between a pre-check signal and the measured no-training gain, all (Δ_i, M_j)."""
    xs, ys = [], []
    for s, t in pairs(r):
        c = r["precheck"][t][s]
        value = c[signal] if signal != "proximity" else 1 / (1 + c["relative_distance"])
        xs.append(value)
        ys.append(gain(r, s, t))
    return spearman(xs, ys)


def precheck_rho_within_target(r: dict) -> float | None:
    rhos = []
    for t in r["versions"]:
        sources = [s for s in r["versions"] if s != t]
        rho = spearman([r["precheck"][t][s]["score"] for s in sources], [gain(r, s, t) for s in sources])
        if rho is not None:
            rhos.append(rho)
    return float(np.mean(rhos)) if rhos else None


Margin = Callable[[dict], float | None]


def claims(versions: list[str]) -> dict[str, tuple[str, Margin]]:
    """Claim name → (what the margin measures, per-seed margin). Needs ≥ 3 versions."""
    first, prev, last = versions[0], versions[-2], versions[-1]
    return {
        "ft_lifts_newest_version": (
            f"FT accuracy − base accuracy of {last}",
            lambda r: r["ft"][last] - r["base"][last],
        ),
        "later_versions_finetune_better": (
            f"FT accuracy of {last} − FT accuracy of {first}",
            lambda r: r["ft"][last] - r["ft"][first],
        ),
        "recycling_helps_without_training": (
            "mean over versions of acc(M_k + Δ_{k−1}) − acc(M_k)",
            lambda r: float(np.mean([gain(r, a, b) for a, b in pairwise(r["versions"])])),
        ),
        "close_versions_transfer_better": (
            "mean gain of adjacent-version Δs − mean gain of the farthest half",
            _close_vs_far,
        ),
        "newest_target_close_vs_far": (
            f"gain of Δ_{prev} on {last} − gain of Δ_{first} on {last}",
            lambda r: gain(r, prev, last) - gain(r, first, last),
        ),
        "stronger_target_gains_more": (
            f"gain of Δ_{prev} on {last} − gain of Δ_{first} on {versions[1]}",
            lambda r: gain(r, prev, last) - gain(r, first, versions[1]),
        ),
        "recycled_ft_ends_higher": (
            "mean over versions of final acc(FT from M_k + Δ_{k−1}) − final acc(FT from M_k)",
            lambda r: float(np.mean([r["recycled_ft"][v] - r["ft"][v] for v in r["recycled_ft"]])),
        ),
        "recycled_ft_converges_faster": (
            "mean steps saved to reach FT-from-base's final accuracy",
            lambda r: _convergence(r, 1.0),
        ),
        "recycled_ft_converges_faster_90": (
            "mean steps saved to reach 90% of FT-from-base's final accuracy",
            lambda r: _convergence(r, 0.9),
        ),
        "iterative_start_beats_direct_start": (
            f"acc({last} + Δ^iter_{prev}) − acc({last} + Δ^dir_{prev}), no training",
            lambda r: r["iter_start"][last] - r["transfer"][prev][last],
        ),
        "iterative_ft_beats_direct_ft": (
            f"final acc of Δ^iter-then-FT − Δ^dir-then-FT on {last}",
            lambda r: r["iter_ft"][last] - r["recycled_ft"][last],
        ),
        "iterative_ft_beats_ft": (
            f"final acc of Δ^iter-then-FT − FT from base on {last}",
            lambda r: r["iter_ft"][last] - r["ft"][last],
        ),
        "precheck_spearman": (
            "pooled Spearman ρ of pre-check score vs no-training gain (all Δ_i → M_j)",
            precheck_rho,
        ),
        "precheck_spearman_within_target": (
            "mean over targets of Spearman ρ (ranking the Δs for one target)",
            precheck_rho_within_target,
        ),
    }


def lora_claims() -> dict[str, tuple[str, Margin]]:
    """The LoRA section's claim (recycler.toy.lora_costs), on runs that have it."""
    return {
        "lora_ft_recycled_ends_higher": (
            "final acc of LoRA-FT from M_i + Δ^iter_{i−1} − LoRA-FT from M_i (newest version)",
            lambda r: r["lora"]["ft"]["recycled"] - r["lora"]["ft"]["base"],
        ),
    }


def noise_floor(name: str, run: dict) -> float:
    if name.startswith("precheck"):
        return 0.0
    if name.startswith("recycled_ft_converges"):
        return float(run["finetune_config"]["eval_every"] or 0)
    return accuracy_noise(0.5, run["n_test"])


def summarize(runs: list[dict]) -> dict[str, dict]:
    versions = runs[0]["versions"]
    named = claims(versions) | (lora_claims() if all("lora" in r for r in runs) else {})
    out = {}
    for name, (what, margin) in named.items():
        values = [margin(r) for r in runs]
        known = [v for v in values if v is not None]
        entry = {"measures": what, "per_seed": values, "noise": noise_floor(name, runs[0])}
        if known:
            entry |= {"mean": float(np.mean(known)), "min": min(known), "max": max(known)}
            entry["spread"] = entry["max"] - entry["min"]
        entry["verdict"] = _verdict(name, entry, len(known) == len(values))
        out[name] = entry
    return out


def _verdict(name: str, e: dict, complete: bool) -> str:
    if "mean" not in e:
        return "not measurable"
    if name.startswith("precheck"):
        return f"{'meets' if e['mean'] >= PRECHECK_TARGET else 'misses'} the {PRECHECK_TARGET} target"
    if abs(e["mean"]) < e["noise"]:
        return "within noise"
    if e["min"] >= e["noise"] and e["min"] > 0 and complete:
        return "holds in every seed"
    return "holds on average only" if e["mean"] > 0 else "does not hold"


def accuracy_noise(p: float, n: int) -> float:
    """Standard error of a difference of two independent accuracies near p on n problems."""
    return math.sqrt(2 * p * (1 - p) / n)
