"""The ASGI read fast path answers as the Django stack does, over a real uvicorn socket (issue 11).

Each fast-path answer is compared with the Django stack's answer to the same request
(`WAREHOUSE_READ_FASTPATH=false` sends it through Django): status, body bytes, and every header
with its value. Only `Date`, a request id that each side generated, and the fast path's own
`X-Served-By` marker may differ.
"""

import logging
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from django.conf import settings
from django.core.asgi import get_asgi_application
from django.core.cache import cache
from django.test import override_settings
from prometheus_client import REGISTRY

from common.network import client_key
from tests.conftest import LiveServer, start_live_server
from tests.warehouse.factories import ARRIVAL, DEPARTURE, body, example_pair
from warehouse import fastpath, services
from warehouse.fastpath import read_fastpath

MOVEMENT = f"/api/movements/{DEPARTURE['data']['movement_id']}"
STOCK = (
    f"/api/warehouses/{ARRIVAL['data']['warehouse_id']}/products/{ARRIVAL['data']['product_id']}"
)
UNKNOWN_MOVEMENT = f"/api/movements/{uuid.uuid4()}"
UNKNOWN_STOCK = f"/api/warehouses/{uuid.uuid4()}/products/{uuid.uuid4()}"
READS = [MOVEMENT, STOCK, UNKNOWN_MOVEMENT, UNKNOWN_STOCK]
READ_IDS = ["movement", "stock", "unknown-movement", "unknown-stock"]
GENERATED_ID = re.compile(r"[0-9a-f]{32}")


@pytest.fixture
def stored(http: httpx.Client) -> httpx.Client:
    services.movements_ingest(bodies=[body(e) for e in example_pair()])
    return http


@contextmanager
def _server_with(**configured: Any) -> Iterator[httpx.Client]:
    """A live server whose Django stack is built under `configured` (Django's middleware read
    most settings once, when the handler loads them), serving both doors."""
    with override_settings(**configured):
        server = start_live_server(read_fastpath(get_asgi_application()))
        try:
            with httpx.Client(base_url=server.http_url, timeout=10) as client:
                yield client
        finally:
            server.stop()


def _through_django(http: httpx.Client, path: str, headers: dict[str, str]) -> httpx.Response:
    with override_settings(WAREHOUSE_READ_FASTPATH=False):
        return http.get(path, headers=headers)


def _comparable(response: httpx.Response, *, generated_id: bool) -> dict[str, str]:
    skip = {"date", "x-served-by"} | ({"x-request-id"} if generated_id else set())
    return {name: value for name, value in response.headers.items() if name not in skip}


def _assert_same_answer(
    fast: httpx.Response, full: httpx.Response, *, sent: dict[str, str], fast_answers: bool
) -> None:
    assert "x-served-by" not in full.headers
    if fast_answers:
        assert fast.headers["x-served-by"] == "warehouse-fastpath"
    else:
        assert "x-served-by" not in fast.headers
    assert (fast.status_code, fast.content) == (full.status_code, full.content)
    generated = sent.get("X-Request-ID") is None or " " in sent["X-Request-ID"]
    assert _comparable(fast, generated_id=generated) == _comparable(full, generated_id=generated)
    assert ("x-request-id" in fast.headers) == ("x-request-id" in full.headers)
    if generated and "x-request-id" in fast.headers:
        assert GENERATED_ID.fullmatch(fast.headers["x-request-id"])
        assert GENERATED_ID.fullmatch(full.headers["x-request-id"])


@pytest.mark.parametrize("path", READS, ids=READ_IDS)
@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"X-Request-ID": "client-chosen.id:1"},
        {"X-Request-ID": "not a safe id"},
        {"Accept": "application/json"},
        {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"},
        {"X-Forwarded-For": "203.0.113.9", "User-Agent": "probe/1.0"},
        {"X-Forwarded-Proto": "https"},
    ],
    ids=["plain", "request-id", "unsafe-request-id", "json", "browser", "forwarded", "https"],
)
def test_the_fast_path_answers_each_read_exactly_as_the_django_stack(
    stored: httpx.Client, path: str, headers: dict[str, str]
) -> None:
    fast = stored.get(path, headers=headers)
    full = _through_django(stored, path, headers)
    _assert_same_answer(fast, full, sent=headers, fast_answers=True)
    assert fast.status_code == (200 if path in (MOVEMENT, STOCK) else 404)
    for name in ("x-frame-options", "x-content-type-options", "referrer-policy", "x-request-id"):
        assert name in fast.headers
    if headers.get("X-Request-ID") == "client-chosen.id:1":
        assert fast.headers["x-request-id"] == "client-chosen.id:1"


@pytest.mark.parametrize("path", [MOVEMENT, UNKNOWN_STOCK], ids=["found", "not-found"])
@pytest.mark.parametrize(
    "security",
    [
        {"SECURE_HSTS_SECONDS": 3600, "SECURE_HSTS_INCLUDE_SUBDOMAINS": True},
        {"SECURE_HSTS_SECONDS": 31536000, "SECURE_HSTS_PRELOAD": True},
        {"X_FRAME_OPTIONS": "SAMEORIGIN", "SECURE_REFERRER_POLICY": "no-referrer"},
        {"SECURE_CONTENT_TYPE_NOSNIFF": False, "SECURE_CROSS_ORIGIN_OPENER_POLICY": None},
    ],
    ids=["hsts", "hsts-preload", "frame-referrer", "fewer"],
)
def test_the_fast_path_sends_the_security_headers_the_settings_configure(
    stored: httpx.Client, path: str, security: dict[str, Any]
) -> None:
    headers = {"X-Forwarded-Proto": "https"}  # from a trusted proxy: a secure request
    trusted_proxy = {
        "TRUSTED_PROXY_HOPS": 1,
        "SECURE_PROXY_SSL_HEADER": ("HTTP_X_FORWARDED_PROTO", "https"),
    }
    with _server_with(**trusted_proxy, **security) as client:
        fast = client.get(path, headers=headers)
        full = _through_django(client, path, headers)
    _assert_same_answer(fast, full, sent=headers, fast_answers=True)
    if security.get("SECURE_HSTS_SECONDS"):
        assert fast.headers["strict-transport-security"].startswith(
            f"max-age={security['SECURE_HSTS_SECONDS']}"
        )


@pytest.mark.parametrize(
    ("configured", "headers", "status"),
    [
        ({}, {"Host": "attacker.example"}, 400),
        ({}, {"Host": "127.0.0.1:8000@attacker.example"}, 400),
        ({"ALLOWED_HOSTS": ["api.example.com"]}, {}, 400),
        ({"SECURE_SSL_REDIRECT": True}, {}, 301),
        ({"PREPEND_WWW": True}, {}, 301),
        ({"DISALLOWED_USER_AGENTS": [re.compile("evilbot")]}, {"User-Agent": "evilbot/2"}, 403),
        ({}, {"Accept": "text/html"}, 406),
        ({}, {"Accept": "application/json; indent=4"}, 200),
        ({"WAREHOUSE_PUBLIC_READS": False}, {}, 401),
    ],
    ids=[
        "bad-host",
        "host-with-userinfo",
        "host-not-allowed",
        "https-redirect",
        "prepend-www",
        "refused-user-agent",
        "accept-not-json",
        "accept-indented",
        "reads-not-public",
    ],
)
def test_a_request_django_would_answer_differently_is_left_to_django(
    stored: httpx.Client, configured: dict[str, Any], headers: dict[str, str], status: int
) -> None:
    with _server_with(**configured) as client:
        fast = client.get(MOVEMENT, headers=headers)
        full = _through_django(client, MOVEMENT, headers)
    _assert_same_answer(fast, full, sent=headers, fast_answers=False)
    assert fast.status_code == status


def test_an_unclassified_middleware_turns_the_fast_path_off(
    stored: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    fastpath._plan.cache_clear()
    extra = "django.middleware.gzip.GZipMiddleware"
    with override_settings(MIDDLEWARE=[*settings.MIDDLEWARE, extra]):
        response = stored.get(MOVEMENT)
    assert response.status_code == 200
    assert "x-served-by" not in response.headers
    assert "warehouse_fastpath_disabled" in caplog.text and extra in caplog.text
    assert stored.get(MOVEMENT).headers["x-served-by"] == "warehouse-fastpath"


def _counters() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    counted = {}
    for metric in REGISTRY.collect():
        if not metric.name.startswith("django_http_"):
            continue
        for sample in metric.samples:
            if sample.name.endswith(("_total", "_count")):
                counted[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return counted


def _increments(
    before: dict[tuple[str, tuple[tuple[str, str], ...]], float],
    after: dict[tuple[str, tuple[tuple[str, str], ...]], float],
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        key: value - before.get(key, 0)
        for key, value in after.items()
        if value != before.get(key, 0)
    }


@pytest.mark.parametrize("path", READS, ids=READ_IDS)
def test_the_fast_path_counts_in_the_request_metrics_as_django_does(
    stored: httpx.Client, path: str
) -> None:
    start = _counters()
    stored.get(path)
    middle = _counters()
    _through_django(stored, path, {})
    end = _counters()
    fast, full = _increments(start, middle), _increments(middle, end)
    assert fast == full
    view = "warehouse-movement-detail" if "/movements/" in path else "warehouse-stock-detail"
    assert any(dict(labels).get("view") == view for _, labels in fast)


def _other_client(server: LiveServer, address: str) -> httpx.Client:
    transport = httpx.HTTPTransport(local_address=address)
    return httpx.Client(base_url=server.http_url, transport=transport, timeout=10)


@pytest.mark.usefixtures("frozen_clock")
@override_settings(WAREHOUSE_READ_THROTTLE="4/min")
def test_public_reads_draw_on_one_budget_per_client_whichever_door_answers(
    stored: httpx.Client,
) -> None:
    allowed = [
        (stored.get(path) if n % 2 else _through_django(stored, path, {})).status_code
        for n, path in enumerate(READS)
    ]
    fast, full = stored.get(STOCK), _through_django(stored, STOCK, {})
    assert allowed == [200, 200, 404, 404]
    _assert_same_answer(fast, full, sent={}, fast_answers=True)
    assert fast.status_code == 429
    assert fast.json()["error"]["code"] == "throttled"
    assert fast.headers["retry-after"] == "50"


@pytest.mark.usefixtures("frozen_clock")
@override_settings(WAREHOUSE_READ_THROTTLE="2/hour")
def test_the_read_budget_follows_the_socket_address_not_a_forwarded_header(
    stored: httpx.Client, asgi_server: LiveServer
) -> None:
    spoofed = {"X-Forwarded-For": "198.51.100.7"}
    used = [stored.get(MOVEMENT).status_code for _ in range(3)]
    after = [stored.get(MOVEMENT, headers=spoofed), _through_django(stored, MOVEMENT, spoofed)]
    with _other_client(asgi_server, "127.0.0.2") as neighbour:
        other = [neighbour.get(MOVEMENT), neighbour.get(MOVEMENT), neighbour.get(MOVEMENT)]
    assert used == [200, 200, 429]
    assert [response.status_code for response in after] == [429, 429]
    assert [response.status_code for response in other] == [200, 200, 429]


@pytest.mark.usefixtures("frozen_clock")
@override_settings(WAREHOUSE_READ_THROTTLE="2/hour", TRUSTED_PROXY_HOPS=1)
def test_behind_trusted_proxies_the_read_budget_follows_the_forwarded_client(
    stored: httpx.Client,
) -> None:
    first, second = {"X-Forwarded-For": "198.51.100.7"}, {"X-Forwarded-For": "198.51.100.8"}
    statuses = [
        stored.get(MOVEMENT, headers=first).status_code,
        _through_django(stored, MOVEMENT, first).status_code,
        stored.get(MOVEMENT, headers=first).status_code,
        _through_django(stored, MOVEMENT, second).status_code,
        stored.get(MOVEMENT, headers=second).status_code,
        stored.get(MOVEMENT, headers={"X-Forwarded-For": "10.0.0.1, 198.51.100.8"}).status_code,
    ]
    assert statuses == [200, 200, 429, 200, 200, 429]


@pytest.mark.parametrize(
    ("one", "other", "same"),
    [
        ("2001:db8::1", "2001:db8::ffff:1", True),
        ("2001:db8::1", "2001:db8:0:1::1", False),
        ("::ffff:192.0.2.1", "192.0.2.1", True),
        ("192.0.2.1", "192.0.2.2", False),
    ],
)
def test_ipv6_clients_share_one_read_budget_per_64(one: str, other: str, same: bool) -> None:
    assert (client_key(one) == client_key(other)) is same


@pytest.fixture
def redis_keys() -> Iterator[Any]:
    import redis

    client = redis.Redis.from_url(settings.CACHES["default"]["LOCATION"])
    yield lambda: {key.decode() for key in client.scan_iter(match=cache.make_key("*"), count=1000)}
    client.close()


@pytest.mark.needs_redis
@pytest.mark.usefixtures("frozen_clock")
def test_random_anonymous_lookups_leave_a_bounded_number_of_cache_entries(
    stored: httpx.Client, redis_keys: Any
) -> None:
    stored.get(STOCK)  # a hit is cached, and the client's budget entry exists
    before = redis_keys()
    statuses = set()
    for n in range(300):
        if n % 2:
            path = f"/api/movements/{uuid.uuid4()}"
        else:
            path = f"/api/warehouses/{uuid.uuid4()}/products/{uuid.uuid4()}"
        response = stored.get(path) if n % 3 else _through_django(stored, path, {})
        statuses.add(response.status_code)
    assert statuses == {404}
    assert redis_keys() - before == set()
    assert any(":wh:rl:" in key for key in before)  # the one entry a client holds
