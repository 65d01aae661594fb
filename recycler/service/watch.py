"""The watcher: take the family's chain forward, one release at a time, oldest first.

State lives in the registry (the chain's entries, recycler.registry.chain), never in the watcher, so
any number of watchers can run, on any hosts and homes. Each pass reads the chain and asks the rule
(recycler.service.chain.next_turn) whose turn it is; it never skips a release that is not terminal.

* inline: the watcher runs the cycle itself (`run_cycle` takes the turn without waiting); if another
  process has the turn, this watcher stops, and the next poll goes on from wherever the chain is.
* deployment: the watcher records the attempt (`dispatched`, with the idempotency key
  `family@version#fingerprint/attempt`) under the turn's lease, then starts or joins that run and
  waits for it. A watcher that finds an attempt in flight joins the same run. A run that failed or
  crashed is retried under the next attempt's key (Prefect returns the existing run for an existing
  key whatever its state), up to the spec's `max_attempts`; then the release is given up and, per
  `after_failure`, blocks the chain until an operator retries or skips it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from recycler.errors import ChainBlocked, GateRefused
from recycler.registry.chain import IN_FLIGHT, ChainEntry, ChainLedger, entry_key
from recycler.service import steps
from recycler.service.chain import chain_key, holder_note, mark_complete, next_turn, settle
from recycler.service.services import Services
from recycler.service.spec import CycleSpec
from recycler.store.releases import Release

# start(release, attempt, key) → result: inline runs get (release, None, None)
StartCycle = Callable[[Release, int | None, str | None], dict[str, Any]]
MAX_PASSES = 10_000  # a bound on one watch: every pass completes, refuses or gives up a release


def new_releases(source: str, spec: CycleSpec, svc: Services) -> list[Release]:
    """Releases of `source` the chain has not finished, oldest first."""
    listing = steps.open_releases(svc, source, spec).list()
    entries = ChainLedger(svc.registry, spec.family, spec.variant).entries()
    return [
        r for r in listing if not ((e := entries.get(entry_key(r.version, r.fingerprint))) and e.terminal)
    ]


def watch(
    source: str,
    spec: CycleSpec,
    start: StartCycle,
    *,
    services: Services | None = None,
    dispatch: bool = False,
    say: Callable[[str], None] = lambda _m: None,
) -> list[dict[str, Any]]:
    """Process the family's releases in chain order until none is left, the turn is elsewhere, or the
    chain is blocked; return what each started cycle returned.

    A block is reported once: the first watcher to find it raises ChainBlocked (its run fails, where
    an operator looks), later ones say it in a line and return.
    """
    svc = services or Services.from_settings()
    source_of = steps.open_releases(svc, source, spec)
    ledger = ChainLedger(svc.registry, spec.family, spec.variant)
    results: list[dict[str, Any]] = []
    for _ in range(MAX_PASSES):
        listing = source_of.list()
        for version, why in sorted(source_of.incomplete.items()):
            say(f"{version}: not complete yet ({why}); left for a later poll")
        entries = _with_finished(svc, spec, listing, ledger.entries())
        turn = next_turn(listing, entries, spec)
        settle(ledger, turn)
        if turn.blocked is not None:
            if not turn.blocked.reported:
                ledger.put(_reported(turn.blocked))
                raise ChainBlocked(turn.message)
            say(f"still blocked: {turn.message}")
            return results
        if turn.release is None:
            return results
        say(f"{turn.release.key}: its turn in the chain")
        if not dispatch:
            try:
                results.append(start(turn.release, None, None))
            except ChainBlocked as e:
                say(f"stopping: {e}")
                return results
            except GateRefused as e:  # recorded as terminal by the cycle; the policy decides what follows
                say(f"{turn.release.key}: refused ({e})")
            continue
        attempt, key = _dispatch(svc, spec, ledger, turn.release, turn.entry, say)
        if key is None:
            return results
        outcome = start(turn.release, attempt, key)
        results.append(outcome)
        if outcome.get("state") != "Completed":
            _record_failure(svc, spec, ledger, turn.release, attempt, f"flow run {outcome.get('flow_run')} ended {outcome.get('state')}")  # fmt: skip
        elif (e := ledger.get(turn.release.version, turn.release.fingerprint)) is None or not e.terminal:
            say(
                f"{turn.release.key}: run {outcome.get('flow_run')} completed but the chain does not say so; stopping"
            )
            return results
    return results


def _with_finished(
    svc: Services, spec: CycleSpec, listing: list[Release], entries: dict[str, ChainEntry]
) -> dict[str, ChainEntry]:
    """The chain's entries, with the cycles the registry knows finished but the chain does not (a
    crash between the fine-tune's `cycle_status` tag and the entry; or cycles run by an older
    recycler) recorded as complete."""
    for r in listing:
        e = entries.get(entry_key(r.version, r.fingerprint))
        if (e is None or e.state != "complete") and (ft := steps.completed_cycle(svc.registry, spec, r)):
            mark_complete(svc, spec, r, ft)
            entries = ChainLedger(svc.registry, spec.family, spec.variant).entries()
    return entries


def _reported(entry: ChainEntry) -> ChainEntry:
    from dataclasses import replace

    return replace(entry, reported=True)


def _dispatch(
    svc: Services, spec: CycleSpec, ledger: ChainLedger, release: Release, entry: ChainEntry | None,
    say: Callable[[str], None],
) -> tuple[int, str | None]:  # fmt: skip
    """The attempt to start or join for `release`: the one in flight, or a new one recorded under the
    turn's lease. (attempt, None) when another process has the turn and nothing is in flight to join."""
    from recycler.errors import LeaseBusy
    from recycler.registry.lease import lease

    if entry is not None and entry.state in IN_FLIGHT and entry.dispatch_key:
        say(f"{release.key}: joining attempt {entry.attempts} ({entry.dispatch_key})")
        return entry.attempts, entry.dispatch_key
    try:
        with lease(
            svc.registry, chain_key(spec.family, spec.variant), ttl=svc.settings.chain_lease_ttl, wait=5.0
        ):
            current = ledger.get(release.version, release.fingerprint)
            if current is not None and current.state in IN_FLIGHT and current.dispatch_key:
                return current.attempts, current.dispatch_key
            if current is not None and current.terminal:
                return 0, None
            attempt = (current.attempts if current else 0) + 1
            key = f"{release.key}/{attempt}"
            base = current or ChainEntry(release.version, release.fingerprint, "dispatched")
            seq = base.seq or ledger.next_seq()
            ledger.put(
                base.moved("dispatched", attempts=attempt, dispatch_key=key, seq=seq, holder=holder_note())
            )
            say(f"{release.key}: dispatched attempt {attempt} of {spec.max_attempts} ({key})")
            return attempt, key
    except LeaseBusy as e:
        say(f"stopping: another process has the turn ({e})")
        return 0, None


def _record_failure(
    svc: Services, spec: CycleSpec, ledger: ChainLedger, release: Release, attempt: int, reason: str
) -> None:
    """Record that the deployment run of `attempt` ended without completing, unless it recorded its
    own ending (failed, refused) or a newer attempt started."""
    from recycler.errors import LeaseBusy
    from recycler.registry.lease import lease

    try:
        # a crashed run's turn expires after its ttl: wait that long rather than spin on a dead run
        ttl = svc.settings.chain_lease_ttl
        with lease(svc.registry, chain_key(spec.family, spec.variant), ttl=ttl, wait=ttl + 10):
            e = ledger.get(release.version, release.fingerprint)
            if e is None or e.state not in IN_FLIGHT or e.attempts != attempt:
                return
            gave_up = e.attempts >= spec.max_attempts
            ledger.put(e.moved("gave-up" if gave_up else "failed", reason=reason[:300], holder=""))
    except LeaseBusy:
        pass  # whoever has the turn counts the attempt as crashed when it finds it in flight
