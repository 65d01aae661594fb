"""Backporting and recycling by hand: a registered Δ applied to a registered base, no training.

Both are one operation (m_t + α·Δ) with a name saying which way it goes: `backport` (a newer Δ onto
an older base) and `recycle` (a Δ onto another base, typically newer). The result is evaluated and
registered as a merged model whose lineage points at the Δ and the base.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from recycler.errors import InvalidReleaseId, RecyclerError
from recycler.registry.names import Lineage
from recycler.service import steps
from recycler.service.cycle import StepRunner, run_locally
from recycler.service.services import Services
from recycler.service.spec import EvalSettings
from recycler.service.workspace import Workspace
from recycler.store.releases import check_id, check_version

How = Literal["backport", "recycle"]


class TransferOptions(BaseModel):
    """How a manual transfer is scaled and evaluated (a cycle takes these from its family's spec)."""

    alpha: float = 1.0
    extract: Literal["number", "text"] = "number"
    max_new_tokens: int = 256
    limit: int | None = None


def run_transfer(
    how: How,
    diff: str,
    target_version: str,
    family: str,
    variant: str,
    eval_task: str,
    options: TransferOptions,
    *,
    services: Services | None = None,
    run: StepRunner = run_locally,
) -> dict:
    """Apply the registered Δ `diff` (NAME/VERSION or NAME@ALIAS) to base `target_version` of `family`,
    evaluate base and result, and register the result as a merged model with lineage."""
    check_id(family)
    check_id(variant, "variant")
    check_version(target_version)
    svc = services or Services.from_settings()
    delta_v = run(f"resolve {diff}", svc.registry.resolve, diff)
    if delta_v.kind != "diff":
        raise RecyclerError(f"{diff} is a {delta_v.kind!r} version, not a Δ")
    base_v = run(f"find base {target_version}", svc.registry.base_version, family, target_version)
    if base_v is None:
        raise InvalidReleaseId(
            f"base {target_version!r} of {family!r} is not registered; run its cycle first"
        )
    evaluation = EvalSettings(
        task=eval_task, limit=options.limit, extract=options.extract, max_new_tokens=options.max_new_tokens
    )
    ws = Workspace.for_release(svc.settings.home, family, variant, target_version)
    base = run(
        f"fetch base {target_version}",
        steps.fetch_verified,
        svc.store,
        base_v.artifact,
        ws.root / "base-fetched",
    )
    key = f"{delta_v.version}"
    diff_dir = run(
        f"fetch Δ {delta_v.reference}",
        steps.fetch_verified,
        svc.store,
        delta_v.artifact,
        ws.transfer(f"{how}-diff", key),
    )
    out = run(
        f"apply Δ to base {target_version}",
        steps.apply_step,
        base,
        diff_dir,
        ws.transfer(how, key),
        options.alpha,
    )
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
        "scores": scores,
        "registered": merged_v.reference,
    }
