"""The console publisher: one sample per tick under a lock, rates from the previous sample, a
15-minute window, failures contained, and a snapshot that equals what was published."""

import threading
import time
from typing import Any

import pytest
from django.core.cache import cache

from common import console, console_publisher
from common.console import ConsolePanel, PanelSample, console_count, console_count_totals
from common.console_publisher import console_snapshot, console_tick
from common.heartbeat import console_flush
from tests.console.conftest import RecordingHub

T0 = 1_800_000_000.0


class _Counted:
    """A panel whose counter the test sets."""

    def __init__(self) -> None:
        self.value = 0
        self.calls = 0

    def sample(self) -> PanelSample:
        self.calls += 1
        return {
            "counters": {"things": {"label": "things", "value": self.value}},
            "numbers": [{"key": "value", "label": "value", "value": self.value}],
            "attention": [],
            "tables": [],
        }


@pytest.fixture
def counted(extra_panel: list[str]) -> _Counted:
    panel = _Counted()
    console.console_panel_register(
        ConsolePanel(name="counted", title="Counted", sample=panel.sample)
    )
    extra_panel.append("counted")
    return panel


def _state(name: str) -> dict[str, Any]:
    return cache.get(console_publisher.STATE_PREFIX + name)


@pytest.mark.django_db
def test_a_counter_becomes_a_rate_per_second_against_the_previous_sample(
    counted: _Counted, recording_hub: RecordingHub
) -> None:
    assert console_tick(now=T0)
    first = recording_hub.last("console.counted")
    assert first["rates"]["things"] == {"label": "things", "per_second": None, "series": []}
    counted.value = 10
    assert console_tick(now=T0 + 2)
    second = recording_hub.last("console.counted")
    assert second["rates"]["things"]["per_second"] == 5.0
    assert second["rates"]["things"]["series"] == [[T0 + 2, 5.0]]
    counted.value = 13
    assert console_tick(now=T0 + 5)
    assert recording_hub.last("console.counted")["rates"]["things"]["series"] == [[T0 + 5, 1.0]]
    assert _state("counted")["rates"]["things"]["series"] == [[T0 + 2, 5.0], [T0 + 5, 1.0]]


@pytest.mark.django_db
def test_a_counter_that_went_backwards_gives_no_rate_point(
    counted: _Counted, recording_hub: RecordingHub
) -> None:
    counted.value = 50
    console_tick(now=T0)
    counted.value = 3  # the shared cache was flushed
    console_tick(now=T0 + 2)
    assert recording_hub.last("console.counted")["rates"]["things"]["per_second"] is None
    counted.value = 7
    console_tick(now=T0 + 4)
    assert recording_hub.last("console.counted")["rates"]["things"]["per_second"] == 2.0


@pytest.mark.django_db
def test_the_series_keeps_only_the_last_fifteen_minutes(
    counted: _Counted, recording_hub: RecordingHub
) -> None:
    for step in range(0, 1200, 100):
        counted.value = step
        console_tick(now=T0 + step)
    series = _state("counted")["rates"]["things"]["series"]
    times = [point[0] for point in series]
    assert times[0] == T0 + 1100 - 900
    assert times[-1] == T0 + 1100
    assert all(value == 1.0 for _, value in series)
    snapshot = {p["name"]: p for p in console_snapshot()["panels"]}
    assert snapshot["counted"]["rates"]["things"]["series"] == series


@pytest.mark.django_db
def test_a_tick_while_another_holds_the_lock_samples_nothing(
    counted: _Counted, recording_hub: RecordingHub
) -> None:
    assert cache.add(console_publisher.LOCK_KEY, "someone-else", 30)
    assert console_tick(now=T0) is False
    assert counted.calls == 0 and recording_hub.published == []
    cache.delete(console_publisher.LOCK_KEY)
    assert console_tick(now=T0) is True


@pytest.mark.django_db
def test_a_second_beat_within_half_an_interval_is_skipped(
    counted: _Counted, recording_hub: RecordingHub, settings: Any
) -> None:
    settings.CONSOLE_SAMPLE_SECONDS = 2.0
    assert console_tick(now=T0) is True
    assert console_tick(now=T0 + 0.5) is False
    assert console_tick(now=T0 + 1.2) is True
    assert counted.calls == 2


@pytest.mark.django_db(transaction=True)
def test_concurrent_ticks_sample_each_panel_once(
    counted: _Counted, recording_hub: RecordingHub
) -> None:
    start = threading.Barrier(8)
    results: list[bool] = []

    def beat() -> None:
        start.wait()
        results.append(console_tick(min_gap=3600))

    threads = [threading.Thread(target=beat) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [False] * 7 + [True]
    assert counted.calls == 1
    assert [t for t, _ in recording_hub.published].count("console.counted") == 1


@pytest.mark.django_db
def test_a_failing_panel_is_published_unavailable_and_the_others_still_go_out(
    counted: _Counted, recording_hub: RecordingHub, extra_panel: list[str]
) -> None:
    broken = {"fail": False}

    def sample() -> PanelSample:
        if broken["fail"]:
            raise RuntimeError("database on fire")
        return counted.sample()

    console.console_panel_register(ConsolePanel(name="flaky", title="Flaky", sample=sample))
    extra_panel.append("flaky")
    counted.value = 4
    console_tick(now=T0)
    broken["fail"] = True
    counted.value = 6
    assert console_tick(now=T0 + 2)
    flaky = recording_hub.last("console.flaky")
    assert flaky["status"] == "unavailable"
    assert flaky["error"] == "RuntimeError: database on fire"
    assert flaky["sample"]["numbers"][0]["value"] == 4  # the last good sample, marked
    assert recording_hub.last("console.counted")["status"] == "ok"
    broken["fail"] = False
    assert console_tick(now=T0 + 4)
    assert recording_hub.last("console.flaky")["status"] == "ok"


@pytest.mark.django_db
def test_the_snapshot_is_what_was_published(counted: _Counted, recording_hub: RecordingHub) -> None:
    for step in range(4):
        counted.value = step * 3
        console_tick(now=T0 + 2 * step)
    snapshot = console_snapshot()
    names = [panel.name for panel in console.console_panels()]
    assert [panel["name"] for panel in snapshot["panels"]] == names
    for panel in snapshot["panels"]:
        published = recording_hub.last(panel["topic"])
        for field in ("sample", "status", "error", "at", "ms"):
            assert panel[field] == published[field], (panel["name"], field)
        for key, rate in panel["rates"].items():
            assert rate["series"][-1:] == published["rates"][key]["series"]
            assert rate["per_second"] == published["rates"][key]["per_second"]
    assert snapshot["ws"]["subscribe"] == [
        {"type": "subscribe", "topic": f"console.{name}"} for name in names
    ]


@pytest.mark.django_db
def test_a_panel_not_sampled_yet_is_in_the_snapshot_as_waiting(counted: _Counted) -> None:
    panel = {p["name"]: p for p in console_snapshot()["panels"]}["counted"]
    assert panel["sample"] is None and panel["at"] is None and panel["status"] == "waiting"
    assert counted.calls == 0


@pytest.mark.django_db
def test_counts_reach_the_global_totals_through_the_tick(recording_hub: RecordingHub) -> None:
    before = console_count_totals(["test.widgets"])["test.widgets"]
    console_count("test.widgets", 3)
    console_count("test.widgets")
    console_tick(now=T0)  # the publisher flushes its own process first
    # (a heartbeat thread of this process may have taken them a moment earlier: it adds them
    # within its flush, so wait for that rather than race it)
    deadline = time.monotonic() + 5
    while console_count_totals(["test.widgets"])["test.widgets"] < before + 4:
        assert time.monotonic() < deadline, "the counts never reached the cache"
        time.sleep(0.01)
    console_flush()
    assert console_count_totals(["test.widgets"]) == {"test.widgets": before + 4}


@pytest.mark.django_db
def test_the_beat_task_ticks_every_sample_interval_and_drops_late_runs(
    settings: Any, recording_hub: RecordingHub
) -> None:
    from common.tasks import console_publish

    entry = settings.CELERY_BEAT_SCHEDULE["common-console-publish"]
    assert entry["task"] == console_publish.name == "common.console_publish"
    assert entry["schedule"] == settings.CONSOLE_SAMPLE_SECONDS
    assert entry["options"] == {"expires": settings.CONSOLE_SAMPLE_SECONDS}
    assert console_publish.apply().get() is True
    assert console_publish.apply().get() is False  # a second beat right after: skipped
    assert {topic for topic, _ in recording_hub.published} == {
        panel.topic for panel in console.console_panels()
    }
