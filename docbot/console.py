"""docbot's panel on the operator console (`shared/specs/console.md`).

Now: updates per second (the `docbot.updates` counter, counted by the bot's middleware for
every update it receives), active dialogs (the `docbot.dialogs` gauge: users served in the last
five minutes, `metrics.dialogs_active`, summed over the bot's processes), documents pending
ingest and failed. Needs a human: ingestion failures of documents still failed, newest first,
each with a retry.
"""

from collections.abc import Mapping
from typing import Any

from django.urls import reverse

from common import parsers
from common.console import (
    Attention,
    ConsoleAction,
    ConsolePanel,
    PanelSample,
    console_count_totals,
    console_gauge_totals,
    console_when,
)
from docbot import selectors, services
from docbot.models import Document, IngestionFailure

PANEL = "docbot"
UPDATES = "docbot.updates"
DIALOGS = "docbot.dialogs"
LIMIT = 20


def _failure(failure: IngestionFailure) -> Attention:
    name = getattr(failure, "document_name", None) or f"#{failure.document_id}"
    return {
        "key": f"failure-{failure.document_id}",
        "text": (
            f"document {name} (#{failure.document_id}) failed to ingest at "
            f"{console_when(failure.created_at)}: {failure.error[:160]}"
        ),
        "link": reverse("admin:docbot_ingestionfailure_change", args=[failure.pk]),
        "actions": [
            {"action": "retry", "label": "Retry", "params": {"document_id": failure.document_id}}
        ],
    }


def sample() -> PanelSample:
    """The panel now: three small queries (`selectors.console_*`) and two cache reads, no
    lock; at most `LIMIT` attention items."""
    dialogs = console_gauge_totals([DIALOGS]).get(DIALOGS, 0.0)
    documents = reverse("admin:docbot_document_changelist")
    return {
        "counters": {
            UPDATES: {"label": "updates", "value": console_count_totals([UPDATES]).get(UPDATES, 0)}
        },
        "numbers": [
            {"key": "dialogs", "label": "active dialogs (5 min)", "value": int(dialogs)},
            {
                "key": "pending",
                "label": "documents pending ingest",
                "value": selectors.console_documents_pending(),
                "link": f"{documents}?status__exact={Document.Status.PENDING}",
            },
            {
                "key": "failed",
                "label": "documents failed",
                "value": selectors.console_documents_failed(),
                "link": f"{documents}?status__exact={Document.Status.FAILED}",
            },
        ],
        "attention": [_failure(f) for f in selectors.console_ingestion_failures(limit=LIMIT)],
        "tables": [],
    }


def retry(*, params: Mapping[str, Any], user: Any) -> str:
    """`{"document_id": int}`: send a failed document through ingestion again
    (`services.document_ingest_retry`). Refuses with NotFound or Conflict
    (`document_not_failed`)."""
    document_id = parsers.integer(params.get("document_id"), field="document_id", min_value=1)
    document = services.document_ingest_retry(document_id=document_id)
    return f"Document {document.name} (#{document.pk}) queued for ingestion again."


panel = ConsolePanel(
    name=PANEL,
    title="Docbot",
    sample=sample,
    order=50,
    actions={"retry": ConsoleAction(label="Retry an ingestion", run=retry)},
)
