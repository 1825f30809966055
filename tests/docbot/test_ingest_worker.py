"""Ingestion by a REAL Celery worker (subprocess) against PostgreSQL and RabbitMQ, with the
file fetched from the fake Bot API: stored through Django storage, hashed, marked stored, the
user told; redelivery creates nothing twice; duplicate content is reported; the update's
correlation id shows up in the worker's logs."""

import ast
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.db import connection

from bench.harness import celery_worker_args
from docbot import services, texts
from docbot.models import Document
from docbot.tasks import ingest_document
from tests.docbot.conftest import BotEnv, Dialog

pytestmark = [
    pytest.mark.needs_postgres,
    pytest.mark.needs_broker,
    pytest.mark.timeout(120),
]

ROOT = Path(__file__).resolve().parents[2]


class Worker:
    def __init__(self, env: BotEnv, log_path: Path) -> None:
        database = connection.settings_dict
        url = (
            f"postgres://{database['USER']}@{database['HOST'] or '127.0.0.1'}:"
            f"{database['PORT'] or 5432}/{database['NAME']}"
        )
        self.log_path = log_path
        self._log = log_path.open("w")
        self.process = subprocess.Popen(
            celery_worker_args(
                loglevel="INFO",
                extra=("--without-heartbeat", "--purge", "-n", f"docbot-test-{os.getpid()}@%h"),
            ),
            cwd=ROOT,
            env={
                **os.environ,
                "DJANGO_SETTINGS_MODULE": "config.settings",
                "DATABASE_URL": url,
                "TELEGRAM_BOT_TOKEN": env.fake.token,
                "TELEGRAM_API_BASE_URL": env.fake.base_url,
                "TELEGRAM_FILE_BASE_URL": env.fake.base_file_url,
                "MEDIA_ROOT": str(env.media_root),
                "LOG_FORMAT": "json",
            },
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.wait_log(lambda line: "ready." in line, timeout=60)

    def lines(self) -> list[str]:
        return self.log_path.read_text().splitlines()

    def wait_log(self, predicate: Any, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines():
                if predicate(line):
                    return line
            if self.process.poll() is not None:
                raise AssertionError("worker exited:\n" + "\n".join(self.lines()[-30:]))
            time.sleep(0.1)
        raise AssertionError("worker log never matched:\n" + "\n".join(self.lines()[-30:]))

    def events(self, name: str) -> list[dict[str, Any]]:
        """Structured events of the worker's log (JSON lines, or Celery's own format, which
        prints the structlog event dict after the `[time: LEVEL/Process]` prefix)."""
        found = []
        for line in self.lines():
            if name not in line:
                continue
            text = line.split("] ", 1)[1] if line.startswith("[") else line
            try:
                record = json.loads(text) if text.startswith('{"') else ast.literal_eval(text)
            except (ValueError, SyntaxError):
                continue
            if isinstance(record, dict) and record.get("event") == name:
                found.append(record)
        return found

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()


@pytest.fixture
def worker(webhook_registered: BotEnv, tmp_path: Path) -> Iterator[Worker]:
    from config.celery import app

    assert not app.conf.task_always_eager
    running = Worker(webhook_registered, tmp_path / "worker.log")
    try:
        yield running
    finally:
        running.stop()


def test_real_worker_stores_hashes_confirms_and_ignores_redelivery(
    webhook_registered: BotEnv, worker: Worker
) -> None:
    fake = webhook_registered.fake
    dialog = Dialog(webhook_registered, "webhook", user_id=3101)
    dialog.say(texts.MENU_ADD, texts.ADD_PICK_TYPE)
    dialog.tap("an", texts.ADD_ASK_TYPE_NAME)
    dialog.say("Contracts", "Now name the document")
    dialog.say("Lease", "Now send the file")
    content = os.urandom(300_000)
    stored_file = fake.add_file(content, name="lease.pdf")
    update = fake.document_update(3101, stored_file)
    since = fake.mark()
    assert fake.deliver(update).status_code == 200
    confirmation = fake.wait_text(3101, "Stored \u201cLease\u201d", since=since, timeout=60)
    assert confirmation.text == texts.STORED.format(name="Lease", size=len(content))

    import hashlib

    document = Document.objects.get(name="Lease")
    assert document.status == Document.Status.STORED
    assert document.sha256 == hashlib.sha256(content).hexdigest()
    on_disk = webhook_registered.media_root / document.storage_name
    assert on_disk.read_bytes() == content

    # The update's correlation id travelled bot -> backend -> broker -> worker.
    correlation = f"tg-{update['update_id']}"
    worker.wait_log(lambda line: "docbot_ingest_done" in line)
    done = worker.events("docbot_ingest_done")
    assert [event["request_id"] for event in done] == [correlation]

    # Redelivery of the same message: nothing stored twice, the user is not told twice.
    ingest_document.delay(document.pk)
    ingest_document.delay(document.pk)
    worker.wait_log(lambda line: line.count("already_done") >= 1 and "docbot_ingest_done" in line)
    deadline = time.monotonic() + 20
    while len(worker.events("docbot_ingest_done")) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    outcomes = [event["outcome"] for event in worker.events("docbot_ingest_done")]
    assert outcomes == ["stored", "already_done", "already_done"]
    files = [p for p in webhook_registered.media_root.rglob("*") if p.is_file()]
    assert files == [on_disk]
    assert Document.objects.count() == 1
    stored_replies = [c for c in fake.sent("sendMessage", 3101) if c.text.startswith("Stored")]
    assert len(stored_replies) == 1


def test_real_worker_reports_duplicate_content(webhook_registered: BotEnv, worker: Worker) -> None:
    fake = webhook_registered.fake
    owner = services.telegram_account_user(telegram_user_id=3201)
    doc_type = services.type_create(user=owner, name="Receipts")
    content = os.urandom(50_000)
    first, second = fake.add_file(content, name="a.pdf"), fake.add_file(content, name="b.pdf")
    for name, sent in (("Shop", first), ("Shop copy", second)):
        received = services.received_file_record(
            user=owner, file_id=sent.file_id, file_unique_id=sent.file_unique_id
        )
        services.document_create(user=owner, type_id=doc_type.pk, name=name, file=received.pk)
        if name == "Shop":
            fake.wait_text(3201, "Stored \u201cShop\u201d", timeout=60)
    duplicate = fake.wait_text(3201, "already stored", timeout=60)
    assert duplicate.text == texts.DUPLICATE.format(existing="Shop")
    assert list(Document.objects.values_list("name", flat=True)) == ["Shop"]
