"""The sandbox's two doors (`docbot/sandbox.py` is the sandbox itself).

- The Bot API, for the bot and the ingestion workers: `/docbot/sandbox/bot<token>/<method>` and
  `/docbot/sandbox/file/bot<token>/<path>`, answering in the Bot API's own envelope
  (`{"ok": ..., "result" | "error_code", "description"}`); a wrong token is a 401.
- The chat page, for staff: `/docbot/sandbox/` (server-rendered, a little JS refreshes the
  transcript and posts the forms), and its small endpoints: `transcript` (the page's chat as an
  HTML fragment), `messages` (the same as JSON), `send`, `press`, `upload`, `files/<file_id>`.
  Form posts answer JSON when asked for it (`Accept: application/json`), else redirect back.

Everything is a 404 unless the sandbox is on (no TELEGRAM_BOT_TOKEN, DOCBOT_SANDBOX). In a
process whose bot does not poll the sandbox (only `runall`'s does: the chats live in its
memory) the chat page is a 404 that says where the sandbox is, the Bot API a 404, the other
endpoints a 503."""

import functools
import hmac
from collections.abc import Callable
from typing import Any

from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.http.response import HttpResponseBase
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils.http import content_disposition_header
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from common import parsers
from common.api import error_body
from docbot import runtime, sandbox, schemas, telegram
from docbot.sandbox import MAX_FILE_BYTES, BotApiError, operator_user

_TEXT_MAX = 4096
_INLINE_TYPES = {"image/jpeg", "image/png", "image/gif", "image/webp"}
_NOT_FOUND = {"ok": False, "error_code": 404, "description": "Not Found"}

View = Callable[..., HttpResponseBase]


# --- the Bot API ----------------------------------------------------------------------------


def _bot_api_refusal(token: str) -> JsonResponse | None:
    if not telegram.sandbox_enabled() or not runtime.sandbox_served_here():
        return JsonResponse(_NOT_FOUND, status=404)
    if not hmac.compare_digest(token.encode(), telegram.sandbox_token().encode()):
        return JsonResponse(
            {"ok": False, "error_code": 401, "description": "Unauthorized"}, status=401
        )
    return None


def _params(request: HttpRequest) -> tuple[dict[str, Any], dict[str, tuple[str, bytes]]]:
    """A Bot API call's parameters: JSON (the workers), a form or multipart (python-telegram-
    bot; nested values arrive JSON-encoded); multipart files by field name."""
    if request.content_type == "application/json":
        data = parsers.json_document(request.body, field="body", max_bytes=1024 * 1024)
        if not isinstance(data, dict):
            raise BotApiError(400, "Bad Request: parameters must be a JSON object")
        return data, {}
    params: dict[str, Any] = {**request.GET.dict(), **request.POST.dict()}
    uploads = {}
    for name in request.FILES:
        upload = request.FILES.get(name)
        if upload is not None:
            uploads[name] = (upload.name or name, upload.read())
    return params, uploads


@csrf_exempt
async def bot_method(request: HttpRequest, token: str, method: str) -> HttpResponse:
    """One Bot API method call of the sandbox (getUpdates long-polls on the event loop)."""
    refusal = _bot_api_refusal(token)
    if refusal is not None:
        return refusal
    try:
        params, uploads = _params(request)
        if method == "getUpdates":
            result: Any = await sandbox.SANDBOX.get_updates(
                offset=int(params.get("offset") or 0),
                wait=float(params.get("timeout") or 0),
                limit=int(params.get("limit") or 100),
            )
        else:
            result = sandbox.SANDBOX.call(method, params, uploads)
    except BotApiError as exc:
        body = {"ok": False, "error_code": exc.code, "description": exc.description}
        return JsonResponse(body, status=exc.code)
    except (ValueError, RequestDataTooBig) as exc:  # InvalidValue is a ValueError too
        body = {"ok": False, "error_code": 400, "description": f"Bad Request: {exc}"}
        return JsonResponse(body, status=400)
    return JsonResponse({"ok": True, "result": result})


@require_GET
def bot_file(request: HttpRequest, token: str, path: str) -> HttpResponse:
    """A file's bytes by its getFile `file_path` (what the ingestion worker downloads)."""
    refusal = _bot_api_refusal(token)
    if refusal is not None:
        return refusal
    stored = sandbox.SANDBOX.file_by_path(path)
    if stored is None:
        return JsonResponse(_NOT_FOUND, status=404)
    return HttpResponse(stored.content, content_type="application/octet-stream")


# --- the chat page --------------------------------------------------------------------------


def _operator_door(*, page: bool = False) -> Callable[[View], View]:
    """404 while the sandbox is off; for anyone but active staff a login (the page) or a 403;
    in a process that does not serve the sandbox, a 503 (the page: a 404 that says where it
    is)."""

    def decorate(view: View) -> View:
        @functools.wraps(view)
        def door(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
            if not telegram.sandbox_enabled():
                return JsonResponse(error_body("not_found", "Not found."), status=404)
            user: Any = request.user
            if not (user.is_authenticated and user.is_active and user.is_staff):
                if page:
                    return redirect_to_login(request.get_full_path(), reverse("admin:login"))
                return JsonResponse(
                    error_body("forbidden", "The sandbox is for staff: log in at /admin/."),
                    status=403,
                )
            if not runtime.sandbox_served_here():
                if page:
                    # A 404 page, not a 5xx: nothing is broken, the sandbox is elsewhere.
                    return render(request, "docbot/sandbox.html", {"not_here": True}, status=404)
                return JsonResponse(
                    error_body(
                        "sandbox_not_here",
                        "This process does not run the sandbox bot: it runs inside `make run`.",
                    ),
                    status=503,
                )
            return view(request, *args, **kwargs)

        return door

    return decorate


def _operator(request: HttpRequest) -> dict[str, Any]:
    user: Any = request.user
    return operator_user(int(user.pk), user.get_username())


def _bubbles(user: dict[str, Any]) -> dict[str, Any]:
    """The transcript as the templates show it."""
    found = sandbox.SANDBOX.transcript(user)
    bubbles = []
    for message in found.messages:
        photo = message.get("photo") or []
        bubbles.append(
            {
                "id": message["message_id"],
                "outgoing": message["outgoing"],
                "text": message.get("text") or message.get("caption") or "",
                "edited": "edit_date" in message,
                "file": message.get("document") or (photo[-1] if photo else None),
                "photo": bool(photo),
                "buttons": message.get("reply_markup", {}).get("inline_keyboard", []),
            }
        )
    return {
        "version": found.version,
        "bubbles": bubbles,
        "keyboard": found.keyboard,
        "notes": found.notes,
        "bot_polling": found.bot_polling,
    }


@_operator_door(page=True)
@require_GET
def chat(request: HttpRequest) -> HttpResponse:
    """The operator's chat with the bot."""
    user = _operator(request)
    return render(request, "docbot/sandbox.html", {"you": user, **_bubbles(user)})


@_operator_door()
@require_GET
def transcript(request: HttpRequest) -> HttpResponse:
    """The chat as an HTML fragment with its version in `X-Sandbox-Version`; 204 while it is
    still the `version` the page has."""
    context = _bubbles(_operator(request))
    if request.GET.get("version") == str(context["version"]):
        return HttpResponse(status=204)
    response = render(request, "docbot/sandbox_transcript.html", context)
    response["X-Sandbox-Version"] = str(context["version"])
    return response


@_operator_door()
@require_GET
def messages(request: HttpRequest) -> JsonResponse:
    """The chat as JSON: `version`, `messages` (Telegram `Message` objects, oldest first, each
    with `outgoing`: true for the bot's), `keyboard` (the reply keyboard shown), `notes` (the
    bot's latest answers to button presses) and `bot_polling`."""
    found = sandbox.SANDBOX.transcript(_operator(request))
    return JsonResponse(
        {
            "version": found.version,
            "messages": found.messages,
            "keyboard": found.keyboard,
            "notes": found.notes,
            "bot_polling": found.bot_polling,
        }
    )


def _done(request: HttpRequest, update_id: int) -> HttpResponse:
    if "application/json" in request.headers.get("Accept", ""):
        return JsonResponse({"update_id": update_id})
    return redirect("docbot-sandbox")


def _refused(code: str, message: str, details: dict[str, Any] | None = None) -> JsonResponse:
    return JsonResponse(error_body(code, message, details), status=400)


@_operator_door()
@require_POST
def send(request: HttpRequest) -> HttpResponse:
    """Say `text` to the bot (a command when it starts with `/`)."""
    try:
        text = parsers.text(request.POST.get("text"), field="text", max_length=_TEXT_MAX)
    except parsers.InvalidValue as exc:
        return _refused(exc.code, exc.message, exc.details)
    return _done(request, sandbox.SANDBOX.say(_operator(request), text))


@_operator_door()
@require_POST
def press(request: HttpRequest) -> HttpResponse:
    """Press the inline button `data` of the bot's message `message_id`."""
    try:
        message_id = parsers.integer(
            request.POST.get("message_id"), field="message_id", min_value=1
        )
        data = parsers.text(
            request.POST.get("data"), field="data", max_length=schemas.CALLBACK_DATA_MAX_BYTES
        )
        update_id = sandbox.SANDBOX.press(_operator(request), message_id, data)
    except parsers.InvalidValue as exc:
        return _refused(exc.code, exc.message, exc.details)
    except BotApiError as exc:
        return _refused("no_such_button", exc.description)
    return _done(request, update_id)


@_operator_door()
@require_POST
def upload(request: HttpRequest) -> HttpResponse:
    """Send the bot the uploaded `file`, as a document (or a photo with `as_photo`)."""
    received = request.FILES.get("file")
    if received is None:
        return _refused("invalid", "file: is required", {"file": ["is required"]})
    if (received.size or 0) > MAX_FILE_BYTES:
        limit = f"is larger than {MAX_FILE_BYTES} bytes"
        return _refused("invalid", f"file: {limit}", {"file": [limit]})
    update_id = sandbox.SANDBOX.send_file(
        _operator(request),
        file_name=received.name or "file",
        mime_type=received.content_type or "",
        content=received.read(),
        photo=bool(request.POST.get("as_photo")),
    )
    return _done(request, update_id)


@_operator_door()
@require_GET
def sandbox_file(request: HttpRequest, file_id: str) -> HttpResponse:
    """A file of the sandbox (one the operator sent, or one the bot sent back)."""
    stored = sandbox.SANDBOX.file(file_id)
    if stored is None:
        return JsonResponse(error_body("not_found", "No such file."), status=404)
    response = HttpResponse(stored.content, content_type=stored.mime_type)
    # Only raster images are shown in the page; anything else (an SVG or HTML file could run
    # script on this origin) is a download.
    inline = stored.mime_type in _INLINE_TYPES
    disposition = content_disposition_header(not inline, stored.file_name)
    response["Content-Disposition"] = disposition or "attachment"
    return response
