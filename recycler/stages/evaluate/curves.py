"""Reading accuracy-vs-step curves: when a run first reached a level, and what a recycled start saved."""

from __future__ import annotations

from collections.abc import Sequence

Curve = Sequence[Sequence[float]]  # [[step, score], …] in step order


def steps_to_reach(curve: Curve, level: float) -> int | None:
    """First evaluated step whose score is ≥ `level` (within float noise), or None if never."""
    return next((int(step) for step, score in curve if score >= level - 1e-12), None)


def savings(recycled: dict, baseline: dict) -> dict[str, float | int | None]:
    """How much of FT-from-base the recycled start saves: steps (and wall time) to reach the accuracy
    FT-from-base ends at. `steps_to_target` is None when the recycled run never gets there.

    Both arguments are training records (`curve`, `steps`, `wall_time_s`).
    """
    target = baseline["curve"][-1][1] if baseline.get("curve") else None
    if target is None:
        return {"target_accuracy": None, "steps_to_target": None, "baseline_steps": baseline.get("steps")}
    reached = steps_to_reach(recycled.get("curve") or [], target)
    total = baseline.get("steps") or 0
    out: dict[str, float | int | None] = {
        "target_accuracy": float(target),
        "steps_to_target": reached,
        "baseline_steps": total,
        "steps_saved": (total - reached) if reached is not None else None,
    }
    if reached is not None and recycled.get("steps") and recycled.get("wall_time_s"):
        out["wall_time_to_target_s"] = reached * recycled["wall_time_s"] / recycled["steps"]
        out["baseline_wall_time_s"] = baseline.get("wall_time_s")
    return out
