"""DRF throttles keyed like every other rate limit of the platform (`common.network`): the
socket address unless TRUSTED_PROXY_HOPS, IPv6 grouped per /64.

Counting is a sliding-window counter: the previous fixed window's count, weighted by how much
of it the sliding window still overlaps, plus the current one's. The rates mean what DRF's do
("100/min": at most about 100 in any 60 s); a refused request answers 429 with Retry-After.

The counts live in the shared cache (Redis in production, so limits are global across
processes), taken in leases: a process reserves `lease_size` hits in one round trip
(`common.cache.window_hits`) and spends them locally, so a generous rate costs one Redis round
trip per lease instead of two per request (DRF's timestamp log: a GET and a SET of a list that
grows to the rate's size). A lease is at most 1/LEASE_DIVISOR of the rate, and 1 for small
rates (login, register: every request is counted in Redis). Reserved hits are counted whether
or not they are spent, so a lease can only make the limit stricter, never looser. While Redis is
unreachable the throttles fail open (input-policy.md).
"""

import math
import threading
import time
from typing import Any

from rest_framework import throttling
from rest_framework.request import Request

from common.cache import window_hits
from common.network import client_ip, client_key

LEASE_DIVISOR = 1000


def _now() -> float:
    return time.time()


class LeaseBook:
    """This process's unspent leases: key → (window slot, hits left). Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._leases: dict[str, tuple[int, int]] = {}

    def spend(self, key: str, slot: int) -> bool:
        with self._lock:
            lease = self._leases.get(key)
            if lease is None or lease[0] != slot or lease[1] <= 0:
                return False
            self._leases[key] = (slot, lease[1] - 1)
            return True

    def keep(self, key: str, slot: int, left: int) -> None:
        with self._lock:
            if len(self._leases) > 100_000:  # bound memory: stale windows go first
                self._leases = {k: v for k, v in self._leases.items() if v[0] >= slot}
            self._leases[key] = (slot, left)


LEASES = LeaseBook()


class _SlidingWindowMixin(throttling.SimpleRateThrottle):
    """Comes after DRF's class in the bases: ScopedRateThrottle settles the rate first."""

    wait_seconds: float | None = None
    num_requests: int | None
    duration: int | None
    leases = LEASES

    def get_ident(self, request: Request) -> str:
        return client_key(client_ip(request._request))

    def allow_request(self, request: Request, view: Any) -> bool:
        if self.rate is None:
            return True
        key = self.get_cache_key(request, view)
        if key is None:
            return True
        assert self.num_requests is not None and self.duration is not None
        limit, window = self.num_requests, int(self.duration)
        now = _now()
        slot = int(now // window)
        if self.leases.spend(key, slot):
            return True
        lease_size = max(1, limit // LEASE_DIVISOR)
        hits = window_hits(self.cache, key, slot, window, lease_size)
        if hits is None:
            return True
        current, previous = hits
        carried = previous * (1 - (now % window) / window)
        # The lease stands for hits current-lease_size+1 … current of this window.
        room = math.floor(limit - carried - (current - lease_size))
        if room >= 1:
            self.leases.keep(key, slot, min(room, lease_size) - 1)
            return True
        if lease_size > 1:  # hand back the lease; the refused attempt itself stays counted
            window_hits(self.cache, key, slot, window, 1 - lease_size)
        # Wait until the carried-over weight falls enough (at most the rest of the window).
        rest_of_window = window - now % window
        surplus = carried + (current - lease_size) + 1 - limit
        wait = surplus / previous * window if previous else rest_of_window
        self.wait_seconds = max(1.0, min(wait, rest_of_window))
        return False

    def wait(self) -> float | None:
        return self.wait_seconds


class AnonRateThrottle(throttling.AnonRateThrottle, _SlidingWindowMixin):
    """Anonymous callers per client address (`anon` rate)."""


class UserRateThrottle(throttling.UserRateThrottle, _SlidingWindowMixin):
    """Signed-in users per id, anonymous ones per client address (`user` rate)."""


class ScopedRateThrottle(throttling.ScopedRateThrottle, _SlidingWindowMixin):
    """Per view `throttle_scope` (login, register), per user or client address."""
