"""Warehouse fixtures shared by the consumer, fast-path and outage tests."""

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.test import override_settings

from warehouse import queue, read_limits


@pytest.fixture
def transport(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A fresh queue on the configured transport; yields settings for this process and env
    for child processes."""
    name = f"warehouse.test.{uuid.uuid4().hex[:12]}"
    url = os.environ.get("CELERY_BROKER_URL") or "filesystem://"
    values = {"url": url, "queue": name, "dir": str(tmp_path / "queue")}
    with override_settings(
        WAREHOUSE_BROKER_URL=url, WAREHOUSE_QUEUE=name, WAREHOUSE_QUEUE_DIR=values["dir"]
    ):
        yield values
    if url.startswith("amqp"):
        with queue.connection_open(url) as conn:
            queue.movement_queue(name)(conn.channel()).delete()


# 10 s into a window of every period (s, min, hour, day), so no read budget rolls over mid-test.
FROZEN_INSTANT = 1_800_000_010.0


@pytest.fixture
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Read-throttle windows cut from a fixed instant."""
    monkeypatch.setattr(read_limits, "now", lambda: FROZEN_INSTANT)
