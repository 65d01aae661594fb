"""Every step of a cycle or transfer runs as a Prefect task named for what it does.

`prefect_step` is the `StepRunner` the library's `run_cycle` and `run_transfer` accept: it wraps the
library call in a task, so the Prefect UI shows "evaluate merged" or "fetch Δ toy-arith-diff/2" as its
own task run with its own state and logs. Steps that talk to the store, the registry or a release
source are retried on errors that may pass (a RecyclerError, such as a bad id or a refused gate,
never will); compute steps are not: a re-run of the flow resumes them from their verified outputs.
No result cache either: a re-run on another worker could not read a local one, and the registry plus
the artifact store are the state that matters.
"""

from __future__ import annotations

from collections.abc import Callable
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
    """Run `fn(*args, **kwargs)` as a Prefect task called `label`."""
    options: dict[str, Any] = {"name": label, "cache_policy": NO_CACHE}
    if fn in IO_STEPS or getattr(fn, "__self__", None) is not None:  # plain steps and registry reads
        options |= {"retries": 2, "retry_delay_seconds": [2, 10], "retry_condition_fn": _transient}
    return task(fn, **options)(*args, **kwargs)
