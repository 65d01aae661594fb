"""Manual transfers as Prefect flows: `backport` (a newer Δ onto an older base) and `recycle` (a Δ onto
another base), one flow definition for both: recycler.service.transfer.run_transfer with each step a
task. Deployments: `backport/manual` and `recycle/manual` (infra/prefect.yaml)."""

from __future__ import annotations

from prefect import Flow, flow
from recycler_flows.tasks import prefect_step

from recycler.service.transfer import How, TransferOptions, run_transfer

DOCS = {
    "backport": "Apply a newer Δ (e.g. `fam-instruct-diff@next-diff`) to an older registered base, no training.",
    "recycle": "Apply a Δ to another registered base (typically a newer one), no training.",
}


def transfer_flow(how: How) -> Flow:
    def transfer(
        diff: str,
        target_version: str,
        family: str,
        eval_task: str,
        variant: str = "instruct",
        evaluation: TransferOptions | None = None,
    ) -> dict:
        options = evaluation or TransferOptions()
        return run_transfer(how, diff, target_version, family, variant, eval_task, options, run=prefect_step)

    transfer.__name__ = transfer.__qualname__ = how
    transfer.__doc__ = DOCS[how]
    return flow(name=how, log_prints=True)(transfer)


backport = transfer_flow("backport")
recycle = transfer_flow("recycle")
