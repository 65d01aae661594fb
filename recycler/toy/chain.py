"""The paper's Table 6 made by the release cycle itself: the service runs over the toy family's
releases, and the numbers are read back from the registry and the cycle runs.

Two chains per seed, each its own registered family in one registry (one MLflow UI shows both):
`toy-direct` (mode direct, with the FT(M_i) baseline: Δ^dir_i = FT(M_i) − M_i, and FT(M_i + Δ^dir_{i−1}))
and `toy-iterative` (Algorithm 1: FT(M_i + Δ^iter_{i−1}), M*_1 = FT(M_1)). Every cycle promotes
(gate margin −1: the chain must not stop where a toy fine-tune happens to lose) and the candidate is
always the recycled fine-tune (`pick_best: false`), so each chain is exactly the paper's. The
watcher starts the cycles, oldest release first; fine-tuning runs in this process (InProcessTrainer).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from recycler.errors import ReproduceError
from recycler.registry.runs import read_keyed_run
from recycler.service.cycle import run_cycle
from recycler.service.services import InProcessTrainer, Services, TaskScorer
from recycler.service.spec import CycleSpec
from recycler.service.watch import watch
from recycler.settings import Settings
from recycler.toy.family import ToyFamily

Mode = Literal["direct", "iterative"]
VARIANT = "arith"
Curve = list[list[float]]  # [[step, accuracy], …]
CURVES = ("eval_curve_ft", "eval_curve_ft_from_base")


@dataclass(frozen=True)
class Chain:
    """What one chain's cycles recorded, per release version (read back from MLflow)."""

    family: str
    base: dict[str, float]  # accuracy of M_i
    start: dict[str, float]  # accuracy of M_i + Δ_{i−1}, no training (from the second release)
    ft: dict[str, float]  # final accuracy of the cycle's fine-tune (FT(M_1) on the first)
    ft_curve: dict[str, Curve]
    baseline: dict[str, float]  # FT(M_i), where the chain ran a baseline
    baseline_curve: dict[str, Curve]
    diffs: dict[str, str]  # Δ_i registered by the cycle of release i: its artifact folder or URI
    run_ids: dict[str, str]


def chain_spec(family: ToyFamily, mode: Mode, finetune: dict) -> CycleSpec:
    return family.cycle_spec(
        finetune=finetune,
        family=f"toy-{mode}",
        mode=mode,
        baseline=mode == "direct",
        pick_best=False,
        gate_margin=-1.0,
    )


@contextmanager
def _tracking_on() -> Iterator[None]:
    """The cycle runs are where the curves are read from: tracking on, whatever the caller's setting."""
    saved = os.environ.get("RECYCLER_TRACK")
    os.environ["RECYCLER_TRACK"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("RECYCLER_TRACK", None)
        else:
            os.environ["RECYCLER_TRACK"] = saved


def run_chain(
    family: ToyFamily,
    versions: list[str],
    home: Path,
    mode: Mode,
    finetune: dict,
    *,
    artifacts: Path | None = None,
) -> Chain:
    """Publish `versions` into a release folder under `home`, let the watcher run one cycle each, and
    read the chain back. The registry (MLflow on SQLite) lives in `home`, the weights in `artifacts`
    (default: under `home`). Re-running finds every cycle complete and only reads."""
    settings = Settings(home=home, artifact_store=str(artifacts) if artifacts else "")
    svc = Services.from_settings(settings, trainer=InProcessTrainer(settings), scorer=TaskScorer())
    spec = chain_spec(family, mode, finetune)
    releases = home / "releases"
    releases.mkdir(parents=True, exist_ok=True)
    for v in versions:
        if not (releases / v).is_dir():
            shutil.copytree(family.versions[v], releases / v, copy_function=os.link)
    with _tracking_on():
        watch(str(releases), spec, lambda r, _a, _k: run_cycle(r.version, str(releases), spec, services=svc).model_dump(),
              services=svc)  # fmt: skip
    return read_chain(svc, spec, versions)


def read_chain(svc: Services, spec: CycleSpec, versions: list[str]) -> Chain:
    """The chain as the registry and the cycle runs hold it: scores and curves from each cycle's run,
    the Δs from the registry."""
    diffs = {
        v.tags["base_version"]: v.artifact.uri
        for v in svc.registry.versions("diff", spec.family, spec.variant)
    }
    chain = Chain(spec.family, {}, {}, {}, {}, {}, {}, {}, {})
    for v in versions:
        run = read_keyed_run(svc.settings, f"{spec.family}/{spec.variant}/{v}@", CURVES)
        if run is None:
            raise ReproduceError(f"no cycle run for {spec.family} {v} in {svc.settings.tracking_uri}")
        m = run.metrics
        chain.run_ids[v], chain.base[v], chain.ft[v] = run.run_id, m["accuracy_base"], m["accuracy_ft"]
        chain.ft_curve[v] = run.curves["eval_curve_ft"]
        if "accuracy_merged" in m:
            chain.start[v] = m["accuracy_merged"]
        if "accuracy_ft_from_base" in m:
            chain.baseline[v] = m["accuracy_ft_from_base"]
            chain.baseline_curve[v] = run.curves["eval_curve_ft_from_base"]
        chain.diffs[v] = diffs[v]
    return chain
