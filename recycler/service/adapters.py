"""A Δ in adapter form, as the service publishes it: for teams that ship LoRA adapters, not merged models.

The exact Δ stays what the chain recycles (Δ^iter is full rank); its adapter form is a by-product: a
truncated SVD per module (`recycler.stages.to_lora`) for one base, registered as
`{family}-{variant}-lora` with `source_diff` naming the Δ (and the Δ tagged `adapter` back), and
scored on the family's task as base + B·A, so the registry shows what the low rank cost next to the
full Δ's score. Every step is idempotent: the adapter folder is reused only if made from the same Δ,
base and form, and registration deduplicates by manifest digest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from recycler.crashpoints import crash_point
from recycler.io.manifest import manifest_digest, read_manifest
from recycler.registry.names import Lineage, RegisteredVersion
from recycler.registry.runlog import log_metrics
from recycler.registry.runs import child_run
from recycler.service import steps
from recycler.stages.gate import Evidence

if TYPE_CHECKING:
    from recycler.service.services import Services
    from recycler.service.spec import AdapterForm, EvalSettings

StepRunner = Callable[..., object]


def adapter_step(
    delta: Path,
    base: Path,
    dest: Path,
    form: AdapterForm,
    *,
    scale: float = 1.0,
    parent_run: str | None = None,
    name: str,
) -> Path:
    """Δ → PEFT LoRA adapter for `base` (its shapes checked), reused only if made from the same Δ,
    base and form. The adapter records the base's own `_name_or_path`, if it has one."""
    from recycler.io.checkpoint import open_checkpoint
    from recycler.stages.sources import stored_delta
    from recycler.stages.to_lora import delta_to_lora

    inputs = {
        "op": "to-lora",
        "delta": manifest_digest(delta),
        "base": manifest_digest(base),
        "form": form.model_dump(),
        "scale": scale,
    }
    if not steps.reusable(dest, inputs):
        target = open_checkpoint(base)
        base_name = (target.config or {}).get("_name_or_path") or None
        with child_run(parent_run, name, params=inputs) as run_id:
            result = delta_to_lora(
                stored_delta(delta),
                dest,
                rank=form.rank,
                energy=form.energy,
                base_name=base_name if isinstance(base_name, str) else None,
                target=target,
                inputs=[delta, base],
                overwrite=True,
                scale=scale,
            )
            m = result.manifest
            log_metrics(
                {"lora_error": m["relative_error_all"], "lora_rank_max": m["ranks"]["max"]}
                | {f"lora_error_{k}": v for k, v in m["relative_error"].items()},
                run_id=run_id,
            )
    return dest


def cost_tags(adapter: Path) -> dict[str, str]:
    """What the low rank cost, as the adapter's status tags (`lora_ranks`, `lora_error`)."""
    body, _ = read_manifest(adapter)
    method, ranks = body["method"], body["ranks"]
    how = (
        f"rank {method['rank']}"
        if "rank" in method
        else f"energy {method['energy']:g}: {ranks['min']}-{ranks['max']}"
    )
    return {"lora_ranks": how, "lora_error": f"{body['relative_error_all']:.4g}"}


def publish_adapter(
    svc: Services,
    run: StepRunner,
    *,
    delta_v: RegisteredVersion,
    delta: Path,
    base: Path,
    folder: Path,
    form: AdapterForm,
    evaluation: EvalSettings,
    evals: Path,
    lineage: Lineage,
    scale: float = 1.0,
    release_fingerprint: str = "",
    parent_run: str | None = None,
) -> tuple[RegisteredVersion, Evidence]:
    """Make the adapter of registered Δ `delta_v` for `base`, score base + B·A, register it (lineage:
    `lineage` with `source_diff` = the Δ) and, on the Δ's own base, tag the Δ with it (an adapter for
    another base is found from the Δ by its `source_diff`). Returns the version and its score."""
    family, variant, version = delta_v.family, delta_v.variant or "", folder.parent.name
    what = f"LoRA adapter ({form.label()}) of {delta_v.reference} for base {version}"
    adapter = run(
        f"make {what}",
        adapter_step,
        delta,
        base,
        folder,
        form,
        scale=scale,
        parent_run=parent_run,
        name=f"make {what}",
    )
    applied = folder.parent / f"{folder.name}-applied"
    label = f"apply {what}"
    model = run(label, steps.apply_step, base, adapter, applied, 1.0, parent_run=parent_run, name=label)
    evidence = run(f"evaluate {what}", steps.evaluate_cached, svc, model, evaluation, evals, name="lora", parent_run=parent_run)  # fmt: skip
    lineage = replace(lineage, source_diff=delta_v.reference)
    lora_v = run(
        f"register {what}",
        steps.publish_and_register,
        svc,
        adapter,
        "lora",
        family,
        variant,
        version,
        lineage=lineage,
        score=evidence,
        status=cost_tags(adapter),
        fingerprint=release_fingerprint,
    )
    crash_point("adapter:registered")
    if delta_v.tags.get("base_version") == version:  # its own base: the Δ's one adapter form
        run(
            f"link {delta_v.reference} to its adapter",
            svc.registry.set_tags,
            delta_v,
            {"adapter": lora_v.reference},
        )
    return lora_v, evidence
