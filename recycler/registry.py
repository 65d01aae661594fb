"""Model registry on MLflow: which artifact is which model version, how versions descend, which is live.

Name scheme (family and variant match `^[a-z0-9][a-z0-9._-]{0,63}$`, e.g. family `qwen2.5-7b`,
variant `math`):

    {family}-base              releases of the base model (one version per base release)
    {family}-{variant}-ft      fine-tunes
    {family}-{variant}-diff    Δ = fine-tuned − base, extracted from an ft version
    {family}-{variant}-merged  base + Δ (a recycled or backported model)

Versions are pointers (`create_model_version(source=<artifact uri>)`): MLflow copies nothing, the
weights stay in the artifact store (recycler.store) where they were published manifest-first.
Every version carries the tags kind, family, variant, base_version, manifest_sha256, artifact_uri,
artifact_kind and, when known, parent_diff / source_ft (references `name/version`), diff_mode,
run_id and eval.<metric>. `lineage` follows source_ft, parent_diff and source_merged references, and
base_version to the `{family}-base` version with that tag, back to the first base.

Aliases used by the flows: `next-diff` on the diff model (the Δ to apply to the next base release),
`champion` and `champion-<base_version>` on the ft model. (`latest` is reserved by MLflow.)

Exactly one version per artifact (RELIABILITY.md R4, §0.9: create_model_version is not idempotent):
`register` looks for a version tagged with the artifact's manifest_sha256 and creates one only under a
lease. The lease is a registered model `_recycler-lock-<hash>`: creating it is atomic in every MLflow
backend (unique name), so it works across processes and machines against one server. Its
`expires_at` tag lets a waiter take over the lease of a killed holder after `lease_ttl` seconds (by
renaming it away, which only one taker can do). Correctness does not rest on the lease alone: after
creating, `register` keeps the lowest-numbered version with that digest and deletes any other, so
even a lease taken over too early converges to one version.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from recycler.crashpoints import crash_point
from recycler.errors import RecyclerError
from recycler.store import ArtifactRef

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

    from recycler.settings import Settings

KINDS = ("base", "diff", "ft", "merged")
ARTIFACT_KINDS = {"base": ("base", "model"), "diff": ("diff",), "ft": ("model",), "merged": ("model",)}
REF_TAGS = ("source_ft", "parent_diff", "source_merged")  # tags holding `name/version` references
NEXT_DIFF, CHAMPION = "next-diff", "champion"
LOCK_PREFIX = "_recycler-lock-"
_PART = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_RELEASE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
_ALIAS = re.compile(r"^[a-z0-9][a-z0-9_-]{0,127}$")
_METRIC = re.compile(r"^[A-Za-z0-9_.\-/]{1,100}$")
_TRANSIENT_CODES = {
    "INTERNAL_ERROR",
    "TEMPORARILY_UNAVAILABLE",
    "REQUEST_LIMIT_EXCEEDED",
    "DEADLINE_EXCEEDED",
}
T = TypeVar("T")


class RegistryError(RecyclerError):
    """A registry request was refused (unknown model/version, invalid name, conflicting lease)."""

    exit_code = 11


class RegistryUnavailable(RegistryError):
    """The MLflow registry did not answer within the bounded retries."""


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    kind: str
    family: str
    variant: str | None
    source: str
    tags: dict[str, str]
    aliases: tuple[str, ...] = ()
    run_id: str | None = None

    @property
    def reference(self) -> str:
        """`name/version`, the form stored in parent_diff / source_ft tags."""
        return f"{self.name}/{self.version}"

    @property
    def artifact(self) -> ArtifactRef:
        return ArtifactRef(self.tags["artifact_kind"], self.tags["manifest_sha256"], self.source)


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
    note: str = ""  # "unregistered", "cycle", …

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

    def to_mermaid(self) -> str:
        """Mermaid flowchart, ancestors above descendants, edges labelled with the relation."""
        ids: dict[str, str] = {}
        lines = ["flowchart TD"]

        def node_id(n: LineageNode) -> str:
            key = n.label
            if key not in ids:
                ids[key] = f"n{len(ids)}"
                extra = f"<br/>{', '.join(n.aliases)}" if n.aliases else ""
                base = f"<br/>base {n.tags['base_version']}" if n.tags.get("base_version") else ""
                note = f"<br/>({n.note})" if n.note else ""
                lines.append(f'    {ids[key]}["{n.label}{base}{extra}{note}"]')
            return ids[key]

        edges: set[str] = set()
        for n in self.walk():
            for c in n.children:
                edge = f"    {node_id(c)} -->|{c.relation}| {node_id(n)}"
                if edge not in edges:
                    edges.add(edge)
                    lines.append(edge)
        node_id(self)
        return "\n".join(lines) + "\n"


def check_part(what: str, value: str) -> str:
    if not isinstance(value, str) or not _PART.match(value):
        raise RegistryError(f"{what} {value!r} must match {_PART.pattern} (lowercase, digits, . _ -)")
    return value


def check_model_name(name: str) -> str:
    """A registered-model name that is safe inside a search filter (no quotes, no spaces)."""
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$", name or ""):
        raise RegistryError(
            f"model name {name!r} is not a recycler model name ({{family}}-{{variant}}-{{kind}})"
        )
    return name


def model_name(kind: str, family: str, variant: str | None = None) -> str:
    """The registered-model name for `kind` (see the module docstring)."""
    if kind not in KINDS:
        raise RegistryError(f"model kind {kind!r} is not one of {', '.join(KINDS)}")
    check_part("family", family)
    if kind == "base":
        return f"{family}-base"
    return f"{family}-{check_part('variant', variant or '')}-{kind}"


def champion_alias(base_version: str) -> str:
    """`champion-<base_version>`, lowercased, every character outside [a-z0-9_-] replaced by '-'."""
    return f"{CHAMPION}-{re.sub(r'[^a-z0-9_-]+', '-', base_version.lower()).strip('-') or 'none'}"[:128]


def _transient(e: Exception) -> bool:
    code = getattr(e, "error_code", None)
    text = str(e)
    return (
        code in _TRANSIENT_CODES
        or "database is locked" in text
        or type(e).__name__ in ("ConnectionError", "Timeout", "OperationalError")
    )


def _code(e: Exception) -> str | None:
    return getattr(e, "error_code", None)


class Registry:
    """recycler's view of an MLflow model registry; every call has bounded retries."""

    def __init__(
        self,
        tracking_uri: str,
        registry_uri: str | None = None,
        *,
        attempts: int = 3,
        backoff: float = 1.0,
        lease_ttl: float = 120.0,
        lease_wait: float = 180.0,
    ) -> None:
        from mlflow import MlflowClient

        from recycler.tracking import install_redaction, prepare_store

        install_redaction()
        prepare_store(tracking_uri, registry_uri or tracking_uri)
        # MLflow's own HTTP retries default to 7 with factor 2 (~4 min per call against a dead server).
        # Bound them unless the operator chose otherwise; our own loop adds `attempts` on top.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
        self.uri = registry_uri or tracking_uri
        self.client: MlflowClient = MlflowClient(tracking_uri, registry_uri or tracking_uri)
        self.attempts, self.backoff = attempts, backoff
        self.lease_ttl, self.lease_wait = lease_ttl, lease_wait

    @classmethod
    def from_settings(cls, settings: Settings) -> Registry:
        return cls(settings.tracking_uri, settings.registry_uri)

    # ------------------------------------------------------------------------------------ plumbing

    def _call(self, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
        for attempt in range(self.attempts):
            try:
                return fn(*args, **kwargs)
            except Exception as e:
                if not _transient(e):
                    raise
                if attempt == self.attempts - 1:
                    first_line = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
                    raise RegistryUnavailable(
                        f"MLflow registry at {self.uri} failed {self.attempts} times ({first_line}); "
                        "check that the server is running and RECYCLER_TRACKING_URI points at it"
                    ) from e
                time.sleep(self.backoff * 2**attempt)
        raise AssertionError("unreachable")

    def _search(self, filter_string: str) -> list[ModelVersion]:
        out, token = [], None
        while True:
            page = self._call(
                self.client.search_model_versions, filter_string, max_results=1000, page_token=token
            )
            out.extend(page)
            token = page.token
            if not token:
                return out

    def _to_version(self, mv: ModelVersion, aliases: tuple[str, ...] | None = None) -> RegisteredVersion:
        tags = dict(mv.tags)
        return RegisteredVersion(
            name=mv.name,
            version=str(mv.version),
            kind=tags.get("kind", ""),
            family=tags.get("family", ""),
            variant=tags.get("variant") or None,
            source=mv.source,
            tags=tags,
            aliases=tuple(mv.aliases) if aliases is None else aliases,
            run_id=mv.run_id or None,
        )

    def _aliases_of(self, name: str) -> dict[str, list[str]]:
        """version → aliases (search_model_versions returns none, so ask the registered model)."""
        rm = self._call(self.client.get_registered_model, name)
        by_version: dict[str, list[str]] = {}
        for alias, version in rm.aliases.items():
            by_version.setdefault(str(version), []).append(alias)
        return by_version

    def _find(self, name: str, digest: str) -> list[ModelVersion]:
        return self._search(f"name = '{name}' and tags.manifest_sha256 = '{digest}'")

    def _ensure_model(self, name: str, kind: str, family: str, variant: str | None) -> None:
        from mlflow.exceptions import MlflowException

        tags = {"recycler.kind": kind, "recycler.family": family}
        if variant:
            tags["recycler.variant"] = variant
        try:
            self._call(
                self.client.create_registered_model,
                name,
                tags=tags,
                description=f"recycler {kind} models of family `{family}`"
                + (f", variant `{variant}`" if variant else "")
                + ". Versions point at verified artifacts; see each version's lineage.",
            )
        except MlflowException as e:
            if _code(e) != "RESOURCE_ALREADY_EXISTS":
                raise

    # ------------------------------------------------------------------------------------ lease

    def _acquire(self, key: str) -> tuple[str, str]:
        """Take the lease for `key`; return (lock model name, owner token)."""
        from mlflow.exceptions import MlflowException

        name = LOCK_PREFIX + hashlib.sha256(key.encode()).hexdigest()[:32]
        token, deadline = uuid.uuid4().hex, time.monotonic() + self.lease_wait
        while True:
            try:
                self._call(
                    self.client.create_registered_model,
                    name,
                    tags={
                        "recycler.lock": key,
                        "owner": token,
                        "expires_at": f"{time.time() + self.lease_ttl:.3f}",
                    },
                    description="recycler registration lease (deleted when released; expires on its own).",
                )
                return name, token
            except MlflowException as e:
                if _code(e) == "RESOURCE_DOES_NOT_EXIST":
                    continue  # the server re-reads the clashing name; the holder released in between
                if _code(e) != "RESOURCE_ALREADY_EXISTS":
                    raise
            try:
                held = self._call(self.client.get_registered_model, name)
            except MlflowException as e:
                if _code(e) == "RESOURCE_DOES_NOT_EXIST":
                    continue  # released in between
                raise
            if held.tags.get("owner") == token:
                return name, token  # our create succeeded but its response was lost and retried
            expires = float(held.tags.get("expires_at", "0") or 0)
            if expires < time.time():  # holder died: rename it away (only one taker wins), then retry
                stale = f"{name}.stale-{token[:12]}"
                try:
                    self._call(self.client.rename_registered_model, name, stale)
                    self._call(self.client.delete_registered_model, stale)
                except MlflowException:
                    pass
                continue
            if time.monotonic() > deadline:
                raise RegistryError(
                    f"registration lease {key!r} is held by another process until "
                    f"{time.strftime('%H:%M:%S', time.localtime(expires))}; waited {self.lease_wait:.0f} s"
                )
            time.sleep(random.uniform(0.05, 0.25))

    def _release(self, name: str, token: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            held = self._call(self.client.get_registered_model, name)
            if held.tags.get("owner") == token:
                self._call(self.client.delete_registered_model, name)
        except MlflowException:
            pass  # already gone or taken over; expiry covers the rest

    # ------------------------------------------------------------------------------------ register

    def register(
        self,
        kind: str,
        family: str,
        variant: str | None,
        ref: ArtifactRef,
        *,
        base_version: str,
        parent_diff: str | None = None,
        source_ft: str | None = None,
        diff_mode: str | None = None,
        run_id: str | None = None,
        metrics: dict | None = None,
        extra_tags: dict | None = None,
    ) -> RegisteredVersion:
        """Register `ref` as a version of the model for (kind, family, variant); idempotent per artifact.

        Call it only after the artifact is published (its manifest exists). Raises RegistryError for
        invalid names or references, RegistryUnavailable when the server does not answer.
        """
        name = model_name(kind, family, variant)
        if ref.kind not in ARTIFACT_KINDS[kind]:
            raise RegistryError(
                f"a {kind} version needs an artifact of kind {ARTIFACT_KINDS[kind]}, got {ref.kind!r}"
            )
        if not _RELEASE.match(base_version or ""):
            raise RegistryError(f"base_version {base_version!r} must match {_RELEASE.pattern}")
        if not ref.uri.startswith("s3://") and self.uri.startswith(("http://", "https://")):
            raise RegistryError(
                f"{ref.uri} is a local path; an MLflow server refuses local sources. Publish to an S3 "
                "artifact store (RECYCLER_ARTIFACT_STORE=s3://bucket/prefix) to register on a server."
            )
        found = self._find(name, ref.digest)
        if found:  # fast path: already registered, no lease needed
            return self.get(name, min(found, key=lambda m: int(m.version)).version)
        tags = self._tags(kind, family, variant, ref, base_version, parent_diff, source_ft, diff_mode, run_id)
        for metric, value in (metrics or {}).items():
            if not _METRIC.match(str(metric)):
                raise RegistryError(f"metric name {metric!r} must match {_METRIC.pattern}")
            tags[f"eval.{metric}"] = f"{float(value):.6g}"
        for key, value in (extra_tags or {}).items():
            if key in tags:
                raise RegistryError(f"extra tag {key!r} would overwrite a recycler tag")
            tags[str(key)] = str(value)
        lock, token = self._acquire(f"register:{name}:{ref.digest}")
        try:
            self._ensure_model(name, kind, family, variant)
            if not self._find(name, ref.digest):
                self._call(
                    self.client.create_model_version,
                    name,
                    source=ref.uri,
                    run_id=run_id,
                    tags=tags,
                    description=describe(name, tags),
                )
                crash_point("register:created")
            winner = self._dedupe(name, ref.digest)
        finally:
            self._release(lock, token)
        return self.get(name, winner)

    def _dedupe(self, name: str, digest: str) -> str:
        """Keep the lowest version holding `digest`; delete the others (a crashed or overlapping run's)."""
        from mlflow.exceptions import MlflowException

        versions = sorted(int(m.version) for m in self._find(name, digest))
        for extra in versions[1:]:
            try:
                self._call(self.client.delete_model_version, name, str(extra))
            except MlflowException as e:
                if _code(e) != "RESOURCE_DOES_NOT_EXIST":
                    raise
        return str(versions[0])

    def _tags(
        self,
        kind: str,
        family: str,
        variant: str | None,
        ref: ArtifactRef,
        base_version: str,
        parent_diff: str | None,
        source_ft: str | None,
        diff_mode: str | None,
        run_id: str | None,
    ) -> dict[str, str]:
        tags = {
            "kind": kind,
            "family": family,
            "variant": variant or "",
            "base_version": base_version,
            "manifest_sha256": ref.digest,
            "artifact_uri": ref.uri,
            "artifact_kind": ref.kind,
        }
        if parent_diff:
            tags["parent_diff"] = self.resolve(parent_diff).reference
        if source_ft:
            tags["source_ft"] = self.resolve(source_ft).reference
        if diff_mode:
            tags["diff_mode"] = str(diff_mode)
        if run_id:
            tags["run_id"] = run_id
        return {k: v for k, v in tags.items() if v}

    # ------------------------------------------------------------------------------------ reading

    def get(self, name: str, version_or_alias: str) -> RegisteredVersion:
        """A version by number or alias; RegistryError if either does not exist."""
        from mlflow.exceptions import MlflowException

        try:
            if str(version_or_alias).isdigit():
                mv = self._call(self.client.get_model_version, name, str(version_or_alias))
            else:
                mv = self._call(self.client.get_model_version_by_alias, name, version_or_alias)
        except MlflowException as e:
            if _code(e) in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise RegistryError(
                    f"{name}@{version_or_alias}: not found in the registry at {self.uri}"
                ) from None
            raise
        return self._to_version(mv)

    def resolve(self, reference: str) -> RegisteredVersion:
        """`name/version`, `name@alias` or `name@version` → the version (checked to exist)."""
        name, sep, which = reference.replace("@", "/", 1).rpartition("/")
        if not sep or not name or not which:
            raise RegistryError(f"reference {reference!r} must be NAME/VERSION or NAME@ALIAS")
        return self.get(name, which)

    def set_alias(
        self, kind: str, family: str, variant: str | None, alias: str, version: str
    ) -> RegisteredVersion:
        name = model_name(kind, family, variant)
        if not _ALIAS.match(alias) or alias == "latest":
            raise RegistryError(f"alias {alias!r} must match {_ALIAS.pattern} and not be 'latest'")
        self._call(self.client.set_registered_model_alias, name, alias, str(version))
        return self.get(name, alias)

    def set_tags(self, version: RegisteredVersion, tags: dict[str, str]) -> RegisteredVersion:
        """Add status tags (gate outcome, cycle completion) to a version; recycler's identity tags
        (kind, digest, lineage references) are refused so a version's lineage never changes."""
        protected = {"kind", "family", "variant", "base_version", "manifest_sha256", "artifact_uri"}
        if clash := protected.intersection(tags) | {k for k in tags if k in REF_TAGS}:
            raise RegistryError(f"tags {sorted(clash)} are set at registration and cannot be changed")
        for key, value in tags.items():
            self._call(self.client.set_model_version_tag, version.name, version.version, key, str(value))
        return self.get(version.name, version.version)

    def get_alias(self, kind: str, family: str, variant: str | None, alias: str) -> RegisteredVersion | None:
        try:
            return self.get(model_name(kind, family, variant), alias)
        except RegistryError:
            return None

    def versions(self, kind: str, family: str, variant: str | None = None) -> list[RegisteredVersion]:
        """All versions of one model, oldest first, with their aliases ([] if the model does not exist)."""
        from mlflow.exceptions import MlflowException

        name = model_name(kind, family, variant)
        try:
            aliases = self._aliases_of(name)
        except MlflowException as e:
            if _code(e) == "RESOURCE_DOES_NOT_EXIST":
                return []
            raise
        found = sorted(self._search(f"name = '{name}'"), key=lambda m: int(m.version))
        return [self._to_version(m, tuple(aliases.get(str(m.version), ()))) for m in found]

    def latest(self, name: str) -> RegisteredVersion | None:
        """The highest-numbered version of a registered model, or None."""
        found = self._search(f"name = '{check_model_name(name)}'")
        return self.get(name, max(found, key=lambda m: int(m.version)).version) if found else None

    def processed_base_versions(self, family: str, variant: str) -> set[str]:
        """Base releases that already have a registered fine-tune (the watcher skips them)."""
        return {
            v.tags["base_version"] for v in self.versions("ft", family, variant) if "base_version" in v.tags
        }

    def models(self) -> list[dict]:
        """recycler's registered models: name, kind, family, variant, aliases (lease models excluded)."""
        out, token = [], None
        while True:
            page = self._call(self.client.search_registered_models, max_results=1000, page_token=token)
            for rm in page:
                if "recycler.kind" in rm.tags and not rm.name.startswith(LOCK_PREFIX):
                    out.append(
                        {
                            "name": rm.name,
                            "kind": rm.tags["recycler.kind"],
                            "family": rm.tags.get("recycler.family", ""),
                            "variant": rm.tags.get("recycler.variant"),
                            "aliases": {a: str(v) for a, v in rm.aliases.items()},
                        }
                    )
            token = page.token
            if not token:
                return sorted(out, key=lambda m: m["name"])

    def families(self) -> list[str]:
        return sorted({m["family"] for m in self.models() if m["family"]})

    # ------------------------------------------------------------------------------------ lineage

    def lineage(self, name: str, version_or_alias: str, *, max_depth: int | None = None) -> LineageNode:
        """The tree of versions `name@version_or_alias` descends from, back to the first base.

        Lineage is a DAG (a fine-tune reaches its parent Δ directly and through its merged start), so a
        version is expanded once and later occurrences are marked "shown above": the tree grows with
        the number of cycles, not twice per cycle. `max_depth` cuts it for pictures of long chains.
        """
        return self._node(self.get(name, version_or_alias), "self", set(), set(), max_depth)

    def _node(
        self, v: RegisteredVersion, relation: str, path: set[str], expanded: set[str], depth: int | None
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
                    node.children.append(self._node(self.resolve(ref), tag, path, expanded, below))
                except RegistryError:
                    node.children.append(LineageNode(ref, None, tag, note="not found"))
        release = v.tags.get("base_version", "")
        if v.kind != "base" and _RELEASE.match(release) and _PART.match(v.family):
            base_name = model_name("base", v.family)
            bases = self._search(f"name = '{base_name}' and tags.base_version = '{release}'")
            if bases:
                first = min(bases, key=lambda m: int(m.version))
                node.children.append(
                    self._node(self.get(base_name, first.version), "base", path, expanded, below)
                )
            else:
                node.children.append(
                    LineageNode(f"{base_name} {release}", None, "base", "base", note="unregistered")
                )
        return node


def describe(name: str, tags: dict[str, str]) -> str:
    """Markdown for the version page: what it is and where it comes from."""
    kind, base = tags["kind"], tags["base_version"]
    head = {
        "base": f"Base release `{base}`.",
        "ft": f"Fine-tune of base `{base}`"
        + (f", initialised from Δ `{tags['parent_diff']}`." if "parent_diff" in tags else "."),
        "diff": f"Δ = `{tags.get('source_ft', '?')}` − base `{base}`.",
        "merged": f"Base `{base}` + Δ `{tags.get('parent_diff', '?')}`.",
    }[kind]
    lines = [f"**{name}** — {head}", ""]
    for key in ("family", "variant", *REF_TAGS, "diff_mode", "run_id"):
        if key in tags:
            lines.append(f"- {key}: `{tags[key]}`")
    lines.append(f"- artifact: `{tags['artifact_uri']}` (manifest sha256 `{tags['manifest_sha256'][:16]}…`)")
    lines += [f"- {k}: {v}" for k, v in sorted(tags.items()) if k.startswith("eval.")]
    return "\n".join(lines)
