"""Liveness and readiness.

`/health` answers as long as the process serves requests and touches no dependency.
`/readyz` checks the database, the cache, the channel layer and the broker as configured, plus
any check an app registers (e.g. a consumer heartbeat) with `readiness_check_register`. Anyone
gets the verdict (`{"status": "ready"|"unavailable"}`, 200/503, what orchestrators probe); the
per-check detail, which names hosts and ports, only staff or the metrics bearer token.
"""

import time
from collections.abc import Callable

from django.conf import settings
from django.core.cache import cache
from django.db import connection
from django.http import HttpRequest, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from common.ops_access import ops_access_allowed

ReadinessCheck = Callable[[], None]
_CHECKS: dict[str, ReadinessCheck] = {}


def readiness_check_register(name: str, check: ReadinessCheck) -> None:
    """Add a named check to /readyz; it raises (any exception) when not ready."""
    _CHECKS[name] = check


def _check_database() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()


def _check_cache() -> None:
    cache.set("readyz", "1", timeout=5)
    if cache.get("readyz") != "1":
        raise RuntimeError("cache did not return the value just written")


def _check_broker() -> None:
    if not settings.CELERY_BROKER_URL:
        return
    from kombu import Connection

    with Connection(settings.CELERY_BROKER_URL, connect_timeout=2) as conn:
        conn.ensure_connection(max_retries=1, timeout=2)


def _check_channel_layer() -> None:
    if not settings.REDIS_URL:
        return
    import redis

    client = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=2, socket_connect_timeout=2)
    try:
        client.ping()
    finally:
        client.close()


def readiness_results() -> dict[str, dict[str, object]]:
    """Run every readiness check now: `{name: {"ok": bool, "ms": float, "error"?: str}}` (the
    detail `/readyz` shows staff; the console's platform panel shows it too)."""
    return _run_checks()


def _run_checks() -> dict[str, dict[str, object]]:
    checks: dict[str, ReadinessCheck] = {
        "database": _check_database,
        "cache": _check_cache,
        "broker": _check_broker,
        "channel_layer": _check_channel_layer,
        **_CHECKS,
    }
    results: dict[str, dict[str, object]] = {}
    for name, check in checks.items():
        started = time.perf_counter()
        try:
            check()
        except Exception as exc:
            results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
        else:
            results[name] = {"ok": True}
        results[name]["ms"] = round((time.perf_counter() - started) * 1000, 1)
    return results


@never_cache
@require_GET
def health(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


@never_cache
@require_GET
def readyz(request: HttpRequest) -> JsonResponse:
    results = _run_checks()
    ready = all(result["ok"] for result in results.values())
    body: dict[str, object] = {"status": "ready" if ready else "unavailable"}
    if ops_access_allowed(request):
        body["checks"] = results
    return JsonResponse(body, status=200 if ready else 503)
