"""Backporting and recycling by hand: a registered Δ applied to a registered base, no training.

Both are one operation (m_t + α·Δ) with a name saying which way it goes: `backport` (a newer Δ onto
an older base) and `recycle` (a Δ onto another base, typically newer). The result is evaluated the way
the family's cycles evaluate (give its spec) and registered as a merged model whose lineage points at
the Δ and the base. The workspace folder is keyed by everything that determines the result (Δ and
base digests, α), so a second request with another α never reuses the first one's model.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict

from recycler.errors import InvalidConfig, InvalidReleaseId, RecyclerError
from recycler.registry.names import Lineage
from recycler.service import steps
from recycler.service.cycle import StepRunner, run_locally
from recycler.service.services import Services
from recycler.service.spec import CycleSpec, EvalSettings
from recycler.service.workspace import Workspace
from recycler.store.releases import check_id, check_version

How = Literal["backport", "recycle"]


class TransferRequest(BaseModel):
    """What a manual transfer needs: a family's spec, or its family, variant and evaluation settings."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    family: str
    variant: str = "instruct"
    evaluation: EvalSettings
    alpha: float = 1.0

    @classmethod
    def of(
        cls,
        spec: CycleSpec | None = None,
        *,
        family: str | None = None,
        variant: str | None = None,
        evaluation: EvalSettings | None = None,
        alpha: float | None = None,
    ) -> TransferRequest:
        """The spec's settings, each overridden by an explicit value."""
        family = family or (spec.family if spec else None)
        evaluation = evaluation or (spec.evaluation if spec else None)
        if family is None or evaluation is None:
            raise InvalidConfig(
                "a backport or recycle needs the family's spec (spec=…, or --spec family.yaml), "
                "or family=… and evaluation={task: …} (the same fields as the spec's evaluation block)"
            )
        variant = variant or (spec.variant if spec else "instruct")
        alpha = alpha if alpha is not None else (spec.alpha if spec else 1.0)
        return cls(
            family=check_id(family), variant=check_id(variant, "variant"), evaluation=evaluation, alpha=alpha
        )


def run_transfer(
    how: How,
    diff: str,
    target_version: str,
    request: TransferRequest,
    *,
    services: Services | None = None,
    run: StepRunner = run_locally,
) -> dict:
    """Apply the registered Δ `diff` (NAME/VERSION or NAME@ALIAS) to base `target_version` of the
    request's family, evaluate base and result, and register the result as a merged model."""
    check_version(target_version)
    svc = services or Services.from_settings()
    family, variant = request.family, request.variant
    delta_v = run(f"resolve {diff}", svc.registry.resolve, diff)
    if delta_v.kind != "diff":
        raise RecyclerError(f"{diff} is a {delta_v.kind!r} version, not a Δ")
    base_v = run(f"find base {target_version}", svc.registry.base_version, family, target_version)
    if base_v is None:
        raise InvalidReleaseId(
            f"base {target_version!r} of {family!r} is not registered; run its cycle first"
        )
    ws = Workspace.for_release(svc.settings.home, family, variant, target_version)
    key = _content_key(delta_v.digest, base_v.digest, request.alpha)
    base = run(
        f"fetch base {target_version}",
        steps.fetch_verified,
        svc.store,
        base_v.artifact,
        ws.root / "base-fetched",
    )
    diff_dir = run(
        f"fetch Δ {delta_v.reference}",
        steps.fetch_verified,
        svc.store,
        delta_v.artifact,
        ws.root / f"diff-{delta_v.digest[:16]}",
    )
    out = run(
        f"apply Δ to base {target_version}",
        steps.apply_step,
        base,
        diff_dir,
        ws.transfer(how, key),
        request.alpha,
    )
    evaluation = request.evaluation
    scores = {
        "base": run("evaluate base", steps.evaluate_cached, svc, base, evaluation, ws.evals, name="base"),
        "merged": run(f"evaluate {how}", steps.evaluate_cached, svc, out, evaluation, ws.evals, name=how),
    }
    lineage = Lineage(
        parent_diff=delta_v.reference, transfer=how, diff_base_version=delta_v.tags.get("base_version")
    )
    merged_v = run(
        f"register {how}", steps.publish_and_register, svc, out, "merged", family, variant, target_version,
        lineage=lineage, score=scores["merged"],
    )  # fmt: skip
    return {
        "diff": delta_v.reference,
        "target": target_version,
        "alpha": request.alpha,
        "scores": scores,
        "registered": merged_v.reference,
    }


def _content_key(delta_digest: str, base_digest: str, alpha: float) -> str:
    """A name for the output folder from everything that determines its bytes."""
    inputs = json.dumps({"delta": delta_digest, "base": base_digest, "alpha": alpha}, sort_keys=True)
    return hashlib.sha256(inputs.encode()).hexdigest()[:16]
