"""Several registered Δs onto one base in a backport or recycle: base + Σ α_i·Δ_i, rounded once.

`recycler apply BASE Δ1 Δ2 …` composes Δ artifacts (`recycler.stages.compose`); this is the same
through the service, so the result is registered with every Δ and its α in its lineage
(`composed_of`), evaluated like any backport, and keyed by every input's content.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from recycler.io.manifest import manifest_digest
from recycler.registry.runlog import log_json_artifact
from recycler.registry.runs import child_run
from recycler.service import steps


class ComposedPart(BaseModel):
    """A further Δ added in the same pass, with its own α."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    diff: str = Field(description="a registered Δ: NAME/VERSION or NAME@ALIAS")
    alpha: float = Field(1.0, description="its scale")

    @classmethod
    def parse(cls, text: str) -> ComposedPart:
        """`NAME/VERSION[=α]` or `NAME@ALIAS[=α]` (the CLI's `--add`)."""
        ref, sep, alpha = text.partition("=")
        try:
            return cls(diff=ref.strip(), alpha=float(alpha) if sep else 1.0)
        except ValueError:
            raise ValueError(
                f"--add {text!r}: expected NAME/VERSION[=ALPHA], e.g. fam-instruct-diff/3=0.5"
            ) from None


def compose_step(
    base: Path,
    diffs: list[Path],
    alphas: list[float],
    dest: Path,
    *,
    parent_run: str | None = None,
    name: str,
) -> Path:
    """base + Σ α_i·Δ_i (one rounding to the base's dtype), reused only if made from the same base,
    Δs and αs, in the same order."""
    from recycler.stages.compose import compose
    from recycler.stages.sources import stored_delta

    inputs = {
        "op": "compose",
        "base": manifest_digest(base),
        "deltas": [manifest_digest(d) for d in diffs],
        "alphas": list(alphas),
    }
    if not steps.reusable(dest, inputs):
        with child_run(parent_run, name, params={"op": "compose", "alphas": str(alphas)}) as run_id:
            result = compose(
                base, [stored_delta(d) for d in diffs], alphas, [], dest, inputs=diffs, overwrite=True
            )
            log_json_artifact(result.report.model_dump(mode="json"), "compatibility.json", run_id=run_id)
    return dest
