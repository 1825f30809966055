"""Redis outages at the warehouse's doors (issue 11): the public reads, their throttle and the
consumer's write-through degrade instead of failing, and the cache is right again afterwards.

Each test owns a throwaway redis-server (never the machine's) that it kills, restarts, or cuts
off behind a relay while the server keeps its data (a partition).
"""

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import httpx
import pytest
import redis
from django.core.cache import cache
from django.core.cache.backends.redis import RedisSerializer
from django.db import close_old_connections
from django.test import override_settings

from bench.harness import free_port
from tests.throwaway import redis_server
from tests.warehouse.factories import body, envelope
from tests.warehouse.relay import Relay
from warehouse import queue, read_cache, read_limits, services
from warehouse.models import LedgerEntry
from warehouse.read_cache import stock_cache_key

pytestmark = [pytest.mark.needs_redis, pytest.mark.timeout(120)]


def _cache_on(port: int) -> dict[str, dict[str, Any]]:
    return {
        "default": {
            "BACKEND": "common.cache.FailOpenRedisCache",
            "LOCATION": f"redis://127.0.0.1:{port}/0",
            "KEY_PREFIX": "wh-outage",
            "OPTIONS": {"socket_connect_timeout": 0.3, "socket_timeout": 0.3},
        }
    }


@pytest.fixture(autouse=True)
def _fresh_outage_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(read_limits, "_last_logged", 0.0)
    monkeypatch.setattr(read_cache, "_unsynced", set())


def _stock_path(warehouse_id: uuid.UUID, product_id: uuid.UUID) -> str:
    return f"/api/warehouses/{warehouse_id}/products/{product_id}"


class Pair(NamedTuple):
    warehouse_id: uuid.UUID
    product_id: uuid.UUID

    @property
    def ids(self) -> dict[str, Any]:
        return {"warehouse_id": self.warehouse_id, "product_id": self.product_id}


def _cached_quantity(port: int, pair: Pair) -> Any:
    """The stock entry's quantity as stored in Redis itself (None when absent)."""
    key = cache.make_key(stock_cache_key(str(pair.warehouse_id), str(pair.product_id)))
    with redis.Redis(port=port) as client:
        raw: Any = client.get(key)
    if raw is None:
        return None
    value = RedisSerializer().loads(raw)
    return json.loads(value)["quantity"] if isinstance(value, bytes) else value


def _outage_warnings(caplog: pytest.LogCaptureFixture) -> int:
    return sum(
        1 for record in caplog.records if "warehouse_read_throttle_unavailable" in str(record.msg)
    )


def _wait_for(condition: Callable[[], bool], seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_public_reads_answer_from_the_database_while_redis_is_down_and_recover(
    http: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    warehouse_id, product_id = uuid.uuid4(), uuid.uuid4()
    pair = Pair(warehouse_id, product_id)
    stock, unknown = _stock_path(warehouse_id, product_id), f"/api/movements/{uuid.uuid4()}"
    port = free_port()
    with override_settings(CACHES=_cache_on(port)):
        with redis_server(port) as process:
            services.movements_ingest(bodies=[body(envelope(quantity=7, **pair.ids))])
            healthy = [http.get(stock).json()["quantity"], _cached_quantity(port, pair)]
            process.kill()
            process.wait()
            services.movements_ingest(bodies=[body(envelope(quantity=5, **pair.ids))])
            down = [
                response
                for _ in range(10)
                for response in (http.get(stock), http.get(stock), http.get(unknown))
            ]
        with redis_server(port):
            back = [http.get(stock), http.get(stock)]
            refilled = _cached_quantity(port, pair)
    assert healthy == [7, 7]
    assert [r.status_code for r in down] == [200, 200, 404] * 10
    assert {r.json()["quantity"] for r in down if r.status_code == 200} == {12}
    assert _outage_warnings(caplog) == 1
    assert [(r.status_code, r.json()["quantity"]) for r in back] == [(200, 12), (200, 12)]
    assert refilled == 12


@pytest.mark.usefixtures("frozen_clock")
def test_the_read_throttle_fails_open_while_redis_is_down_and_limits_again_after(
    http: httpx.Client,
) -> None:
    path = f"/api/movements/{uuid.uuid4()}"
    port = free_port()
    with override_settings(CACHES=_cache_on(port), WAREHOUSE_READ_THROTTLE="3/min"):
        with redis_server(port):
            limited = [http.get(path).status_code for _ in range(4)]
        during = [http.get(path).status_code for _ in range(6)]
        with redis_server(port):
            after = [http.get(path).status_code for _ in range(4)]
    assert limited == [404, 404, 404, 429]
    assert during == [404] * 6
    assert after == [404, 404, 404, 429]


@pytest.fixture
def consumer(transport: dict[str, str]) -> Iterator[threading.Thread]:
    with override_settings(WAREHOUSE_HEARTBEAT_SECONDS=0.2):
        halt = threading.Event()
        worker = queue.MovementConsumer(batch_size=50, linger_ms=20)
        thread = threading.Thread(target=worker.run_blocking, args=(halt,), daemon=True)
        thread.start()
        yield thread
        halt.set()
        thread.join(timeout=30)
        assert not thread.is_alive()


def _ledger_rows() -> int:
    close_old_connections()
    return LedgerEntry.objects.count()


def _arrivals(count: int, pair: Pair) -> list[bytes]:
    return [body(envelope(quantity=1, **pair.ids)) for _ in range(count)]


def test_the_consumer_keeps_consuming_while_redis_is_down(
    http: httpx.Client, consumer: threading.Thread
) -> None:
    warehouse_id, product_id = uuid.uuid4(), uuid.uuid4()
    pair = Pair(warehouse_id, product_id)
    stock = _stock_path(warehouse_id, product_id)
    port = free_port()
    with override_settings(CACHES=_cache_on(port)):
        with redis_server(port) as process:
            queue.envelopes_publish(_arrivals(20, pair))
            _wait_for(lambda: _ledger_rows() == 20)
            before = [http.get(stock).json()["quantity"], _cached_quantity(port, pair)]
            process.kill()
            process.wait()
            queue.envelopes_publish(_arrivals(20, pair))
            _wait_for(lambda: _ledger_rows() == 40)
            during = [http.get(stock), http.get(stock)]
            alive_during = consumer.is_alive()
        with redis_server(port):
            queue.envelopes_publish(_arrivals(10, pair))
            _wait_for(lambda: _ledger_rows() == 50)
            _wait_for(lambda: _cached_quantity(port, pair) == 50)
            after = http.get(stock).json()["quantity"]
    assert before == [20, 20]
    assert [(r.status_code, r.json()["quantity"]) for r in during] == [(200, 40), (200, 40)]
    assert alive_during and consumer.is_alive()
    assert after == 50


def test_entries_cached_before_a_partition_are_replaced_once_redis_answers_again(
    http: httpx.Client, consumer: threading.Thread
) -> None:
    warehouse_id, product_id = uuid.uuid4(), uuid.uuid4()
    pair = Pair(warehouse_id, product_id)
    stock = _stock_path(warehouse_id, product_id)
    redis_port, relay_port = free_port(), free_port()
    with (
        redis_server(redis_port),
        Relay(redis_port, relay_port) as relay,
        override_settings(CACHES=_cache_on(relay_port)),
    ):
        queue.envelopes_publish(_arrivals(7, pair))
        _wait_for(lambda: _cached_quantity(redis_port, pair) == 7)
        relay.cut()
        queue.envelopes_publish(_arrivals(5, pair))
        _wait_for(lambda: _ledger_rows() == 12)
        during = [http.get(stock).json()["quantity"], http.get(stock).json()]
        stale = _cached_quantity(redis_port, pair)  # what Redis kept through the cut
        relay.restore()
        # No new message arrives: the consumer's heartbeat replaces the stale entry.
        _wait_for(lambda: http.get(stock).json()["quantity"] == 12, seconds=5)
        after = [http.get(stock).json()["quantity"]]
        after.append(_cached_quantity(redis_port, pair))
    assert during[0] == 12 and during[1]["quantity"] == 12
    assert stale == 7
    assert after[0] == 12 and after[1] in (12, None, "stale")
