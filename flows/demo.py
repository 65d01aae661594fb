"""`recycler demo`: the whole service on one machine, unattended, on embedded defaults.

Builds (or reuses) the toy family, publishes its first demo release into a release folder, runs the
watcher (which runs the first cycle: FT(M)), publishes the next two and runs the watcher after each
(iterative cycles: M_i + Δ^iter_{i−1} → FT), then backports the newest Δ onto the first release.
The default releases are the toy family's v3, v4 and v5: the bases strong enough for fine-tuning to
work (FT of v1 and v2 stays near 0%), where the paper says transfer is worth having; `--versions
v1,v2,v3` shows the weak end, where the cycle's gate falls back to fine-tuning from the base. Prefect runs without a server
(a temporary local one), MLflow on a SQLite file, artifacts in a local folder, all under OUTPUT.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from recycler.errors import OutputExists, RecyclerError

Say = Callable[[str], None]


def embedded_environment(output: Path) -> dict[str, str]:
    """Everything under OUTPUT, nothing from ~/.prefect or an inherited server; set before Prefect loads."""
    output = output.resolve()
    env = {
        "RECYCLER_HOME": str(output / ".recycler"),
        "RECYCLER_TRACK": "1",
        "PREFECT_HOME": str(output / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "PREFECT_LOGGING_LEVEL": os.environ.get("PREFECT_LOGGING_LEVEL", "WARNING"),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    return env


def publish_release(source: Path, releases: Path, version: str) -> Path:
    """What a pretraining team does when a base ships: a new folder appears, complete, in one rename."""
    dest = releases / version
    if dest.is_dir():
        return dest
    tmp = releases / f".{version}.incoming"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp, copy_function=os.link)
    os.replace(tmp, dest)
    return dest


DEFAULT_VERSIONS = ("v3", "v4", "v5")


def run_demo(output: Path, *, fast: bool, say: Say, versions: tuple[str, ...] = DEFAULT_VERSIONS) -> dict:
    from recycler_flows.release import watch_releases
    from recycler_flows.transfer import backport

    from recycler.settings import get_settings
    from recycler.toy import build_toy_family

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    cache = Path(os.environ.get("RECYCLER_TOY_CACHE", Path.home() / ".cache" / "recycler" / "toy"))
    say(f"toy family ({'fast' if fast else 'full'}) in {cache} …")
    fam = build_toy_family(cache, fast=fast)
    timings["toy family"] = time.perf_counter() - t0
    if unknown := [v for v in versions if v not in fam.versions]:
        raise RecyclerError(f"unknown toy versions {unknown}; the family has {list(fam.versions)}")
    from recycler.toy.reproduce import FAST_FT, FULL_FT

    spec = fam.cycle_spec(finetune=FAST_FT if fast else FULL_FT, baseline=True, precheck_sample=str(fam.dev))
    releases = output / "releases"
    releases.mkdir(parents=True, exist_ok=True)
    cycles: list[dict[str, Any]] = []
    for version in versions:
        t = time.perf_counter()
        publish_release(fam.versions[version], releases, version)
        say(f"published base {version}; the watcher picks it up …")
        cycles += watch_releases(str(releases), spec)
        timings[f"cycle {version}"] = time.perf_counter() - t
    t = time.perf_counter()
    say(f"backporting the newest Δ onto {versions[0]} …")
    back = backport("toy-arith-diff@next-diff", versions[0], spec=spec)
    timings["backport"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    settings = get_settings()
    n_test = sum(1 for line in fam.test.read_text().splitlines() if line.strip())
    noise = {"n_test": n_test, "eval_every": spec.finetune.eval_every}
    return {
        "cycles": cycles,
        "backport": back,
        "timings": timings,
        "tracking_uri": settings.tracking_uri,
        "noise": noise,
    }


def main(output: Path, *, fast: bool, versions: tuple[str, ...], overwrite: bool) -> dict:
    """`recycler demo`: run the demo into OUTPUT and print its table, the registry versions, timings
    and the commands that open the lineage and the MLflow UI."""
    from rich.console import Console
    from rich.table import Table

    console, out = Console(stderr=True), Console()
    if output.exists() and any(output.iterdir()):
        if not overwrite:
            raise OutputExists(f"{output} holds an earlier demo; pass --overwrite to start over")
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)
    os.environ.update(embedded_environment(output))
    start = time.perf_counter()
    result = run_demo(
        output,
        fast=fast,
        say=lambda m: console.print(f"[bold]»[/bold] {m}", highlight=False),
        versions=versions,
    )
    table = Table(title=f"recycler demo: toy family, {len(result['cycles'])} release cycles + backport")
    for col in REPORT_COLUMNS:
        table.add_column(col)
    rows, registered = format_report(result)
    for row in rows:
        table.add_row(*row)
    out.print(table)
    out.print(
        "accuracy on the held-out task; steps to FT(M): steps FT from M+Δ needs to reach FT(M)'s final accuracy"
    )
    out.print(noise_line(result["noise"]))
    out.print("registered: " + " · ".join(registered))
    timings = ", ".join(f"{k} {v:.0f} s" for k, v in result["timings"].items())
    out.print(f"timings: {timings} (wall {time.perf_counter() - start:.0f} s)")
    (output / "demo.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    out.print(
        f"lineage: RECYCLER_HOME={shlex.quote(str(output.resolve() / '.recycler'))} recycler lineage toy-arith-ft@champion",
        soft_wrap=True,
    )
    command = ui_command(result["tracking_uri"])
    out.print(f"MLflow UI: {command + '   then open:' if command else ''}", soft_wrap=True)
    for label, address in ui_links(result).items():
        out.print(f"  {label:<22} {address}", soft_wrap=True, highlight=False)
    return result


def ui_command(tracking_uri: str) -> str | None:
    """The `mlflow ui` command for a SQLite store, quoted for any shell (zsh globs on `?`); None for a
    tracking server, which serves its own UI."""
    from recycler.settings import sqlite_path

    if (db := sqlite_path(tracking_uri)) is None:
        return None
    return f"mlflow ui --backend-store-uri {shlex.quote(f'sqlite:///{db}')} --port 5000"


def ui_links(result: dict) -> dict[str, str]:
    """Deep links into the MLflow UI: the champion, its Δ, the newest cycle's run, the backport's run."""
    from recycler.registry.client import Registry
    from recycler.registry.links import experiment_path, url, version_path
    from recycler.registry.runs import experiment_id, run_url
    from recycler.settings import get_settings

    settings = get_settings()
    reg, ui = Registry.from_settings(settings), settings.ui_url
    links = {"runs": url(ui, experiment_path(experiment_id(settings)))}
    for label, kind, alias in (("champion", "ft", "champion"), ("its Δ (next-diff)", "diff", "next-diff")):
        if found := reg.get_alias(kind, "toy", "arith", alias):
            links[label] = url(ui, version_path(found.reference))
    cycles = [c for c in result["cycles"] if c.get("run_id")]
    if cycles:
        links[f"cycle {cycles[-1]['version']} run"] = run_url(cycles[-1]["run_id"], settings)
    if run_id := result["backport"].get("run_id"):
        links["backport run"] = run_url(run_id, settings)
    return links


def noise_line(noise: dict) -> str:
    """What a difference in the table must exceed to mean something (recycler.toy.findings' floors)."""
    from recycler.toy.findings import accuracy_noise

    n, every = noise["n_test"], noise["eval_every"]
    return (
        f"noise floor: ±{100 * accuracy_noise(0.5, n):.1f} points (standard error of a difference of two accuracies "
        f"on {n} problems), ±{every} steps (curves are evaluated every {every} steps)"
    )


def format_report(result: dict) -> tuple[list[list[str]], list[str]]:
    """Rows of the per-release table (accuracies, steps, champion) and one line per release listing
    the registry versions it created."""
    rows, registered = [], []
    for c in result["cycles"]:
        s, sv = c.get("scores", {}), c.get("savings") or {}
        reached = sv.get("steps_to_target")
        steps = "–" if not sv else f"{reached if reached is not None else 'never'} vs {sv['baseline_steps']}"
        champion = "FT(M)" if c.get("candidate") == "from-base" else "FT"
        rows.append(
            [
                c["version"],
                "M" if c.get("mode") == "first" else "M+Δ" + _sub(c.get("parent_diff")),
                _pct(s.get("base")),
                _pct(s.get("merged")),
                _pct(s.get("ft")),
                _pct(s.get("ft_from_base")),
                steps,
                champion if c.get("promoted") else "kept",
            ]
        )
        reg = c.get("registered", {})
        registered.append(f"{c['version']}: " + " ".join(_short(v) for v in reg.values() if v))
    b = result["backport"]
    rows.append(
        [b["target"], "M+" + _short(b["diff"]), _pct(b["scores"]["base"]), _pct(b["scores"]["merged"])]
    )
    rows[-1] += ["", "", "", "backport"]
    registered.append(f"backport: {_short(b['registered'])}")
    return rows, registered


def _sub(reference: str | None) -> str:
    return f"({_short(reference)})" if reference else ""


REPORT_COLUMNS = ["base", "FT start", "M", "M+Δ", "FT", "FT(M)", "steps to FT(M)", "champion"]


def _short(reference: str) -> str:
    """`toy-arith-diff/3` → `diff/3`: the model's kind suffix and version."""
    name, _, version = reference.partition("/")
    return f"{name.rsplit('-', 1)[-1]}/{version}"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"
