"""The ingestion service in-process against the fake Bot API (every database): idempotent on
redelivery, duplicate content reported, Telegram failures recorded once; every notice goes to
the owner's own Telegram chat."""

from pathlib import Path
from typing import Any

import pytest

from docbot import services, texts
from docbot.models import Document, IngestionFailure
from docbot.tasks import ingest_document
from tests.docbot.fake_telegram import FakeTelegram

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("eager_tasks")]


@pytest.fixture
def telegram(settings: Any, fake_telegram: FakeTelegram, tmp_path: Path) -> FakeTelegram:
    settings.TELEGRAM_BOT_TOKEN = fake_telegram.token
    settings.TELEGRAM_API_BASE_URL = fake_telegram.base_url
    settings.TELEGRAM_FILE_BASE_URL = fake_telegram.base_file_url
    settings.MEDIA_ROOT = str(tmp_path)
    return fake_telegram


def pending(owner: Any, file_id: str, name: str = "Doc") -> Document:
    doc_type = services.type_create(user=owner, name=f"T {name}")
    # The row only (not document_create): each test decides when the task runs.
    document = Document.objects.create(
        user=owner, type=doc_type, name=name, telegram_file_id=file_id
    )
    return document


def test_redelivered_ingestion_stores_once_and_confirms_once(
    telegram: FakeTelegram, tmp_path: Path
) -> None:
    owner = services.telegram_account_user(telegram_user_id=11)
    stored = telegram.add_file(b"abc" * 1000)
    document = pending(owner, stored.file_id)

    assert ingest_document.delay(document.pk).get() == "stored"
    assert ingest_document.delay(document.pk).get() == "already_done"

    document.refresh_from_db()
    assert document.status == Document.Status.STORED
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == [tmp_path / document.storage_name]
    assert len([c for c in telegram.sent("sendMessage", 11) if c.text.startswith("Stored")]) == 1


def test_equal_names_in_storage_never_overwrite(telegram: FakeTelegram, tmp_path: Path) -> None:
    owner = services.telegram_account_user(telegram_user_id=12)
    first = pending(owner, telegram.add_file(b"one", name="same.pdf").file_id, "A")
    second = pending(owner, telegram.add_file(b"two", name="same.pdf").file_id, "B")
    Document.objects.filter(pk__in=[first.pk, second.pk]).update(file_name="same.pdf")
    ingest_document.delay(first.pk)
    ingest_document.delay(second.pk)
    first.refresh_from_db()
    second.refresh_from_db()
    assert first.storage_name != second.storage_name
    assert (tmp_path / first.storage_name).read_bytes() == b"one"
    assert (tmp_path / second.storage_name).read_bytes() == b"two"


def test_duplicate_content_is_reported_and_not_stored_again(telegram: FakeTelegram) -> None:
    owner = services.telegram_account_user(telegram_user_id=13)
    original = pending(owner, telegram.add_file(b"same bytes").file_id, "Original")
    copy = pending(owner, telegram.add_file(b"same bytes").file_id, "Copy")
    ingest_document.delay(original.pk)
    assert ingest_document.delay(copy.pk).get() == "duplicate"
    assert telegram.sent("sendMessage", 13)[-1].text == texts.DUPLICATE.format(existing="Original")
    assert list(Document.objects.values_list("name", flat=True)) == ["Original"]


def test_a_file_telegram_does_not_know_fails_once_with_a_record(telegram: FakeTelegram) -> None:
    owner = services.telegram_account_user(telegram_user_id=14)
    document = pending(owner, "no-such-file")
    assert ingest_document.delay(document.pk).get() == "failed"
    assert ingest_document.delay(document.pk).get() == "already_done"
    document.refresh_from_db()
    assert document.status == Document.Status.FAILED
    assert IngestionFailure.objects.filter(document_id=document.pk).count() == 1
    assert [c.text for c in telegram.sent("sendMessage", 14)] == [
        texts.INGEST_FAILED.format(name="Doc")
    ]
