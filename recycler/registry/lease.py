"""A registration lease that works across processes and machines against one MLflow server.

The lease for a key is a registered model `_recycler-lock-<hash>`: creating it is atomic in every
MLflow backend (unique name). Its `expires_at` tag lets a waiter take over the lease of a killed
holder after `ttl` seconds, by renaming it away, which only one taker can do. Correctness never rests
on the lease alone (Registry.register deduplicates after creating); the lease keeps the common case
from creating duplicates in the first place.
"""

from __future__ import annotations

import hashlib
import random
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from recycler.errors import RegistryError
from recycler.registry.names import LOCK_PREFIX

if TYPE_CHECKING:
    from recycler.registry.client import Registry


@dataclass(frozen=True)
class LeaseInfo:
    name: str
    key: str
    owner: str
    expires_at: float


def _error_code(e: Exception) -> str | None:
    return getattr(e, "error_code", None)


def _expires(tags: dict) -> float:
    try:
        return float(tags.get("expires_at", "0") or 0)  # missing or garbled = expired
    except ValueError:
        return 0.0


def lease_name(key: str) -> str:
    return LOCK_PREFIX + hashlib.sha256(key.encode()).hexdigest()[:32]


@contextmanager
def lease(registry: Registry, key: str, *, ttl: float, wait: float) -> Iterator[None]:
    """Hold the lease for `key` for the duration of the block (waiting up to `wait` seconds)."""
    name, token = acquire(registry, key, ttl=ttl, wait=wait)
    try:
        yield
    finally:
        release(registry, name, token)


def acquire(registry: Registry, key: str, *, ttl: float, wait: float) -> tuple[str, str]:
    """Take the lease for `key`; return (lock model name, owner token)."""
    from mlflow.exceptions import MlflowException

    client, name = registry.client, lease_name(key)
    token, deadline = uuid.uuid4().hex, time.monotonic() + wait
    while True:
        tags = {"recycler.lock": key, "owner": token, "expires_at": f"{time.time() + ttl:.3f}"}
        try:
            description = "recycler registration lease (deleted when released; expires on its own)."
            registry.call(client.create_registered_model, name, tags=tags, description=description)
            return name, token
        except MlflowException as e:
            if _error_code(e) == "RESOURCE_DOES_NOT_EXIST":
                continue  # the server re-reads the clashing name; the holder released in between
            if _error_code(e) != "RESOURCE_ALREADY_EXISTS":
                raise
        try:
            held = registry.call(client.get_registered_model, name)
        except MlflowException as e:
            if _error_code(e) == "RESOURCE_DOES_NOT_EXIST":
                continue  # released in between
            raise
        if held.tags.get("owner") == token:
            return name, token  # our create succeeded but its response was lost and retried
        expires = _expires(held.tags)
        if expires < time.time():  # holder died: rename it away (only one taker wins), then retry
            try:
                registry.call(client.rename_registered_model, name, f"{name}.stale-{token[:12]}")
                registry.call(client.delete_registered_model, f"{name}.stale-{token[:12]}")
            except MlflowException:
                pass
            continue
        if time.monotonic() > deadline:
            until = time.strftime("%H:%M:%S", time.localtime(expires))
            raise RegistryError(
                f"registration lease {key!r} is held by another process until {until}; waited {wait:.0f} s"
            )
        time.sleep(random.uniform(0.05, 0.25))


def release(registry: Registry, name: str, token: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        held = registry.call(registry.client.get_registered_model, name)
        if held.tags.get("owner") == token:
            registry.call(registry.client.delete_registered_model, name)
    except MlflowException:
        pass  # already gone or taken over; expiry covers the rest


def leases(registry: Registry) -> list[LeaseInfo]:
    """Every lease model on the server (live or expired)."""
    found, token = [], None
    while True:
        page = registry.call(
            registry.client.search_registered_models,
            f"name LIKE '{LOCK_PREFIX}%'",
            max_results=1000,
            page_token=token,
        )
        found += [
            LeaseInfo(rm.name, rm.tags.get("recycler.lock", "?"), rm.tags.get("owner", ""), _expires(rm.tags))
            for rm in page
            if rm.name.startswith(LOCK_PREFIX)
        ]
        if not (token := page.token):
            return found


def delete_if_expired(registry: Registry, info: LeaseInfo) -> bool:
    """Delete an expired lease, re-reading it first so a lease renewed or re-taken in between is kept."""
    from mlflow.exceptions import MlflowException

    try:
        held = registry.call(registry.client.get_registered_model, info.name)
    except MlflowException as e:
        if _error_code(e) == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise
    if held.tags.get("owner") != info.owner or _expires(held.tags) >= time.time():
        return False
    registry.call(registry.client.delete_registered_model, info.name)
    return True
