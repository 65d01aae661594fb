"""A family that already has a fine-tune joins the service without retraining it.

Teams arrive with a fine-tune of the release they use today: a full checkpoint, or (most often) a
PEFT LoRA adapter trained on it. The spec's `initial_finetune` names it, and the first cycle adopts
it as M*_1 instead of fine-tuning: the model is written as M_1 + (fine-tune − M_1), which for a full
checkpoint is the fine-tune bit for bit (the apply's round-trip refinement) and for an adapter is
M_1 + scale·B·A rounded once. Everything after is the ordinary cycle: it is scored, gated,
registered (role `adopted`), and its Δ = M*_1 − M_1 is what the next release recycles.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from recycler.io.manifest import fingerprint, manifest_digest
from recycler.service import steps

if TYPE_CHECKING:
    from recycler.service.spec import CycleSpec

log = logging.getLogger(__name__)


def content(finetune: Path) -> dict:
    """What an adoption depends on: the adapter's files, or every weight file of the checkpoint."""
    from recycler.io.adapter import is_adapter, open_adapter
    from recycler.io.checkpoint import open_checkpoint
    from recycler.stages.sources import adapter_fingerprint

    if is_adapter(finetune):
        return adapter_fingerprint(open_adapter(finetune))
    return fingerprint(open_checkpoint(finetune), full=True)


def adopt_step(base: Path, finetune: Path, dest: Path, spec: CycleSpec) -> dict:
    """M*_1 = M_1 + (fine-tune − M_1) in `dest`, refused as `recycler recycle` refuses (unrelated models,
    an adapter whose shapes do not fit M_1); returns the record a fine-tune would have (no steps).

    An adapter's recorded base name is not required to match: the spec declares it was trained on
    this family's first release, and its shapes are checked against it."""
    from recycler.io.adapter import is_adapter
    from recycler.stages.apply import recycle

    adapter = is_adapter(finetune)
    inputs = {"op": "adopt", "base": manifest_digest(base), "finetune": content(finetune)}
    if not steps.reusable(dest, inputs):
        recycle(base, finetune, base, dest, overwrite=True, allow_other_base=True, max_relative_norm=spec.max_relative_norm)  # fmt: skip
        log.info("adopted %s %s as the fine-tune of %s", "adapter" if adapter else "fine-tune", finetune, dest.parent.name)  # fmt: skip
    return {
        "adopted": {"path": str(finetune), "adapter": adapter},
        "steps": 0,
        "curve": [],
        "wall_time_s": 0.0,
    }
