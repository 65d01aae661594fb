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
from dataclasses import dataclass, field
from pathlib import Path

from recycler.delta.compat import Side, compare_tensor_sets, plan_transfer
from recycler.delta.policy import ApplyPolicy, CompatibilityReport
from recycler.errors import IncompatibleCheckpoints, InvalidCheckpoint
from recycler.io.atomic import atomic_folder
from recycler.io.checkpoint import (
    GENERATION_CONFIG,
    TOKENIZER_FILES,
    Checkpoint,
    load_vocab,
    open_checkpoint,
    resolve_tied,
)
from recycler.io.manifest import (
    FileEntry,
    fail_if,
    fingerprint,
    listed_file_problems,
    manifest_digest,
    write_manifest,
)
from recycler.io.reader import WINDOW, ChunkReader, DeltaSource, StoredDelta, compute_threads
from recycler.io.residual import RESIDUAL_DIR, ResidualReader
from recycler.io.safetensors import TensorEntry
from recycler.io.writer import DEFAULT_SHARD_BYTES, PlannedTensor, ShardedWriter
from recycler.stages.engine import stream_apply
from recycler.stages.extract import DEFAULT_MAX_RELATIVE_NORM
from recycler.stages.pair_checks import (
    MeasuredPair,
    check_related,
    pair_sums,
    refuse_changed_non_float,
    relative_norms,
)

Progress = Callable[[int], None]
Opener = Callable[[ChunkReader], Callable[[str], DeltaSource]]


@dataclass
class DeltaInputs:
    """What planning needs to know about a Δ, wherever its values come from."""

    side: Side[TensorEntry]  # tensors (for a pair: the base's entries), vocabulary, tied embeddings
    side_folder: Path  # holds the fine-tuned source's tokenizer and generation config
    provenance: dict  # content only: digests and fingerprints, never a path
    open: Opener  # per transfer: Δ tensor name → its chunked source
    must_match: list[FileEntry] = field(default_factory=list)  # re-hashed before the output is published
    before_publish: Callable[[], None] | None = None  # a check that may still refuse the output


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
        entries, m.get("vocab_size"), _delta_tied(ck.path, m, entries), load_vocab(ck.path), str(ck.path)
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


def _delta_tied(folder: Path, m: dict, entries: dict[str, TensorEntry]) -> bool:
    """Whether the Δ's source ties embeddings, decided again from its config and tensors: Δs written
    before the class default was read from the tensors recorded false for configs without the key."""
    cfg = folder / "tuned_config.json"
    if not cfg.is_file():
        return bool(m.get("tied_embeddings"))
    try:
        config = json.loads(cfg.read_text())
    except ValueError as e:
        raise InvalidCheckpoint(f"{cfg}: unreadable ({e})") from e
    return resolve_tied(config if isinstance(config, dict) else None, entries, m.get("vocab_size"))


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


def pair_delta(
    base_path: Path, tuned_path: Path, max_relative_norm: float = DEFAULT_MAX_RELATIVE_NORM
) -> DeltaInputs:
    """Δ = tuned − base, never materialised; refused as `diff` would refuse it (changed non-float
    tensors before anything is computed, unrelated models before the output is published)."""
    base, tuned = open_checkpoint(base_path), open_checkpoint(tuned_path)
    problems = compare_tensor_sets(base.tensors, tuned.tensors)
    if problems:
        raise IncompatibleCheckpoints(f"cannot diff {tuned.path} against {base.path}: " + "; ".join(problems))
    refuse_changed_non_float(base, tuned)
    tensors = {n: e for n, e in base.tensors.items() if e.is_float}
    side = Side(
        tensors,
        tuned.vocab_size,
        tuned.tied_embeddings,
        load_vocab(tuned.path),
        f"{tuned.path} − {base.path}",
    )
    tally: dict = {}  # (tensor, element) → (count, Σd32², Σbase²) of each block the stream computed

    def related() -> None:
        sums = pair_sums(base, tuned, tensors, tally)
        check_related(relative_norms(sums, base.tensors, tensors), max_relative_norm, base.path, tuned.path)

    return DeltaInputs(
        side=side,
        side_folder=tuned.path,
        provenance={"kind": "pair", "base": fingerprint(base), "tuned": fingerprint(tuned)},
        open=lambda chunks: lambda name: MeasuredPair(chunks, base.tensors[name], tuned.tensors[name], tally),
        before_publish=related,
    )


def apply_diff(target_path: Path, diff_path: Path, out: Path, **kw) -> TransferResult:
    """m_t + α·Δ from a stored Δ artifact. See `transfer` for keyword arguments."""
    return transfer(target_path, stored_delta(diff_path), out, inputs=[Path(diff_path)], **kw)


def recycle(
    base_path: Path,
    tuned_path: Path,
    target_path: Path,
    out: Path,
    *,
    max_relative_norm: float = DEFAULT_MAX_RELATIVE_NORM,
    **kw,
) -> TransferResult:
    """m_t + α·(m′_s − m_s) in one streaming pass, without writing Δ.

    Refuses what `diff` refuses, with the same errors: UnrelatedModels when ‖Δ‖/‖base‖ over weight
    matrices exceeds `max_relative_norm` (nothing is published), IncompatibleCheckpoints when a
    non-float tensor differs between base and fine-tune."""
    pair = pair_delta(base_path, tuned_path, max_relative_norm)
    return transfer(target_path, pair, out, inputs=[Path(base_path), Path(tuned_path)], **kw)


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
    """Stream target + α·Δ into `out` (atomic). Validation and planning happen before any write.

    The manifest depends on content only (digests, dtype, α, policy, tool version): the same inputs
    from any folder give the same bytes, hence one address. `target_id` is recorded only if given.
    """
    target = open_checkpoint(target_path)
    side = Side(
        target.tensors, target.vocab_size, target.tied_embeddings, load_vocab(target.path), str(target.path)
    )
    jobs, report = plan_transfer(side, delta.side, policy)
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
