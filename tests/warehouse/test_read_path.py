"""The two public reads take the normal Django path (issue 14: no special read path): the Host
check, the security headers, the request metrics and the per-client throttle apply to them as
to every endpoint, over a real uvicorn socket."""

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
from warehouse import read_cache, read_limits, services

MOVEMENT = f"/api/movements/{DEPARTURE['data']['movement_id']}"
STOCK = (
    f"/api/warehouses/{ARRIVAL['data']['warehouse_id']}/products/{ARRIVAL['data']['product_id']}"
)
UNKNOWN_MOVEMENT = f"/api/movements/{uuid.uuid4()}"
UNKNOWN_STOCK = f"/api/warehouses/{uuid.uuid4()}/products/{uuid.uuid4()}"
READS = [MOVEMENT, STOCK, UNKNOWN_MOVEMENT, UNKNOWN_STOCK]
READ_IDS = ["movement", "stock", "unknown-movement", "unknown-stock"]


@pytest.fixture
def stored(http: httpx.Client) -> httpx.Client:
    services.movements_ingest(bodies=[body(e) for e in example_pair()])
    return http


@contextmanager
def _server_with(**configured: Any) -> Iterator[httpx.Client]:
    """A live server whose Django stack is built under `configured` (Django's middleware read
    most settings once, when the handler loads them)."""
    with override_settings(**configured):
        server = start_live_server(get_asgi_application())
        try:
            with httpx.Client(base_url=server.http_url, timeout=10) as client:
                yield client
        finally:
            server.stop()


@pytest.mark.parametrize("path", READS, ids=READ_IDS)
def test_public_reads_carry_the_security_headers_and_a_request_id(
    stored: httpx.Client, path: str
) -> None:
    for response in (stored.get(path), stored.get(path)):  # from the database, then cached
        assert response.status_code == (200 if path in (MOVEMENT, STOCK) else 404)
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["x-content-type-options"] == "nosniff"
        assert "referrer-policy" in response.headers
        assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])
    chosen = stored.get(path, headers={"X-Request-ID": "client-chosen.id:1"})
    assert chosen.headers["x-request-id"] == "client-chosen.id:1"


@pytest.mark.parametrize("path", [STOCK, UNKNOWN_STOCK], ids=["found", "not-found"])
def test_the_stock_read_sends_hsts_on_a_secure_request_when_configured(
    stored: httpx.Client, path: str
) -> None:
    configured = {
        "TRUSTED_PROXY_HOPS": 1,
        "SECURE_PROXY_SSL_HEADER": ("HTTP_X_FORWARDED_PROTO", "https"),
        "SECURE_HSTS_SECONDS": 3600,
        "SECURE_HSTS_INCLUDE_SUBDOMAINS": True,
    }
    with _server_with(**configured) as client:
        response = client.get(path, headers={"X-Forwarded-Proto": "https"})
    assert response.headers["strict-transport-security"] == "max-age=3600; includeSubDomains"


@pytest.mark.parametrize(
    ("configured", "headers", "status"),
    [
        ({}, {"Host": "attacker.example"}, 400),
        ({}, {"Host": "127.0.0.1:8000@attacker.example"}, 400),
        ({"ALLOWED_HOSTS": ["api.example.com"]}, {}, 400),
        ({"SECURE_SSL_REDIRECT": True}, {}, 301),
        ({"DISALLOWED_USER_AGENTS": [re.compile("evilbot")]}, {"User-Agent": "evilbot/2"}, 403),
        ({}, {"Accept": "text/html"}, 406),
        ({"WAREHOUSE_PUBLIC_READS": False}, {}, 401),
    ],
    ids=[
        "bad-host",
        "host-with-userinfo",
        "host-not-allowed",
        "https-redirect",
        "refused-user-agent",
        "accept-not-json",
        "reads-not-public",
    ],
)
@pytest.mark.parametrize("path", [STOCK, MOVEMENT], ids=["stock", "movement"])
def test_a_cached_public_read_is_refused_like_every_other_endpoint(
    stored: httpx.Client,
    path: str,
    configured: dict[str, Any],
    headers: dict[str, str],
    status: int,
) -> None:
    assert stored.get(path).status_code == 200  # cached now
    with _server_with(**configured) as client:
        response = client.get(path, headers=headers)
    assert response.status_code == status
    assert ARRIVAL["data"]["warehouse_id"] not in response.text


def _counters() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    counted = {}
    for metric in REGISTRY.collect():
        if not metric.name.startswith("django_http_"):
            continue
        for sample in metric.samples:
            if sample.name.endswith(("_total", "_count")):
                counted[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return counted


@pytest.mark.parametrize("path", READS, ids=READ_IDS)
def test_public_reads_count_in_the_request_metrics(stored: httpx.Client, path: str) -> None:
    stored.get(path)
    before = _counters()
    stored.get(path)
    after = _counters()
    increments = {key for key, value in after.items() if value != before.get(key, 0)}
    view = "warehouse-movement-detail" if "/movements/" in path else "warehouse-stock-detail"
    assert any(dict(labels).get("view") == view for _, labels in increments)


def _other_client(server: LiveServer, address: str) -> httpx.Client:
    transport = httpx.HTTPTransport(local_address=address)
    return httpx.Client(base_url=server.http_url, transport=transport, timeout=10)


@pytest.mark.usefixtures("frozen_clock")
@override_settings(WAREHOUSE_READ_THROTTLE="4/min")
def test_the_cached_stock_read_is_throttled_in_one_budget_with_the_movement_read(
    stored: httpx.Client,
) -> None:
    allowed = [stored.get(path).status_code for path in READS]
    refused = stored.get(STOCK)
    assert allowed == [200, 200, 404, 404]
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "throttled"
    assert refused.headers["retry-after"] == "50"
    assert refused.headers["x-content-type-options"] == "nosniff"


@pytest.mark.usefixtures("frozen_clock")
@override_settings(WAREHOUSE_READ_THROTTLE="2/hour")
def test_the_read_budget_follows_the_socket_address_not_a_forwarded_header(
    stored: httpx.Client, asgi_server: LiveServer
) -> None:
    spoofed = {"X-Forwarded-For": "198.51.100.7"}
    used = [stored.get(STOCK).status_code for _ in range(3)]
    after = stored.get(STOCK, headers=spoofed)
    with _other_client(asgi_server, "127.0.0.2") as neighbour:
        other = [neighbour.get(STOCK), neighbour.get(MOVEMENT), neighbour.get(STOCK)]
    assert used == [200, 200, 429]
    assert after.status_code == 429
    assert [response.status_code for response in other] == [200, 200, 429]


@pytest.mark.usefixtures("frozen_clock")
@override_settings(WAREHOUSE_READ_THROTTLE="2/hour", TRUSTED_PROXY_HOPS=1)
def test_behind_trusted_proxies_the_read_budget_follows_the_forwarded_client(
    stored: httpx.Client,
) -> None:
    first, second = {"X-Forwarded-For": "198.51.100.7"}, {"X-Forwarded-For": "198.51.100.8"}
    statuses = [
        stored.get(MOVEMENT, headers=first).status_code,
        stored.get(STOCK, headers=first).status_code,
        stored.get(MOVEMENT, headers=first).status_code,
        stored.get(STOCK, headers=second).status_code,
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


@pytest.mark.django_db
@pytest.mark.usefixtures("frozen_clock")
@override_settings(WAREHOUSE_READ_THROTTLE="3/min")
def test_counting_a_read_and_fetching_its_entry_is_one_step_that_counts_once() -> None:
    key = read_cache.stock_cache_key(uuid.uuid4(), uuid.uuid4())
    cache.set(key, b'{"quantity":1}', 60)
    seen = [read_limits.hit_and_get("client:test", key) for _ in range(4)]
    assert [value for _, value in seen] == [b'{"quantity":1}'] * 4
    assert [wait for wait, _ in seen] == [None, None, None, 50.0]
    assert read_limits.hit_and_get("client:other", f"{key}:absent") == (None, None)
    with override_settings(WAREHOUSE_READ_THROTTLE=""):
        assert read_limits.hit_and_get("client:test", key) == (None, b'{"quantity":1}')


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
        statuses.add(stored.get(path).status_code)
    assert statuses == {404}
    # The operator console's counters are one entry per counter name, whatever is asked.
    assert {key for key in redis_keys() - before if ":console:" not in key} == set()
    assert any(":wh:rl:" in key for key in before)  # the one entry a client holds
