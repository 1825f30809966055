"""ERROR records are published to the durable `ops.errors` queue without blocking the caller."""

import json
import logging
import time
import uuid

import pytest
from django.conf import settings
from django.test import override_settings
from kombu import Connection

from common.logging import ErrorQueueHandler


@pytest.mark.needs_broker
def test_error_records_reach_the_ops_errors_queue() -> None:
    queue_name = f"ops.errors.test-{uuid.uuid4().hex[:8]}"
    logger = logging.getLogger("tests.error_channel")
    handler = ErrorQueueHandler()
    logger.addHandler(handler)
    try:
        with override_settings(LOG_ERRORS_QUEUE=queue_name):
            started = time.perf_counter()
            logger.error("settlement failed for event %s", "ev-1")
            assert time.perf_counter() - started < 0.05, "logging must not wait for the broker"
            with Connection(settings.CELERY_BROKER_URL) as conn:
                simple = conn.SimpleQueue(queue_name, queue_opts={"durable": True})
                message = simple.get(block=True, timeout=10)
                body = message.payload
                message.ack()
                simple.close()
                conn.default_channel.queue_delete(queue_name)
    finally:
        logger.removeHandler(handler)
    if isinstance(body, str):
        body = json.loads(body)
    assert body["level"] == "ERROR"
    assert body["message"] == "settlement failed for event ev-1"
    assert body["logger"] == "tests.error_channel"


def test_an_unreachable_broker_never_breaks_the_caller() -> None:
    logger = logging.getLogger("tests.error_channel.down")
    handler = ErrorQueueHandler(capacity=2)
    logger.addHandler(handler)
    try:
        with override_settings(CELERY_BROKER_URL="amqp://guest:guest@127.0.0.1:1//"):
            for n in range(10):
                logger.error("boom %s", n)
    finally:
        logger.removeHandler(handler)
    assert handler.dropped >= 1
