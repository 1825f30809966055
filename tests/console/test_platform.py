"""The platform panel and the per-process heartbeat: processes and their last heartbeat, what
goes silent, dependencies, HTTP counts flushed from process-local counters, gauges."""

import time
from collections.abc import Iterator
from typing import Any

import pytest
from django.test import Client

from common import console_store, health
from common.console import (
    console_count,
    console_count_totals,
    console_counts_take,
    console_gauge_totals,
)
from common.console_platform import platform_sample
from common.heartbeat import (
    HTTP_REQUESTS,
    HTTP_SERVER_ERRORS,
    PROCESSES_KEY,
    _Heartbeat,
    console_flush,
    processes_read,
)

pytestmark = pytest.mark.django_db


def _record(kind: str, pid: int, *, age: float, host: str = "box", **extra: Any) -> None:
    record = {"kind": kind, "host": host, "pid": pid, "names": [], "started": 0.0, "gauges": {}}
    record.update(at=time.time() - age, **extra)
    console_store.record_put(PROCESSES_KEY, f"{kind}:{host}:{pid}", record, keep_seconds=3600)


def _table(sample: Any, key: str) -> dict[str, list[Any]]:
    table = next(t for t in sample["tables"] if t["key"] == key)
    return {row["key"]: row["cells"] for row in table["rows"]}


def _attention(sample: Any) -> dict[str, str]:
    return {item["key"]: item["text"] for item in sample["attention"]}


@pytest.fixture
def broken_dependency() -> Iterator[None]:
    def broken() -> None:
        raise RuntimeError("consumer heartbeat stale")

    health.readiness_check_register("test_console_broken", broken)
    try:
        yield
    finally:
        health._CHECKS.pop("test_console_broken", None)


def test_a_heartbeat_lists_the_process_with_its_kind_and_last_beat() -> None:
    heartbeat = _Heartbeat("consumer", [])
    heartbeat.beat()
    mine = [p for p in processes_read() if p["kind"] == "consumer"]
    assert [(p["pid"], p["silent"]) for p in mine] == [(heartbeat.pid, False)]
    row = _table(platform_sample(), "processes")["consumer"]
    assert row[:3] == ["queue consumer", "1/1", "0 s ago"]


def test_a_process_silent_for_three_heartbeats_needs_a_human(settings: Any) -> None:
    settings.CONSOLE_HEARTBEAT_SECONDS = 5.0
    _record("worker", 11, age=1)
    _record("worker", 12, age=16)
    sample = platform_sample()
    assert _table(sample, "processes")["worker"][1] == "1/2"
    assert _attention(sample) == {
        "silent:worker:box:12": "Celery worker box:12 silent since 16 s ago."
    }
    assert {n["key"]: n["value"] for n in sample["numbers"]}["processes_silent"] == 1


def test_a_process_gone_longer_than_the_forget_time_is_dropped(settings: Any) -> None:
    settings.CONSOLE_PROCESS_FORGET_SECONDS = 600
    _record("beat", 21, age=601)
    _record("beat", 22, age=2)
    assert [p["pid"] for p in processes_read()] == [22]
    assert list(console_store.records_get(PROCESSES_KEY)) == ["beat:box:22"]


def test_a_process_that_stops_normally_removes_its_record() -> None:
    heartbeat = _Heartbeat("grpc", [])
    heartbeat.beat()
    heartbeat.finish()
    assert not [p for p in processes_read() if p["kind"] == "grpc"]


def test_an_expected_kind_that_never_reported_needs_a_human(settings: Any) -> None:
    settings.CONSOLE_EXPECTED_PROCESSES = ["beat"]
    sample = platform_sample()
    assert _attention(sample)["missing:beat"] == "No Celery beat process has reported."
    assert _table(sample, "processes")["beat"][1:3] == ["0/0", "never"]


def test_embedded_mode_is_one_process_named_after_what_it_runs() -> None:
    _record("embedded", 31, age=0, names=["http", "vmcontrol", "warehouse-consumer", "beat"])
    row = _table(platform_sample(), "processes")["embedded"]
    assert row[0] == "embedded (one process)"
    assert row[3] == "http, vmcontrol, warehouse-consumer, beat"


def test_a_dependency_down_needs_a_human(broken_dependency: None) -> None:
    sample = platform_sample()
    row = _table(sample, "dependencies")["test_console_broken"]
    assert row[1] == "DOWN" and "consumer heartbeat stale" in row[3]
    assert "consumer heartbeat stale" in _attention(sample)["dependency:test_console_broken"]
    assert _table(sample, "dependencies")["database"][1] == "ready"


def test_http_requests_and_server_errors_are_counted_and_flushed(
    client: Client, broken_dependency: None
) -> None:
    console_flush()
    before = console_count_totals([HTTP_REQUESTS, HTTP_SERVER_ERRORS])
    for _ in range(3):
        assert client.get("/health").status_code == 200
    assert client.get("/readyz").status_code == 503
    console_flush()
    after = console_count_totals([HTTP_REQUESTS, HTTP_SERVER_ERRORS])
    assert after[HTTP_REQUESTS] - before[HTTP_REQUESTS] >= 4
    assert after[HTTP_SERVER_ERRORS] - before[HTTP_SERVER_ERRORS] >= 1
    counters = platform_sample()["counters"]
    assert counters["http_requests"]["value"] == after[HTTP_REQUESTS]
    assert counters["http_5xx"]["value"] == after[HTTP_SERVER_ERRORS]


def test_counts_are_kept_for_the_next_flush_while_the_cache_is_down(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    console_counts_take()

    def down(counts: Any) -> None:
        raise ConnectionError("redis is down")

    monkeypatch.setattr(console_store, "counters_add", down)
    console_count("test.kept", 2)
    with pytest.raises(ConnectionError):
        console_flush()
    assert console_counts_take().get("test.kept") == 2


def test_gauges_are_summed_over_the_processes_alive(settings: Any) -> None:
    settings.CONSOLE_HEARTBEAT_SECONDS = 5.0
    _record("asgi", 41, age=1, gauges={"test.sockets": 2})
    _record("asgi", 42, age=2, gauges={"test.sockets": 3})
    _record("asgi", 43, age=60, gauges={"test.sockets": 100})  # silent: not counted
    assert console_gauge_totals(["test.sockets", "test.absent"]) == {
        "test.sockets": 5.0,
        "test.absent": 0.0,
    }


def test_a_silent_process_replaced_by_a_newer_one_of_its_kind_is_dropped(settings: Any) -> None:
    settings.CONSOLE_HEARTBEAT_SECONDS = 5.0
    now = time.time()
    _record("web", 51, age=40)  # a web worker a restart replaced
    _record("web", 52, age=1, started=now - 30)
    _record("web", 53, age=40, host="other")  # its host has no newer web process: a human looks
    sample = platform_sample()
    assert [(p["host"], p["pid"]) for p in processes_read() if p["kind"] == "web"] == [
        ("box", 52),
        ("other", 53),
    ]
    assert list(_attention(sample)) == ["silent:web:other:53"]
