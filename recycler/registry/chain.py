"""A family's release chain as the registry records it: one entry per release (version + content).

The chain of `{family}-{variant}` lives on a registered model of its own, `{family}-{variant}-chain`,
which has no versions: each release is a tag `release.<version>.<fingerprint[:16]>` holding its entry
as JSON (state, attempts, reason, the order it started in), and the model's description renders the
chain as a table for the MLflow UI. One read returns the whole chain; entries are written only by the
holder of the chain's lease (recycler.service.chain), so the read-modify-write of an entry cannot
interleave with another writer's.

States: `dispatched` (a deployment run was started for it) and `running` (a cycle holds the chain's
turn) are in flight; `failed` will be retried up to the spec's `max_attempts`; `complete` (the cycle
ran to the end, promoted or not), `refused` (a pre-check or the re-publish policy refused it),
`gave-up` (failed `max_attempts` times) and `skipped` (by an operator, or superseded) are terminal.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Literal

from recycler.registry.names import check_part

if TYPE_CHECKING:
    from recycler.registry.client import Registry

State = Literal["dispatched", "running", "failed", "complete", "refused", "gave-up", "skipped"]
TERMINAL: frozenset[str] = frozenset({"complete", "refused", "gave-up", "skipped"})
IN_FLIGHT: frozenset[str] = frozenset({"dispatched", "running"})
ENTRY_PREFIX = "release."


@dataclass(frozen=True)
class ChainEntry:
    """What the chain knows of one release (a version with one content fingerprint)."""

    version: str
    fingerprint: str
    state: State
    attempts: int = 0  # attempts started (a dispatched deployment run counts as started)
    reason: str = ""  # why it failed, was refused or skipped; the gate's outcome when complete
    seq: int = 0  # order in which releases first started (0: never started)
    updated: float = 0.0
    dispatch_key: str = ""  # the Prefect idempotency key of the current attempt's deployment run
    holder: str = ""  # who runs the current attempt (host, pid) while in flight
    reported: bool = False  # a block or refusal was reported once (watchers log it once)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    @property
    def key(self) -> str:
        return entry_key(self.version, self.fingerprint)

    def moved(self, state: State, **changes: object) -> ChainEntry:
        """This entry in `state` (with `changes`), stamped now; reported again after any change."""
        return replace(self, state=state, updated=time.time(), reported=False, **changes)  # type: ignore[arg-type]


def entry_key(version: str, fingerprint: str) -> str:
    return f"{ENTRY_PREFIX}{version}.{fingerprint[:16]}"


def chain_name(family: str, variant: str) -> str:
    return f"{check_part('family', family)}-{check_part('variant', variant)}-chain"


class ChainLedger:
    """Read and write the entries of one family's chain (write only under the chain's lease)."""

    def __init__(self, registry: Registry, family: str, variant: str) -> None:
        self.registry, self.family, self.variant = registry, family, variant
        self.name = chain_name(family, variant)

    def entries(self) -> dict[str, ChainEntry]:
        """Every entry, by key (`release.<version>.<fp16>`); {} before the first cycle."""
        from mlflow.exceptions import MlflowException

        try:
            model = self.registry.call(self.registry.client.get_registered_model, self.name)
        except MlflowException as e:
            if getattr(e, "error_code", None) == "RESOURCE_DOES_NOT_EXIST":
                return {}
            raise
        out = {}
        for key, value in model.tags.items():
            if key.startswith(ENTRY_PREFIX):
                fields = json.loads(value)
                out[key] = ChainEntry(
                    **{k: v for k, v in fields.items() if k in ChainEntry.__dataclass_fields__}
                )
        return out

    def get(self, version: str, fingerprint: str) -> ChainEntry | None:
        return self.entries().get(entry_key(version, fingerprint))

    def put(self, entry: ChainEntry) -> ChainEntry:
        """Write `entry` (creating the chain model on first use) and refresh the chain's description."""
        self._ensure()
        client = self.registry.client
        self.registry.call(client.set_registered_model_tag, self.name, entry.key, json.dumps(asdict(entry)))
        entries = self.entries()
        self.registry.call(
            client.update_registered_model, self.name, description=describe_chain(self, entries)
        )
        return entry

    def next_seq(self) -> int:
        return 1 + max((e.seq for e in self.entries().values()), default=0)

    def _ensure(self) -> None:
        from mlflow.exceptions import MlflowException

        tags = {"recycler.kind": "chain", "recycler.family": self.family, "recycler.variant": self.variant}
        try:
            self.registry.call(self.registry.client.create_registered_model, self.name, tags=tags)
        except MlflowException as e:
            if getattr(e, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
                raise


def ordered(entries: dict[str, ChainEntry]) -> list[ChainEntry]:
    """Entries in the order their releases started (never-started ones last, by update time)."""
    return sorted(entries.values(), key=lambda e: (e.seq == 0, e.seq, e.updated))


def describe_chain(ledger: ChainLedger, entries: dict[str, ChainEntry]) -> str:
    """The chain as Markdown for the MLflow UI: one row per release, in the order they started."""
    rows = [
        f"| {e.seq or '–'} | {e.version} | `{e.fingerprint[:12]}` | {e.state} | {e.attempts} | {e.reason or ''} |"
        for e in ordered(entries)
    ]
    return "\n".join(
        [
            f"The release chain of `{ledger.family}-{ledger.variant}`: every base release the service has "
            "seen, in the order its cycle started (`recycler chain show`; unblock with `recycler chain "
            "retry` or `recycler chain skip`).",
            "",
            "| # | release | content | state | attempts | reason |",
            "|---|---|---|---|---|---|",
            *rows,
        ]
    )
