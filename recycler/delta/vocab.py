"""Vocabulary alignment between a Δ's source tokenizer and a target's: which Δ row feeds each target row.

Pure functions over token→id maps. New base versions often grow or reorder their vocabulary; adding Δ
rows by position would silently give tokens another token's update, so rows are matched by token
string, tokens new in the target get a zero Δ, and everything that does not line up is counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SAMPLE = 10


@dataclass(frozen=True)
class RowMap:
    """`src_rows[i]` is the Δ row added to target row i, or -1 for none (zero Δ)."""

    src_rows: np.ndarray
    method: str  # "identity" | "tokens" | "prefix"
    matched: int
    new_in_target: int = 0
    dropped_from_source: int = 0
    samples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def identity(self) -> bool:
        return self.method == "identity"

    def summary(self) -> dict:
        return {
            "method": self.method,
            "target_rows": len(self.src_rows),
            "matched": self.matched,
            "new_in_target_zero_delta": self.new_in_target,
            "dropped_from_delta": self.dropped_from_source,
            "samples": self.samples,
        }


def identity_map(rows: int) -> RowMap:
    return RowMap(np.arange(rows, dtype=np.int64), "identity", rows)


def align_by_prefix(src_rows: int, tgt_rows: int) -> RowMap:
    """Row i ↔ row i; opt-in only, since it is correct only when one vocabulary extends the other."""
    n = min(src_rows, tgt_rows)
    rows = np.full(tgt_rows, -1, dtype=np.int64)
    rows[:n] = np.arange(n)
    return RowMap(rows, "prefix", n, new_in_target=tgt_rows - n, dropped_from_source=src_rows - n)


def align_by_tokens(
    src_vocab: dict[str, int], tgt_vocab: dict[str, int], src_rows: int, tgt_rows: int
) -> RowMap:
    """Match rows by token string. Rows beyond a tokenizer's ids (padding rows) get zero Δ."""
    src_by_id = {i: t for t, i in src_vocab.items() if 0 <= i < src_rows}
    tgt_by_id = {i: t for t, i in tgt_vocab.items() if 0 <= i < tgt_rows}
    if src_rows == tgt_rows and src_by_id == tgt_by_id:
        return identity_map(tgt_rows)
    rows = np.full(tgt_rows, -1, dtype=np.int64)
    new: list[str] = []
    for i, tok in tgt_by_id.items():
        j = src_vocab.get(tok, -1)
        if 0 <= j < src_rows:
            rows[i] = j
        else:
            new.append(tok)
    used = set(rows[rows >= 0].tolist())
    dropped = [t for i, t in sorted(src_by_id.items()) if i not in used]
    return RowMap(
        rows,
        "tokens",
        matched=len(used),
        new_in_target=tgt_rows - len(used),
        dropped_from_source=src_rows - len(used),
        samples={"new_in_target": sorted(new)[:SAMPLE], "dropped_from_delta": dropped[:SAMPLE]},
    )


def row_runs(src_rows: np.ndarray) -> list[tuple[int, int, int]]:
    """Split a row map into runs (target_offset, source_start, length) of consecutive source rows.

    Runs with source -1 are returned with source_start = -1, so a chunk is filled with few reads.
    """
    runs: list[tuple[int, int, int]] = []
    values = src_rows.tolist()
    i = 0
    while i < len(values):
        j, start = i + 1, values[i]
        while j < len(values) and (
            (start < 0 and values[j] < 0) or (start >= 0 and values[j] == start + (j - i))
        ):
            j += 1
        runs.append((i, start, j - i))
        i = j
    return runs


def tokenizer_fingerprint(vocab: dict[str, int] | None) -> str | None:
    """A stable hash of a vocabulary (token→id pairs), for manifests and compatibility checks."""
    if vocab is None:
        return None
    import hashlib
    import json

    return hashlib.sha256(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode()).hexdigest()
