"""Structured logging (structlog) and the optional RabbitMQ error channel.

Every record, from structlog or the standard library, goes through one ProcessorFormatter so a
correlation id bound with `structlog.contextvars` shows up on all of them.
"""

import json
import logging
import queue
import re
import threading
from typing import Any

import structlog

_SHARED_PROCESSORS: list[Any] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
    structlog.processors.StackInfoRenderer(),
]


def _configure_structlog() -> None:
    structlog.configure(
        processors=[
            # First, so a line below its logger's level costs one level check, not the chain.
            structlog.stdlib.filter_by_level,
            *_SHARED_PROCESSORS,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


def structured_formatter(fmt: str = "console") -> structlog.stdlib.ProcessorFormatter:
    """Formatter factory for LOGGING: JSON lines in production, coloured console otherwise."""
    _configure_structlog()
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    return structlog.stdlib.ProcessorFormatter(
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
        foreign_pre_chain=_SHARED_PROCESSORS,
    )


_SECRET_QUERY = re.compile(r"((?:[?&;]|^)(?:ticket|token|secret|password|key)=)[^&;\s\"']*", re.I)


def redact_query_secrets(text: str) -> str:
    """`/ws/?ticket=abc&room=x` → `/ws/?ticket=[redacted]&room=x`: credentials that clients must
    pass in a URL (the WebSocket ticket; browsers cannot set headers) never reach a log line."""
    return _SECRET_QUERY.sub(r"\1[redacted]", text)


class RedactQuerySecrets(logging.Filter):
    """Logger filter for the servers' access lines (uvicorn logs the path with its query)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact_query_secrets(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(
                redact_query_secrets(arg) if isinstance(arg, str) else arg for arg in record.args
            )
        return True


class ErrorQueueHandler(logging.Handler):
    """Publishes ERROR/CRITICAL records as JSON to a durable RabbitMQ queue (`ops.errors`).

    `emit` only puts the record on a bounded in-memory queue (dropping when full), and a daemon
    thread publishes, so logging never blocks or breaks the request that logged.
    """

    def __init__(self, capacity: int = 1000) -> None:
        super().__init__()
        self._pending: queue.Queue[dict[str, Any]] = queue.Queue(maxsize=capacity)
        self._thread: threading.Thread | None = None
        self.dropped = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            body = {
                "level": record.levelname,
                "logger": record.name,
                "message": record.getMessage(),
                "time": record.created,
                "formatted": self.format(record),
            }
            self._pending.put_nowait(body)
        except queue.Full:
            self.dropped += 1
            return
        except Exception:
            self.handleError(record)
            return
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._publish_forever, daemon=True)
            self._thread.start()

    def _publish_forever(self) -> None:
        from django.conf import settings
        from kombu import Connection, Exchange, Queue

        errors_queue = Queue(settings.LOG_ERRORS_QUEUE, Exchange(""), durable=True)
        errors_queue.routing_key = settings.LOG_ERRORS_QUEUE
        while True:
            body = self._pending.get()
            try:
                with Connection(settings.CELERY_BROKER_URL, connect_timeout=2) as conn:
                    producer = conn.Producer()
                    producer.publish(
                        json.dumps(body),
                        routing_key=settings.LOG_ERRORS_QUEUE,
                        declare=[errors_queue],
                        delivery_mode=2,
                        content_type="application/json",
                        retry=False,
                    )
                    while True:
                        body = self._pending.get(timeout=30)
                        producer.publish(
                            json.dumps(body),
                            routing_key=settings.LOG_ERRORS_QUEUE,
                            delivery_mode=2,
                            content_type="application/json",
                            retry=False,
                        )
            except queue.Empty:
                continue
            except Exception:
                self.dropped += 1
