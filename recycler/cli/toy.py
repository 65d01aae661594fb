"""`recycler toy build`, `recycler reproduce` and `recycler precheck`.

Mounted by the main CLI with `from recycler.cli.toy import register; register(app)`. Commands raise
`RecyclerError` subclasses; the main CLI prints `error: <message>` and exits with the error's code.
Heavy imports (torch, transformers) happen inside the commands so that `recycler --help` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from recycler.toy.family import ProgressUpdate

toy_app = typer.Typer(help="The toy model family used to reproduce the paper on a CPU.", no_args_is_help=True)

FastOpt = Annotated[
    bool, typer.Option("--fast", help="The small fast variant (tests, CI): a smoke test, not evidence.")
]
CacheOpt = Annotated[
    Path | None,
    typer.Option(
        "--cache",
        help="Where toy families are cached (default $RECYCLER_TOY_CACHE or ~/.cache/recycler/toy).",
    ),
]


class LaneProgress:
    """One rich progress bar per lane (seed), fed with ProgressUpdates; started on the first update."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("[bold]{task.fields[lane]}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.description}"), TimeElapsedColumn(), console=Console(stderr=True),
        )  # fmt: skip
        self.tasks: dict[str, int] = {}

    def __enter__(self) -> LaneProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def __call__(self, u: ProgressUpdate) -> None:
        if u.lane not in self.tasks:
            self.tasks[u.lane] = self.progress.add_task(u.label, total=u.total, lane=u.lane)
        self.progress.update(self.tasks[u.lane], description=u.label, completed=u.done, total=u.total)


@toy_app.command("build")
def build_command(
    fast: FastOpt = False,
    seed: Annotated[
        int, typer.Option("--seed", help="Seed of the corpus, the task split and the weights.")
    ] = 0,
    output: Annotated[
        Path | None,
        typer.Option("-o", "--output", help="Cache folder to build into (default: --cache's default)."),
    ] = None,
) -> None:
    """Build (or find cached) the toy family: base versions v1…v5, train/dev/test data, and its cycle spec."""
    from recycler.toy.family import build_toy_family
    from recycler.toy.reproduce import default_cache

    with LaneProgress() as progress:
        family = build_toy_family(output or default_cache(), fast=fast, seed=seed, progress=progress)
    summary = {
        "root": str(family.root),
        "versions": {k: str(v) for k, v in family.versions.items()},
        "train": str(family.train),
        "dev": str(family.dev),
        "test": str(family.test),
        # a whole family spec, as `recycler cycle --spec` takes it (fine-tuning and evaluation settings
        # each in their place: a spec refuses evaluation options under `finetune:`)
        "spec": family.cycle_spec().model_dump(mode="json"),
    }
    typer.echo(json.dumps(summary, indent=1))


def reproduce_command(
    output: Annotated[
        Path, typer.Option("-o", "--output", help="Folder for report.md, results.json and plots.")
    ],
    fast: FastOpt = False,
    seeds: Annotated[
        int,
        typer.Option(
            "--seeds",
            min=1,
            help="Families (pretraining + FT seeds) to run; a finding holds only if it holds in each.",
        ),
    ] = 3,
    versions: Annotated[
        str | None,
        typer.Option(
            "--versions", help="Base versions to run, oldest first, comma-separated (≥ 3; default all)."
        ),
    ] = None,
    cache: CacheOpt = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Write into a non-empty OUTPUT.")] = False,
    keep_work: Annotated[
        bool, typer.Option("--keep-work", help="Keep every intermediate model under OUTPUT/work.")
    ] = False,
    lora: Annotated[
        bool,
        typer.Option(
            "--lora",
            help="Add the LoRA section: accuracy of the newest version + Δ as a rank-r adapter, and LoRA "
            "fine-tuning from it with and without Δ (1–1.5 min more per seed in full mode on 2 cores).",
        ),
    ] = False,
    lora_ranks: Annotated[
        str,
        typer.Option(
            "--lora-ranks", help="Adapter ranks of the LoRA section, comma-separated (full is added)."
        ),
    ] = "1,2,4,8,16",
) -> None:
    """Run the paper's experiments on the toy family and write a Markdown report with tables and plots.

    The fine-tunes, Δs and recycled starts come from the release cycle itself: per seed, the watcher runs
    one cycle per release in mode direct (with FT(M) baselines) and in mode iterative (Algorithm 1),
    and the tables are read back from their registry, kept in OUTPUT/service/seed-N (open it with
    `mlflow ui`). Full mode (default, 3 seeds) takes minutes on a 2-core CPU; --fast is a smoke test.
    Logs to MLflow when RECYCLER_TRACK=1 (report, results and plots as artifacts, findings as metrics).
    `--lora` adds the table for LoRA users: which adapter rank keeps Δ's accuracy, and whether recycling
    helps LoRA fine-tuning as it helps full fine-tuning.
    """
    from recycler.toy.lora_costs import LoraPlan
    from recycler.toy.reproduce import reproduce

    plan = LoraPlan(ranks=parse_ranks(lora_ranks)) if lora else None
    with LaneProgress() as progress:
        result = reproduce(
            output,
            fast=fast,
            seeds=seeds,
            versions=tuple(v.strip() for v in versions.split(",") if v.strip()) if versions else None,
            progress=progress,
            cache=cache,
            overwrite=overwrite,
            keep_work=keep_work,
            lora=plan,
        )
    for name, f in result.findings.items():
        mean = f.get("mean")
        typer.echo(f"{name}: {'n/a' if mean is None else f'{mean:+.3f}'} ({f['verdict']})")
    typer.echo(f"wrote {result.report} ({result.wall_time_s:.0f} s)")


def parse_ranks(text: str) -> tuple[int, ...]:
    """'1,2,4' → (1, 2, 4); a BadParameter naming the option otherwise."""
    try:
        ranks = tuple(int(r) for r in text.split(",") if r.strip())
    except ValueError:
        ranks = ()
    if not ranks or min(ranks) < 1:
        raise typer.BadParameter(
            f"expected positive integers separated by commas, got {text!r}", param_hint="--lora-ranks"
        )
    return ranks


def precheck_command(
    target: Annotated[Path, typer.Argument(help="Target base model folder m_t.")],
    diff: Annotated[
        list[Path],
        typer.Option(
            "--diff", help="Candidate Δ folder, or a PEFT LoRA adapter folder (with its --base) (repeatable)."
        ),
    ],
    base: Annotated[
        list[Path] | None,
        typer.Option("--base", help="The source base m_s of each --diff, in the same order (repeatable)."),
    ] = None,
    sample: Annotated[
        Path | None, typer.Option("--sample", help="Held-out SFT or task JSONL for the loss probe.")
    ] = None,
    alpha: Annotated[
        list[float] | None, typer.Option("--alpha", help="Scales of Δ to probe (repeatable).")
    ] = None,
    n: Annotated[int, typer.Option("-n", min=1, help="Probe examples taken from --sample.")] = 64,
    output: Annotated[Path | None, typer.Option("--output", help="Write the full result as JSON.")] = None,
) -> None:
    """Rank candidate Δs for TARGET by how well they should transfer, without fine-tuning."""
    from rich.console import Console
    from rich.table import Table
    from transformers.utils import logging as hf_logging

    from recycler.stages.precheck import PrecheckError, precheck

    hf_logging.disable_progress_bar()
    if base and len(base) != len(diff):
        raise PrecheckError(
            f"{len(base)} --base for {len(diff)} --diff; give one --base per --diff, in order"
        )
    with LaneProgress() as progress:
        result = precheck(
            target, diff, bases=base, alphas=tuple(alpha or (0.5, 1.0)), sample=sample, n=n,
            progress=lambda label, done, total: progress(_update("precheck", label, done, total)),
        )  # fmt: skip
    table = Table(title=f"pre-check for {target} (score = {' + '.join(result.signals)})")
    for col in ("rank", "Δ", "score", "best α", "probe gain", "‖m_t−m_s‖/‖Δ‖", "cos"):
        table.add_column(col)
    for i, c in enumerate(result.candidates, 1):
        table.add_row(
            str(i),
            Path(c.diff).name,
            f"{c.score:+.4f}",
            _fmt(c.best_alpha),
            _fmt(c.probe_gain),
            _fmt(c.relative_distance),
            _fmt(c.cosine),
        )
    Console().print(table)
    for c in result.candidates:
        for note in c.notes:
            typer.echo(f"note: {Path(c.diff).name}: {note}", err=True)
    if output is not None:
        output.write_text(result.model_dump_json(indent=1) + "\n")


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.3g}"


def _update(lane: str, label: str, done: int, total: int) -> ProgressUpdate:
    from recycler.toy.family import ProgressUpdate

    return ProgressUpdate(lane, label, done, total)


def register(app: typer.Typer) -> None:
    """Add `toy build`, `reproduce` and `precheck` to the main recycler CLI."""
    app.add_typer(toy_app, name="toy")
    app.command("reproduce")(reproduce_command)
    app.command("precheck")(precheck_command)
