"""Every error recycler raises on purpose, and the one table of exit codes.

Each message names the file, tensor, version or setting involved and, where there is one, the fix.
Exit codes are stable so scripts, CI jobs and flows can branch on them; `EXIT_CODES` is the table the
README prints, and a test checks that every class has its own code.
"""

from __future__ import annotations


class RecyclerError(Exception):
    """Any other refusal (the base class): the CLI prints `error: <message>` and exits with its code."""

    exit_code = 1


# ---- checkpoints and Δ artifacts (2–7) -------------------------------------------------------------


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


# ---- the service: releases, pre-check, store, registry (8–13) ----------------------------------------


class InvalidReleaseId(RecyclerError):
    """A family, variant or version id is not on the allow-list, or names no release in the source."""

    exit_code = 8


class GateRefused(RecyclerError):
    """The pre-check score is below the family's threshold: the cycle stops before fine-tuning."""

    exit_code = 9


class ArtifactNotFound(RecyclerError):
    """No manifest at the artifact's address: never published, or a publish that did not finish."""

    exit_code = 10


class RegistryError(RecyclerError):
    """A registry request was refused (unknown model/version, invalid name, conflicting lease)."""

    exit_code = 11


class PrecheckError(RecyclerError):
    """The pre-check was given nothing it can score, or inputs that do not belong together."""

    exit_code = 12


class ChainBlocked(RecyclerError):
    """A family's release chain cannot take this step now: another cycle holds its turn, an earlier
    release is not finished, or a release blocks the chain until an operator retries or skips it."""

    exit_code = 14


class ChainConflict(RecyclerError):
    """The chain moved under a cycle: its lease was taken over, or the aliases it would move were moved
    by someone else since it decided. Nothing was promoted; re-run to re-decide."""

    exit_code = 15


class LeaseBusy(RegistryError):
    """A registry lease (a registration's, or a family's turn in its chain) is held by a live holder."""

    exit_code = 16


class RegistryUnavailable(RegistryError):
    """The MLflow registry did not answer within the bounded retries."""

    exit_code = 13


# ---- fine-tuning and evaluation (20–26) ----------------------------------------------------------------


class InvalidData(RecyclerError):
    """A training/eval data file is missing or has a malformed line (the message names file:line)."""

    exit_code = 20


class InvalidModelFolder(RecyclerError):
    """A model folder lacks what the stage needs: config, safetensors weights, tokenizer, chat template."""

    exit_code = 21


class InvalidTask(RecyclerError):
    """An evaluation task file or name is unusable, e.g. its gold answers cannot be parsed."""

    exit_code = 22


class InvalidConfig(RecyclerError):
    """A configuration file (fine-tuning options, family spec) failed validation; all problems at once."""

    exit_code = 23


class ResumeError(RecyclerError):
    """Training cannot resume: no usable checkpoint, or one made with a different config or data."""

    exit_code = 24


class MissingOptionalDependency(RecyclerError):
    """An optional package (e.g. lm-evaluation-harness) or its offline data is not available."""

    exit_code = 25


class FinetuneFailed(RecyclerError):
    """The fine-tuning child process exited with an error; re-running resumes from its last checkpoint."""

    exit_code = 26


# ---- the toy world (30–31) ----------------------------------------------------------------------------


class ToyFamilyError(RecyclerError):
    """A cached toy family is unreadable or was built from a different configuration."""

    exit_code = 30


class ReproduceError(RecyclerError):
    """`recycler reproduce` was asked for something it cannot run (e.g. zero seeds)."""

    exit_code = 31


def error_classes() -> list[type[RecyclerError]]:
    """RecyclerError and every subclass, depth first (all of them are defined in this module)."""
    out: list[type[RecyclerError]] = []
    todo: list[type[RecyclerError]] = [RecyclerError]
    while todo:
        cls = todo.pop(0)
        out.append(cls)
        todo.extend(cls.__subclasses__())
    return out


def exit_codes() -> dict[int, str]:
    """exit code → error class name (the README's table)."""
    return {cls.exit_code: cls.__name__ for cls in sorted(error_classes(), key=lambda c: c.exit_code)}
