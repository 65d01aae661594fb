"""The fine-tuning output folder: may OUT be (re)used, and the extras published with the model.

During training OUT holds only `.checkpoints/`; the finished model, tokenizer, training record and
plot are built in a temporary sibling and swapped in atomically, so OUT is either an unfinished run
(resumable) or a finished one, never a half-written model.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from recycler.errors import OutputExists
from recycler.io.atomic import check_destination, link_or_copy
from recycler.stages.finetune import state as ts

RECORD = "training_record.json"
PLOT = "convergence.png"


def check_output(out: Path, model_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Decide before any work whether OUT may be (re)used; pure, so every process can run it."""
    check_destination(out, [model_dir], overwrite=True)  # only the overlap-with-input check
    if not out.exists():
        return
    if (out / RECORD).exists() and not overwrite:
        raise OutputExists(f"{out} already holds a finished fine-tune; pass --overwrite to train again")
    if resume or overwrite:
        return
    if ts.checkpoint_root(out).is_dir():
        raise OutputExists(
            f"{out} holds checkpoints of an unfinished run; pass --resume to continue it or --overwrite to start over"
        )
    if any(out.iterdir()):
        raise OutputExists(f"{out} already exists and is not empty; pass --overwrite to replace it")


def link_tree(src: Path, dest: Path) -> None:
    """Hard-link (copy across filesystems) so the old OUT keeps its checkpoints until the swap."""
    shutil.copytree(src, dest, copy_function=link_or_copy)


def plot_curve(path: Path, record: dict) -> None:
    """Training loss and eval metric against step, side by side (Agg canvas: no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    loss_ax, eval_ax = fig.subplots(1, 2)
    if record["loss_per_step"]:
        steps, losses = zip(*record["loss_per_step"], strict=True)
        loss_ax.plot(steps, losses)
    loss_ax.set(xlabel="step", ylabel="training loss", title="training loss")
    meta = record["eval"] or {"task": "no evaluator", "metric": ""}
    if record["curve"]:
        steps, scores = zip(*record["curve"], strict=True)
        eval_ax.plot(steps, scores, marker="o")
    eval_ax.set(xlabel="step", ylabel=meta["metric"], title=f"eval: {meta['task']}")
    fig.tight_layout()
    fig.savefig(path)
