"""Celery interface of docbot: take ids, call one service."""

import structlog
from celery import Task, shared_task

from common.exceptions import ApplicationError
from docbot import metrics, services
from docbot.telegram import TelegramUnavailable

logger = structlog.get_logger(__name__)

INGEST_TASK = "docbot.ingest_document"


@shared_task(bind=True, name=INGEST_TASK, max_retries=3)
def ingest_document(self: Task, document_id: int) -> str:
    try:
        outcome = services.document_ingest(document_id=document_id)
    except TelegramUnavailable as exc:
        # Eager (embedded) runs inside the API request: no waiting retries there.
        if not self.request.is_eager and self.request.retries < (self.max_retries or 0):
            metrics.QUEUE_CONSUMED.labels(INGEST_TASK, "retry").inc()
            raise self.retry(exc=exc, countdown=2**self.request.retries) from exc
        services.document_ingest_fail(document_id=document_id, error=str(exc))
        metrics.QUEUE_CONSUMED.labels(INGEST_TASK, "failed").inc()
        return "failed"
    except ApplicationError as exc:
        services.document_ingest_fail(document_id=document_id, error=str(exc))
        metrics.QUEUE_CONSUMED.labels(INGEST_TASK, "failed").inc()
        return "failed"
    metrics.QUEUE_CONSUMED.labels(INGEST_TASK, outcome.status).inc()
    logger.info("docbot_ingest_done", document_id=document_id, outcome=outcome.status)
    return outcome.status
