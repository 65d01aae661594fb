"""recycler's view of an MLflow model registry: which artifact is which model version.

Versions are pointers (`create_model_version(source=<artifact uri>)`): MLflow copies nothing, the
weights stay in the artifact store (recycler.store) where they were published manifest-first. Names,
aliases and tags are defined in recycler.registry.names; lineage walks in recycler.registry.lineage.

Exactly one version per artifact (RELIABILITY.md R4, §0.9: create_model_version is not idempotent):
`register` looks for a version tagged with the artifact's manifest_sha256 and creates one only under a
lease (recycler.registry.lease). Correctness does not rest on the lease alone: after creating,
`register` keeps the lowest-numbered version with that digest and deletes any other, so even a lease
taken over too early converges to one version. Every call has bounded retries (`call`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from recycler.crashpoints import crash_point
from recycler.errors import RegistryError, RegistryUnavailable
from recycler.registry.describe import describe, refresh_lineage_of, related_of
from recycler.registry.lease import lease
from recycler.registry.names import (
    ALIAS,
    ARTIFACT_KINDS,
    IDENTITY_TAGS,
    LOCK_PREFIX,
    REF_TAGS,
    RELEASE,
    Lineage,
    RegisteredVersion,
    check_model_name,
    check_tag,
    model_name,
    version_tags,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

    from recycler.settings import Settings
    from recycler.store import ArtifactRef

_TRANSIENT_CODES = {
    "INTERNAL_ERROR",
    "TEMPORARILY_UNAVAILABLE",
    "REQUEST_LIMIT_EXCEEDED",
    "DEADLINE_EXCEEDED",
}
T = TypeVar("T")


def _transient(e: Exception) -> bool:
    text = str(e)
    return (
        getattr(e, "error_code", None) in _TRANSIENT_CODES
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

        from recycler.redact import install_redaction
        from recycler.registry.runs import prepare_store

        install_redaction()
        prepare_store(tracking_uri, registry_uri or tracking_uri)
        # MLflow's own HTTP retries default to 7 with factor 2 (~4 min per call against a dead server).
        # Bound them unless the operator chose otherwise; our own loop adds `attempts` on top.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
        self.uri = registry_uri or tracking_uri
        self.tracking_uri = tracking_uri
        self.client: MlflowClient = MlflowClient(tracking_uri, registry_uri or tracking_uri)
        self.attempts, self.backoff = attempts, backoff
        self.lease_ttl, self.lease_wait = lease_ttl, lease_wait

    @classmethod
    def from_settings(cls, settings: Settings, **kw) -> Registry:
        return cls(settings.tracking_uri, settings.registry_uri, **kw)

    # ------------------------------------------------------------------------------------ plumbing

    def call(self, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
        """`fn(*args, **kwargs)` with bounded retries on transient errors (RegistryUnavailable after)."""
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

    def search(self, filter_string: str) -> list[ModelVersion]:
        """Every model version matching an MLflow filter string (all pages)."""
        out, token = [], None
        while True:
            page = self.call(
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
        rm = self.call(self.client.get_registered_model, name)
        by_version: dict[str, list[str]] = {}
        for alias, version in rm.aliases.items():
            by_version.setdefault(str(version), []).append(alias)
        return by_version

    def _find(self, name: str, digest: str) -> list[ModelVersion]:
        return self.search(f"name = '{name}' and tags.manifest_sha256 = '{digest}'")

    def _ensure_model(self, name: str, kind: str, family: str, variant: str | None) -> None:
        from mlflow.exceptions import MlflowException

        tags = {"recycler.kind": kind, "recycler.family": family} | (
            {"recycler.variant": variant} if variant else {}
        )
        what = f"recycler {kind} models of family `{family}`" + (f", variant `{variant}`" if variant else "")
        try:
            self.call(
                self.client.create_registered_model,
                name,
                tags=tags,
                description=f"{what}. Versions point at verified artifacts; see each version's lineage.",
            )
        except MlflowException as e:
            if _code(e) != "RESOURCE_ALREADY_EXISTS":
                raise

    # ------------------------------------------------------------------------------------ register

    def register(
        self,
        kind: str,
        family: str,
        variant: str | None,
        ref: ArtifactRef,
        *,
        base_version: str,
        lineage: Lineage = Lineage(),
        metrics: dict[str, float] | None = None,
        status: dict[str, str] | None = None,
        release_fingerprint: str = "",
    ) -> RegisteredVersion:
        """Register `ref` as a version of the model for (kind, family, variant); idempotent per artifact.

        Call it only after the artifact is published (its manifest exists). Lineage references are
        checked to exist. A version that already exists keeps its identity and lineage, and takes the
        scores and status given now (a re-run that measured under other settings says so, instead of
        leaving the first run's scores beside its own decision). Raises RegistryError for invalid
        names, references or tags, RegistryUnavailable when the server does not answer.
        """
        name = model_name(kind, family, variant)
        if ref.kind not in ARTIFACT_KINDS[kind]:
            raise RegistryError(
                f"a {kind} version needs an artifact of kind {ARTIFACT_KINDS[kind]}, got {ref.kind!r}"
            )
        if not RELEASE.match(base_version or ""):
            raise RegistryError(f"base_version {base_version!r} must match {RELEASE.pattern}")
        if not ref.uri.startswith("s3://") and self.uri.startswith(("http://", "https://")):
            raise RegistryError(
                f"{ref.uri} is a local path; an MLflow server refuses local sources. Publish to an S3 "
                "artifact store (RECYCLER_ARTIFACT_STORE=s3://bucket/prefix) to register on a server."
            )
        found = self._find(name, ref.digest)
        if found:  # fast path: already registered, no lease needed
            return self._update_status(self.get(name, min(found, key=lambda m: int(m.version)).version), metrics, status)  # fmt: skip
        tags = self._tags(
            kind, family, variant, ref, base_version, lineage, metrics, status, release_fingerprint
        )
        with lease(self, f"register:{name}:{ref.digest}", ttl=self.lease_ttl, wait=self.lease_wait):
            self._ensure_model(name, kind, family, variant)
            if not self._find(name, ref.digest):
                description = describe(name, tags, related_of(self, None, tags, lineage.run_id))
                self.call(
                    self.client.create_model_version,
                    name,
                    source=ref.uri,
                    run_id=lineage.run_id,
                    tags=tags,
                    description=description,
                )
                crash_point("register:created")
            winner = self._dedupe(name, ref.digest)
        refresh_lineage_of(self, tags)  # the versions it names link forward to it
        return self._update_status(self.get(name, winner), metrics, status)

    def _update_status(
        self, version: RegisteredVersion, metrics: dict[str, float] | None, status: dict[str, str] | None
    ) -> RegisteredVersion:
        """Bring a version's eval.<metric> and status tags to the values of this registration."""
        wanted = {f"eval.{k}": f"{float(v):.6g}" for k, v in (metrics or {}).items()} | dict(status or {})
        changed = {k: v for k, v in wanted.items() if version.tags.get(k) != v}
        return self.set_tags(version, changed) if changed else version

    def _dedupe(self, name: str, digest: str) -> str:
        """Keep the lowest version holding `digest`; delete the others (a crashed or overlapping run's)."""
        from mlflow.exceptions import MlflowException

        versions = sorted(int(m.version) for m in self._find(name, digest))
        for extra in versions[1:]:
            try:
                self.call(self.client.delete_model_version, name, str(extra))
            except MlflowException as e:
                if _code(e) != "RESOURCE_DOES_NOT_EXIST":
                    raise
        return str(versions[0])

    def _tags(self, kind: str, family: str, variant: str | None, ref: ArtifactRef, base_version: str,
              lineage: Lineage, metrics: dict[str, float] | None, status: dict[str, str] | None,
              release_fingerprint: str = "") -> dict[str, str]:  # fmt: skip
        resolved = {k: self.resolve(v).reference if k in REF_TAGS else v for k, v in lineage.tags().items()}
        return version_tags(
            kind, family, variant, ref, base_version, resolved, metrics, status, release_fingerprint
        )

    # ------------------------------------------------------------------------------------ reading

    def get(self, name: str, version_or_alias: str) -> RegisteredVersion:
        """A version by number or alias; RegistryError if either does not exist."""
        from mlflow.exceptions import MlflowException

        try:
            if str(version_or_alias).isdigit():
                mv = self.call(self.client.get_model_version, name, str(version_or_alias))
            else:
                mv = self.call(self.client.get_model_version_by_alias, name, version_or_alias)
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
        if not ALIAS.match(alias) or alias == "latest":
            raise RegistryError(f"alias {alias!r} must match {ALIAS.pattern} and not be 'latest'")
        self.call(self.client.set_registered_model_alias, name, alias, str(version))
        return self.get(name, alias)

    def delete_alias(self, kind: str, family: str, variant: str | None, alias: str) -> None:
        """Remove `alias` from the model (nothing if it is not set)."""
        from mlflow.exceptions import MlflowException

        try:
            self.call(self.client.delete_registered_model_alias, model_name(kind, family, variant), alias)
        except MlflowException as e:
            if _code(e) not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise

    def set_tags(self, version: RegisteredVersion, tags: dict[str, str]) -> RegisteredVersion:
        """Add status tags (gate outcome, cycle completion) to a version; identity and lineage tags are
        refused, so a version's lineage never changes."""
        if clash := set(tags) & {*IDENTITY_TAGS, *REF_TAGS}:
            raise RegistryError(f"tags {sorted(clash)} are set at registration and cannot be changed")
        for key, value in tags.items():
            self.call(
                self.client.set_model_version_tag, version.name, version.version, check_tag(key), str(value)
            )
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
        found = sorted(self.search(f"name = '{name}'"), key=lambda m: int(m.version))
        return [self._to_version(m, tuple(aliases.get(str(m.version), ()))) for m in found]

    def base_version(self, family: str, release: str) -> RegisteredVersion | None:
        """The registered base of release `release` (the oldest version with that tag), or None."""
        if not RELEASE.match(release or ""):
            raise RegistryError(f"release {release!r} must match {RELEASE.pattern}")
        name = model_name("base", family)
        found = self.search(f"name = '{name}' and tags.base_version = '{release}'")
        return self.get(name, min(found, key=lambda m: int(m.version)).version) if found else None

    def latest(self, name: str) -> RegisteredVersion | None:
        """The highest-numbered version of a registered model, or None."""
        found = self.search(f"name = '{check_model_name(name)}'")
        return self.get(name, max(found, key=lambda m: int(m.version)).version) if found else None

    def all_versions(self) -> list[RegisteredVersion]:
        """Every recycler version on the server (tagged with a manifest digest), for health checks."""
        return [self._to_version(m, ()) for m in self.search("") if "manifest_sha256" in m.tags]

    def models(self) -> list[dict]:
        """recycler's registered models: name, kind, family, variant, aliases (lease models excluded)."""
        out, token = [], None
        while True:
            page = self.call(self.client.search_registered_models, max_results=1000, page_token=token)
            for rm in page:
                chain = rm.tags.get("recycler.kind") == "chain"  # a family's chain ledger, not a model
                if "recycler.kind" in rm.tags and not rm.name.startswith(LOCK_PREFIX) and not chain:
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
