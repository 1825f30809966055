"""Wiring of the bot into this deployment: the service token (checked before the bot starts),
the per-event-loop webhook Application, and the embedded polling process for `runall`."""

import asyncio
import threading

import structlog
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connections

from docbot import services
from docbot.bot import texts
from docbot.bot.application import (
    DocbotApplication,
    application_close,
    build_application,
    run_polling,
    settings_from_django,
)

logger = structlog.get_logger(__name__)

_lock = threading.Lock()
_issued_token: str | None = None
_webhook_apps: dict[asyncio.AbstractEventLoop, asyncio.Task[DocbotApplication]] = {}
_off_said = False


def bot_enabled() -> bool:
    return bool(settings.TELEGRAM_BOT_TOKEN)


def say_off_once() -> None:
    global _off_said
    with _lock:
        if _off_said:
            return
        _off_said = True
    logger.warning("docbot_off", reason=texts.BOT_OFF)


def service_token_sync() -> str:
    """The token the bot calls the backend with, checked once per process.

    DOCBOT_SERVICE_TOKEN when set: it must be a token of the service identity, whose password
    must be unusable. Unset (the zero-setup default of `make run`, `runall` and compose): this
    process is the operator's own, so it makes the identity if missing and uses the
    installation's derived token (`services.service_token_default`). Raises
    `services.ServiceAccountRefused`, with the reason and the fix, instead of starting."""
    global _issued_token
    with _lock:
        if _issued_token is None:
            configured = str(settings.DOCBOT_SERVICE_TOKEN or "").strip()
            if configured:
                services.service_token_check(token=configured)
                _issued_token = configured
            else:
                _issued_token = services.service_token_default()
        return _issued_token


def _service_token_off_request() -> str:
    """For event-loop callers: runs in a pool thread, which must not keep a DB connection."""
    try:
        return service_token_sync()
    finally:
        connections.close_all()


def reset_for_tests() -> None:
    global _issued_token
    with _lock:
        _issued_token = None
    _webhook_apps.clear()


async def _webhook_application_create() -> DocbotApplication:
    token = await sync_to_async(_service_token_off_request, thread_sensitive=False)()
    application = build_application(settings_from_django(service_token=token, mode="webhook"))
    await application.initialize()
    return application


async def webhook_application() -> DocbotApplication:
    """The Application serving webhook updates on the running event loop (one per loop).

    Concurrent first requests all await the same creation task, so none sees an Application
    that is not initialized yet."""
    loop = asyncio.get_running_loop()
    creation = _webhook_apps.get(loop)
    if creation is None:
        creation = loop.create_task(_webhook_application_create())
        _webhook_apps[loop] = creation
    try:
        return await asyncio.shield(creation)
    except Exception:
        _webhook_apps.pop(loop, None)
        raise


async def webhook_applications_close() -> None:
    loop = asyncio.get_running_loop()
    creation = _webhook_apps.pop(loop, None)
    if creation is not None:
        await application_close(await creation)


async def run_embedded(stop: asyncio.Event) -> None:
    """runall's docbot process: polling when a token is set and DOCBOT_MODE is polling."""
    if not bot_enabled():
        say_off_once()
        await stop.wait()
        return
    if settings.DOCBOT_MODE != "polling":
        await stop.wait()
        return
    try:
        token = await sync_to_async(_service_token_off_request, thread_sensitive=False)()
    except services.ServiceAccountRefused as exc:
        # The bot stays off; the rest of the system keeps running.
        logger.error("docbot_refused_to_start", code=exc.code, reason=exc.message)
        await stop.wait()
        return
    await run_polling(settings_from_django(service_token=token, mode="polling"), stop)


def describe() -> str:
    if not bot_enabled():
        return f"  {'Docbot':<12} off (TELEGRAM_BOT_TOKEN not set)"
    if settings.DOCBOT_MODE == "webhook":
        return f"  {'Docbot':<12} webhook at /docbot/webhook"
    return f"  {'Docbot':<12} polling {settings.TELEGRAM_API_BASE_URL}"
