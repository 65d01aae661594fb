"""Typed errors. Every message names the file/tensor involved and, where there is one, the fix.

Exit codes are stable so scripts and flows can branch on them:
1 other · 2 invalid checkpoint · 3 incompatible · 4 NaN/Inf · 5 unrelated models · 6 verification failed ·
7 output exists · 8 invalid release id · 9 gate refused · 10 artifact not found · 11 registry error ·
12 pre-check refused · 20–25 fine-tuning/evaluation errors (see `recycler.train_errors`).
"""

from __future__ import annotations


class RecyclerError(Exception):
    """Base class: the CLI prints `error: <message>` and exits with `exit_code`."""

    exit_code = 1


class InvalidCheckpoint(RecyclerError):
    """A model or Δ folder is malformed, unsafe (pickle, path escape) or internally inconsistent."""

    exit_code = 2


class IncompatibleCheckpoints(RecyclerError):
    """Two checkpoints cannot be combined under the chosen policies (shapes, vocabularies, tensor sets)."""

    exit_code = 3


class NonFiniteValues(RecyclerError):
    """An input or result tensor holds NaN/Inf."""

    exit_code = 4


class UnrelatedModels(RecyclerError):
    """‖Δ‖/‖base‖ is so large that base and fine-tuned cannot be versions of one model."""

    exit_code = 5


class VerificationFailed(RecyclerError):
    """A folder's files do not match its manifest (sha256, size, missing or unlisted files)."""

    exit_code = 6


class OutputExists(RecyclerError):
    """The destination exists and --overwrite was not given, or it would overwrite an input."""

    exit_code = 7
