"""One release cycle of Algorithm 1, as idempotent steps that the Prefect flows call one by one.

    Δ_prev  = registry alias `next-diff`             (none on the first cycle)
    merged  = M_i + Δ_prev                            (apply; skipped on the first cycle)
    M*_i    = FT(merged)                              (fine-tune)
    Δ_iter  = M*_i − M_i                              (extract; the next cycle's Δ)

Every step writes into a per-release workspace through atomic folder publishes, so a re-run after a
crash finds complete outputs (verified against their manifests) and skips them, and fine-tuning
resumes from its last complete checkpoint. Registration is idempotent per artifact (registry.py), and
a cycle that already finished is recognised by the `cycle_status` tag on its fine-tune, so a repeated
run changes nothing. No Prefect here: the flows own orchestration, this module owns the data path.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import yaml
from pydantic import BaseModel, ConfigDict

from recycler.atomic import atomic_folder
from recycler.checkpoint import MANIFEST_NAME, open_checkpoint
from recycler.errors import RecyclerError, VerificationFailed
from recycler.finetune_config import FinetuneConfig
from recycler.manifest import manifest_digest, verify_folder, write_manifest
from recycler.releases import InvalidReleaseId, Release, ReleaseSource, check_id, check_version

if TYPE_CHECKING:
    from recycler.registry import RegisteredVersion, Registry
    from recycler.settings import Settings
    from recycler.store import ArtifactRef, ArtifactStore

Say = Callable[[str], None]
CYCLE_COMPLETE = "complete"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
FT_RECORD = "training_record.json"


class CycleSpec(BaseModel):
    """What a family's release cycle needs besides the release itself."""

    model_config = ConfigDict(frozen=True)

    family: str
    variant: str = "instruct"
    mode: Literal["iterative", "direct"] = "iterative"
    train: Path
    eval_task: Path
    finetune: FinetuneConfig = FinetuneConfig()
    alpha: float = 1.0
    max_relative_norm: float = 0.5
    gate_margin: float = 0.0
    precheck_min_score: float | None = None
    precheck_sample: Path | None = None
    baseline: bool = False  # also fine-tune from the plain base: savings report (and Δ^dir in direct mode)
    pick_best: bool = True  # with a baseline, the better of FT(M_i + Δ) and FT(M_i) is the candidate
    eval_limit: int | None = None

    def model_post_init(self, _: object) -> None:
        check_id(self.family)
        check_id(self.variant, "variant")
        if self.mode == "direct" and not self.baseline:
            raise RecyclerError("mode 'direct' recycles FT(base) − base, so it needs baseline=True")


class GateRefused(RecyclerError):
    """The pre-check score is below the configured threshold: the cycle stops before fine-tuning."""

    exit_code = 9


@dataclass(frozen=True)
class Workspace:
    """Per-release working folders under <home>/work/<family>/<variant>/<version>."""

    root: Path

    @classmethod
    def for_release(cls, home: Path, spec: CycleSpec, version: str) -> Workspace:
        root = Path(home) / "work" / spec.family / spec.variant / check_version(version)
        root.mkdir(parents=True, exist_ok=True)
        return cls(root)

    @property
    def base(self) -> Path:
        return self.root / "base"

    @property
    def prev_diff(self) -> Path:
        return self.root / "prev-diff"

    @property
    def merged(self) -> Path:
        return self.root / "merged"

    @property
    def ft(self) -> Path:
        return self.root / "ft"

    @property
    def baseline(self) -> Path:
        return self.root / "ft-from-base"

    @property
    def delta(self) -> Path:
        return self.root / "delta"

    @property
    def evals(self) -> Path:
        return self.root / "evals"

    @property
    def download(self) -> Path:
        return self.root / "download"


@dataclass(frozen=True)
class Services:
    """The artifact store and registry a cycle talks to, both from one Settings."""

    settings: Settings
    store: ArtifactStore
    registry: Registry

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> Services:
        from recycler.registry import Registry
        from recycler.settings import get_settings
        from recycler.store import open_store

        settings = settings or get_settings()
        settings.home.mkdir(parents=True, exist_ok=True)
        return cls(settings, open_store(settings), Registry.from_settings(settings))


# ---------------------------------------------------------------------------------------------- local steps


def is_complete(folder: Path) -> bool:
    """An earlier run's output can be reused only if it verifies against its manifest."""
    if not (Path(folder) / MANIFEST_NAME).is_file():
        return False
    try:
        verify_folder(folder)
    except (VerificationFailed, RecyclerError):
        return False
    return True


def find_release(source: ReleaseSource, version: str) -> Release:
    """The release `version` of `source` (ids are validated before the source is listed)."""
    check_version(version)
    for release in source.list():
        if release.version == version:
            return release
    raise InvalidReleaseId(f"no release {version!r} of family {source.family!r} in the release source")


def stage_base(release: Release, local: Path, dest: Path) -> Path:
    """A manifest-carrying view of the release (hard links, no copy) that the store can publish.

    The release folder itself is never written to: it may be a user's checkpoint or a mounted bucket.
    """
    if is_complete(dest):
        return dest
    if dest.exists():
        shutil.rmtree(dest)
    open_checkpoint(local)  # validate (pickles, index, headers) before anything else
    with atomic_folder(dest, [local]) as tmp:
        for f in sorted(Path(local).iterdir()):  # pickles beside the safetensors are never carried on
            if f.is_file() and f.name != MANIFEST_NAME and not f.name.endswith(PICKLE_SUFFIXES):
                try:
                    os.link(f, tmp / f.name)
                except OSError:
                    shutil.copy2(f, tmp / f.name)
        body = {"role": "base", "family": release.family, "version": release.version}
        write_manifest(tmp, {"kind": "model", **body, "release_fingerprint": release.fingerprint}, {})
    return dest


def apply_step(base: Path, diff: Path, dest: Path, spec: CycleSpec) -> Path:
    """M_i + α·Δ_prev, reused if a verified copy exists."""
    from recycler.policy import ApplyPolicy
    from recycler.transfer import apply_diff

    if not is_complete(dest):
        apply_diff(base, diff, dest, policy=ApplyPolicy(alpha=spec.alpha), overwrite=True)
    return dest


def extract_step(base: Path, tuned: Path, dest: Path, spec: CycleSpec) -> Path:
    """Δ = tuned − base in float32 (exact round trip), reused if a verified copy exists."""
    from recycler.extract import diff_checkpoints

    if not is_complete(dest):
        diff_checkpoints(base, tuned, dest, overwrite=True, max_relative_norm=spec.max_relative_norm)
    return dest


def finetune_step(start: Path, dest: Path, spec: CycleSpec, *, role: str) -> dict:
    """FT(start) in a child process (`accelerate launch` on GPU hosts, plain python on CPU).

    A child process because accelerate keeps process-wide state, and because a crash (OOM, a killed
    pod) must not take the orchestrating flow with it. `--resume` continues from the last complete
    checkpoint of an interrupted attempt. The finished folder gets a manifest so it can be published.
    """
    from recycler.launcher import run_finetune
    from recycler.store import ensure_manifest

    record_path = dest / FT_RECORD
    if not record_path.is_file():
        config = dest.parent / f".{dest.name}.finetune.yaml"
        config.write_text(yaml.safe_dump(spec.finetune.model_dump(mode="json"), sort_keys=True))
        args = [str(start), "--data", str(spec.train), "--output", str(dest), "--config", str(config)]
        args += ["--eval-data", str(spec.eval_task), "--resume"]
        try:
            run_finetune(args)
        except subprocess.CalledProcessError as e:
            raise FinetuneFailed(
                f"fine-tuning {start} exited with code {e.returncode}; re-run the cycle to resume "
                f"from the last complete checkpoint in {dest / '.checkpoints'}"
            ) from e
    ensure_manifest(dest, kind="model", body={"role": role})
    shutil.rmtree(dest / ".checkpoints", ignore_errors=True)  # finished: the checkpoints are dead weight
    return json.loads(record_path.read_text())


class FinetuneFailed(RecyclerError):
    exit_code = 20


def evaluate_cached(model: Path, spec: CycleSpec, cache: Path, *, name: str) -> float:
    """Accuracy of `model` on the spec's task, cached per (model manifest, task) so re-runs skip it."""
    cache.mkdir(parents=True, exist_ok=True)
    ft = spec.finetune
    how = json.dumps([str(spec.eval_task), spec.eval_limit, ft.eval_extract, ft.eval_max_new_tokens])
    setting = hashlib.sha256(how.encode()).hexdigest()[:8]  # the same model under other settings differs
    key = f"{name}-{manifest_digest(model)[:16]}-{setting}.json"
    if (cache / key).is_file():
        return float(json.loads((cache / key).read_text())["score"])
    from transformers.utils import logging as hf_logging

    from recycler.evaluate import load_task
    from recycler.model_folder import load_causal_lm, load_tokenizer

    hf_logging.disable_progress_bar()
    task = load_task(
        spec.eval_task,
        limit=spec.eval_limit,
        extract=ft.eval_extract,
        batch_size=ft.eval_batch_size,
        max_new_tokens=ft.eval_max_new_tokens,
    )
    result = task.evaluate(load_causal_lm(model), load_tokenizer(model))
    tmp = cache / f".{key}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps({"score": result.score, "n": result.n, "task": result.task}))
    os.replace(tmp, cache / key)
    return float(result.score)


def gate(ft: float, base: float, champion: float | None, margin: float) -> tuple[bool, str]:
    """Promote only a model that beats its base and the serving champion by `margin`."""
    if ft < base + margin:
        return False, f"fine-tuned {ft:.3f} does not beat base {base:.3f} by {margin}"
    if champion is not None and ft < champion + margin:
        return False, f"fine-tuned {ft:.3f} does not beat champion {champion:.3f} by {margin}"
    return True, "promoted"


def steps_to_reach(curve: list[list[float]] | list[tuple[float, float]], target: float) -> int | None:
    """First step at which an accuracy curve reaches `target` (None if never)."""
    for step, value in curve:
        if value >= target:
            return int(step)
    return None


def savings(recycled: dict, baseline: dict) -> dict[str, float | int | None]:
    """How much of FT-from-base the recycled start saves: steps and wall time to reach the accuracy
    FT-from-base ends at. None when the recycled run never gets there."""
    target = baseline["curve"][-1][1] if baseline.get("curve") else None
    if target is None:
        return {"target_accuracy": None, "steps_to_target": None, "baseline_steps": baseline.get("steps")}
    reached = steps_to_reach(recycled.get("curve") or [], target)
    total = baseline.get("steps") or 0
    out: dict[str, float | int | None] = {
        "target_accuracy": float(target),
        "steps_to_target": reached,
        "baseline_steps": total,
        "steps_saved": (total - reached) if reached is not None else None,
    }
    if reached is not None and recycled.get("steps") and recycled.get("wall_time_s"):
        per_step = recycled["wall_time_s"] / recycled["steps"]
        out["wall_time_to_target_s"] = reached * per_step
        out["baseline_wall_time_s"] = baseline.get("wall_time_s")
    return out


# ---------------------------------------------------------------------------------------------- registry steps


def previous_diff(registry: Registry, spec: CycleSpec, version: str) -> RegisteredVersion | None:
    """The Δ this cycle applies: the family's `next-diff`, unless this very cycle already moved the
    alias before being interrupted, in which case the Δ it applied is recorded on the new Δ."""
    from recycler.registry import NEXT_DIFF

    prev = registry.get_alias("diff", spec.family, spec.variant, NEXT_DIFF)
    if prev is not None and prev.tags.get("base_version") == version:
        parent = prev.tags.get("cycle_parent_diff")
        prev = registry.resolve(parent) if parent else None
    return prev


def completed_cycle(registry: Registry, spec: CycleSpec, version: str) -> RegisteredVersion | None:
    """The fine-tune of a cycle that already ran to the end for this base version, if any."""
    for v in registry.versions("ft", spec.family, spec.variant):
        if v.tags.get("base_version") == version and v.tags.get("cycle_status") == CYCLE_COMPLETE:
            return v
    return None


def fetch_verified(store: ArtifactStore, ref: ArtifactRef, dest: Path) -> Path:
    """A local, verified copy of an artifact (reused when an earlier attempt already fetched it)."""
    if is_complete(dest) and manifest_digest(dest) == ref.digest:
        return dest
    return store.fetch(ref, dest, overwrite=True)


def champion_score(registry: Registry, spec: CycleSpec, metric: str) -> float | None:
    from recycler.registry import CHAMPION

    champ = registry.get_alias("ft", spec.family, spec.variant, CHAMPION)
    if champ is None or f"eval.{metric}" not in champ.tags:
        return None
    return float(champ.tags[f"eval.{metric}"])
