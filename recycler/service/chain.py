"""One ordered chain per family: whose turn it is, and the turn held while a cycle runs.

Algorithm 1 is a chain: the cycle of release i applies the Δ^iter the cycle of release i−1 registered.
So a cycle starts only when every earlier release of the family is terminal (recycler.registry.chain),
and only one cycle of a family runs at a time, across hosts and homes: the turn is a registry lease
(`chain:{family}/{variant}`) renewed while the cycle runs and taken over after its holder dies. A
watcher that cannot take the turn stops; it never skips ahead.

`next_turn` is the rule, a pure function of the listed releases, the chain's entries and the spec's
policy. `ChainTurn` is the turn held by one cycle: it checks the rule under the lease, records the
attempt, and records how it ended (complete, refused, failed or gave up) on every path but a crash;
the next holder counts a crashed attempt as failed.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

from recycler.errors import ChainBlocked, GateRefused
from recycler.registry.chain import IN_FLIGHT, ChainEntry, ChainLedger, entry_key
from recycler.store.releases import Release, version_key

if TYPE_CHECKING:
    from recycler.registry.lease import HeldLease
    from recycler.registry.names import RegisteredVersion
    from recycler.service.services import Services

log = logging.getLogger(__name__)
UNBLOCK = "unblock {family}-{variant} with `recycler chain retry {version} --spec SPEC` (try again) or `recycler chain skip {version} --spec SPEC --reason …` (go on without it)"  # fmt: skip


class ChainPolicy(Protocol):
    family: str
    variant: str
    on_republish: Literal["new-cycle", "refuse"]
    max_attempts: int
    after_failure: Literal["stop", "continue"]
    after_refusal: Literal["continue", "stop"]


@dataclass(frozen=True)
class Turn:
    """What the chain allows now: run `release` (a new attempt, or joining `entry` in flight), or
    nothing (`release` None), or `blocked` with the reason and how to unblock. `settle`: entries to
    record first (re-publications refused or superseded, releases that arrived out of order)."""

    release: Release | None = None
    entry: ChainEntry | None = None
    blocked: ChainEntry | None = None
    message: str = ""
    settle: tuple[ChainEntry, ...] = field(default=())


def _unblock(policy: ChainPolicy, version: str) -> str:
    return UNBLOCK.format(family=policy.family, variant=policy.variant, version=version)


def next_turn(releases: Iterable[Release], entries: dict[str, ChainEntry], policy: ChainPolicy) -> Turn:
    """The chain's rule: the oldest listed release that is not terminal has the turn; a terminal
    release blocks the chain only when the policy says so (`after_refusal`, `after_failure: stop`)."""
    settle: list[ChainEntry] = []
    started = [e.version for e in entries.values() if e.seq]
    newest = max(started, key=version_key, default=None)
    listed = {entry_key(r.version, r.fingerprint) for r in releases}
    for e in entries.values():  # a failed publication that was replaced: it will never run again
        if e.key not in listed and e.state == "failed" and any(r.version == e.version for r in releases):
            settle.append(e.moved("skipped", reason=f"superseded: {e.version} was re-published"))
    for r in sorted(releases, key=lambda r: version_key(r.version)):
        e = entries.get(entry_key(r.version, r.fingerprint))
        if e is None:
            before = [x for x in entries.values() if x.version == r.version]
            late = newest is not None and version_key(newest) > version_key(r.version)
            new = ChainEntry(r.version, r.fingerprint, "refused")
            if before and policy.on_republish == "refuse":
                was = ", ".join(x.fingerprint[:12] for x in before)
                why = (
                    f"re-published with other content ({r.fingerprint[:12]}, was {was}); on_republish: refuse"
                )
                settle.append(new.moved("refused", reason=why))
                if policy.after_refusal == "stop":
                    return Turn(blocked=settle[-1], message=f"{r.version}: {why}; {_unblock(policy, r.version)}", settle=tuple(settle))  # fmt: skip
                continue
            if late:
                what = "re-published" if before else "appeared"
                why = f"{what} after {newest} was processed (out of order); backport to it instead"
                settle.append(new.moved("skipped", reason=why))
                continue
            return Turn(release=r, settle=tuple(settle))
        if e.state in ("complete", "skipped"):
            continue
        if e.state in ("refused", "gave-up"):
            stop = policy.after_refusal if e.state == "refused" else policy.after_failure
            if stop == "stop":
                msg = f"the chain is blocked at {r.version} ({e.state}: {e.reason}); {_unblock(policy, r.version)}"
                return Turn(blocked=e, message=msg, settle=tuple(settle))
            continue
        return Turn(release=r, entry=e, settle=tuple(settle))  # in flight, or failed and to be retried
    return Turn(settle=tuple(settle))


def chain_key(family: str, variant: str) -> str:
    return f"chain:{family}/{variant}"


def holder_note() -> str:
    return f"{socket.gethostname()} pid {os.getpid()}"


def settle(ledger: ChainLedger, turn: Turn) -> None:
    for entry in turn.settle:
        log.warning("release %s: %s", entry.version, entry.reason)
        ledger.put(entry)


class ChainTurn:
    """The family's turn, held by the cycle of one release for as long as it runs.

    Entering takes the chain's lease (waiting up to `wait` seconds), settles what the rule says, and
    checks that it is this release's turn; then it records the attempt (`attempt`: the one a watcher
    recorded when it dispatched a deployment run; None: a new one). Leaving records the outcome:
    `complete(reason)` when the cycle ran to the end; a GateRefused is `refused` (terminal); any other
    error is `failed`, or `gave-up` after `max_attempts`. A crash records nothing: the next holder
    finds the entry in flight with the lease free, and counts that attempt as failed.
    """

    def __init__(
        self, svc: Services, policy: ChainPolicy, release: Release, releases: list[Release],
        *, attempt: int | None = None, wait: float = 0.0,
    ) -> None:  # fmt: skip
        self.svc, self.policy, self.release, self.releases = svc, policy, release, releases
        self.attempt, self.wait = attempt, wait
        self.ledger = ChainLedger(svc.registry, policy.family, policy.variant)
        self.entry: ChainEntry | None = None
        self.done = False  # the release's cycle had already completed
        self.lease: HeldLease | None = None

    def check(self) -> None:
        """The fence before each write: raise ChainConflict if the turn was lost."""
        if self.lease is not None:
            self.lease.check()

    def __enter__(self) -> ChainTurn:
        from recycler.errors import LeaseBusy
        from recycler.registry.lease import held_lease

        key = chain_key(self.policy.family, self.policy.variant)
        ttl = self.svc.settings.chain_lease_ttl
        try:
            self.lease = held_lease(self.svc.registry, key, ttl=ttl, wait=self.wait, note=f"{holder_note()}, {self.release.version}")  # fmt: skip
        except LeaseBusy as e:
            raise ChainBlocked(
                f"{self.policy.family}-{self.policy.variant}: another cycle has the turn ({e})"
            ) from None
        self.lease.__enter__()
        try:
            self._begin()
        except BaseException:
            self.lease.__exit__(None, None, None)
            raise
        return self

    def _begin(self) -> None:
        entries = self.ledger.entries()
        for e in list(entries.values()):  # in flight but the lease was free: its holder died
            if e.state == "running":
                entries[e.key] = self.ledger.put(self._failed(e, f"attempt {e.attempts} crashed ({e.holder or 'holder unknown'})"))  # fmt: skip
        turn = next_turn(self.releases, entries, self.policy)
        settle(self.ledger, turn)
        entries.update({e.key: e for e in turn.settle})
        mine = entries.get(entry_key(self.release.version, self.release.fingerprint))
        if mine is not None and mine.state == "complete":
            self.entry, self.done = mine, True
            return
        if turn.release is None or (turn.release.version, turn.release.fingerprint) != (self.release.version, self.release.fingerprint):  # fmt: skip
            raise ChainBlocked(self._not_my_turn(turn, mine))
        if mine is not None and self.attempt is not None and mine.attempts > self.attempt:
            raise ChainBlocked(
                f"{self.release.key}: attempt {self.attempt} was superseded by attempt {mine.attempts}"
            )
        if mine is not None and mine.state == "failed" and mine.attempts >= self.policy.max_attempts:
            raise ChainBlocked(f"{self.release.version} failed {mine.attempts} times: {mine.reason}; {_unblock(self.policy, self.release.version)}")  # fmt: skip
        seq = mine.seq if mine is not None and mine.seq else self.ledger.next_seq()
        base = mine or ChainEntry(self.release.version, self.release.fingerprint, "running")
        joined = self.attempt is not None and mine is not None and mine.attempts == self.attempt
        attempts = base.attempts if joined else base.attempts + 1
        self.entry = self.ledger.put(base.moved("running", attempts=attempts, seq=seq, holder=holder_note()))
        log.info(
            "%s: chain turn taken (attempt %d of %d)", self.release.key, attempts, self.policy.max_attempts
        )

    def _not_my_turn(self, turn: Turn, mine: ChainEntry | None) -> str:
        me = self.release.version
        if mine is not None and mine.terminal:
            return f"{me} is {mine.state} ({mine.reason}); {_unblock(self.policy, me)}"
        if turn.blocked is not None:
            return turn.message
        if turn.release is not None:
            state = turn.entry.state if turn.entry else "not started"
            return f"{me} must wait: {turn.release.version} comes first in the chain ({state})"
        return f"{me} is not a release the chain will process (out of order or superseded)"

    def _failed(self, e: ChainEntry, reason: str) -> ChainEntry:
        gave_up = e.attempts >= self.policy.max_attempts
        return e.moved("gave-up" if gave_up else "failed", reason=reason[:300], holder="")

    def complete(self, reason: str) -> None:
        assert self.entry is not None
        self.entry = self.ledger.put(self.entry.moved("complete", reason=reason[:300], holder=""))

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        assert self.lease is not None
        try:
            ours = self.entry is not None and not self.done and self.entry.state in IN_FLIGHT
            # an Exception ends the attempt (a crash, KeyboardInterrupt, records nothing); a lost turn
            # is not ours to write any more
            if ours and isinstance(exc, Exception) and self.lease.lost is None:
                assert self.entry is not None
                first = (str(exc).splitlines() or [type(exc).__name__])[0]
                if isinstance(exc, GateRefused):
                    self.entry = self.ledger.put(self.entry.moved("refused", reason=first[:300], holder=""))
                else:
                    self.entry = self.ledger.put(self._failed(self.entry, f"{type(exc).__name__}: {first}"))
        finally:
            self.lease.__exit__(kind, exc, tb)


def mark_complete(svc: Services, policy: ChainPolicy, release: Release, ft: RegisteredVersion) -> None:
    """Bring a finished cycle's chain entry to `complete` (its fine-tune says the cycle finished; a
    crash came before the entry was written). Idempotent; needs no turn: nothing else writes the
    entry of a finished release."""
    ledger = ChainLedger(svc.registry, policy.family, policy.variant)
    entry = ledger.get(release.version, release.fingerprint)
    if entry is not None and entry.state == "complete":
        return
    base = entry or ChainEntry(release.version, release.fingerprint, "complete", seq=ledger.next_seq())
    ledger.put(base.moved("complete", reason=f"finished (gate: {ft.tags.get('gate', '?')})"[:300], holder=""))


def operator_update(
    svc: Services, policy: ChainPolicy, version: str, action: Literal["retry", "skip"], reason: str = "",
    release: Release | None = None,
) -> ChainEntry:  # fmt: skip
    """An operator's unblock, under the turn's lease: `retry` gives a refused, failed or given-up
    release a fresh set of attempts; `skip` makes it terminal so the chain goes on without it.
    `release` (from the source) is needed to skip a release the chain has not seen yet."""
    from recycler.registry.lease import lease

    ledger = ChainLedger(svc.registry, policy.family, policy.variant)
    ttl = svc.settings.chain_lease_ttl
    with lease(svc.registry, chain_key(policy.family, policy.variant), ttl=ttl, wait=ttl + 10):
        mine = sorted((e for e in ledger.entries().values() if e.version == version), key=lambda e: e.updated)
        if release is not None:
            mine = [e for e in mine if e.fingerprint == release.fingerprint] or [ChainEntry(version, release.fingerprint, "failed")]  # fmt: skip
        if not mine:
            raise ChainBlocked(f"{version} is not in the chain of {policy.family}-{policy.variant} yet; name its source to skip it")  # fmt: skip
        entry = mine[-1]
        if entry.state == "complete" or entry.state in IN_FLIGHT:
            raise ChainBlocked(f"{version} is {entry.state}: nothing to {action}")
        if action == "retry":
            return ledger.put(entry.moved("failed", attempts=0, reason=f"retry requested by an operator {reason}".strip()))  # fmt: skip
        return ledger.put(
            entry.moved("skipped", reason=f"skipped by an operator: {reason or 'no reason given'}")
        )
