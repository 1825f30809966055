"""The platform's throttles (common/throttling.py): a sliding-window counter in the shared cache
(Redis in production), taken in leases so a generous rate costs one round trip per lease.
Time is frozen mid-window so every assertion is about one window, whatever the clock."""

from typing import Any

import pytest
from django.core.cache import cache
from rest_framework.request import Request
from rest_framework.test import APIRequestFactory, force_authenticate
from rest_framework.views import APIView

from common import throttling
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db
WINDOW_START = 1_800_000_000.0  # a multiple of 60: 2027-01-15T08:00:00Z


def frozen(monkeypatch: pytest.MonkeyPatch, seconds_into_window: float) -> None:
    monkeypatch.setattr(throttling, "_now", lambda: WINDOW_START + seconds_into_window)


def throttle_class(rate: str, book: throttling.LeaseBook) -> type[throttling.UserRateThrottle]:
    return type("T", (throttling.UserRateThrottle,), {"rate": rate, "leases": book})


def request_of(user: Any) -> Request:
    raw = APIRequestFactory().get("/api/auth/me")
    force_authenticate(raw, user=user)
    request = Request(raw)
    request.user = user
    return request


def allowed(throttle: type[throttling.UserRateThrottle], user: Any, times: int) -> list[bool]:
    request, view = request_of(user), APIView()
    return [throttle().allow_request(request, view) for _ in range(times)]


def window_count(user: Any, slot_offset: int = 0) -> int:
    key = throttling.UserRateThrottle.cache_format % {"scope": "user", "ident": user.pk}
    return int(cache.get(f"{key}:{int(WINDOW_START // 60) + slot_offset}", 0))


def test_a_small_rate_counts_every_request_and_refuses_with_retry_after(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    frozen(monkeypatch, 30)
    user = UserFactory.create()
    throttle = throttle_class("5/min", throttling.LeaseBook())
    assert allowed(throttle, user, 5) == [True] * 5
    assert window_count(user) == 5
    refused = throttle()
    assert refused.allow_request(request_of(user), APIView()) is False
    wait = refused.wait()
    assert wait is not None
    assert 1 <= wait <= 30


def test_a_generous_rate_costs_one_cache_round_trip_per_lease(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    frozen(monkeypatch, 10)
    user = UserFactory.create()
    calls: list[int] = []
    real = throttling.window_hits

    def counted(*args: Any) -> Any:
        calls.append(args[-1])
        return real(*args)

    monkeypatch.setattr(throttling, "window_hits", counted)
    throttle = throttle_class("10000/min", throttling.LeaseBook())  # lease: 10 hits
    assert allowed(throttle, user, 25) == [True] * 25
    assert calls == [10, 10, 10]
    assert window_count(user) == 30  # reserved hits count: a lease only makes the limit stricter


def test_two_processes_sharing_the_cache_never_pass_the_limit_together(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    frozen(monkeypatch, 0)
    user = UserFactory.create()
    first = throttle_class("3000/min", throttling.LeaseBook())  # lease: 3 hits each
    second = throttle_class("3000/min", throttling.LeaseBook())
    results: list[bool] = []
    for _ in range(1600):
        results += allowed(first, user, 1) + allowed(second, user, 1)
    assert 3000 - 2 * 3 <= results.count(True) <= 3000
    assert results[-10:] == [False] * 10


def test_the_previous_window_still_weighs_on_the_current_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    user = UserFactory.create()
    throttle = throttle_class("100/min", throttling.LeaseBook())
    key = throttling.UserRateThrottle.cache_format % {"scope": "user", "ident": user.pk}
    cache.set(f"{key}:{int(WINDOW_START // 60) - 1}", 100, 120)
    frozen(monkeypatch, 45)  # a quarter of the previous minute still overlaps: 25 carried
    assert allowed(throttle, user, 80).count(True) == 75
