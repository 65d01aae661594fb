"""`recycler reproduce`: the paper's experiments on the toy family, over seeds, into a Markdown report.

Each seed is a separate family (pretraining seed) and fine-tuning seed, run in its own process with one
torch thread, so two seeds use the two cores of a small CI machine fully. `--fast` is a smoke test:
one seed, three versions, shorter fine-tuning on the smaller fast family. `--lora` adds the LoRA
section (recycler.toy.lora_costs): what shipping Δ as an adapter, and fine-tuning with LoRA, cost.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from recycler.errors import OutputExists, ReproduceError
from recycler.toy.family import Progress, ProgressUpdate, build_toy_family
from recycler.toy.lora_costs import LoraPlan
from recycler.toy.pretrain import torch_threads

FULL_VERSIONS = ("v1", "v2", "v3", "v4", "v5")
FAST_VERSIONS = ("v1", "v3", "v5")
FULL_FT = {"eval_every": 5}  # the full budget is 40 steps: 9 points per curve
FAST_FT = {"eval_every": 20}


@dataclass(frozen=True)
class ReproduceResult:
    out: Path
    report: Path
    results: Path
    plots: dict[str, Path]
    findings: dict  # name → {"per_seed", "mean", "min", "max", "verdict", …}
    wall_time_s: float


def default_cache() -> Path:
    return Path(os.environ.get("RECYCLER_TOY_CACHE", "~/.cache/recycler/toy")).expanduser()


@dataclass(frozen=True)
class Plan:
    """What every seed runs (picklable: it crosses into the seed's process)."""

    cache: Path  # toy families, built once per (size, seed)
    work: Path  # intermediate models
    service: Path  # the release cycles' registries, one per seed
    fast: bool
    versions: tuple[str, ...]
    lora: LoraPlan | None = None  # the LoRA section, when asked for

    @property
    def finetune(self) -> dict:
        """Options of the cycles' fine-tunes on top of the family's budget: how often to evaluate."""
        return FAST_FT if self.fast else FULL_FT


def run_seed(plan: Plan, seed: int, queue=None) -> dict:
    """Build (or reuse) the family of `seed` and run every experiment on it; returns JSON-able results."""
    from transformers.utils import logging as hf_logging

    from recycler.toy.experiments import SeedExperiments

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    lane = f"seed {seed}"

    def send(label: str, done: int, total: int) -> None:
        if queue is not None:
            queue.put(ProgressUpdate(lane, label, done, total))

    t0 = time.monotonic()
    family = build_toy_family(
        plan.cache, fast=plan.fast, seed=seed, progress=lambda u: send(u.label, u.done, u.total)
    )
    built = time.monotonic() - t0
    if unknown := [v for v in plan.versions if v not in family.versions]:
        raise ReproduceError(f"unknown versions {unknown}; the family has {list(family.versions)}")
    ft = family.finetune_config.updated(**plan.finetune)
    home = plan.service / f"seed-{seed}"
    # One thread: these models are too small to gain from two, and a second thread that spin-waits
    # for a core busy with other work slowed a run tenfold.
    with torch_threads(1):
        work = plan.work / f"seed-{seed}"
        experiments = SeedExperiments(
            family, list(plan.versions), work, ft, send, plan.finetune, home, lora=plan.lora
        )
        result = experiments.run()
    result |= {"seed": seed, "service_home": str(home), "finetune_config": ft.model_dump(mode="json")}
    result["family"] = {"root": str(family.root), "config": family.config.model_dump(mode="json")}
    result["timings"]["family_s"] = built
    return result


def _run_seeds(plan: Plan, seeds: list[int], progress: Progress | None) -> list[dict]:
    """One process per seed (at most one per core); progress updates come back through a queue."""
    cores = len(os.sched_getaffinity(0))
    if len(seeds) == 1:  # in-process: simpler to debug, and tests do not pay for a spawn
        return [run_seed(plan, seeds[0], _Relay(progress))]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        queue = manager.Queue()
        stop = threading.Event()
        drain = threading.Thread(target=_drain, args=(queue, progress, stop), daemon=True)
        drain.start()
        try:
            with ProcessPoolExecutor(max_workers=min(len(seeds), cores), mp_context=ctx) as pool:
                futures = [pool.submit(run_seed, plan, s, queue) for s in seeds]
                return [f.result() for f in futures]
        finally:
            stop.set()
            drain.join()


class _Relay:
    """A queue stand-in that hands updates straight to the progress callback (single process)."""

    def __init__(self, progress: Progress | None) -> None:
        self.progress = progress

    def put(self, update: ProgressUpdate) -> None:
        if self.progress:
            self.progress(update)


def _drain(queue, progress: Progress | None, stop: threading.Event) -> None:
    import queue as queue_module

    while not stop.is_set() or not queue.empty():
        try:
            update = queue.get(timeout=0.2)
        except queue_module.Empty:
            continue
        if progress:
            progress(update)


def reproduce(
    out: Path,
    *,
    fast: bool = False,
    seeds: int = 3,
    versions: tuple[str, ...] | None = None,
    progress: Progress | None = None,
    cache: Path | None = None,
    overwrite: bool = False,
    keep_work: bool = False,
    lora: LoraPlan | None = None,
) -> ReproduceResult:
    """Run the experiments for seeds 0..seeds-1 and write report.md, results.json and plots into `out`.

    Families are cached under `cache` (default $RECYCLER_TOY_CACHE or ~/.cache/recycler/toy). The
    release cycles' registries stay in `out`/service/seed-N; the intermediate models go to a temporary
    folder, removed at the end unless `keep_work`. `versions` (≥ 3, oldest first) narrows the run.
    `lora` adds the LoRA section (adapter rank against accuracy, LoRA fine-tuning) on the newest version.
    """
    from recycler.toy.report import write_report

    if seeds < 1:
        raise ReproduceError(f"--seeds must be at least 1, got {seeds}")
    versions = tuple(versions or (FAST_VERSIONS if fast else FULL_VERSIONS))
    if len(versions) < 3:
        raise ReproduceError(f"the findings need at least 3 versions, got {list(versions)}")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputExists(f"{out} exists and is not empty; pass --overwrite or choose another folder")
    t0 = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="recycler-reproduce-"))
    caches = Path(cache) if cache is not None else default_cache()
    plan = Plan(caches, work, out / "service", fast, versions, lora)
    shutil.rmtree(plan.service, ignore_errors=True)
    try:
        runs = _run_seeds(plan, list(range(seeds)), progress)
        if keep_work:
            shutil.copytree(work, out / "work", dirs_exist_ok=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    wall = time.monotonic() - t0
    report, results, plots, findings = write_report(out, runs, fast=fast, wall_time_s=wall)
    _log_mlflow(report, results, plots, findings, fast=fast, seeds=seeds, lora=lora is not None)
    return ReproduceResult(out, report, results, plots, findings, wall)


def _log_mlflow(
    report: Path,
    results: Path,
    plots: dict[str, Path],
    findings: dict,
    *,
    fast: bool,
    seeds: int,
    lora: bool,
) -> None:
    """Log the run to MLflow when tracking is on (RECYCLER_TRACK=1, as for every command)."""
    from recycler.registry import runlog, runs

    params = {"fast": fast, "seeds": seeds, "lora": lora}
    with runs.tracked_run(f"reproduce{'-fast' if fast else ''}", params=params):
        runlog.log_metrics({name: f.get("mean") for name, f in findings.items()})
        for path in (report, results, *plots.values()):
            runlog.log_artifact(path)
