"""Bounded memory for the receiver: a rate limit per client and the release keys announced lately.

Both are bounded whatever the traffic: at most `clients` buckets and `size` keys, oldest dropped first,
so a flood of distinct addresses or releases costs a fixed amount of memory.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable


class RateLimit:
    """A token bucket per client: `burst` requests at once, refilled at `per_second`."""

    def __init__(
        self,
        per_second: float,
        burst: int,
        *,
        clients: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_second, self.burst, self.clients, self.clock = per_second, burst, clients, clock
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client → (tokens, when)
        self.lock = threading.Lock()

    def allow(self, client: str) -> bool:
        now = self.clock()
        with self.lock:
            tokens, then = self.buckets.pop(client, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - then) * self.per_second)
            allowed = tokens >= 1.0
            self.buckets[client] = (tokens - 1.0 if allowed else tokens, now)
            while len(self.buckets) > self.clients:
                self.buckets.popitem(last=False)
            return allowed


class RecentKeys:
    """The last `size` keys seen (a bounded set): a replayed announcement is answered, not re-emitted."""

    def __init__(self, size: int = 4096) -> None:
        self.size, self.keys, self.lock = size, OrderedDict[str, None](), threading.Lock()

    def __contains__(self, key: str) -> bool:
        with self.lock:
            return key in self.keys

    def add(self, key: str) -> None:
        with self.lock:
            self.keys[key] = None
            self.keys.move_to_end(key)
            while len(self.keys) > self.size:
                self.keys.popitem(last=False)


class QuietPeriod:
    """Run `action(key)` once `seconds` have passed without another `touch(key)` (a debounce): an
    upload's objects arrive one notification each, and a release is checked once its uploads paused,
    so files that land after the weights (tokenizer, generation config) are in its fingerprint.
    At most `size` keys wait at once; beyond that a key is acted on at once."""

    def __init__(self, seconds: float, action: Callable[[object], None], *, size: int = 1024) -> None:
        self.seconds, self.action, self.size = seconds, action, size
        self.timers: dict[object, threading.Timer] = {}
        self.lock = threading.Lock()

    def touch(self, key: object) -> None:
        with self.lock:
            if (old := self.timers.pop(key, None)) is not None:
                old.cancel()
            if len(self.timers) >= self.size:
                now = True
            else:
                now = False
                timer = threading.Timer(self.seconds, self._fire, args=(key,))
                timer.daemon = True
                self.timers[key] = timer
                timer.start()
        if now:
            self.action(key)

    def _fire(self, key: object) -> None:
        with self.lock:
            self.timers.pop(key, None)
        self.action(key)

    def pending(self) -> int:
        with self.lock:
            return len(self.timers)
