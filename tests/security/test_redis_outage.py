"""When Redis is down, REST calls that only need it for throttling or caching degrade (fail open
with a log line) instead of answering 500 (input-policy.md, "Identity and abuse")."""

import logging

import httpx
import pytest
from django.test import override_settings

from bench.harness import free_port
from tests.factories import UserFactory, auth_header
from tests.throwaway import redis_server

pytestmark = [pytest.mark.needs_redis, pytest.mark.timeout(60)]


def _cache_settings(port: int) -> dict[str, dict[str, object]]:
    return {
        "default": {
            "BACKEND": "common.cache.FailOpenRedisCache",
            "LOCATION": f"redis://127.0.0.1:{port}/0",
            "KEY_PREFIX": "outage-test",
            "OPTIONS": {"socket_connect_timeout": 0.5, "socket_timeout": 1.0},
        }
    }


def _calls(http: httpx.Client, headers: dict[str, str]) -> list[int]:
    return [
        http.get("/api/auth/me", headers=headers).status_code,
        http.get("/api/betting/events", headers=headers).status_code,
        http.post("/api/realtime/ticket", headers=headers).status_code,
        http.get("/api/vmcontrol/vms", headers=headers).status_code,
    ]


def test_rest_keeps_answering_while_redis_is_down_and_recovers_when_it_returns(
    http: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    headers = auth_header(UserFactory.create())
    port = free_port()
    with override_settings(CACHES=_cache_settings(port)):
        with redis_server(port):
            healthy = _calls(http, headers)
        down = _calls(http, headers)
        with redis_server(port):
            back = _calls(http, headers)
    assert healthy == [200, 200, 201, 403]
    assert down == healthy
    assert back == healthy
    assert "cache_unavailable" in caplog.text


def test_a_throttle_fails_open_during_the_outage_and_limits_again_after(
    http: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rest_framework.throttling import SimpleRateThrottle

    monkeypatch.setattr(SimpleRateThrottle, "THROTTLE_RATES", {"user": "2/min", "anon": "2/min"})
    headers = auth_header(UserFactory.create())
    port = free_port()
    with override_settings(CACHES=_cache_settings(port)):
        with redis_server(port):
            limited = [http.get("/api/auth/me", headers=headers).status_code for _ in range(3)]
        during = [http.get("/api/auth/me", headers=headers).status_code for _ in range(5)]
        with redis_server(port):
            after = [http.get("/api/auth/me", headers=headers).status_code for _ in range(3)]
    assert limited == [200, 200, 429]
    assert during == [200] * 5
    assert after == [200, 200, 429]
