"""Every docbot REST input through the shared parsers, over real HTTP (issue 10, item 11): the
Telegram user header, serializer fields, query parameters, path ids and share tokens are
refused with a 400/404 JSON error naming the field, never a 500; a share-link download of a
document whose stored name holds CR/LF gets a safe Content-Disposition (RFC 6266)."""

import json
from typing import Any

import httpx
import pytest

from docbot import services
from docbot.models import Document, DocumentType, ReceivedFile, TelegramAccount
from tests.docbot.factories import stored_document, telegram_user

pytestmark = pytest.mark.usefixtures("eager_tasks")

USER = 8101


@pytest.fixture
def service_token(transactional_db: None) -> str:
    return services.service_token_issue()


def _headers(token: str, user: str | bytes = str(USER)) -> dict[str, Any]:
    return {"Authorization": f"Token {token}", "X-Telegram-User-Id": user}


def _refused(response: httpx.Response, field: str, status: int = 400) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert field in error["details"], error


@pytest.mark.parametrize(
    "header",
    [
        "\u00b2".encode("latin-1"),  # superscript two: str.isdigit() says yes
        "\u0661\u0662".encode(),  # Arabic-Indic digits
        "\uff11\uff12".encode(),  # fullwidth digits
        "1" * 20,
        "9223372036854775808",
        str(2**52),  # one past Telegram's 52-bit ids
        "0",
        "-5",
        "+5",
        "5.0",
        "1e3",
        "1_000",
        "0x10",
        "",
        "abc",
    ],
)
def test_a_telegram_user_header_outside_telegrams_id_range_is_a_400_naming_it(
    http: httpx.Client, service_token: str, header: str | bytes
) -> None:
    response = http.get("/api/docbot/types/", headers=_headers(service_token, header))
    _refused(response, "X-Telegram-User-Id")
    assert not TelegramAccount.objects.exists()


def test_the_largest_telegram_user_id_is_served(http: httpx.Client, service_token: str) -> None:
    response = http.get("/api/docbot/types/", headers=_headers(service_token, str(2**52 - 1)))
    assert response.status_code == 200
    assert TelegramAccount.objects.get().telegram_user_id == 2**52 - 1


DOCUMENT_FIELDS: list[tuple[str, Any]] = [
    ("type_id", 2**63),
    ("type_id", -1),
    ("type_id", "x"),
    ("type_id", None),
    ("name", "a\x00b"),
    ("name", "a\x1bb"),
    ("name", "n" * 401),
    ("name", 5),
    ("file", 2**63),
    ("file", 0),
    ("file", -1),
    ("file", 1.5),
    ("file", True),
    ("file", "\u0661\u0662"),
    ("file", "1e3"),
    ("file", None),
]

RECEIVED_FILE_FIELDS: list[tuple[str, Any]] = [
    ("size", -1),
    ("size", 2**63),
    ("size", 2.5),
    ("file_id", "a b"),
    ("file_id", "a\nb"),
    ("file_id", ""),
    ("file_id", "f" * 257),
    ("file_id", "\u0444"),
    ("file_unique_id", "\u00e9"),
    ("file_unique_id", ""),
    ("file_unique_id", "u" * 129),
    ("file_name", "evil\r\nname.pdf"),
    ("file_name", "nul\x00.pdf"),
    ("file_name", "f" * 256),
    ("file_name", ["a"]),
    ("mime_type", "text/html\r\nX-Evil: 1"),
    ("mime_type", "pdf"),
    ("mime_type", "m/" + "x" * 200),
]


def _received(http: httpx.Client, token: str) -> int:
    body = {"file_id": "F1", "file_unique_id": "U1"}
    response = http.post("/api/docbot/received-files/", json=body, headers=_headers(token))
    assert response.status_code == 201, response.text
    received_id: int = response.json()["id"]
    return received_id


@pytest.mark.parametrize(("field", "value"), DOCUMENT_FIELDS)
def test_document_create_refuses_each_malformed_field(
    http: httpx.Client, service_token: str, field: str, value: Any
) -> None:
    headers = _headers(service_token)
    type_id = http.post("/api/docbot/types/", json={"name": "Bills"}, headers=headers).json()["id"]
    body = {"type_id": type_id, "name": "May", "file": _received(http, service_token), field: value}
    response = http.post("/api/docbot/documents/", json=body, headers=headers)
    _refused(response, field)
    assert not Document.objects.exists()


@pytest.mark.parametrize(("field", "value"), RECEIVED_FILE_FIELDS)
def test_a_received_file_record_refuses_each_malformed_field(
    http: httpx.Client, service_token: str, field: str, value: Any
) -> None:
    body = {"file_id": "F1", "file_unique_id": "U1", field: value}
    response = http.post("/api/docbot/received-files/", json=body, headers=_headers(service_token))
    _refused(response, field)
    assert not ReceivedFile.objects.exists()


@pytest.mark.parametrize(
    ("path", "raw"),
    [
        ("documents/", b'{"type_id": 1, "name": "x\\ud800", "file": 1}'),
        (
            "received-files/",
            b'{"file_id": "F", "file_unique_id": "U", "file_name": "\\udc00"}',
        ),
    ],
)
def test_lone_surrogates_in_a_document_body_are_a_400(
    http: httpx.Client, service_token: str, path: str, raw: bytes
) -> None:
    response = http.post(
        f"/api/docbot/{path}",
        content=raw,
        headers={**_headers(service_token), "Content-Type": "application/json"},
    )
    assert response.status_code == 400, response.text
    assert not Document.objects.exists()
    assert not ReceivedFile.objects.exists()


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("type=%C2%B2", "type"),
        ("type=%D9%A1", "type"),
        ("type=9223372036854775808", "type"),
        ("type=-1", "type"),
        ("type=1.5", "type"),
        ("q=a%00b", "q"),
        ("q=" + "q" * 129, "q"),
        ("name=a%00b", "name"),
        ("name=a%1Bb", "name"),
        ("limit=%D9%A1%D9%A0", "limit"),
        ("limit=0", "limit"),
    ],
)
def test_document_list_parameters_go_through_the_shared_parsers(
    http: httpx.Client, service_token: str, query: str, field: str
) -> None:
    response = http.get(f"/api/docbot/documents/?{query}", headers=_headers(service_token))
    assert response.status_code == 400, response.text
    assert field in json.dumps(response.json()["error"])


@pytest.mark.parametrize("value", ["maybe", "2", "%00"])
def test_the_non_empty_flag_is_a_boolean(
    http: httpx.Client, service_token: str, value: str
) -> None:
    response = http.get(f"/api/docbot/types/?non_empty={value}", headers=_headers(service_token))
    _refused(response, "non_empty")


@pytest.mark.parametrize("name", ["a\x00b", "tab\x07", "x\x1b[2J", "n" * 201, ""])
def test_type_names_that_are_not_clean_text_are_refused(
    http: httpx.Client, service_token: str, name: str
) -> None:
    headers = _headers(service_token)
    created = http.post("/api/docbot/types/", json={"name": name}, headers=headers)
    assert created.status_code == 400, created.text
    doc_type = DocumentType.objects.create(user=telegram_user(USER), name="Ok")
    renamed = http.patch(f"/api/docbot/types/{doc_type.pk}", json={"name": name}, headers=headers)
    assert renamed.status_code == 400, renamed.text
    assert list(DocumentType.objects.values_list("name", flat=True)) == ["Ok"]


@pytest.mark.parametrize(
    ("field", "value"), [("name", "a\x00b"), ("type_id", 2**63), ("type_id", "\u0662")]
)
def test_document_update_refuses_malformed_fields(
    http: httpx.Client, service_token: str, field: str, value: Any
) -> None:
    document = stored_document(telegram_user(USER))
    response = http.patch(
        f"/api/docbot/documents/{document.pk}", json={field: value}, headers=_headers(service_token)
    )
    _refused(response, field)


@pytest.mark.parametrize(
    "path",
    [
        "/api/docbot/documents/9223372036854775808",
        "/api/docbot/documents/99999999999999999999/share",
        "/api/docbot/types/18446744073709551616",
        "/api/docbot/documents/%D9%A1",
        "/api/docbot/documents/1%00",
    ],
)
def test_ids_in_paths_outside_int64_are_a_json_404(
    http: httpx.Client, service_token: str, path: str
) -> None:
    response = http.get(path, headers=_headers(service_token))
    assert response.status_code in {404, 405}
    assert response.headers["content-type"].startswith("application/json")


@pytest.mark.parametrize(
    ("file_name", "disposition"),
    [
        (
            "evil\r\nSet-Cookie: session=1.pdf",
            'attachment; filename="evil__Set-Cookie: session=1.pdf"',
        ),
        ("line\nfeed.pdf", 'attachment; filename="line_feed.pdf"'),
        ('quote".pdf', 'attachment; filename="quote\\".pdf"'),
        ("back\\slash.pdf", 'attachment; filename="back_slash.pdf"'),
        ("../../etc/passwd", 'attachment; filename="_.._etc_passwd"'),
        ("\u043f\u0430\u0441\u043f\u043e\u0440\u0442.pdf", "attachment; filename*=utf-8''%D0%BF"),
        ("tab\tname.pdf", 'attachment; filename="tab_name.pdf"'),
        ("", 'attachment; filename="Scan"'),
    ],
)
def test_a_share_link_download_always_has_a_safe_content_disposition(
    http: httpx.Client, file_name: str, disposition: str
) -> None:
    owner = telegram_user(USER)
    document = stored_document(owner, content=b"%PDF share")
    # A row written before uploads were checked (or through the admin) keeps its raw name.
    Document.objects.filter(pk=document.pk).update(
        file_name=file_name, mime_type="text/html\r\nX-Evil: 1"
    )
    link = services.share_link_create(user=owner, document_id=document.pk)
    response = http.get(f"/docbot/files/{link.token}")
    assert response.status_code == 200, response.text
    assert response.content == b"%PDF share"
    assert response.headers["content-disposition"].startswith(disposition)
    assert response.headers["content-type"] == "application/octet-stream"
    assert "set-cookie" not in response.headers
    assert "x-evil" not in response.headers


@pytest.mark.parametrize(
    "token",
    ["a%00b", "%E2%80%AE", "t" * 600, "a%20b", "%ED%A0%80", "a%0D%0Ab", "..%2F..%2F"],
)
def test_share_tokens_outside_their_charset_are_a_json_404(http: httpx.Client, token: str) -> None:
    response = http.get(f"/docbot/files/{token}")
    assert response.status_code == 404, response.text
    assert response.json()["error"]["code"] in {"link_invalid", "not_found"}
