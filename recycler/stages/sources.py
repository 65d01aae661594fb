"""Where a Δ comes from, as the apply stage sees it: a stored artifact, a (base, fine-tuned) pair
computed on the fly, or a PEFT LoRA adapter. Each becomes `DeltaInputs`: what planning needs (the
tensors, vocabulary, tied embeddings), content provenance, and an opener for chunked sources.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from recycler.delta.compat import Side, compare_tensor_sets
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
from recycler.io.checkpoint import (
    load_vocab,
    open_checkpoint,
    resolve_tied,
)
from recycler.io.manifest import (
    FileEntry,
    fingerprint,
    manifest_digest,
    sha256_file,
)
from recycler.io.reader import ChunkReader, DeltaSource, StoredDelta
from recycler.io.residual import RESIDUAL_DIR, ResidualReader
from recycler.io.safetensors import TensorEntry
from recycler.stages.pair_checks import (
    DEFAULT_MAX_RELATIVE_NORM,
    MeasuredPair,
    check_related,
    pair_sums,
    refuse_changed_non_float,
    relative_norms,
)

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
    own_tokenizer = has_tokenizer(adapter.path)
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


def applied_delta(path: Path) -> DeltaInputs:
    """What `recycler apply` adds: a stored Δ artifact, or a LoRA adapter's factors (scale·B·A, no
    base needed unless it saves modules whole)."""
    return adapter_delta(path, None) if is_adapter(path) else stored_delta(path)


def fine_tune_delta(
    base_path: Path,
    tuned_path: Path,
    *,
    allow_other_base: bool = False,
    max_relative_norm: float = DEFAULT_MAX_RELATIVE_NORM,
) -> DeltaInputs:
    """Δ of a fine-tune, given as a full checkpoint or as a PEFT LoRA adapter folder."""
    if is_adapter(tuned_path):
        return adapter_delta(tuned_path, base_path, allow_other_base=allow_other_base)
    return pair_delta(base_path, tuned_path, max_relative_norm)


def has_tokenizer(folder: Path) -> bool:
    return any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "vocab.json"))
