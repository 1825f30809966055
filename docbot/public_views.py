"""Non-API HTTP endpoints: the Telegram webhook and streamed share-link downloads.

Both answer every refusal in JSON (`{"error": {"code", "message", "details"}}`) naming the
field: a webhook body that is not clean JSON or not an Update is a 400 (never a 500, so
Telegram does not retry a poison update forever), a share token outside its charset a 404.

The webhook answers 2xx only for an update that is finished (handled, dropped on purpose, or
done before). One that another delivery is handling right now (a retry that overtook the first
attempt, or the first attempt's process died less than DOCBOT_UPDATE_CLAIM_SECONDS ago) is a
503: the Bot API repeats a webhook request that got no 2xx, so the update is delivered again
and handled once its claim is done (then a 200 duplicate) or expired (then handled here)."""

import hmac
import re
from collections.abc import AsyncIterator, Iterator
from typing import IO

import structlog
from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.core.files.storage import default_storage
from django.core.handlers.wsgi import WSGIRequest
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.http.response import HttpResponseBase
from django.utils.http import content_disposition_header
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from common import parsers
from common.api import error_body
from common.exceptions import ApplicationError
from docbot import runtime, schemas, services

logger = structlog.get_logger(__name__)

SECRET_HEADER = "HTTP_X_TELEGRAM_BOT_API_SECRET_TOKEN"  # noqa: S105 - a header name
DOWNLOAD_CHUNK = 256 * 1024
#: `django.core.signing` tokens: URL-safe base64 parts joined by `:` (compressed ones start
#: with `.`).
SHARE_TOKEN_PATTERN = re.compile(r"[A-Za-z0-9_.:-]+")
SHARE_TOKEN_MAX = 512


def secret_matches(presented: str, expected: str) -> bool:
    return bool(expected) and hmac.compare_digest(presented.encode(), expected.encode())


@csrf_exempt
@require_POST
async def webhook(request: HttpRequest) -> HttpResponse:
    if not runtime.bot_enabled():
        runtime.say_off_once()
        return JsonResponse(error_body("bot_off", "docbot is off."), status=404)
    presented = request.META.get(SECRET_HEADER, "")
    if not secret_matches(presented, settings.TELEGRAM_WEBHOOK_SECRET):
        return JsonResponse(error_body("forbidden", "Wrong secret token."), status=403)
    try:
        body = request.body
    except RequestDataTooBig:
        return JsonResponse(
            error_body("invalid", "body: is too large", {"body": ["is too large"]}), status=400
        )
    try:
        finished = await runtime.webhook_deliver(body)
    except services.ServiceAccountRefused as exc:
        logger.error("docbot_refused_to_start", code=exc.code, reason=exc.message)
        return JsonResponse(
            error_body("bot_unavailable", "docbot cannot start; see the server log."), status=503
        )
    except parsers.InvalidValue as exc:
        return JsonResponse(error_body(exc.code, exc.message, exc.details), status=400)
    if not finished:
        return JsonResponse(
            error_body("update_busy", "The update is being handled; deliver it again later."),
            status=503,
            headers={"Retry-After": "5"},
        )
    return HttpResponse(status=200)


def _chunks_sync(handle: IO[bytes]) -> Iterator[bytes]:
    try:
        while chunk := handle.read(DOWNLOAD_CHUNK):
            yield chunk
    finally:
        handle.close()


async def _chunks(handle: IO[bytes]) -> AsyncIterator[bytes]:
    read = sync_to_async(handle.read, thread_sensitive=False)
    try:
        while chunk := await read(DOWNLOAD_CHUNK):
            yield chunk
    finally:
        await sync_to_async(handle.close, thread_sensitive=False)()


@require_GET
def file_download(request: HttpRequest, token: str, name: str = "") -> HttpResponseBase:
    """Stream the shared document chunk by chunk (never whole in memory, under WSGI or ASGI),
    saved as its original file name (`schemas.download_name`). `name`, the link's last
    segment, is only for people and `curl -O`: the server's name is sent."""
    try:
        parsers.identifier(
            token, field="token", max_length=SHARE_TOKEN_MAX, pattern=SHARE_TOKEN_PATTERN
        )
        document = services.share_link_resolve(token=token)
    except parsers.InvalidValue as exc:
        return JsonResponse(error_body("link_invalid", exc.message, exc.details), status=404)
    except ApplicationError as exc:
        return JsonResponse(error_body(exc.code, exc.message), status=404)
    handle = default_storage.open(document.storage_name, "rb")
    # The iterator of the server's kind: Django buffers a whole async iterator under WSGI and
    # a whole sync one under ASGI, so the wrong kind would read the file into memory.
    chunks = _chunks_sync(handle) if isinstance(request, WSGIRequest) else _chunks(handle)
    response = StreamingHttpResponse(
        chunks, content_type=schemas.mime_type_or_default(document.mime_type)
    )
    # Names stored before uploads were checked may hold CR/LF or quotes: cleaned, then encoded
    # by Django's RFC 6266 helper (`filename*=utf-8''...` for anything beyond plain ASCII).
    filename = schemas.download_name(document.file_name, document.name, document.mime_type)
    response["Content-Disposition"] = content_disposition_header(True, filename) or "attachment"
    if document.size is not None:
        response["Content-Length"] = str(document.size)
    return response
