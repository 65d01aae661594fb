"""Deterministic crash points for recovery tests.

Recovery code is only trustworthy if it has been exercised against real crashes at awkward moments.
Setting `RECYCLER_CRASH_AT=<name>` makes the process SIGKILL itself when it reaches `crash_point(<name>)`:
no `finally` blocks, no atexit handlers, no flushing — the same as losing the machine. Names are
matched exactly, so a test can target one step (`finetune:step=3`) and nothing else.
"""

from __future__ import annotations

import os
import signal

ENV_VAR = "RECYCLER_CRASH_AT"


def crash_point(name: str) -> None:
    """SIGKILL this process if `RECYCLER_CRASH_AT` equals `name`; otherwise do nothing."""
    if os.environ.get(ENV_VAR) == name:
        os.kill(os.getpid(), signal.SIGKILL)
