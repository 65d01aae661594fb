"""Every step of a cycle or transfer runs as a Prefect task named for what it does; the library's log
lines and a Markdown summary reach the flow run.

`prefect_step` is the `StepRunner` the library's `run_cycle` and `run_transfer` accept: it wraps the
library call in a task, so the Prefect UI shows "evaluate merged" or "fetch Δ toy-arith-diff/2" as its
own task run with its own state and logs. Steps that talk to the store, the registry or a release
source are retried on errors that may pass (a RecyclerError, such as a bad id or a refused gate,
never will); compute steps are not: a re-run of the flow resumes them from their verified outputs.
No result cache either: a re-run on another worker could not read a local one, and the registry plus
the artifact store are the state that matters.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.states import State

from recycler.errors import RecyclerError
from recycler.service import steps

T = TypeVar("T")
IO_STEPS = {
    steps.completed_cycle,
    steps.find_release,
    steps.stage_base,
    steps.previous_diff,
    steps.champion_before,
    steps.fetch_verified,
    steps.publish_and_register,
}


def _transient(task: object, task_run: object, state: State) -> bool:
    """Retry I/O that may succeed next time; a RecyclerError (bad id, bad file, refused) never will."""
    return not isinstance(state.result(raise_on_failure=False), RecyclerError)


def prefect_step(label: str, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """Run `fn(*args, **kwargs)` as a Prefect task whose task and run are both called `label` (not
    `label-3f2`): the UI lists "fetch base v3", "evaluate merged"."""
    # Prefect's run graph draws names in a font without Greek letters: "apply Δ" would read "apply "
    label = label.replace("Δ", "diff")
    literal = label.replace("{", "{{").replace("}", "}}")  # task_run_name is a format string
    options: dict[str, Any] = {"name": label, "task_run_name": literal, "cache_policy": NO_CACHE}
    if fn in IO_STEPS or getattr(fn, "__self__", None) is not None:  # plain steps and registry reads
        options |= {"retries": 2, "retry_delay_seconds": [2, 10], "retry_condition_fn": _transient}
    return task(fn, **options)(*args, **kwargs)


@contextmanager
def library_logs() -> Iterator[None]:
    """The library's own INFO lines (scores, registered versions, the gate's decision) in the flow
    run's log, attributed to the task that emitted them: Prefect's API handler on the `recycler`
    logger while the flow runs (a nested flow finds it in place)."""
    from prefect.logging.handlers import APILogHandler

    lib = logging.getLogger("recycler")
    if any(isinstance(h, APILogHandler) for h in lib.handlers):
        yield
        return
    handler, level = APILogHandler(), lib.level
    handler.setLevel(logging.INFO)
    lib.addHandler(handler)
    if lib.getEffectiveLevel() > logging.INFO:
        lib.setLevel(logging.INFO)
    try:
        yield
    finally:
        lib.removeHandler(handler)
        lib.setLevel(level)


def summary_artifact(key: str, note: Callable[[str], str], run_id: str | None, description: str) -> None:
    """The flow run's result as a Markdown artifact: `note(ui)` (the MLflow run's description, with
    full links into the MLflow UI at RECYCLER_UI_URL) and a link to the MLflow run itself. Keys are
    lowercase letters, digits and dashes."""
    import re

    from prefect.artifacts import create_markdown_artifact

    from recycler.registry.runs import run_url
    from recycler.settings import get_settings

    settings = get_settings()
    markdown = note(settings.ui_url)
    if run_id:
        markdown += f"\n[The MLflow run]({run_url(run_id, settings)})\n"
    create_markdown_artifact(
        markdown, key=re.sub(r"[^a-z0-9-]+", "-", key.lower()).strip("-"), description=description
    )
