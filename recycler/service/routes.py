"""Which family a release source belongs to: the receiver's routing table.

One receiver serves many families. Its table is a YAML file beside the family specs:

    routes:
      - source: hf://meta-llama/Llama-3.1-8B        # a Hub model repo (its webhook)
        spec: llama-3-8b.yaml                        # the family spec (relative to this file)
      - source: s3://recycler/bases/mistral-7b       # a bucket prefix (its bucket notifications)
        spec: mistral-7b.yaml
      - source: /data/releases/qwen                  # a folder: announced by POST /hooks/announce
        spec: qwen.yaml

The family is the spec's; two specs of one family (two variants) on one source are one route, as a
base release is the family's, not a variant's. `recycler serve SOURCE --spec SPEC` uses the one
route it is given. Sources are spelled as the watcher's (`recycler.store.releases.open_source`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from recycler.errors import InvalidConfig
from recycler.io.config_file import read_yaml_mapping
from recycler.store.releases import VERSION_PATTERN, check_id


@dataclass(frozen=True)
class Route:
    source: str
    family: str

    @property
    def kind(self) -> str:
        return (
            "hub"
            if self.source.startswith("hf://")
            else "s3"
            if self.source.startswith("s3://")
            else "folder"
        )

    def s3_version(self, bucket: str, key: str) -> tuple[str, str] | None:
        """(version, file name) of an object of this S3 route (`prefix/<version>/<name>`), else None."""
        if self.kind != "s3":
            return None
        mine, _, prefix = self.source[5:].partition("/")
        prefix = prefix.strip("/")
        head = f"{prefix}/" if prefix else ""
        if bucket != mine or not key.startswith(head):
            return None
        version, _, name = key[len(head) :].partition("/")
        if not name or "/" in name or not VERSION_PATTERN.match(version) or ".." in version:
            return None
        return version, name


@dataclass(frozen=True)
class RouteTable:
    routes: tuple[Route, ...]

    @classmethod
    def single(cls, source: str, family: str) -> RouteTable:
        return cls((Route(_normal(source), check_id(family)),))

    def for_hub(self, repo: str) -> list[Route]:
        return [r for r in self.routes if r.source == f"hf://{repo}"]

    def for_object(self, bucket: str, key: str) -> list[tuple[Route, str, str]]:
        """Every route the object belongs to, with its version and file name."""
        return [(r, *hit) for r in self.routes if (hit := r.s3_version(bucket, key))]

    def for_source(self, source: str) -> list[Route]:
        return [r for r in self.routes if r.source == _normal(source)]


def _normal(source: str) -> str:
    if source.startswith(("hf://", "s3://")):
        return source.rstrip("/")
    return str(Path(source).resolve())


def load_routes(path: Path) -> RouteTable:
    """The table in `path`; every problem at once (unknown keys, missing or invalid specs)."""
    from recycler.service.spec import load_spec

    values = read_yaml_mapping(path, "routes")
    entries, problems = values.get("routes"), []
    if set(values) != {"routes"} or not isinstance(entries, list) or not entries:
        raise InvalidConfig(f"{path}: expected one key `routes:` with a list of {{source, spec}} entries")
    found: dict[tuple[str, str], Route] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or set(entry) != {"source", "spec"}:
            problems.append(f"routes[{i}]: expected exactly the keys source and spec, found {entry!r}")
            continue
        spec_path = Path(path).parent / str(entry["spec"])
        try:
            family = load_spec(spec_path).family
        except InvalidConfig as e:
            problems.append(f"routes[{i}]: {e}")
            continue
        route = Route(_normal(str(entry["source"])), family)
        found[(route.source, route.family)] = route
    if problems:
        raise InvalidConfig(f"{path}: " + "; ".join(problems))
    return RouteTable(tuple(found.values()))
