"""From a platform's notification to the releases it announces: one `Announcement` per complete release.

A release is announced only when its source's completion rule holds (recycler.store.releases:
config.json, and the index with every shard it names, or one unsharded `model.safetensors`), checked
against the store itself, so the notification for a partial upload announces nothing and the one for
the object that completes the release announces it, with the same content fingerprint the watcher
computes. A Hub ref is a whole commit: its fingerprint is the commit, as `HubSource` lists it.

Each announcement becomes one Prefect event (`recycler.release.published`, the `event` method here;
recycler_flows.receiver emits it). Its id is derived from the release key, so a replay carries the
same id: Prefect's trigger service evaluates an event id once (it remembers ids for 30 minutes), the
receiver keeps its own bounded memory of keys, and the watcher's dispatch key and the registry's
chain make a second run a no-op whatever gets through.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from recycler.service.intake import CreatedObject, HubRef
from recycler.service.routes import Route, RouteTable
from recycler.store.releases import Release, check_version

EVENT = "recycler.release.published"
RESOURCE_PREFIX = "recycler.release."
_NAMESPACE = uuid.UUID("0e4b9f5e-5c3a-4d59-9a52-7d1c2b8e6f10")  # event ids: uuid5 of the release key

# (source, family, version) → the release if complete, else the reason it is not (yet)
CheckRelease = Callable[[str, str, str], "Release | str"]


@dataclass(frozen=True)
class Announcement:
    release: Release
    source: str
    via: str  # hub, s3 or announce

    @property
    def key(self) -> str:
        """The release's idempotency key (`family@version#fingerprint[:16]`): the watcher dispatches
        `release-cycle/gpu` under `<key>/<attempt>`."""
        return self.release.key

    def event(self) -> dict[str, Any]:
        """Keyword arguments of `prefect.events.emit_event` for this release."""
        r = self.release
        return {
            "event": EVENT,
            "resource": {
                "prefect.resource.id": f"{RESOURCE_PREFIX}{r.family}@{r.version}",
                "prefect.resource.name": f"{r.family}@{r.version}",
                "recycler.family": r.family,
                "recycler.version": r.version,
            },
            "payload": {
                "family": r.family,
                "version": r.version,
                "fingerprint": r.fingerprint,
                "source": self.source,
                "uri": r.uri,
                "key": self.key,
                "via": self.via,
            },
            "id": uuid.uuid5(_NAMESPACE, self.key),
        }


def check_in_store(endpoint_url: str | None) -> CheckRelease:
    """The completion rule, asked of the store: one version listed alone (not the whole prefix)."""
    from recycler.store.releases import open_source

    def check(source: str, family: str, version: str) -> Release | str:
        src = open_source(source, family, endpoint_url=endpoint_url)
        found = src.release(version)  # type: ignore[attr-defined]
        return found if found is not None else src.incomplete.get(version, "not complete")

    return check


def from_hub(table: RouteTable, refs: list[HubRef]) -> tuple[list[Announcement], list[str]]:
    out, ignored = [], []
    for ref in refs:
        routes = table.for_hub(ref.repo)
        if not routes:
            ignored.append(f"hf://{ref.repo}: no route (not a release source of this receiver)")
        for route in routes:
            release = Release(route.family, ref.version, f"{route.source}@{ref.version}", ref.sha)
            out.append(Announcement(release, route.source, "hub"))
    return out, ignored


def routed_versions(
    table: RouteTable, objects: list[CreatedObject]
) -> tuple[list[tuple[Route, str]], list[str]]:
    """The (route, version) pairs the objects belong to, each once; and the objects no route takes."""
    todo: dict[tuple[Route, str], None] = {}
    ignored = []
    for obj in objects:
        hits = table.for_object(obj.bucket, obj.key)
        if not hits:
            ignored.append(f"s3://{obj.bucket}/{obj.key}: no route (not under a release prefix)")
        for route, version, _name in hits:
            todo[(route, version)] = None
    return list(todo), ignored


def from_objects(
    table: RouteTable, objects: list[CreatedObject], check: CheckRelease
) -> tuple[list[Announcement], list[str]]:
    """One check per (route, version) however many of its objects the notification names."""
    todo, ignored = routed_versions(table, objects)
    return checked(todo, check, "s3", ignored)


def from_request(
    table: RouteTable, source: str, version: str, check: CheckRelease
) -> tuple[list[Announcement], list[str]]:
    """A publisher's own announcement (`POST /hooks/announce {source, version}`), e.g. after copying
    a release into a folder: checked against the source exactly as a notification is."""
    check_version(version)
    routes = table.for_source(source)
    if not routes:
        return [], [f"{source}: no route (not a release source of this receiver)"]
    if any(r.kind == "hub" for r in routes):  # a Hub ref's commit comes from the Hub's own webhook
        return [], [f"{source}: Hub releases are announced by the Hub's webhook (/hooks/hub)"]
    return checked([(r, version) for r in routes], check, "announce", [])


def checked(
    todo: list[tuple[Route, str]], check: CheckRelease, via: str, ignored: list[str]
) -> tuple[list[Announcement], list[str]]:
    """The complete releases among `todo`, by the store's completion rule; the others in `ignored`."""
    out = []
    for route, version in todo:
        found = check(route.source, route.family, version)
        if isinstance(found, Release):
            out.append(Announcement(found, route.source, via))
        else:
            ignored.append(f"{route.family}@{version}: not complete yet ({found})")
    return out, ignored
