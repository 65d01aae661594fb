"""Transferability pre-check: how well will each candidate Δ_s transfer to a target base m_t?

Cheap signals, no fine-tuning and no generation:

1. Proximity: d = ‖m_t − m_s‖ / ‖Δ_s‖, the distance between the Δ's source base and the target in
   units of the fine-tuning update; transfer works best between close versions (Lin et al., 2025).
   Needs m_s: a `bases` entry per Δ, or a target whose content hash equals the Δ's recorded base.
2. Cosine between Δ_s and m_t − m_s: whether the release moved along (or against) the fine-tune.
3. Probe: mean response-token loss of m_t + α·Δ_s on a small held-out sample, for a few α, each
   applied model streamed into a temporary folder with `recycler.stages.apply.apply_diff`.

score = probe_gain + 0.1·proximity + 0.05·cosine, where probe_gain = 1 − min_α L(m_t + α·Δ_s) / L(m_t)
and proximity = 1/(1 + d). The weights were fixed before any validation: the probe measures the task
directly and dominates; the parameter-space terms break near-ties and rank candidates when no sample
is given. Signals that cannot be computed are left out of every candidate's score and named in `notes`.

A given base is checked against the fingerprint in the Δ's manifest, whatever its kind: the digest
of the base's manifest (every Δ the cycle extracts; a plain copy of that base, such as the release
folder, is matched by the sha256 of its weight files, which the Δ records too), a full sha256, or
the structure. Δs extracted from plain folders without `hash_inputs` record only the structure
(shapes, sizes), so another version of the same architecture passes that check: the note "matched
by structure only" says so.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from recycler.delta.bits import widen
from recycler.delta.policy import ApplyPolicy
from recycler.errors import IncompatibleCheckpoints, PrecheckError
from recycler.io.adapter import is_adapter
from recycler.io.checkpoint import Checkpoint, open_checkpoint
from recycler.io.jsonl import read_jsonl_objects, require_nonempty
from recycler.io.manifest import fingerprint, sha256_file
from recycler.io.reader import ChunkReader, chunk_ranges
from recycler.stages.apply import apply_diff, transfer
from recycler.stages.evaluate.evaluators import LossEvaluator
from recycler.stages.finetune.data import Messages, encode_records, parse_record
from recycler.stages.sources import DeltaInputs, adapter_delta, stored_delta

W_PROXIMITY, W_COSINE = 0.1, 0.05
Progress = Callable[[str, int, int], None]  # (label, done, total)


class Candidate(BaseModel):
    diff: str
    base: str | None = None
    relative_distance: float | None = None  # ‖m_t − m_s‖ / ‖Δ_s‖
    base_distance: float | None = None  # ‖m_t − m_s‖ / ‖m_s‖
    cosine: float | None = None  # cos(Δ_s, m_t − m_s)
    probe_loss: dict[str, float] = {}  # α → mean response-token loss of m_t + α·Δ_s
    best_alpha: float | None = None
    probe_gain: float | None = None
    score: float = 0.0
    notes: list[str] = []


class PrecheckResult(BaseModel):
    target: str
    target_loss: float | None
    sample_size: int
    signals: list[str]  # the terms that make up every candidate's score
    candidates: list[Candidate]  # best first


# ---- parameter-space signals ----------------------------------------------------------------------------


def _base_for(target: Checkpoint, diff: Checkpoint, base: Path | None) -> tuple[Path | None, list[str]]:
    """The Δ's source base: the given folder (checked against the Δ's manifest) or the target itself.

    Every fingerprint kind is checked (manifest digest, full sha256, structure): a base that cannot be
    matched is refused, since distance and cosine against the wrong base are numbers with no meaning.
    """
    recorded = ((diff.manifest or {}).get("sources") or {}).get("base") or {}
    want = recorded.get("fingerprint") or {}
    kind, weights = want.get("kind"), recorded.get("weights")
    if base is not None and kind == "manifest" and open_checkpoint(base).manifest is None:
        # A plain folder (the release itself, not the cycle's staged copy): compare the weights.
        if not weights:
            raise IncompatibleCheckpoints(
                f"{diff.path} records its base by manifest digest only and {base} has no manifest.json, "
                "so it cannot be checked; pass the base folder the Δ was extracted from"
            )
        if _weight_digests(open_checkpoint(base)) != weights:
            raise IncompatibleCheckpoints(
                f"{base} is not the base {diff.path} was extracted from (the sha256 of its weight files "
                f"differ from those the Δ records; id {recorded.get('id')!r})"
            )
        return Path(base), ["base matched to the Δ's manifest by the sha256 of its weight files"]
    if base is not None:
        if kind not in ("manifest", "sha256", "structure"):
            raise IncompatibleCheckpoints(
                f"{diff.path}: its manifest records no fingerprint of its base, so {base} cannot be checked; "
                "omit --base (rank by the probe alone)"
            )
        got = fingerprint(open_checkpoint(base), full=kind == "sha256")
        if got["kind"] != kind or got["sha256"] != want.get("sha256"):
            raise IncompatibleCheckpoints(
                f"{base} is not the base {diff.path} was extracted from (its {got['kind']} fingerprint does "
                f"not match the Δ's recorded {kind} fingerprint); pass the folder recorded in its manifest "
                f"(id {recorded.get('id')!r})"
            )
        note = ["base matched to the Δ's manifest by structure only"] if kind == "structure" else []
        return Path(base), note
    if kind in ("sha256", "manifest"):
        got = fingerprint(target, full=kind == "sha256")
        same = got["kind"] == kind and got["sha256"] == want.get("sha256")
        if same or (
            kind == "manifest" and weights and target.manifest is None and _weight_digests(target) == weights
        ):
            return target.path, ["the target is the Δ's own base"]
    return None, [f"source base unknown (pass --base for {diff.path.name}): no distance or cosine"]


def _weight_digests(ck: Checkpoint) -> dict[str, str]:
    """sha256 of each weight file, named as in a manifest (what a Δ records of a base with one)."""
    return {p.name: sha256_file(p).sha256 for p in ck.shard_files}


def _adapter_candidate(
    target: Checkpoint, adapter: Path, base: Path | None, adapters: dict[str, DeltaInputs]
) -> Candidate:
    """A LoRA adapter as a candidate: checked against its base (shapes, recorded name) when given;
    without one only its factors count (scale·B·A) and the distance signals are left out."""
    delta = adapter_delta(adapter, base)
    adapters[str(adapter)] = delta
    cand = Candidate(diff=str(adapter), base=str(base) if base else None)
    if base is None:
        cand.notes.append(f"source base unknown (pass --base for {adapter.name}): no distance or cosine")
        return cand
    cand.notes.append(
        "LoRA adapter: checked against --base by shapes and recorded name; signals over adapted tensors"
    )
    for key, value in parameter_signals(target, open_checkpoint(base), delta).items():
        setattr(cand, key, value)
    return cand


def parameter_signals(
    target: Checkpoint, base: Checkpoint, diff: Checkpoint | DeltaInputs
) -> dict[str, float]:
    """Stream the three checkpoints chunk by chunk; float32 sums of ‖t−b‖², ‖b‖², ‖Δ‖², ⟨Δ, t−b⟩.

    `diff`: a Δ artifact, or any Δ source (an adapter's: the sums then run over the tensors it adapts).
    """
    sums = dict.fromkeys(("tb", "b", "d", "dot"), 0.0)
    chunks = ChunkReader()
    inputs = diff if isinstance(diff, DeltaInputs) else stored_delta(diff.path)
    delta = inputs.open(chunks)  # the exact float32 Δ (stored values + residual, or scale·B·A)
    try:
        for name, d in inputs.side.tensors.items():
            t, b = target.tensors.get(name), base.tensors.get(name)
            if t is None or b is None or not (t.shape == b.shape == d.shape):
                raise IncompatibleCheckpoints(
                    f"tensor {name}: Δ, target and base differ in shape or presence; the distance signals "
                    "need one architecture and vocabulary (omit --base to rank by the probe alone)"
                )
            for start, count in chunk_ranges(d.numel):
                tv = widen(chunks.raw(t, start, count, "t"), t.dtype, chunks.scratch("t", count))
                bv = widen(chunks.raw(b, start, count, "b"), b.dtype, chunks.scratch("b", count))
                dv = chunks.scratch("d", count)
                delta(name).read_f32(start, count, dv)
                sums["b"] += float(np.dot(bv, bv))
                tv = np.subtract(tv, bv, out=chunks.scratch("tb", count))  # (count,) m_t − m_s
                sums["tb"] += float(np.dot(tv, tv))
                sums["d"] += float(np.dot(dv, dv))
                sums["dot"] += float(np.dot(dv, tv))
    finally:
        chunks.close()
    norm_tb, norm_d = math.sqrt(sums["tb"]), math.sqrt(sums["d"])
    return {
        "relative_distance": norm_tb / max(norm_d, 1e-30),
        "base_distance": norm_tb / max(math.sqrt(sums["b"]), 1e-30),
        "cosine": sums["dot"] / (norm_tb * norm_d) if norm_tb > 0 and norm_d > 0 else 0.0,
    }


# ---- probe ----------------------------------------------------------------------------------------------


def probe_conversations(sample: Path, n: int) -> list[Messages]:
    """The first `n` lines of SFT data ({"messages"} / {"prompt", "response"}) or a task file ({…, "answer"})."""
    out: list[Messages] = []
    for line, obj in read_jsonl_objects(sample):
        if "answer" in obj and "response" not in obj:
            prompt = obj.get("messages") or [{"role": "user", "content": obj.get("prompt")}]
            obj = {"messages": [*prompt, {"role": "assistant", "content": str(obj["answer"])}]}
        out.append(parse_record(obj, f"{sample}:{line}"))
        if len(out) >= n:
            break
    return require_nonempty(sample, out)


def probe_loss(model_dir: Path, conversations: list[Messages]) -> float:
    from recycler.stages.finetune.data import SFTRecord
    from recycler.stages.model_folder import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    records = [SFTRecord(model_dir, i + 1, m) for i, m in enumerate(conversations)]
    examples = encode_records(tokenizer, records, max_length=4096)
    result = LossEvaluator("probe", examples, batch_size=16).evaluate(load_causal_lm(model_dir), tokenizer)
    return result.score


def _applied_loss(
    target: Path,
    diff: Path,
    alpha: float,
    conversations: list[Messages],
    tmp: Path,
    delta: DeltaInputs | None,
) -> float:
    out = tmp / f"probe-{len(list(tmp.iterdir()))}"
    if delta is None:
        apply_diff(target, diff, out, policy=ApplyPolicy(alpha=alpha))
    else:  # an adapter: its Δ relative to its base, never written
        transfer(target, delta, out, inputs=[diff], policy=ApplyPolicy(alpha=alpha))
    return probe_loss(out, conversations)


# ---- driver ---------------------------------------------------------------------------------------------


def precheck(
    target: Path,
    diffs: Sequence[Path],
    *,
    bases: Sequence[Path | None] | None = None,
    alphas: Sequence[float] = (0.5, 1.0),
    sample: Path | None = None,
    n: int = 64,
    progress: Progress | None = None,
) -> PrecheckResult:
    """Score and rank candidate Δs (and the best α of each) for `target`, best first.

    Raises PrecheckError when there is nothing to score (no sample and no known base), and
    IncompatibleCheckpoints when a given base is not the one a Δ was extracted from.
    """
    if not diffs:
        raise PrecheckError("no candidate Δ given; pass at least one --diff")
    bases = list(bases) if bases is not None else [None] * len(diffs)
    if len(bases) != len(diffs):
        raise PrecheckError(f"{len(bases)} bases for {len(diffs)} Δs; give one --base per --diff, in order")
    if not alphas or any(not math.isfinite(a) for a in alphas):
        raise PrecheckError(f"alphas must be finite numbers, got {list(alphas)}")
    tgt = open_checkpoint(target)
    candidates = []
    adapters: dict[str, DeltaInputs] = {}
    for diff, base in zip(diffs, bases, strict=True):
        if is_adapter(diff):
            candidates.append(_adapter_candidate(tgt, Path(diff), base, adapters))
            continue
        stored_delta(diff)  # validates the Δ artifact (manifest kind, file sizes) before any work
        ck = open_checkpoint(diff, require_config=False)
        base_path, notes = _base_for(tgt, ck, base)
        cand = Candidate(diff=str(diff), base=str(base_path) if base_path else None, notes=notes)
        if base_path is not None:
            for key, value in parameter_signals(tgt, open_checkpoint(base_path), ck).items():
                setattr(cand, key, value)
        candidates.append(cand)
    if sample is None and all(c.relative_distance is None for c in candidates):
        raise PrecheckError("nothing to score: pass --sample (a probe of held-out loss) or --base per Δ")
    target_loss = (
        _run_probes(Path(target), candidates, alphas, sample, n, progress, adapters) if sample else None
    )
    signals = _score(candidates, target_loss)
    candidates.sort(key=lambda c: c.score, reverse=True)
    return PrecheckResult(
        target=str(target),
        target_loss=target_loss,
        sample_size=len(probe_conversations(sample, n)) if sample else 0,
        signals=signals,
        candidates=candidates,
    )


def _run_probes(
    target: Path,
    candidates: list[Candidate],
    alphas: Sequence[float],
    sample: Path,
    n: int,
    progress: Progress | None,
    adapters: dict[str, DeltaInputs],
) -> float:
    """Fill each candidate's probe losses; returns L(m_t) (α = 0 under the first Δ's tokenizer files)."""
    conversations = probe_conversations(sample, n)
    total, done = 1 + len(candidates) * len(alphas), 0
    with tempfile.TemporaryDirectory(prefix="recycler-precheck-") as tmp:
        first = candidates[0].diff
        base_loss = _applied_loss(target, Path(first), 0.0, conversations, Path(tmp), adapters.get(first))
        for cand in candidates:
            for alpha in alphas:
                done += 1
                if progress:
                    progress(f"probing {Path(cand.diff).name} α={alpha:g}", done, total)
                cand.probe_loss[f"{alpha:g}"] = _applied_loss(
                    target, Path(cand.diff), alpha, conversations, Path(tmp), adapters.get(cand.diff)
                )
    if progress:
        progress("probes done", total, total)
    if not math.isfinite(base_loss) or base_loss <= 0:
        raise PrecheckError(f"the target's probe loss is {base_loss}; cannot measure a relative gain")
    return base_loss


def _score(candidates: list[Candidate], target_loss: float | None) -> list[str]:
    """Combine the signals every candidate has; returns the names of the terms used."""
    probe = target_loss is not None
    has_distance = all(c.relative_distance is not None for c in candidates)
    signals = (["probe_gain"] if probe else []) + (["proximity", "cosine"] if has_distance else [])
    if not has_distance and any(c.relative_distance is not None for c in candidates):
        for c in candidates:
            c.notes.append("distance and cosine left out of the score: not every candidate has a known base")
    for c in candidates:
        score = 0.0
        if probe:
            alpha, loss = min(c.probe_loss.items(), key=lambda kv: kv[1])
            c.best_alpha = float(alpha)
            c.probe_gain = 1.0 - loss / target_loss
            score += c.probe_gain
        if has_distance:
            score += W_PROXIMITY / (1.0 + c.relative_distance) + W_COSINE * c.cosine
        c.score = score
    return signals
