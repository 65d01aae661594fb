"""Manual transfers as Prefect flows: `backport` (a newer Δ onto an older base) and `recycle` (a Δ onto
another base), one flow definition for both: recycler.service.transfer.run_transfer with each step a
task. Deployments: `backport/manual` and `recycle/manual` (infra/prefect.yaml)."""

from __future__ import annotations

from typing import Any

from prefect import Flow, flow
from prefect.runtime import flow_run
from recycler_flows.tasks import library_logs, prefect_step, summary_artifact

from recycler.service.composition import ComposedPart
from recycler.service.spec import AdapterForm, CycleSpec, EvalSettings
from recycler.service.summary import transfer_note
from recycler.service.transfer import How, Output, TransferRequest, run_transfer

DOCS = {
    "backport": "Apply a newer Δ (e.g. `fam-instruct-diff@next-diff`) to an older registered base, no training.",
    "recycle": "Apply a Δ to another registered base (typically a newer one), no training.",
}
PARAMETERS = """

Parameters: `diff` (NAME@ALIAS or NAME/VERSION), `target_version` (a registered base release), and
either `spec` (the family's CycleSpec: family, variant, evaluation and alpha come from it) or `family`,
`variant` and `evaluation` ({task, limit, extract, max_new_tokens, batch_size, normalize, chat}, the
names of `recycler evaluate`'s options); `alpha` overrides the spec's scale of Δ. `output`: `merged` (a
model) or `adapter` (α·Δ as a PEFT LoRA adapter for the target base, registered as
`{family}-{variant}-lora`), with `adapter` = {rank: R} or {energy: E} (default: the spec's `adapter:`).
`add`: further Δs, [{diff, alpha}, …], summed in the same pass (merged output; lineage tag `composed_of`)."""


def transfer_flow(how: How) -> Flow:
    def transfer(
        diff: str,
        target_version: str,
        spec: CycleSpec | None = None,
        family: str | None = None,
        variant: str | None = None,
        evaluation: EvalSettings | None = None,
        alpha: float | None = None,
        output: Output = "merged",
        adapter: AdapterForm | None = None,
        add: list[ComposedPart] | None = None,
    ) -> dict[str, Any]:
        request = TransferRequest.of(
            spec,
            family=family,
            variant=variant,
            evaluation=evaluation,
            alpha=alpha,
            output=output,
            adapter=adapter,
            add=tuple(add or ()),
        )
        with library_logs():
            result = run_transfer(how, diff, target_version, request, run=prefect_step)
        title, note = f"{how} {result.diff} {target_version}", lambda ui: transfer_note(result, ui=ui)
        summary_artifact(title, note, result.run_id, f"{how} → {result.registered}")
        return result.model_dump(mode="json")

    def run_name() -> str:
        p = flow_run.parameters
        return f"{how} {p.get('diff', '?')} → {p.get('target_version', '?')}"

    transfer.__name__ = transfer.__qualname__ = how
    transfer.__doc__ = DOCS[how] + PARAMETERS
    return flow(name=how, flow_run_name=run_name, log_prints=True)(transfer)


backport = transfer_flow("backport")
recycle = transfer_flow("recycle")
