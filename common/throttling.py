"""DRF throttles keyed like every other rate limit of the platform (`common.network`): the
socket address unless TRUSTED_PROXY_HOPS, IPv6 grouped per /64.

Counting is a sliding-window counter (the previous fixed window's count weighted by how much of
it still overlaps the sliding window, plus the current one's), one Redis round trip per check
(`common.cache.window_hits`) instead of DRF's timestamp log (a GET and a SET of a list that
grows to the rate's size). The rates mean what DRF's do ("100/min": at most about 100 in any
60 s); a refused request answers 429 with Retry-After. While Redis is unreachable the throttles
fail open (input-policy.md)."""

import time
from typing import Any

from rest_framework import throttling
from rest_framework.request import Request

from common.cache import window_hits
from common.network import client_ip, client_key


class _SlidingWindowMixin(throttling.SimpleRateThrottle):
    """Comes after DRF's class in the bases: ScopedRateThrottle settles the rate first."""

    wait_seconds: float | None = None
    num_requests: int | None
    duration: int | None

    def get_ident(self, request: Request) -> str:
        return client_key(client_ip(request._request))

    def allow_request(self, request: Request, view: Any) -> bool:
        if self.rate is None:
            return True
        key = self.get_cache_key(request, view)
        if key is None:
            return True
        assert self.num_requests is not None and self.duration is not None
        window = int(self.duration)
        hits = window_hits(self.cache, key, window)
        if hits is None:
            return True
        current, previous = hits
        elapsed = (time.time() % window) / window
        estimate = previous * (1 - elapsed) + current
        if estimate <= self.num_requests:
            return True
        # Wait until the weighted estimate falls back under the rate (at most one window).
        surplus = estimate - self.num_requests
        self.wait_seconds = min(
            window * (1 - elapsed), surplus / previous * window if previous else window
        )
        self.wait_seconds = max(self.wait_seconds, 1.0)
        return False

    def wait(self) -> float | None:
        return self.wait_seconds


class AnonRateThrottle(throttling.AnonRateThrottle, _SlidingWindowMixin):
    """Anonymous callers per client address (`anon` rate)."""


class UserRateThrottle(throttling.UserRateThrottle, _SlidingWindowMixin):
    """Signed-in users per id, anonymous ones per client address (`user` rate)."""


class ScopedRateThrottle(throttling.ScopedRateThrottle, _SlidingWindowMixin):
    """Per view `throttle_scope` (login, register), per user or client address."""
