"""Lineage of a registered version: the DAG of fine-tunes, Δs, merged starts and bases behind it,
as a tree (walk), Mermaid text, and the Markdown description each version carries in the MLflow UI.

`lineage` follows the reference tags (source_ft, parent_diff, source_merged, cycle_parent_diff) and
base_version to the `{family}-base` version with that tag, back to the first base. A version reached
twice (a fine-tune reaches its parent Δ directly and through its merged start) is expanded once, so
the tree grows with the number of cycles, not twice per cycle.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from recycler.errors import RegistryError
from recycler.registry.names import PART, REF_TAGS, RELEASE, model_name

if TYPE_CHECKING:
    from recycler.registry.client import Registry
    from recycler.registry.names import RegisteredVersion


@dataclass
class LineageNode:
    """One version in a lineage tree; `relation` says how its parent node used it."""

    name: str
    version: str | None
    relation: str
    kind: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    children: list[LineageNode] = field(default_factory=list)
    note: str = ""  # "unregistered", "cycle", "shown above", "…"

    @property
    def label(self) -> str:
        return f"{self.name} v{self.version}" if self.version else self.name

    def walk(self) -> Iterator[LineageNode]:
        yield self
        for c in self.children:
            yield from c.walk()

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "version": self.version,
            "relation": self.relation,
            "kind": self.kind,
            "aliases": list(self.aliases),
            "tags": self.tags,
            "note": self.note,
            "parents": [c.to_dict() for c in self.children],
        }


def lineage(
    registry: Registry, name: str, version_or_alias: str, *, max_depth: int | None = None
) -> LineageNode:
    """The tree of versions `name@version_or_alias` descends from, back to the first base.

    A version is expanded once; later occurrences are marked "shown above". `max_depth` cuts the tree
    (for pictures of long chains).
    """
    return _node(registry, registry.get(name, version_or_alias), "self", set(), set(), max_depth)


def _node(
    registry: Registry,
    v: RegisteredVersion,
    relation: str,
    path: set[str],
    expanded: set[str],
    depth: int | None,
) -> LineageNode:
    node = LineageNode(v.name, v.version, relation, v.kind, v.tags, v.aliases)
    if v.reference in path:
        node.note = "cycle"
        return node
    if v.reference in expanded:
        node.note = "shown above"
        return node
    if depth is not None and depth <= 0:
        node.note = "…"
        return node
    expanded.add(v.reference)
    path = path | {v.reference}
    below = None if depth is None else depth - 1
    for tag in REF_TAGS:
        if ref := v.tags.get(tag):
            try:
                node.children.append(_node(registry, registry.resolve(ref), tag, path, expanded, below))
            except RegistryError:
                node.children.append(LineageNode(ref, None, tag, note="not found"))
    release = v.tags.get("base_version", "")
    if v.kind != "base" and RELEASE.match(release) and PART.match(v.family):
        base = registry.base_version(v.family, release)
        if base is not None:
            node.children.append(_node(registry, base, "base", path, expanded, below))
        else:
            label = f"{model_name('base', v.family)} {release}"
            node.children.append(LineageNode(label, None, "base", "base", note="unregistered"))
    return node
