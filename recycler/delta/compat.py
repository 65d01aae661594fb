"""Which Δ tensor feeds which target tensor: the pure planning half of applying a Δ.

Every difference between a Δ and a target (tensors only on one side, shapes, vocabularies, tied
embeddings, selection globs, dtypes) goes through a named `ApplyPolicy` decision and into the
`CompatibilityReport`; nothing is skipped or truncated silently (mergekit's failure mode). Works on
tensor *specs* (name, dtype, shape), so it is unit-testable without a file, and the I/O layer's
`TensorEntry` is one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from recycler.delta.math import tensor_family
from recycler.delta.policy import ApplyPolicy, CompatibilityReport
from recycler.delta.vocab import RowMap, align_by_prefix, align_by_tokens, identity_map
from recycler.errors import IncompatibleCheckpoints

FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}  # FP8 widens exactly to float32


class TensorSpec(Protocol):
    name: str
    dtype: str  # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]


S = TypeVar("S", bound=TensorSpec)


@dataclass(frozen=True)
class Side(Generic[S]):
    """One side of a transfer: its tensors and what is known about its vocabulary."""

    tensors: Mapping[str, S]
    vocab_size: int | None
    tied: bool
    vocab: dict[str, int] | None  # token → id, None without a tokenizer
    label: str = ""


@dataclass
class Job(Generic[S]):
    """One output tensor: the target's `entry` plus α·(Δ tensor `delta_name`, rows re-mapped by `rowmap`)."""

    entry: S
    delta_name: str | None
    rowmap: RowMap | None = None


def is_float(spec: TensorSpec) -> bool:
    return spec.dtype in FLOAT_DTYPES


def compare_tensor_sets(base: Mapping[str, TensorSpec], tuned: Mapping[str, TensorSpec]) -> list[str]:
    """All reasons two checkpoints cannot be diffed, collected so they are reported together."""
    problems: list[str] = []
    b, t = set(base), set(tuned)
    if b - t:
        problems.append(f"only in base: {sorted(b - t)[:10]}")
    if t - b:
        problems.append(f"only in fine-tuned: {sorted(t - b)[:10]}")
    for name in sorted(b & t):
        eb, et = base[name], tuned[name]
        if eb.shape != et.shape:
            vocab = "embed" in name or "lm_head" in name
            hint = " (was the vocabulary resized during fine-tuning?)" if vocab else ""
            problems.append(f"{name}: shape {list(eb.shape)} in base vs {list(et.shape)} in fine-tuned{hint}")
        elif is_float(eb) != is_float(et):
            problems.append(f"{name}: dtype {eb.dtype} in base vs {et.dtype} in fine-tuned")
    return problems


def _vocab_tensor(spec: TensorSpec, vocab_size: int | None) -> bool:
    return (
        bool(vocab_size)
        and spec.shape[:1] == (vocab_size,)
        and tensor_family(spec.name) in ("embed", "lm_head")
    )


def plan_transfer(
    target: Side[S], delta: Side, policy: ApplyPolicy
) -> tuple[list[Job[S]], CompatibilityReport]:
    """Decide, for every target tensor, which Δ tensor (if any) and which row map feed it.

    Raises IncompatibleCheckpoints listing every conflict the policy does not resolve.
    """
    report = CompatibilityReport()
    jobs: list[Job[S]] = []
    used: set[str] = set()
    rowmaps: dict[tuple[int, int], RowMap] = {}
    delta_embed = next(
        (n for n, e in delta.tensors.items() if tensor_family(n) == "embed" and len(e.shape) == 2 and _vocab_tensor(e, delta.vocab_size)),
        None,
    )  # fmt: skip
    for name, entry in target.tensors.items():
        if not is_float(entry):
            report.non_float_kept.append(name)
            jobs.append(Job(entry, None))
            continue
        if not policy.selects(name):
            report.excluded.append(name)
            jobs.append(Job(entry, None))
            used.add(name)  # its Δ is accounted for: deliberately not applied
            continue
        src = _source_for(name, target, delta, delta_embed, report)
        if src is None:
            report.kept_target_only.append(name)
            jobs.append(Job(entry, None))
            continue
        used.add(src)
        job = _job_for(entry, src, target, delta, policy, rowmaps, report)
        if job is not None:
            jobs.append(job)
            report.applied.append(name)
            report.count_cast(delta.tensors[src].dtype, entry.dtype)
    _account_unused(target, delta, policy, used, report)
    if report.errors:
        raise IncompatibleCheckpoints(
            f"cannot apply {delta.label} to {target.label}: " + "; ".join(report.errors[:20])
        )
    return jobs, report


def _source_for(
    name: str, target: Side, delta: Side, delta_embed: str | None, report: CompatibilityReport
) -> str | None:
    """The Δ tensor for target tensor `name`: the same name, or the embedding's Δ for an untied lm_head."""
    if name in delta.tensors:
        return name
    if delta.tied and not target.tied and tensor_family(name) == "lm_head" and delta_embed:
        report.tied.append(f"{name} receives the Δ of {delta_embed} (the Δ's source ties embeddings)")
        return delta_embed
    return None


def _job_for(
    entry: S,
    src: str,
    target: Side,
    delta: Side,
    policy: ApplyPolicy,
    rowmaps: dict[tuple[int, int], RowMap],
    report: CompatibilityReport,
) -> Job[S] | None:
    d = delta.tensors[src]
    if (
        _vocab_tensor(entry, target.vocab_size)
        and _vocab_tensor(d, delta.vocab_size)
        and d.shape[1:] == entry.shape[1:]
    ):
        key = (d.shape[0], entry.shape[0])
        if key not in rowmaps:
            rowmaps[key] = resolve_rowmap(delta.vocab, target.vocab, *key, policy, report)
        rm = rowmaps[key]
        report.vocab = rm.summary()
        return Job(entry, src, None if rm.identity else rm)
    if d.shape != entry.shape:
        report.errors.append(f"{entry.name}: target shape {list(entry.shape)} vs Δ shape {list(d.shape)}")
        return None
    return Job(entry, src)


def _account_unused(
    target: Side, delta: Side, policy: ApplyPolicy, used: set[str], report: CompatibilityReport
) -> None:
    for name in sorted(set(delta.tensors) - used):
        if target.tied and not delta.tied and tensor_family(name) == "lm_head":
            report.tied.append(
                f"Δ of {name} ignored: the target ties lm_head to the embeddings, which receive their own Δ"
            )
        elif policy.only_in_delta == "ignore":
            report.ignored_delta_only.append(name)
        elif name in target.tensors:  # present, but an integer/bool tensor: no Δ can be added to it
            report.errors.append(
                f"Δ tensor {name} is {target.tensors[name].dtype} in the target, not a float tensor "
                "(--only-in-delta ignore to skip it)"
            )
        else:
            report.errors.append(
                f"Δ tensor {name} has no counterpart in the target (--only-in-delta ignore to skip it)"
            )


def resolve_rowmap(
    delta_vocab: dict[str, int] | None,
    target_vocab: dict[str, int] | None,
    src_rows: int,
    tgt_rows: int,
    policy: ApplyPolicy,
    report: CompatibilityReport,
) -> RowMap:
    """How Δ rows map onto target rows when both are vocabulary tensors (see ApplyPolicy.vocab)."""
    if policy.vocab == "prefix":
        return identity_map(tgt_rows) if src_rows == tgt_rows else align_by_prefix(src_rows, tgt_rows)
    if delta_vocab is not None and target_vocab is not None:
        rm = align_by_tokens(delta_vocab, target_vocab, src_rows, tgt_rows)
        if policy.vocab == "error" and not rm.identity:
            raise IncompatibleCheckpoints(
                f"vocabularies differ ({rm.matched} of {tgt_rows} target rows match Δ rows by token) and --vocab error was given"
            )
        return rm
    if policy.vocab == "tokens":
        raise IncompatibleCheckpoints("--vocab tokens needs a tokenizer in both the Δ and the target folder")
    if src_rows == tgt_rows:
        report.notes.append(
            "vocabulary not verified: no tokenizer in the Δ or the target; rows matched by position"
        )
        return identity_map(tgt_rows)
    raise IncompatibleCheckpoints(
        f"embedding rows differ (Δ {src_rows}, target {tgt_rows}) and there are no tokenizers to align them by token; "
        "pass --vocab prefix if the target's vocabulary extends the Δ's (new rows get zero Δ)"
    )
