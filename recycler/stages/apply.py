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
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from recycler.delta.compat import Job, Side, compare_tensor_sets, plan_transfer
from recycler.delta.policy import ApplyPolicy, CompatibilityReport
from recycler.errors import IncompatibleCheckpoints, InvalidCheckpoint
from recycler.io.adapter import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    Adapter,
    adapter_source,
    base_identity_problem,
    is_adapter,
    open_adapter,
    shape_problems,
)
from recycler.io.atomic import atomic_folder
from recycler.io.checkpoint import GENERATION_CONFIG, TOKENIZER_FILES, Checkpoint, load_vocab, open_checkpoint
from recycler.io.manifest import (
    FileEntry,
    fail_if,
    fingerprint,
    listed_file_problems,
    manifest_digest,
    sha256_file,
    write_manifest,
)
from recycler.io.reader import WINDOW, ChunkReader, DeltaSource, PairDelta, StoredDelta, compute_threads
from recycler.io.residual import RESIDUAL_DIR, ResidualReader
from recycler.io.safetensors import TensorEntry
from recycler.io.writer import DEFAULT_SHARD_BYTES, PlannedTensor, ShardedWriter
from recycler.stages.engine import stream_apply

Progress = Callable[[int], None]
Opener = Callable[[ChunkReader], Callable[[str], DeltaSource]]
Planner = Callable[[Side[TensorEntry]], tuple[list[Job[TensorEntry]], CompatibilityReport]]


@dataclass
class DeltaInputs:
    """What planning needs to know about a Δ, wherever its values come from."""

    side: Side[TensorEntry]  # tensors (for a pair: the base's entries), vocabulary, tied embeddings
    side_folder: Path  # holds the fine-tuned source's tokenizer and generation config
    provenance: dict  # content only: digests and fingerprints, never a path
    open: Opener  # per transfer: Δ tensor name → its chunked source
    must_match: list[FileEntry] = field(default_factory=list)  # re-hashed before the output is published


@dataclass(frozen=True)
class TransferResult:
    path: Path
    manifest: dict
    report: CompatibilityReport


def stored_delta(diff_path: Path) -> DeltaInputs:
    """A Δ artifact written by `recycler diff` (its manifest must say kind 'diff').

    A Δ with a residual (format recycler-residual/1) is refused if a residual file is missing or of
    the wrong size, and the output is not published if one fails its sha256 (checked while applying):
    without it the result would silently be the rounded Δ. A Δ written before the residual existed
    (float32, or the lossy bfloat16 of that time) applies as it always did.
    """
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
    residual_files = _residual_files(ck.path, m)
    entries = ck.tensors
    side = Side(
        entries, m.get("vocab_size"), bool(m.get("tied_embeddings")), load_vocab(ck.path), str(ck.path)
    )

    def open_sources(chunks: ChunkReader) -> Callable[[str], DeltaSource]:
        residual = ResidualReader(ck.path, residual_files, entries, chunks) if residual_files else None
        return lambda name: StoredDelta(chunks, entries[name], residual)

    return DeltaInputs(
        side=side,
        side_folder=ck.path,
        provenance={
            "kind": "stored",
            "manifest_sha256": manifest_digest(ck.path),
            "sources": m.get("sources"),
        },
        open=open_sources,
        must_match=[
            FileEntry(rel, m["files"][rel]["sha256"], m["files"][rel]["size"]) for rel in residual_files
        ],
    )


def _residual_files(folder: Path, m: dict) -> list[str]:
    """The residual files a Δ's manifest names (none for a Δ written before residuals existed)."""
    residual = m.get("residual")
    if residual is None:
        return []
    files = residual.get("files") if isinstance(residual, dict) else None
    if not isinstance(files, list) or not all(
        isinstance(f, str) and f.startswith(f"{RESIDUAL_DIR}/") for f in files
    ):
        raise InvalidCheckpoint(f"{folder}: manifest.json: malformed 'residual' entry")
    missing = [f for f in files if f not in m.get("files", {})]
    if missing or (not files and residual.get("elements")):
        raise InvalidCheckpoint(
            f"{folder}: Δ incomplete or altered: residual file(s) {missing or 'none'} not listed; without them "
            "the stored Δ is only the nearest-dtype rounding. Run `recycler verify`"
        )
    return files


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
        open=lambda chunks: lambda name: PairDelta(chunks, base.tensors[name], tuned.tensors[name]),
    )


@dataclass(frozen=True)
class _DeltaSpec:
    """An adapter's Δ tensor as planning sees it: float32, of the adapted weight's shape."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "F32"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def adapter_delta(
    adapter_path: Path, base_path: Path | None, *, allow_other_base: bool = False
) -> DeltaInputs:
    """Δ of a PEFT LoRA adapter (`recycler.io.adapter`), never materialised.

    With its base: every adapted tensor is checked against the base's shapes and the adapter's recorded
    base name (IncompatibleCheckpoints unless `allow_other_base`), and modules_to_save become
    saved − base. Without one (applying an adapter as a Δ): only LoRA factors are accepted.
    """
    adapter = open_adapter(adapter_path)
    base = open_checkpoint(base_path) if base_path is not None else None
    if base is not None:
        problems = shape_problems(adapter, base.tensors)
        if problems:
            raise IncompatibleCheckpoints(
                f"{adapter.path} was not trained on {base.path}: " + "; ".join(problems[:10])
            )
        who = base_identity_problem(adapter, base.path, base.config)
        if who and not allow_other_base:
            raise IncompatibleCheckpoints(
                f"{adapter.path}: {who}. If it is the same model under another name, pass --allow-other-base"
            )
    elif adapter.saved or adapter.base_layers:
        raise IncompatibleCheckpoints(
            f"{adapter.path} saves {sorted({**adapter.saved, **adapter.base_layers})[:5]} whole "
            "(modules_to_save, or embedding layers): their Δ needs the "
            "adapter's base; use `recycler recycle BASE ADAPTER TARGET`"
        )
    tensors = {n: _DeltaSpec(n, tuple(s)) for n, s in adapter.shapes().items()}
    own_tokenizer = _has_tokenizer(adapter.path)
    folder = adapter.path if own_tokenizer or base is None else base.path
    side = Side(
        tensors,
        base.vocab_size if base else None,
        base.tied_embeddings if base else False,
        load_vocab(folder),
        str(adapter.path),
    )
    base_entries = base.tensors if base is not None else {}
    provenance = {
        "kind": "adapter",
        "adapter": adapter_fingerprint(adapter),
        **({"base": fingerprint(base)} if base is not None else {}),
    }
    return DeltaInputs(
        side=side,
        side_folder=folder,
        provenance=provenance,
        open=lambda chunks: lambda name: adapter_source(chunks, adapter, base_entries, name),
    )


def adapter_fingerprint(adapter: Adapter) -> dict:
    """The adapter's content: sha256 of its config and weights, and what its config says."""
    digests = {f: sha256_file(adapter.path / f).sha256 for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)}
    return {"sha256": digests, **adapter.summary()}


def fine_tune_delta(base_path: Path, tuned_path: Path, *, allow_other_base: bool = False) -> DeltaInputs:
    """Δ of a fine-tune, given as a full checkpoint or as a PEFT LoRA adapter folder."""
    if is_adapter(tuned_path):
        return adapter_delta(tuned_path, base_path, allow_other_base=allow_other_base)
    return pair_delta(base_path, tuned_path)


def apply_diff(target_path: Path, diff_path: Path, out: Path, **kw) -> TransferResult:
    """m_t + α·Δ from a stored Δ artifact, or from a LoRA adapter's factors (scale·B·A, no base needed
    unless it saves modules whole). See `transfer` for keyword arguments."""
    delta = adapter_delta(diff_path, None) if is_adapter(diff_path) else stored_delta(diff_path)
    return transfer(target_path, delta, out, inputs=[Path(diff_path)], **kw)


def recycle(
    base_path: Path,
    tuned_path: Path,
    target_path: Path,
    out: Path,
    *,
    allow_other_base: bool = False,
    **kw,
) -> TransferResult:
    """m_t + α·(m′_s − m_s) in one streaming pass, without writing Δ; m′_s may be a LoRA adapter."""
    delta = fine_tune_delta(base_path, tuned_path, allow_other_base=allow_other_base)
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
