"""Deterministic crash points for recovery tests.

Recovery code is only trustworthy if it has been exercised against real crashes at awkward moments.
Setting `RECYCLER_CRASH_AT=<name>` makes the process SIGKILL itself when it reaches `crash_point(<name>)`:
no `finally` blocks, no atexit handlers, no flushing — the same as losing the machine. Names are
matched exactly, so a test can target one step (`finetune:step=3`) and nothing else.

In-process tests can instead install a hook (`set_hook`) that every crash point calls with its name:
to raise a BaseException there (a crash that records nothing, without killing the test), or to run
another watcher at exactly that point (a deterministic interleaving).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

ENV_VAR = "RECYCLER_CRASH_AT"
_hook: Callable[[str], None] | None = None


def set_hook(hook: Callable[[str], None] | None) -> None:
    """Call `hook(name)` at every crash point of this process (None: no hook)."""
    global _hook
    _hook = hook


def crash_point(name: str) -> None:
    """SIGKILL this process if `RECYCLER_CRASH_AT` equals `name`; call the hook, if any."""
    if os.environ.get(ENV_VAR) == name:
        os.kill(os.getpid(), signal.SIGKILL)
    if _hook is not None:
        _hook(name)
