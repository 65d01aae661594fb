"""The release cycle's steps, each a library call that is safe to repeat.

Local steps write into the release's workspace through atomic publishes and reuse an earlier
attempt's output only if it verifies against its manifest; fine-tuning resumes from its last
complete checkpoint. Registry steps are idempotent per artifact (registration is deduplicated by
manifest digest) and read the registry, never a watcher's memory, to know what happened.
`recycler.service.cycle` orders them; the Prefect flows run each one as a task.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shutil
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

from recycler.errors import InvalidReleaseId, RecyclerError, VerificationFailed
from recycler.io.atomic import atomic_folder, link_or_copy
from recycler.io.layout import MANIFEST_NAME, is_release_file
from recycler.io.manifest import manifest_digest, read_manifest, verify_folder, write_manifest
from recycler.registry.names import ARTIFACT_KINDS, CHAMPION, NEXT_DIFF, Lineage, RegisteredVersion
from recycler.registry.runlog import log_json_artifact, log_metrics
from recycler.registry.runs import child_run
from recycler.service.services import FT_RECORD, Services
from recycler.stages.gate import Evidence, as_evidence
from recycler.store.releases import Release, ReleaseSource, check_version, open_source

if TYPE_CHECKING:
    from recycler.registry.client import Registry
    from recycler.service.spec import CycleSpec, EvalSettings
    from recycler.store import ArtifactRef, ArtifactStore

CYCLE_COMPLETE = "complete"
METRIC = "accuracy"
log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- local


def is_complete(folder: Path) -> bool:
    """An earlier run's output can be reused only if it verifies against its manifest."""
    if not (Path(folder) / MANIFEST_NAME).is_file():
        return False
    try:
        verify_folder(folder)
    except (VerificationFailed, RecyclerError):
        return False
    return True


def open_releases(svc: Services, source: str, spec: CycleSpec) -> ReleaseSource:
    """The family's release source, with its file digests cached under the home (a folder's
    fingerprints are of content: hashed once per file change, not on every poll)."""
    digests = svc.settings.home / "digests" / f"{hashlib.sha256(source.encode()).hexdigest()[:16]}.json"
    return open_source(source, spec.family, endpoint_url=svc.settings.s3_endpoint_url, digests=digests)


def list_releases(source: ReleaseSource) -> list[Release]:
    """The complete releases of `source`, oldest first (ones still being copied are left out)."""
    return source.list()


def cycle_key(spec: CycleSpec, release: Release) -> str:
    """The key of a cycle's MLflow run: one per release version and content."""
    return f"{spec.family}/{spec.variant}/{release.version}@{release.fingerprint[:12]}"


def find_release(source: ReleaseSource, version: str, listing: list[Release] | None = None) -> Release:
    """The release `version` of `source` (ids are validated before the source is listed)."""
    check_version(version)
    releases = source.list() if listing is None else listing
    for release in releases:
        if release.version == version:
            return release
    known = ", ".join(r.version for r in releases) or "none"
    partial = source.incomplete.get(version)
    why = f"; {version} is not complete yet: {partial}" if partial else ""
    raise InvalidReleaseId(
        f"no release {version!r} of family {source.family!r} in the release source (it has: {known}){why}"
    )


def staged_fingerprint(dest: Path) -> str | None:
    """The release fingerprint a staged base was made from (None if there is no complete one)."""
    if not is_complete(dest):
        return None
    body, _ = read_manifest(dest)
    return body.get("release_fingerprint")


def stage_base(source: ReleaseSource, release: Release, download: Path, dest: Path) -> Path:
    """A manifest-carrying view of the release (hard links, no copy) that the store can publish.

    Reused only when it was staged from this very release content (its fingerprint): a release
    re-published under the same version, or a stale download, is staged again. The release folder
    itself is never written to: it may be a user's checkpoint or a mounted bucket. Only weights,
    configs, tokenizer and templates are carried on (`is_release_file`), never pickles.
    """
    from recycler.io.checkpoint import open_checkpoint

    if staged_fingerprint(dest) == release.fingerprint:
        return dest
    if dest.exists():
        shutil.rmtree(dest)
    fresh = download / release.fingerprint[:16]  # downloads are per content, never reused across it
    if download.is_dir():
        for old in download.iterdir():
            if old != fresh:
                shutil.rmtree(old, ignore_errors=True)
    local = source.materialize(release, fresh)
    open_checkpoint(local)  # validate (pickles, index, headers) before anything else
    with atomic_folder(dest, [local]) as tmp:
        for f in sorted(Path(local).iterdir()):
            if f.is_file() and is_release_file(f.name):
                link_or_copy(f, tmp / f.name)
        body = {"role": "base", "family": release.family, "version": release.version}
        write_manifest(tmp, {"kind": "model", **body, "release_fingerprint": release.fingerprint}, {})
    return dest


def _inputs_file(dest: Path) -> Path:
    return dest.parent / f".{dest.name}.inputs.json"


def reusable(dest: Path, inputs: dict, *, complete: bool = True) -> bool:
    """Whether an earlier attempt's `dest` was made from exactly `inputs` (and, with `complete`,
    verifies). If not, what is there is removed and `inputs` recorded for the attempt about to start:
    a workspace entry is never reused for other inputs (another α, Δ, base or config)."""
    marker = _inputs_file(dest)
    recorded = json.loads(marker.read_text()) if marker.is_file() else None
    if recorded == inputs and (not complete or is_complete(dest)):
        return True
    if recorded != inputs:
        shutil.rmtree(dest, ignore_errors=True)
        marker.write_text(json.dumps(inputs, sort_keys=True))
    return False


def apply_step(
    base: Path, diff: Path, dest: Path, alpha: float, *, parent_run: str | None = None, name: str = "apply Δ"
) -> Path:
    """M_i + α·Δ, reused only if a verified copy made from the same base, Δ and α exists (`name`: its
    MLflow run's)."""
    from recycler.delta.policy import ApplyPolicy
    from recycler.stages.apply import apply_diff

    inputs = {"op": "apply", "base": manifest_digest(base), "delta": manifest_digest(diff), "alpha": alpha}
    if not reusable(dest, inputs):
        with child_run(parent_run, name, params=inputs) as run_id:
            result = apply_diff(base, diff, dest, policy=ApplyPolicy(alpha=alpha), overwrite=True)
            log_json_artifact(result.report.model_dump(mode="json"), "compatibility.json", run_id=run_id)
    return dest


def extract_step(
    base: Path, tuned: Path, dest: Path, spec: CycleSpec, *, parent_run: str | None = None
) -> Path:
    """Δ = tuned − base (exact round trip), reused only if made from the same base and fine-tune."""
    from recycler.stages.extract import diff_checkpoints

    inputs = {"op": "extract", "base": manifest_digest(base), "tuned": manifest_digest(tuned)}
    if not reusable(dest, inputs | {"max_relative_norm": spec.max_relative_norm}):
        name = f"extract Δ {dest.parent.name} = {tuned.name} − base"
        with child_run(parent_run, name, params=inputs) as run_id:
            result = diff_checkpoints(
                base, tuned, dest, overwrite=True, max_relative_norm=spec.max_relative_norm
            )
            log_metrics(
                {f"relative_norm_{k}": v for k, v in result.manifest.get("relative_norms", {}).items()},
                run_id=run_id,
            )
    return dest


FT_RUN_NAMES = {
    "ft": "finetune {version} from {start}",
    "ft-from-base": "finetune {version} from base (baseline)",
}


def finetune_step(
    svc: Services, start: Path, dest: Path, spec: CycleSpec, *, role: str, parent_run: str | None = None
) -> dict:
    """FT(start) with the services' trainer (resumed after a crash); returns the training record.

    An earlier attempt (finished, or checkpoints to resume) counts only if it trained from the same
    start, data and options. The finished folder gets a manifest so it can be published; its
    checkpoints are dead weight then.
    """
    from recycler.io.manifest import sha256_file
    from recycler.store import ensure_manifest

    inputs = {  # what determines the weights; evaluation-only settings never throw a fine-tune away
        "op": "finetune",
        "start": manifest_digest(start),
        "train": sha256_file(spec.train).sha256,
        "config": json.loads(json.dumps(spec.finetune_config().resume_fingerprint(), default=str)),
    }
    run_marker = dest.parent / f".{dest.name}.mlflow-run"
    if not reusable(dest, inputs, complete=False) or not (dest / FT_RECORD).is_file():
        what = {"merged": "M+Δ", "base": "base"}.get(start.name, start.name)
        name = FT_RUN_NAMES[role].format(version=dest.parent.name, start=what)
        with child_run(parent_run, name, tags={"recycler.role": role}) as run_id:
            svc.trainer.finetune(start, dest, spec, run_id=run_id)
        run_marker.write_text(run_id or "")
    ensure_manifest(dest, kind="model", body={"role": role})
    shutil.rmtree(dest / ".checkpoints", ignore_errors=True)
    record = json.loads((dest / FT_RECORD).read_text())
    return record | {"mlflow_run_id": run_marker.read_text() if run_marker.is_file() else ""}


def evaluate_cached(
    svc: Services,
    model: Path,
    evaluation: EvalSettings,
    cache: Path,
    *,
    name: str,
    parent_run: str | None = None,
) -> Evidence:
    """Score of `model` with its per-example outcomes, cached by content: the model's manifest and
    the evaluation's provenance (the task file's digest and every setting that changes a result), so a
    re-run skips it and an edited task file or setting is measured anew, never read from the cache."""
    cache.mkdir(parents=True, exist_ok=True)
    provenance = evaluation.provenance()
    key = f"{manifest_digest(model)[:16]}-{provenance}.json"
    if (cache / key).is_file():
        cached = json.loads((cache / key).read_text())
        outcomes = cached.get("outcomes")
        evidence = Evidence(
            float(cached["score"]), tuple(outcomes) if outcomes is not None else None, provenance
        )
        log.info("%s (%s): %s %.1f%% (cached)", name, model.parent.name, METRIC, 100 * evidence.score)
        return evidence
    with child_run(
        parent_run, f"evaluate {name} {model.parent.name}", params={"model": name, "task": evaluation.task}
    ) as run_id:
        scored = as_evidence(svc.scorer.score(model, evaluation))
        evidence = Evidence(scored.score, scored.outcomes, provenance)
        log_metrics({"accuracy": evidence.score}, run_id=run_id)
    log.info("%s (%s): %s %.1f%%", name, model.parent.name, METRIC, 100 * evidence.score)
    record = {"score": evidence.score, "outcomes": evidence.outcomes, "provenance": provenance, "task": str(evaluation.task)}  # fmt: skip
    tmp = cache / f".{key}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(record))
    os.replace(tmp, cache / key)
    return evidence


def eval_tags(evidence: Evidence) -> dict[str, str]:
    """The status tags that say what a registered score measured (recycler.registry.names.EVAL_TAGS)."""
    tags = {"eval_provenance": evidence.provenance} if evidence.provenance else {}
    if evidence.outcomes is not None:
        packed = base64.b64encode(zlib.compress(bytes(evidence.outcomes), 9)).decode()
        tags |= {"eval_outcomes": packed, "eval_n": str(len(evidence.outcomes))}
    return tags


def registered_evidence(version: RegisteredVersion) -> Evidence | None:
    """A registered version's score as the gate reads it (None when it has no score)."""
    score = version.score(METRIC)
    if score is None:
        return None
    packed = version.tags.get("eval_outcomes")
    outcomes = tuple(zlib.decompress(base64.b64decode(packed))) if packed else None
    return Evidence(score, outcomes, version.tags.get("eval_provenance", ""))


def precheck_step(target: Path, diff: Path, spec: CycleSpec) -> dict:
    """Pre-check score of M_i + α·Δ on the spec's sample (held-out loss probe), before any training."""
    from recycler.stages.precheck import precheck

    result = precheck(target, [diff], alphas=(spec.alpha,), sample=spec.precheck_sample, n=32)
    best = result.candidates[0]
    return {"score": best.score, "probe_gain": best.probe_gain, "target_loss": result.target_loss}


# ---------------------------------------------------------------------------------------------- registry


def of_release(v: RegisteredVersion, release: Release) -> bool:
    """Whether a registered version belongs to this release's cycle: same version and content
    (versions registered before recycler recorded fingerprints match on the version alone)."""
    fp = v.fingerprint
    return v.tags.get("base_version") == release.version and (not fp or fp == release.fingerprint)


def completed_cycle(registry: Registry, spec: CycleSpec, release: Release) -> RegisteredVersion | None:
    """The fine-tune of a cycle that already ran to the end for this release (version and content)."""
    for v in registry.versions("ft", spec.family, spec.variant):
        if of_release(v, release) and v.tags.get("cycle_status") == CYCLE_COMPLETE:
            return v
    return None


def previous_diff(registry: Registry, spec: CycleSpec, release: Release) -> RegisteredVersion | None:
    """The Δ this cycle applies: the family's `next-diff`, unless this very cycle already moved the
    alias before being interrupted, in which case the Δ it applied is recorded on the new Δ."""
    prev = registry.get_alias("diff", spec.family, spec.variant, NEXT_DIFF)
    if prev is not None and of_release(prev, release):  # (of_release also matches pre-fingerprint Δs)
        parent = prev.tags.get("cycle_parent_diff")
        prev = registry.resolve(parent) if parent else None
    return prev


def champion_before(registry: Registry, spec: CycleSpec, release: Release) -> RegisteredVersion | None:
    """The champion before this cycle. An interrupted attempt of this very cycle recorded which one it
    compared against on its fine-tunes before moving any alias, so a re-run decides against the same
    champion (not against its own half-promoted fine-tune)."""
    for v in registry.versions("ft", spec.family, spec.variant):
        if of_release(v, release) and "gate_champion" in v.tags:
            recorded = v.tags["gate_champion"]
            return None if recorded == "none" else registry.resolve(recorded)
    return registry.get_alias("ft", spec.family, spec.variant, CHAMPION)


def fetch_verified(store: ArtifactStore, ref: ArtifactRef, dest: Path) -> Path:
    """A local, verified copy of an artifact (reused when an earlier attempt already fetched it)."""
    if is_complete(dest) and manifest_digest(dest) == ref.digest:
        return dest
    return store.fetch(ref, dest, overwrite=True)


def publish_and_register(
    svc: Services,
    folder: Path,
    kind: str,
    family: str,
    variant: str,
    base_version: str,
    *,
    lineage: Lineage = Lineage(),
    score: Evidence | float | None = None,
    status: dict[str, str] | None = None,
    fingerprint: str = "",
) -> RegisteredVersion:
    """Publish `folder` to the store (files first, manifest last) and register it: both idempotent.
    A score is registered with its provenance and per-example outcomes (`eval_tags`)."""
    ref = svc.store.publish(
        folder, ARTIFACT_KINDS[kind][0]
    )  # the store kind this registered kind is published as
    metrics, status = None, dict(status or {})
    if score is not None:
        evidence = as_evidence(score)
        metrics, status = {METRIC: evidence.score}, eval_tags(evidence) | status
    version = svc.registry.register(
        kind,
        family,
        None if kind == "base" else variant,
        ref,
        base_version=base_version,
        lineage=lineage,
        metrics=metrics,
        status=status or None,
        release_fingerprint=fingerprint,
    )
    log.info("registered %s (%s of release %s)", version.reference, kind, base_version)
    return version
