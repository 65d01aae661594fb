"""The paper's findings on the toy world, pinned: a change that silently breaks the science fails here.

Golden figures (tests/golden/toy.json) come from the fast configuration (`reproduce --fast`, the fast
toy families of seeds 0 and 1, releases v1, v3, v5) and, in the `slow` tier, the demo's headline on
the full family. Each one is pinned per seed with a tolerance
and its provenance (machine, commit, date): runs are bit-reproducible on one machine (one torch thread,
fixed seeds), and the tolerance covers other CPUs' float kernels. `RECYCLER_UPDATE_GOLDEN=1` rewrites
the file from this machine's run instead of comparing (then review the diff).

The full `recycler reproduce` (three seeds, every release) with its verdicts is the `slow` test.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest

from recycler.toy.findings import claims
from recycler.toy.reproduce import FAST_VERSIONS, reproduce

GOLDEN = Path(__file__).parent / "golden" / "toy.json"
QUICK = {"fast": True, "seeds": 2, "versions": FAST_VERSIONS}
KEY_FIGURES = {  # claim → tolerance (accuracy as a fraction, steps in optimizer steps)
    "recycling_helps_without_training": 0.03,
    "recycled_ft_ends_higher": 0.03,
    "recycled_ft_converges_faster": 10.0,
    "iterative_start_beats_direct_start": 0.03,
}
UPDATE = os.environ.get("RECYCLER_UPDATE_GOLDEN") == "1"


def provenance() -> dict[str, str]:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=GOLDEN.parent
    )
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or platform.platform()}",
        "commit": commit.stdout.strip() or "unknown",
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
    }


def compare_or_update(
    section: str, measured: dict[str, dict[str, float]], tolerance: dict[str, float]
) -> None:
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}
    if UPDATE:
        golden[section] = {"provenance": provenance(), "tolerance": tolerance, "values": measured}
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
        return
    pinned = golden[section]
    assert pinned["provenance"]["machine"] and pinned["provenance"]["commit"]
    shape = {case: sorted(figures) for case, figures in measured.items()}
    assert shape == {case: sorted(figures) for case, figures in pinned["values"].items()}, (
        "the pinned cases changed"
    )
    off = {
        f"{case}/{name}": (got, pinned["values"][case][name])
        for case, figures in measured.items()
        for name, got in figures.items()
        if abs(got - pinned["values"][case][name]) > pinned["tolerance"][name]
    }
    assert not off, f"moved beyond tolerance (measured, pinned at {pinned['provenance']}): {off}"


@pytest.fixture
def family_cache(toy_cache) -> Path:
    """The session's cache, or RECYCLER_TOY_CACHE when set (families are keyed by their config's digest,
    so a shared cache cannot serve a different world)."""
    return Path(os.environ["RECYCLER_TOY_CACHE"]) if os.environ.get("RECYCLER_TOY_CACHE") else toy_cache


def test_fast_configuration_key_figures_per_seed(family_cache, tmp_path):
    result = reproduce(tmp_path / "out", cache=family_cache, **QUICK)
    runs = json.loads(result.results.read_text())["runs"]
    margins = claims(list(QUICK["versions"]))
    measured = {f"seed {r['seed']}": {name: margins[name][1](r) for name in KEY_FIGURES} for r in runs}
    compare_or_update("fast", measured, KEY_FIGURES)


@pytest.mark.slow
def test_full_reproduce_verdicts(family_cache, tmp_path):
    result = reproduce(tmp_path / "out", cache=family_cache)
    verdicts = {name: f["verdict"] for name, f in result.findings.items()}
    for claim in ("close_versions_transfer_better", "stronger_target_gains_more", "recycling_helps_without_training",
                  "recycled_ft_converges_faster", "recycled_ft_ends_higher", "iterative_start_beats_direct_start",
                  "iterative_ft_beats_ft"):  # fmt: skip
        assert verdicts[claim] == "holds in every seed", (claim, result.findings[claim])
    # Δ^iter ≥ Δ^dir after the same fine-tuning budget: a tie within noise on this world, never a loss
    assert verdicts["iterative_ft_beats_direct_ft"] in ("holds in every seed", "within noise"), (
        result.findings
    )


@pytest.mark.slow
def test_demo_headline_figures(family_cache, tmp_path):
    """`recycler demo` as a newcomer runs it (the README's first command), its table pinned."""
    import sys

    env = {**os.environ, "RECYCLER_TOY_CACHE": str(family_cache)}
    env.pop("PREFECT_API_URL", None)  # the demo's own temporary server, as on a fresh machine
    out = tmp_path / "demo"
    done = subprocess.run(
        [sys.executable, "-m", "recycler.cli", "demo", "-o", str(out)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "noise floor: ±" in done.stdout and "mlflow ui --backend-store-uri" in done.stdout
    result = json.loads((out / "demo.json").read_text())
    measured = {}
    for c in result["cycles"]:
        figures = {f"accuracy {k}": v for k, v in c["scores"].items()}
        if savings := c.get("savings"):
            reached = savings.get("steps_to_target")
            figures["steps to FT(M)"] = -1.0 if reached is None else float(reached)  # -1: never
        measured[f"cycle {c['version']}"] = figures
    measured["backport"] = {f"accuracy {k}": v for k, v in result["backport"]["scores"].items()}
    names = {name for figures in measured.values() for name in figures}
    compare_or_update("demo", measured, {n: 10.0 if n.startswith("steps") else 0.03 for n in names})
