"""Write m_t + α·Δ as a loadable checkpoint, streaming: recycling (old Δ → new base) and backporting
(new Δ → old base) are the same operation.

Δ comes from a stored artifact (`apply_diff`) or is computed on the fly from a (base, fine-tuned)
pair without being written (`recycle`, one pass over three checkpoints). Every mismatch between Δ and
the target goes through `ApplyPolicy` and into the CompatibilityReport saved with the output.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from recycler.delta.compat import Job, Side, compare_tensor_sets, plan_transfer
from recycler.delta.math import apply_into, squared_norm
from recycler.delta.policy import ApplyPolicy, CompatibilityReport
from recycler.errors import IncompatibleCheckpoints, InvalidCheckpoint, NonFiniteValues
from recycler.io.atomic import atomic_folder
from recycler.io.checkpoint import GENERATION_CONFIG, TOKENIZER_FILES, Checkpoint, load_vocab, open_checkpoint
from recycler.io.manifest import fingerprint, manifest_digest, write_manifest
from recycler.io.reader import (
    DTYPES,
    WINDOW,
    ChunkReader,
    DeltaSource,
    PairDelta,
    RowMapped,
    StoredDelta,
    chunk_ranges,
    compute_threads,
    ordered_map,
)
from recycler.io.safetensors import TensorEntry
from recycler.io.writer import DEFAULT_SHARD_BYTES, PlannedTensor, ShardedWriter

Progress = Callable[[int], None]
FP16_MAX = 65504.0


@dataclass
class DeltaInputs:
    """What planning needs to know about a Δ, wherever its values come from."""

    side: Side[TensorEntry]  # tensors (for a pair: the base's entries), vocabulary, tied embeddings
    side_folder: Path  # holds the fine-tuned source's tokenizer and generation config
    provenance: dict
    make: Callable[[ChunkReader, str], DeltaSource]


@dataclass(frozen=True)
class TransferResult:
    path: Path
    manifest: dict
    report: CompatibilityReport


def stored_delta(diff_path: Path) -> DeltaInputs:
    """A Δ artifact written by `recycler diff` (its manifest must say kind 'diff')."""
    ck = open_checkpoint(diff_path, require_config=False)
    m = ck.manifest
    if not m or m.get("kind") != "diff":
        raise InvalidCheckpoint(
            f"{diff_path}: not a recycler Δ (no manifest.json of kind 'diff'); create one with `recycler diff`"
        )
    for rel, want in m.get("files", {}).items():
        p = ck.path / rel
        if not p.is_file() or p.stat().st_size != want["size"]:
            raise InvalidCheckpoint(
                f"{diff_path}: Δ incomplete or altered: {rel} missing or of the wrong size; run `recycler verify`"
            )
    entries = ck.tensors
    side = Side(
        entries, m.get("vocab_size"), bool(m.get("tied_embeddings")), load_vocab(ck.path), str(ck.path)
    )
    return DeltaInputs(
        side=side,
        side_folder=ck.path,
        provenance={
            "kind": "stored",
            "path": str(ck.path),
            "manifest_sha256": manifest_digest(ck.path),
            "sources": m.get("sources"),
        },
        make=lambda chunks, name: StoredDelta(chunks, entries[name]),
    )


def pair_delta(base_path: Path, tuned_path: Path) -> DeltaInputs:
    """Δ = tuned − base, never materialised."""
    base, tuned = open_checkpoint(base_path), open_checkpoint(tuned_path)
    problems = compare_tensor_sets(base.tensors, tuned.tensors)
    if problems:
        raise IncompatibleCheckpoints(f"cannot diff {tuned.path} against {base.path}: " + "; ".join(problems))
    tensors = {n: e for n, e in base.tensors.items() if e.is_float}
    side = Side(
        tensors,
        tuned.vocab_size,
        tuned.tied_embeddings,
        load_vocab(tuned.path),
        f"{tuned.path} − {base.path}",
    )
    return DeltaInputs(
        side=side,
        side_folder=tuned.path,
        provenance={"kind": "pair", "base": fingerprint(base), "tuned": fingerprint(tuned)},
        make=lambda chunks, name: PairDelta(chunks, base.tensors[name], tuned.tensors[name]),
    )


def apply_diff(target_path: Path, diff_path: Path, out: Path, **kw) -> TransferResult:
    """m_t + α·Δ from a stored Δ artifact. See `transfer` for keyword arguments."""
    return transfer(target_path, stored_delta(diff_path), out, inputs=[Path(diff_path)], **kw)


def recycle(base_path: Path, tuned_path: Path, target_path: Path, out: Path, **kw) -> TransferResult:
    """m_t + α·(m′_s − m_s) in one streaming pass, without writing Δ."""
    return transfer(
        target_path, pair_delta(base_path, tuned_path), out, inputs=[Path(base_path), Path(tuned_path)], **kw
    )


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
) -> TransferResult:
    """Stream target + α·Δ into `out` (atomic). Validation and planning happen before any write."""
    target = open_checkpoint(target_path)
    side = Side(
        target.tensors, target.vocab_size, target.tied_embeddings, load_vocab(target.path), str(target.path)
    )
    jobs, report = plan_transfer(side, delta.side, policy)
    plan = [PlannedTensor(j.entry.name, j.entry.dtype, j.entry.shape) for j in jobs]
    with atomic_folder(out, [target.path, *inputs], overwrite=overwrite) as tmp:
        writer = ShardedWriter(tmp, plan, max_shard_bytes, pool=WINDOW + 3)
        try:
            with compute_threads() as workers:
                _stream_apply(jobs, delta, policy.alpha, writer, on_progress, workers)
            digests = writer.close()
        except BaseException:
            writer.abort()
            raise
        _write_side_files(target, delta, report, policy, tmp)
        (tmp / "compatibility.json").write_text(report.model_dump_json(indent=2) + "\n")
        body = {
            "kind": "model",
            "alpha": policy.alpha,
            "policy": policy.model_dump(mode="json"),
            "sources": {
                "target": {"id": target_id or target.path.resolve().name, "fingerprint": fingerprint(target)},
                "delta": delta.provenance,
            },
            "tensor_count": len(plan),
            "vocab_size": target.vocab_size,
        }
        manifest = write_manifest(tmp, body, dict(digests))
    return TransferResult(Path(out), manifest, report)


def _stream_apply(
    jobs: list[Job[TensorEntry]],
    delta: DeltaInputs,
    alpha: float,
    writer: ShardedWriter,
    on_progress: Progress | None,
    workers: int = 1,
) -> None:
    """Compute output chunks on `workers` threads; hand them to the writer in plan order."""
    chunks = ChunkReader()
    sources: list[DeltaSource | None] = []
    for job in jobs:
        source = delta.make(chunks, job.delta_name) if job.delta_name is not None else None
        if source is not None and job.rowmap is not None:
            source = RowMapped(source, job.rowmap, math.prod(job.entry.shape[1:]))
        sources.append(source)

    def compute(item: tuple[int, int, int]) -> tuple[torch.Tensor, int]:
        i, start, count = item
        e, source = jobs[i].entry, sources[i]
        dtype = DTYPES[e.dtype]
        buf = writer.buffer()
        nbytes = count * dtype.itemsize
        raw = chunks.raw(e, start, count, "target")
        if not e.is_float:
            buf[:nbytes].copy_(raw.view(torch.uint8))
            return buf, nbytes
        d = chunks.scratch("delta32", count)
        if source is not None:
            source.read_f32(start, count, d)
        a = apply_into(raw, d if source is not None else None, alpha, chunks.scratch("acc", count))
        if not math.isfinite(squared_norm(a)):
            _diagnose_nonfinite(e, raw, d if source else None, jobs[i].delta_name)
        if e.dtype == "F16" and float(a.abs().max()) > FP16_MAX:
            raise NonFiniteValues(f"{e.file}: tensor {e.name!r}: target + α·Δ overflows float16")
        buf[:nbytes].view(dtype).copy_(a)
        return buf, nbytes

    items = (
        (i, start, count) for i, job in enumerate(jobs) for start, count in chunk_ranges(job.entry.numel)
    )
    try:
        for buf, nbytes in ordered_map(compute, items, workers=workers, window=WINDOW):
            writer.submit(buf, nbytes)
            if on_progress:
                on_progress(nbytes)
    finally:
        chunks.close()


def _diagnose_nonfinite(
    e: TensorEntry, raw: torch.Tensor, d: torch.Tensor | None, delta_name: str | None
) -> None:
    bad = int((~torch.isfinite(raw)).sum())
    if bad:
        raise NonFiniteValues(f"{e.file}: tensor {e.name!r} has {bad} NaN/Inf value(s) in the target")
    if d is not None and not torch.isfinite(d).all():
        raise NonFiniteValues(
            f"Δ tensor {delta_name!r} has {int((~torch.isfinite(d)).sum())} NaN/Inf value(s)"
        )
    raise NonFiniteValues(f"{e.file}: tensor {e.name!r}: target + α·Δ overflows {e.dtype}")


def _write_side_files(
    target: Checkpoint, delta: DeltaInputs, report: CompatibilityReport, policy: ApplyPolicy, tmp: Path
) -> None:
    """config.json from the target; tokenizer, chat template and generation config per policy."""
    shutil.copy2(target.path / "config.json", tmp / "config.json")
    same_vocab = report.vocab is None or report.vocab["method"] == "identity"
    choice = policy.tokenizer_from
    if choice == "auto":
        choice = "source" if same_vocab and _has_tokenizer(delta.side_folder) else "target"
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


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "vocab.json"))


def _chat_template(folder: Path) -> str | None:
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    cfg = folder / "tokenizer_config.json"
    if cfg.is_file():
        template = json.loads(cfg.read_text()).get("chat_template")
        return template if isinstance(template, str) else None
    return None
