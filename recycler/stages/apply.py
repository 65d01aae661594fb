"""Write m_t + α·Δ as a loadable checkpoint, streaming: recycling (old Δ → new base) and backporting
(new Δ → old base) are the same operation.

Δ comes from a stored artifact (`apply_diff`) or is computed on the fly from a (base, fine-tuned)
pair without being written (`recycle`, one pass over three checkpoints). Every mismatch between Δ and
the target goes through `ApplyPolicy` and into the CompatibilityReport saved with the output.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from recycler.delta.compat import Job, Side, plan_transfer
from recycler.delta.policy import ApplyPolicy, CompatibilityReport
from recycler.io.atomic import atomic_folder
from recycler.io.checkpoint import (
    GENERATION_CONFIG,
    TOKENIZER_FILES,
    Checkpoint,
    load_vocab,
    open_checkpoint,
)
from recycler.io.manifest import (
    fail_if,
    fingerprint,
    listed_file_problems,
    write_manifest,
)
from recycler.io.reader import WINDOW, compute_threads
from recycler.io.safetensors import TensorEntry
from recycler.io.writer import DEFAULT_SHARD_BYTES, PlannedTensor, ShardedWriter
from recycler.stages.engine import stream_apply
from recycler.stages.pair_checks import DEFAULT_MAX_RELATIVE_NORM
from recycler.stages.sources import (
    DeltaInputs,
    applied_delta,
    fine_tune_delta,
    has_tokenizer,
)

Progress = Callable[[int], None]
Planner = Callable[[Side[TensorEntry]], tuple[list[Job[TensorEntry]], CompatibilityReport]]


@dataclass(frozen=True)
class TransferResult:
    path: Path
    manifest: dict
    report: CompatibilityReport


def apply_diff(target_path: Path, diff_path: Path, out: Path, **kw) -> TransferResult:
    """m_t + α·Δ from a stored Δ artifact, or from a LoRA adapter's factors (scale·B·A, no base needed
    unless it saves modules whole). See `transfer` for keyword arguments."""
    return transfer(target_path, applied_delta(diff_path), out, inputs=[Path(diff_path)], **kw)


def recycle(
    base_path: Path,
    tuned_path: Path,
    target_path: Path,
    out: Path,
    *,
    max_relative_norm: float = DEFAULT_MAX_RELATIVE_NORM,
    allow_other_base: bool = False,
    **kw,
) -> TransferResult:
    """m_t + α·(m′_s − m_s) in one streaming pass, without writing Δ; m′_s may be a LoRA adapter.

    Refuses what `diff` refuses, with the same errors: UnrelatedModels when ‖Δ‖/‖base‖ over weight
    matrices exceeds `max_relative_norm` (nothing is published), IncompatibleCheckpoints when a
    non-float tensor differs between base and fine-tune."""
    delta = fine_tune_delta(
        base_path, tuned_path, allow_other_base=allow_other_base, max_relative_norm=max_relative_norm
    )
    return transfer(target_path, delta, out, inputs=[Path(base_path), Path(tuned_path)], **kw)


# -- writing --------------------------------------------------------------------------------------


def transfer(
    target_path: Path,
    delta: DeltaInputs,
    out: Path,
    *,
    inputs: list[Path] = (),
    policy: ApplyPolicy = ApplyPolicy(),
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
    target_id: str | None = None,
    on_progress: Progress | None = None,
    planner: Planner | None = None,
    manifest_extra: dict | None = None,
) -> TransferResult:
    """Stream target + α·Δ into `out` (atomic). Validation and planning happen before any write.

    The manifest depends on content only (digests, dtype, α, policy, tool version): the same inputs
    from any folder give the same bytes, hence one address. `target_id` is recorded only if given.
    `planner` replaces the one-Δ plan (composition: `recycler.stages.compose`); `manifest_extra` adds
    to (or overrides) the manifest's keys.
    """
    target = open_checkpoint(target_path)
    side = Side(
        target.tensors, target.vocab_size, target.tied_embeddings, load_vocab(target.path), str(target.path)
    )
    jobs, report = planner(side) if planner is not None else plan_transfer(side, delta.side, policy)
    plan = [PlannedTensor(j.entry.name, j.entry.dtype, j.entry.shape) for j in jobs]
    with atomic_folder(out, [target.path, *inputs], overwrite=overwrite) as tmp, ThreadPoolExecutor(1) as bg:
        checked = _start_check(bg, delta)
        with compute_threads() as workers:
            writer = ShardedWriter(tmp, plan, max_shard_bytes, pool=WINDOW + 3, lanes=workers)
            try:
                stream_apply(jobs, delta.open, policy.alpha, writer, on_progress, workers)
                digests = writer.close()
            except BaseException:
                writer.abort()
                raise
        if delta.before_publish is not None:
            delta.before_publish()
        if checked is not None:
            fail_if(
                checked.result(),
                f"{delta.side_folder}: Δ altered, output not published (run `recycler verify`)",
            )
        _write_side_files(target, delta, report, policy, tmp)
        (tmp / "compatibility.json").write_text(report.model_dump_json(indent=2) + "\n")
        target_src = {"fingerprint": fingerprint(target)} | ({"id": target_id} if target_id else {})
        body = {
            "kind": "model",
            "alpha": policy.alpha,
            "policy": policy.model_dump(mode="json"),
            "sources": {"target": target_src, "delta": delta.provenance},
            "tensor_count": len(plan),
            "vocab_size": target.vocab_size,
            **(manifest_extra or {}),
        }
        manifest = write_manifest(tmp, body, dict(digests))
    return TransferResult(Path(out), manifest, report)


def _start_check(pool: ThreadPoolExecutor, delta: DeltaInputs) -> Future[list[str]] | None:
    """Re-hash the files the output's correctness rests on (the residual) beside the arithmetic."""
    if not delta.must_match:
        return None
    return pool.submit(listed_file_problems, delta.side_folder, delta.must_match, workers=1)


def _write_side_files(
    target: Checkpoint, delta: DeltaInputs, report: CompatibilityReport, policy: ApplyPolicy, tmp: Path
) -> None:
    """config.json from the target; tokenizer, chat template and generation config per policy."""
    shutil.copy2(target.path / "config.json", tmp / "config.json")
    same_vocab = report.vocab is None or report.vocab["method"] == "identity"
    choice = policy.tokenizer_from
    if choice == "auto":
        choice = "source" if same_vocab and has_tokenizer(delta.side_folder) else "target"
    folder = delta.side_folder if choice == "source" else target.path
    for n in (*TOKENIZER_FILES, GENERATION_CONFIG):
        if (folder / n).is_file():
            shutil.copy2(folder / n, tmp / n)
    report.tokenizer = (
        f"tokenizer and generation config from the {'fine-tuned source' if choice == 'source' else 'target'}"
    )
    if choice == "target" and not (tmp / "chat_template.jinja").exists():
        template = _chat_template(delta.side_folder)
        if template:
            (tmp / "chat_template.jinja").write_text(template)
            report.tokenizer += (
                "; chat template from the fine-tuned source (vocabularies differ: check its special tokens)"
            )
    if not same_vocab and choice == "source":
        report.notes.append("tokenizer forced from the source although vocabularies differ")


def _chat_template(folder: Path) -> str | None:
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    cfg = folder / "tokenizer_config.json"
    if cfg.is_file():
        template = json.loads(cfg.read_text()).get("chat_template")
        return template if isinstance(template, str) else None
    return None
