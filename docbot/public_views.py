"""Non-API HTTP endpoints: the Telegram webhook and streamed share-link downloads."""

import hmac
from collections.abc import AsyncIterator
from typing import IO

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.files.storage import default_storage
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.http.response import HttpResponseBase
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from common.api import error_body
from common.exceptions import ApplicationError
from docbot import runtime, services

SECRET_HEADER = "HTTP_X_TELEGRAM_BOT_API_SECRET_TOKEN"  # noqa: S105 - a header name
DOWNLOAD_CHUNK = 256 * 1024


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
    application = await runtime.webhook_application()
    from docbot.bot.application import process_webhook_body

    try:
        await process_webhook_body(application, request.body)
    except ValueError:
        return JsonResponse(error_body("invalid", "Not an update."), status=400)
    return HttpResponse(status=200)


async def _chunks(handle: IO[bytes]) -> AsyncIterator[bytes]:
    read = sync_to_async(handle.read, thread_sensitive=False)
    try:
        while chunk := await read(DOWNLOAD_CHUNK):
            yield chunk
    finally:
        await sync_to_async(handle.close, thread_sensitive=False)()


@require_GET
def file_download(request: HttpRequest, token: str) -> HttpResponseBase:
    """Stream the shared document chunk by chunk (an async iterator, so Django never buffers
    the whole file)."""
    try:
        document = services.share_link_resolve(token=token)
    except ApplicationError as exc:
        return JsonResponse(error_body(exc.code, exc.message), status=404)
    handle = default_storage.open(document.storage_name, "rb")
    response = StreamingHttpResponse(
        _chunks(handle), content_type=document.mime_type or "application/octet-stream"
    )
    filename = document.file_name or document.name
    response["Content-Disposition"] = f'attachment; filename="{filename.replace(chr(34), "")}"'
    if document.size is not None:
        response["Content-Length"] = str(document.size)
    return response
