"""The backend REST API the bot uses, over a real socket: service identity, ownership,
validation, share links and streamed downloads."""

import warnings
from typing import Any

import httpx
import pytest
from django.core import signing
from django.test import AsyncRequestFactory, RequestFactory

from docbot import public_views, services
from docbot.models import Document, IngestionFailure
from tests.docbot.factories import stored_document, telegram_user
from tests.docbot.fake_telegram import FakeTelegram
from tests.factories import UserFactory, auth_header

pytestmark = pytest.mark.usefixtures("eager_tasks")


def service_headers(telegram_user_id: int) -> dict[str, str]:
    token = services.service_token_issue()
    return {"Authorization": f"Token {token}", "X-Telegram-User-Id": str(telegram_user_id)}


def test_service_token_acts_as_the_telegram_user_named_in_the_header(
    http: httpx.Client,
) -> None:
    headers = service_headers(5001)
    created = http.post("/api/docbot/types/", json={"name": "Passport"}, headers=headers)
    assert created.status_code == 201
    owner = telegram_user(5001)
    assert owner.docbot_types.get().name == "Passport"
    other = http.get("/api/docbot/types/", headers={**headers, "X-Telegram-User-Id": "5002"})
    assert other.json() == []


def test_service_token_without_the_telegram_header_is_rejected(http: httpx.Client) -> None:
    headers = service_headers(5001)
    del headers["X-Telegram-User-Id"]
    assert http.get("/api/docbot/types/", headers=headers).status_code in {401, 403}


def test_another_users_document_id_is_not_found(http: httpx.Client) -> None:
    owner = telegram_user(6001)
    document = stored_document(owner)
    intruder = service_headers(6002)
    path = f"/api/docbot/documents/{document.pk}"
    assert http.get(path, headers=intruder).status_code == 404
    assert http.patch(path, json={"name": "mine"}, headers=intruder).status_code == 404
    assert http.delete(path, headers=intruder).status_code == 404
    assert http.post(f"{path}/share", headers=intruder).status_code == 404
    assert http.get(path, headers=service_headers(6001)).status_code == 200
    assert Document.objects.get(pk=document.pk).name == "Scan"


def test_type_names_are_unique_per_user_case_insensitively(http: httpx.Client) -> None:
    headers = service_headers(7001)
    assert http.post("/api/docbot/types/", json={"name": "Tickets"}, headers=headers).is_success
    again = http.post("/api/docbot/types/", json={"name": "tICKETS"}, headers=headers)
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "type_exists"
    elsewhere = service_headers(7002)
    assert http.post("/api/docbot/types/", json={"name": "Tickets"}, headers=elsewhere).is_success


def received(http: httpx.Client, headers: dict[str, str], file_id: str, **fields: Any) -> int:
    """Record, as the bot does, that the acting Telegram user sent this file."""
    body = {"file_id": file_id, "file_unique_id": f"U-{file_id}", **fields}
    response = http.post("/api/docbot/received-files/", json=body, headers=headers)
    assert response.status_code == 201, response.text
    received_id: int = response.json()["id"]
    return received_id


def test_document_create_answers_202_pending_and_rejects_big_files_and_taken_names(
    http: httpx.Client, settings: Any, fake_telegram: FakeTelegram
) -> None:
    settings.TELEGRAM_BOT_TOKEN = fake_telegram.token
    settings.TELEGRAM_API_BASE_URL = fake_telegram.base_url
    headers = service_headers(8001)
    type_id = http.post("/api/docbot/types/", json={"name": "Bills"}, headers=headers).json()["id"]
    big = received(http, headers, "big", size=21 * 1024 * 1024)
    too_big = http.post(
        "/api/docbot/documents/",
        json={"type_id": type_id, "name": "May", "file": big},
        headers=headers,
    )
    assert too_big.status_code == 422
    assert too_big.json()["error"]["code"] == "file_too_large"
    body = {"type_id": type_id, "name": "May", "file": received(http, headers, "nope")}
    created = http.post("/api/docbot/documents/", json=body, headers=headers)
    assert created.status_code == 202
    assert created.json()["name"] == "May"
    # Telegram does not know the file id: ingestion gives up, records why and tells the user.
    document = Document.objects.get(pk=created.json()["id"])
    assert document.status == Document.Status.FAILED
    assert IngestionFailure.objects.filter(document_id=document.pk).exists()
    fake_telegram.wait_text(8001, "could not store")
    other = {**body, "file": received(http, headers, "other")}
    taken = http.post("/api/docbot/documents/", json=other, headers=headers)
    assert taken.status_code == 409
    assert taken.json()["error"]["code"] == "name_taken"


def test_documents_are_listed_newest_first_eight_per_page_with_a_cursor(
    http: httpx.Client,
) -> None:
    owner = telegram_user(9001)
    for index in range(10):
        stored_document(owner, name=f"Doc {index}", content=f"c{index}".encode())
    headers = service_headers(9001)
    first = http.get("/api/docbot/documents/", headers=headers).json()
    assert [d["name"] for d in first["results"]] == [f"Doc {i}" for i in range(9, 1, -1)]
    second = http.get(first["next"], headers=headers).json()
    assert [d["name"] for d in second["results"]] == ["Doc 1", "Doc 0"]
    found = http.get("/api/docbot/documents/", params={"q": "doc 3"}, headers=headers).json()
    assert [d["name"] for d in found["results"]] == ["Doc 3"]


def test_share_link_downloads_the_file_and_is_bound_to_the_document(
    http: httpx.Client,
) -> None:
    owner = telegram_user(9101)
    content = bytes(range(256)) * 4096  # 1 MiB
    document = stored_document(owner, content=content)
    link = http.post(
        f"/api/docbot/documents/{document.pk}/share", headers=service_headers(9101)
    ).json()
    path = "/" + link["url"].split("/", 3)[3]
    with http.stream("GET", path) as response:
        assert response.status_code == 200
        assert response.headers["content-length"] == str(len(content))
        chunks = list(response.iter_raw())
    assert b"".join(chunks) == content

    token = path.split("/")[3]  # /docbot/files/<token>/<file name>
    payload = signing.loads(token, salt="docbot.share")
    forged = signing.dumps({**payload, "d": payload["d"] + 1}, salt="docbot.share.other")
    assert http.get(f"/docbot/files/{forged}").status_code == 404
    services.document_delete(user=owner, document_id=document.pk)
    assert http.get(path).status_code == 404


def test_share_link_for_replaced_content_no_longer_opens(http: httpx.Client) -> None:
    owner = telegram_user(9201)
    document = stored_document(owner, content=b"old")
    link = services.share_link_create(user=owner, document_id=document.pk)
    Document.objects.filter(pk=document.pk).update(sha256="f" * 64)
    assert http.get(f"/docbot/files/{link.token}").status_code == 404


def test_share_link_expires(http: httpx.Client, settings: object) -> None:
    owner = telegram_user(9301)
    document = stored_document(owner)
    settings.DOCBOT_SHARE_LINK_TTL_SECONDS = -1  # type: ignore[attr-defined]
    expired = services.share_link_create(user=owner, document_id=document.pk)
    response = http.get(f"/docbot/files/{expired.token}")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "link_expired"


@pytest.mark.django_db
@pytest.mark.parametrize("server", ["wsgi", "asgi"])
def test_download_response_streams_with_the_iterator_of_the_servers_kind(server: str) -> None:
    """Django reads a whole async iterator into memory under WSGI and a whole sync one under
    ASGI: the download hands each server its own kind, chunk by chunk."""
    owner = telegram_user(9401)
    document = stored_document(owner, content=b"z" * (3 * public_views.DOWNLOAD_CHUNK))
    link = services.share_link_create(user=owner, document_id=document.pk)
    factory = RequestFactory() if server == "wsgi" else AsyncRequestFactory()
    response = public_views.file_download(factory.get("/"), link.token)
    assert response.streaming
    assert response.is_async is (server == "asgi")  # type: ignore[attr-defined]
    if server == "wsgi":
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # Django warns when it has to buffer
            chunks = list(response)
        assert [len(c) for c in chunks] == [public_views.DOWNLOAD_CHUNK] * 3


def test_regular_users_reach_only_their_own_documents(http: httpx.Client) -> None:
    user = UserFactory.create()
    other = stored_document(telegram_user(9501))
    headers = auth_header(user)
    assert http.get("/api/docbot/types/", headers=headers).json() == []
    assert http.get(f"/api/docbot/documents/{other.pk}", headers=headers).status_code == 404


@pytest.mark.django_db
def test_deleting_a_user_removes_their_types_and_documents() -> None:
    owner = telegram_user(9601)
    stored_document(owner)
    owner.delete()
    assert not Document.objects.exists()
