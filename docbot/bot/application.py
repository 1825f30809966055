"""Building and running the python-telegram-bot Application: polling, and webhook updates
handed over by the ASGI view. Knows no models: data goes through `Backend`, state through
`DialogStore`. PTB's Updater is not used: updates are parsed by `update_parse` and fetched by
the tolerant `Poller` (docbot/bot/polling.py)."""

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog
from django.conf import settings
from telegram.ext import AIORateLimiter, Application, ApplicationBuilder
from telegram.request import BaseRequest

from common import parsers
from docbot.bot.backend import Backend
from docbot.bot.handlers import handlers_install
from docbot.bot.polling import Poller, PollPolicy
from docbot.bot.state import DialogStore
from docbot.bot.turn import BotConfig
from docbot.bot.updates import MAX_UPDATE_BYTES, update_parse

logger = structlog.get_logger(__name__)

DocbotApplication = Application[Any, Any, Any, Any, Any, Any]


@dataclass(frozen=True)
class BotSettings:
    token: str
    base_url: str
    base_file_url: str
    backend_url: str
    service_token: str
    mode: str = "polling"
    flood_max_per_second: int = 5
    max_file_bytes: int = 20 * 1024 * 1024
    state_ttl_seconds: int = 7 * 24 * 3600
    rate_limit_per_second: float = 30.0
    poll_retry_first: float = 0.5
    poll_retry_max: float = 30.0


def settings_from_django(*, service_token: str, mode: str | None = None) -> BotSettings:
    return BotSettings(
        token=settings.TELEGRAM_BOT_TOKEN,
        base_url=settings.TELEGRAM_API_BASE_URL,
        base_file_url=settings.TELEGRAM_FILE_BASE_URL,
        backend_url=settings.DOCBOT_BACKEND_URL,
        service_token=service_token,
        mode=mode or settings.DOCBOT_MODE,
        flood_max_per_second=settings.DOCBOT_FLOOD_MAX_PER_SECOND,
        max_file_bytes=settings.DOCBOT_MAX_FILE_BYTES,
        state_ttl_seconds=settings.DOCBOT_STATE_TTL_SECONDS,
        rate_limit_per_second=settings.DOCBOT_RATE_LIMIT_PER_SECOND,
    )


def build_application(
    config: BotSettings,
    *,
    request: BaseRequest | None = None,
    backend_transport: Any = None,
    store: DialogStore | None = None,
) -> DocbotApplication:
    """`request` replaces python-telegram-bot's HTTP layer (offline unit tests only)."""
    builder = (
        ApplicationBuilder()
        .token(config.token)
        .base_url(config.base_url)
        .base_file_url(config.base_file_url)
        .concurrent_updates(True)
        .updater(None)
    )
    if request is not None:
        builder = builder.request(request).get_updates_request(request)
    else:
        builder = builder.connection_pool_size(64).pool_timeout(10.0)
    if config.rate_limit_per_second > 0:
        builder = builder.rate_limiter(
            AIORateLimiter(  # type: ignore[arg-type]
                overall_max_rate=config.rate_limit_per_second, max_retries=2
            )
        )
    application: DocbotApplication = builder.build()
    backend = Backend(config.backend_url, config.service_token, transport=backend_transport)
    application.bot_data["backend"] = backend
    application.bot_data["store"] = store or DialogStore(ttl_seconds=config.state_ttl_seconds)
    application.bot_data["config"] = BotConfig(
        mode=config.mode,
        flood_max_per_second=config.flood_max_per_second,
        max_file_bytes=config.max_file_bytes,
    )
    handlers_install(application)
    return application


async def application_close(application: DocbotApplication) -> None:
    with contextlib.suppress(Exception):
        await application.shutdown()
    await application.bot_data["backend"].aclose()


async def webhook_start(service_token: str) -> Callable[[bytes], Awaitable[None]]:
    """This deployment's webhook bot (Django settings, mode `webhook`), initialized. Returns
    the function that hands it one webhook body (`process_webhook_body`)."""
    application = build_application(
        settings_from_django(service_token=service_token, mode="webhook")
    )
    await application.initialize()
    return functools.partial(process_webhook_body, application)


async def polling_run(service_token: str, stop: asyncio.Event) -> None:
    """This deployment's bot long-polling (Django settings, mode `polling`) until `stop`."""
    await run_polling(settings_from_django(service_token=service_token, mode="polling"), stop)


async def process_webhook_body(application: DocbotApplication, body: bytes) -> None:
    """Parse one webhook body and hand the update to the dialog (dedupe, the update policy and
    flood control happen inside). Raises `InvalidValue` (the view's 400) when the body is not
    clean JSON (`json_document`) or not an Update (`update_parse`); handler failures never
    leave `process_update` (the bot's catch-all answers them)."""
    data = parsers.json_document(body, field="body", max_bytes=MAX_UPDATE_BYTES)
    update = update_parse(data, application.bot)
    try:
        await application.process_update(update)
    finally:
        structlog.contextvars.unbind_contextvars("request_id")


async def run_polling(
    config: BotSettings, stop: asyncio.Event, *, poll_timeout: int = 10, poll_interval: float = 0
) -> None:
    """Long-poll getUpdates until `stop` is set, then finish in-flight updates and return."""
    application = build_application(config)
    await application.initialize()
    try:
        await application.start()
        logger.info("docbot_polling_started", bot=application.bot.username)
        policy = PollPolicy(
            timeout=poll_timeout,
            interval=poll_interval,
            retry_first=config.poll_retry_first,
            retry_max=config.poll_retry_max,
        )
        await Poller(application.bot, application.update_queue, policy, mode=config.mode).run(stop)
        await application.stop()
    finally:
        await application_close(application)
        logger.info("docbot_polling_stopped")
