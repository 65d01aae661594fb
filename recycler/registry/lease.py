"""Leases that work across processes, hosts and homes against one MLflow server.

The lease for a key is a registered model `_recycler-lock-<hash>`: creating it is atomic in every
MLflow backend (unique name). Its `expires_at` tag lets a waiter take over the lease of a killed
holder after `ttl` seconds, by renaming it away, which only one taker can do.

Two uses: registration (`lease`, seconds long; correctness never rests on it alone, Registry.register
deduplicates after creating) and a family's release chain (`held_lease`, hours long while a fine-tune
runs): a `HeldLease` renews itself from a background thread every ttl/3, and `check()` raises
ChainConflict once it was lost (a renewal failed for longer than the ttl and another process took it
over), so the holder stops before it writes anything a new holder may be writing too.
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from recycler.errors import ChainConflict, LeaseBusy
from recycler.registry.names import LOCK_PREFIX

if TYPE_CHECKING:
    from recycler.registry.client import Registry


@dataclass(frozen=True)
class LeaseInfo:
    name: str
    key: str
    owner: str
    expires_at: float


log = logging.getLogger(__name__)


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


def holder(registry: Registry, key: str) -> LeaseInfo | None:
    """Who holds the lease for `key` now (live or expired), or None."""
    from mlflow.exceptions import MlflowException

    name = lease_name(key)
    try:
        held = registry.call(registry.client.get_registered_model, name)
    except MlflowException as e:
        if _error_code(e) == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return LeaseInfo(
        name, held.tags.get("recycler.lock", key), held.tags.get("owner", ""), _expires(held.tags)
    )


def acquire(registry: Registry, key: str, *, ttl: float, wait: float, note: str = "") -> tuple[str, str]:
    """Take the lease for `key`; return (lock model name, owner token). `note` (who takes it: host,
    pid, what for) is stored on the lease for the operator who finds it held."""
    from mlflow.exceptions import MlflowException

    client, name = registry.client, lease_name(key)
    token, deadline = uuid.uuid4().hex, time.monotonic() + wait
    while True:
        tags = {"recycler.lock": key, "owner": token, "expires_at": f"{time.time() + ttl:.3f}"}
        if note:
            tags["holder"] = note
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
            who = f" ({held.tags['holder']})" if held.tags.get("holder") else ""
            raise LeaseBusy(
                f"lease {key!r} is held by another process{who} until {until} (renewed while it works); "
                f"waited {wait:.0f} s"
            )
        time.sleep(random.uniform(0.05, 0.25))


class HeldLease:
    """A lease held for a long block: renewed every ttl/3 from a daemon thread while the block runs.

    `check()` is the fence: call it before every write that must not interleave with another holder's
    (registration, alias moves); it raises ChainConflict once a renewal found the lease gone or owned
    by someone else, or when the last successful renewal is older than the ttl.
    """

    def __init__(self, registry: Registry, key: str, name: str, token: str, ttl: float) -> None:
        self.registry, self.key, self.name, self.token, self.ttl = registry, key, name, token, ttl
        self.renewed_at = time.monotonic()
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease {key}", daemon=True)

    def renew(self) -> bool:
        """Extend the lease by ttl if we still hold it; False (and `lost` set) if not."""
        from mlflow.exceptions import MlflowException

        client = self.registry.client
        try:
            held = self.registry.call(client.get_registered_model, self.name)
            if held.tags.get("owner") != self.token:
                self.lost = f"taken over by {held.tags.get('holder') or held.tags.get('owner', '?')}"
                return False
            expires = f"{time.time() + self.ttl:.3f}"
            self.registry.call(client.set_registered_model_tag, self.name, "expires_at", expires)
            # re-read: a taker may have renamed ours away and created its own in between
            if self.registry.call(client.get_registered_model, self.name).tags.get("owner") != self.token:
                self.lost = "taken over while renewing"
                return False
        except MlflowException as e:
            if _error_code(e) == "RESOURCE_DOES_NOT_EXIST":
                self.lost = "deleted (expired and taken over)"
                return False
            log.warning("could not renew lease %s: %s", self.key, str(e).splitlines()[0][:200])
            return True  # transient: check() fails once the ttl has passed without a renewal
        except Exception as e:  # a server that does not answer: same as above
            log.warning(
                "could not renew lease %s: %s", self.key, str(e).splitlines()[0][:200] if str(e) else e
            )
            return True
        self.renewed_at = time.monotonic()
        return True

    def check(self) -> None:
        """Raise ChainConflict if this holder may no longer act under the lease."""
        if self.lost is None and time.monotonic() - self.renewed_at > self.ttl:
            self.lost = f"not renewed for {self.ttl:.0f} s (registry unreachable?)"
        if self.lost is not None:
            raise ChainConflict(
                f"lost the lease {self.key!r}: {self.lost}; stopping before any further write"
            )

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            if not self.renew():
                return

    def __enter__(self) -> HeldLease:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        if self.lost is None:
            release(self.registry, self.name, self.token)


def held_lease(registry: Registry, key: str, *, ttl: float, wait: float, note: str = "") -> HeldLease:
    """Take the lease for `key` and return it, ready to be entered (`with held_lease(...) as lease:`)."""
    name, token = acquire(registry, key, ttl=ttl, wait=wait, note=note)
    return HeldLease(registry, key, name, token, ttl)


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
