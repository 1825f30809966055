"""The bot's only way to data: the backend REST API `/api/docbot/`, called with the docbot
service token, the Telegram user id and the update's correlation id. The user id is always the
sender of the update being handled, so the backend acts for them and nobody else."""

from typing import Any, NotRequired, TypedDict
from urllib.parse import parse_qs, urlparse

import httpx
import structlog

from common.metrics import timed_integration


class TypeRow(TypedDict):
    """A document type (`TypeOutput` of docbot/api.py)."""

    id: int
    name: str
    document_count: NotRequired[int]  # in lists only; failed uploads not counted


class DocumentRow(TypedDict):
    """A document (`DocumentOutput` of docbot/api.py)."""

    id: int
    name: str
    type_id: int
    type_name: str
    status: str  # pending | stored | failed
    size: int | None  # bytes
    sha256: str  # hex, empty until stored
    mime_type: str
    file_name: str
    telegram_file_id: str
    created_at: str  # ISO 8601


class DocumentPage(TypedDict):
    """One page of documents (DRF cursor pagination): `next`/`previous` are URLs or None."""

    next: str | None
    previous: str | None
    results: list[DocumentRow]


class ReceivedFileRow(TypedDict):
    id: int
    file_unique_id: str
    size: int | None  # bytes


class ShareRow(TypedDict):
    url: str
    expires_at: str  # ISO 8601
    file_name: str  # what the download is saved as


class BackendError(Exception):
    """The backend answered with an error body (or not at all)."""

    def __init__(self, status: int, code: str, message: str, details: Any = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = details or {}


def cursor_of(url: str | None) -> str | None:
    if not url:
        return None
    values = parse_qs(urlparse(url).query).get("cursor")
    return values[0] if values else None


class Backend:
    def __init__(self, base_url: str, token: str, *, transport: Any = None) -> None:
        self._client = httpx.AsyncClient(
            base_url=base_url.rstrip("/") + "/api/docbot/",
            headers={"Authorization": f"Token {token}"},
            timeout=httpx.Timeout(20.0, connect=5.0),
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=32),
            transport=transport,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _call(
        self,
        method: str,
        path: str,
        user_id: int,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
    ) -> Any:
        headers = {"X-Telegram-User-Id": str(user_id)}
        request_id = structlog.contextvars.get_contextvars().get("request_id")
        if request_id:
            headers["X-Request-ID"] = str(request_id)
        try:
            response = await self._client.request(
                method, path, json=json, params=params, headers=headers
            )
        except httpx.HTTPError as exc:
            raise BackendError(503, "backend_unreachable", repr(exc)) from exc
        if response.status_code == 204:
            return None
        try:
            body = response.json()
        except ValueError:
            body = {}
        if response.status_code >= 400:
            error = body.get("error", {}) if isinstance(body, dict) else {}
            raise BackendError(
                response.status_code,
                str(error.get("code", "error")),
                str(error.get("message", response.reason_phrase)),
                error.get("details"),
            )
        return body

    @timed_integration("docbot_backend", "types_list")
    async def types(self, user_id: int, *, non_empty: bool) -> list[TypeRow]:
        params = {"non_empty": "1"} if non_empty else None
        result: list[TypeRow] = await self._call("GET", "types/", user_id, params=params)
        return result

    @timed_integration("docbot_backend", "types_create")
    async def type_create(self, user_id: int, *, name: str) -> TypeRow:
        result: TypeRow = await self._call("POST", "types/", user_id, json={"name": name})
        return result

    @timed_integration("docbot_backend", "documents_list")
    async def documents(
        self,
        user_id: int,
        *,
        type_id: int | None = None,
        query: str = "",
        name: str = "",
        cursor: str | None = None,
        limit: int = 8,
    ) -> DocumentPage:
        params: dict[str, Any] = {"limit": limit}
        if type_id is not None:
            params["type"] = type_id
        if query:
            params["q"] = query
        if name:
            params["name"] = name
        if cursor:
            params["cursor"] = cursor
        result: DocumentPage = await self._call("GET", "documents/", user_id, params=params)
        return result

    @timed_integration("docbot_backend", "received_files_create")
    async def file_received(self, user_id: int, **fields: Any) -> ReceivedFileRow:
        """Tell the backend that this user sent the bot this file; its `id` names the file in
        `document_create`."""
        result: ReceivedFileRow = await self._call("POST", "received-files/", user_id, json=fields)
        return result

    @timed_integration("docbot_backend", "documents_create")
    async def document_create(
        self, user_id: int, *, type_id: int, name: str, file: int
    ) -> DocumentRow:
        """A document from a file `file_received` recorded for the same user; the backend
        picks the chat to notify (the user's own)."""
        body = {"type_id": type_id, "name": name, "file": file}
        result: DocumentRow = await self._call("POST", "documents/", user_id, json=body)
        return result

    @timed_integration("docbot_backend", "documents_retrieve")
    async def document(self, user_id: int, document_id: int) -> DocumentRow:
        result: DocumentRow = await self._call("GET", f"documents/{document_id}", user_id)
        return result

    @timed_integration("docbot_backend", "documents_update")
    async def document_update(self, user_id: int, document_id: int, **fields: Any) -> DocumentRow:
        result: DocumentRow = await self._call(
            "PATCH", f"documents/{document_id}", user_id, json=fields
        )
        return result

    @timed_integration("docbot_backend", "documents_delete")
    async def document_delete(self, user_id: int, document_id: int) -> None:
        await self._call("DELETE", f"documents/{document_id}", user_id)

    @timed_integration("docbot_backend", "documents_share")
    async def share(self, user_id: int, document_id: int) -> ShareRow:
        result: ShareRow = await self._call("POST", f"documents/{document_id}/share", user_id)
        return result

    @timed_integration("docbot_backend", "file_download")
    async def download(self, url: str) -> bytes:
        """Fetch a shared file (used only when Telegram no longer knows our file_id)."""
        async with httpx.AsyncClient(timeout=60) as client:
            response = await client.get(url)
            response.raise_for_status()
            return response.content
