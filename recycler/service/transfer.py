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
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from recycler.errors import InvalidConfig, InvalidReleaseId, RecyclerError
from recycler.registry.names import Lineage, RegisteredVersion, composed_of
from recycler.service import steps
from recycler.service.adapters import publish_adapter
from recycler.service.composition import ComposedPart, compose_step
from recycler.service.cycle import StepRunner, run_locally
from recycler.service.services import Services
from recycler.service.spec import AdapterForm, CycleSpec, EvalSettings
from recycler.service.summary import log_transfer
from recycler.service.workspace import Workspace
from recycler.stages.gate import Evidence
from recycler.store.releases import check_id, check_version

How = Literal["backport", "recycle"]
Output = Literal["merged", "adapter"]
log = logging.getLogger(__name__)


class TransferRequest(BaseModel):
    """What a manual transfer needs: a family's spec, or its family, variant and evaluation settings."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    family: str
    variant: str = "instruct"
    evaluation: EvalSettings
    alpha: float = 1.0
    output: Output = "merged"
    adapter: AdapterForm | None = None  # with output "adapter": its rank or energy
    add: tuple[ComposedPart, ...] = ()  # further Δs summed in the same pass (merged output only)

    @classmethod
    def of(
        cls,
        spec: CycleSpec | None = None,
        *,
        family: str | None = None,
        variant: str | None = None,
        evaluation: EvalSettings | None = None,
        alpha: float | None = None,
        output: Output = "merged",
        adapter: AdapterForm | None = None,
        add: tuple[ComposedPart, ...] = (),
    ) -> TransferRequest:
        """The spec's settings, each overridden by an explicit value. An adapter output takes its rank
        or energy from `adapter`, else from the spec's `adapter:`."""
        family = family or (spec.family if spec else None)
        evaluation = evaluation or (spec.evaluation if spec else None)
        if family is None or evaluation is None:
            raise InvalidConfig(
                "a backport or recycle needs the family's spec (spec=…, or --spec family.yaml), "
                "or family=… and evaluation={task: …} (the same fields as the spec's evaluation block)"
            )
        variant = variant or (spec.variant if spec else "instruct")
        alpha = alpha if alpha is not None else (spec.alpha if spec else 1.0)
        adapter = adapter or (spec.adapter if spec else None)
        if output == "adapter" and adapter is None:
            raise InvalidConfig(
                "an adapter output needs its rank or energy: --rank R or --energy E (or the spec's `adapter:`)"
            )
        if add and output == "adapter":
            raise InvalidConfig("an adapter output is made from one Δ; compose into a merged model instead")
        return cls(
            family=check_id(family), variant=check_id(variant, "variant"), evaluation=evaluation,
            alpha=alpha, output=output, adapter=adapter if output == "adapter" else None, add=tuple(add),
        )  # fmt: skip


class TransferResult(BaseModel):
    """What a backport or recycle did: the scores of the base and of base + α·Δ, and the version."""

    how: How
    diff: str
    target: str
    base: str
    alpha: float
    scores: dict[str, float]  # "base", and "merged": the base with α·Δ applied (as B·A for an adapter)
    registered: str
    output: Output = "merged"
    run_id: str | None = None


def run_transfer(
    how: How,
    diff: str,
    target_version: str,
    request: TransferRequest,
    *,
    services: Services | None = None,
    run: StepRunner = run_locally,
) -> TransferResult:
    """Apply the registered Δ `diff` (NAME/VERSION or NAME@ALIAS) to base `target_version` of the
    request's family, evaluate base and result, and register the result as a merged model. One MLflow
    run (found again by its inputs on a repeat) holds the steps and points at the version."""
    from recycler.registry.runs import TRANSFER_TAG, keyed_run

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
    added = [run(f"resolve {p.diff}", svc.registry.resolve, p.diff) for p in request.add]
    if bad := [
        f"{p.diff} is a {v.kind!r} version"
        for p, v in zip(request.add, added, strict=True)
        if v.kind != "diff"
    ]:
        raise RecyclerError("; ".join(bad) + ", not a Δ")
    form = request.adapter.model_dump() if request.adapter else None
    extra = [(v.digest, p.alpha) for p, v in zip(request.add, added, strict=True)]
    key = _content_key(delta_v.digest, base_v.digest, request.alpha, form, extra)
    alphas = [request.alpha] + [p.alpha for p in request.add]
    composition = composed_of([v.reference for v in (delta_v, *added)], alphas) if added else ""
    params = {"how": how, "diff": delta_v.reference, "target": target_version, "base": base_v.reference,
              "family": family, "variant": variant, "alpha": request.alpha, "output": request.output,
              **({"adapter": request.adapter.label()} if request.adapter else {}),
              **({"composed_of": composition} if composition else {})}  # fmt: skip
    name = f"{how} {delta_v.reference} → {target_version}"
    key_of_run = f"{how}/{family}/{variant}/{target_version}/{key}"
    with keyed_run(key_of_run, name, params, tag=TRANSFER_TAG, settings=svc.settings) as run_id:
        t = _Transfer(how, svc, run, request, Workspace.for_release(svc.settings.home, family, variant, target_version), run_id)  # fmt: skip
        result = t.perform(delta_v, base_v, key, added, composition)
        run(f"log {how}", log_transfer, svc, result)
    log.info("%s of %s onto %s: accuracy %.1f%% → %.1f%%; registered %s", how, result.diff, result.base,
             100 * result.scores["base"], 100 * result.scores["merged"], result.registered)  # fmt: skip
    return result


@dataclass
class _Transfer:
    """The steps of one transfer, inside its MLflow run."""

    how: How
    svc: Services
    run: StepRunner
    request: TransferRequest
    ws: Workspace
    run_id: str | None

    def perform(self, delta_v: RegisteredVersion, base_v: RegisteredVersion, key: str, added: list[RegisteredVersion], composition: str) -> TransferResult:  # fmt: skip
        run, svc, ws, how, req, target = self.run, self.svc, self.ws, self.how, self.request, self.ws.version
        base = run(f"fetch base {target}", steps.fetch_verified, svc.store, base_v.artifact, ws.root / "base-fetched")  # fmt: skip
        fetched = ws.root / f"diff-{delta_v.digest[:16]}"
        diff = run(f"fetch Δ {delta_v.reference}", steps.fetch_verified, svc.store, delta_v.artifact, fetched)
        evidence = {"base": self.evaluate(f"evaluate base {target}", base, "base")}
        if req.adapter is not None:  # α·Δ as a LoRA adapter for this base
            lineage = Lineage(
                transfer=how, diff_base_version=delta_v.tags.get("base_version"), run_id=self.run_id
            )
            registered, evidence["merged"] = publish_adapter(
                svc, run, delta_v=delta_v, delta=diff, base=base, folder=ws.root / f"{how}-lora-{key}",
                form=req.adapter, evaluation=req.evaluation, evals=ws.evals, lineage=lineage, scale=req.alpha,
                release_fingerprint=base_v.fingerprint, parent_run=self.run_id,
            )  # fmt: skip
        else:
            status = {"composed_of": composition} if composition else {}
            if added:  # base + α·Δ + Σ α_i·Δ_i, rounded once
                diffs = [diff] + [run(f"fetch Δ {v.reference}", steps.fetch_verified, svc.store, v.artifact, ws.root / f"diff-{v.digest[:16]}") for v in added]  # fmt: skip
                alphas = [req.alpha] + [p.alpha for p in req.add]
                label = f"compose {composition} onto base {target}"
                out = run(label, compose_step, base, diffs, alphas, ws.transfer(how, key), parent_run=self.run_id, name=label)  # fmt: skip
            else:
                apply = f"apply Δ {delta_v.reference} to base {target}"
                out = run(apply, steps.apply_step, base, diff, ws.transfer(how, key), req.alpha, parent_run=self.run_id, name=apply)  # fmt: skip
            evidence["merged"] = self.evaluate(f"evaluate {how}", out, how)
            lineage = Lineage(parent_diff=delta_v.reference, transfer=how, diff_base_version=delta_v.tags.get("base_version"), run_id=self.run_id)  # fmt: skip
            registered = run(f"register {how}", steps.publish_and_register, svc, out, "merged", req.family, req.variant,
                             target, lineage=lineage, score=evidence["merged"], status=status)  # fmt: skip
        scores = {k: e.score for k, e in evidence.items()}
        return TransferResult(how=how, diff=delta_v.reference, target=target, base=base_v.reference, alpha=req.alpha,
                              scores=scores, registered=registered.reference, output=req.output, run_id=self.run_id)  # fmt: skip

    def evaluate(self, label: str, model: Path, name: str) -> Evidence:
        ev, evals = self.request.evaluation, self.ws.evals
        return self.run(
            label, steps.evaluate_cached, self.svc, model, ev, evals, name=name, parent_run=self.run_id
        )


def _content_key(
    delta_digest: str,
    base_digest: str,
    alpha: float,
    adapter: dict | None = None,
    added: list[tuple[str, float]] = (),
) -> str:
    """A name for the output folder from everything that determines its bytes (an adapter output's
    form and further Δs included; a plain merged output's key is what it was before those existed)."""
    body = {"delta": delta_digest, "base": base_digest, "alpha": alpha}
    body |= ({"adapter": adapter} if adapter else {}) | ({"added": [list(a) for a in added]} if added else {})
    inputs = json.dumps(body, sort_keys=True)
    return hashlib.sha256(inputs.encode()).hexdigest()[:16]
