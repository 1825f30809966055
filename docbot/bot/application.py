"""Building and running the python-telegram-bot Application: polling, and webhook updates
handed over by the ASGI view. Knows no models: data goes through `Backend`, state through
`DialogStore`. PTB's Updater is not used: updates are parsed by `update_parse` and fetched by
the tolerant `Poller` (docbot/bot/polling.py). Updates of different users run concurrently,
one user's in the order they arrived (`PerUserOrder`)."""

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog
from django.conf import settings
from telegram import Update
from telegram.error import InvalidToken, NetworkError
from telegram.ext import AIORateLimiter, Application, ApplicationBuilder, BaseUpdateProcessor
from telegram.request import BaseRequest

from common import parsers
from docbot import telegram
from docbot.bot.backend import Backend
from docbot.bot.handlers import handlers_install
from docbot.bot.polling import Backoff, Poller, PollPolicy, pause
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
    """This deployment's bot: the Bot API `telegram.bot_api` names (Telegram with
    TELEGRAM_BOT_TOKEN, else the sandbox) and the DOCBOT_* settings. Raises RuntimeError when
    the bot is off (neither)."""
    api = telegram.bot_api()
    if api is None:
        raise RuntimeError("docbot is off: no TELEGRAM_BOT_TOKEN and DOCBOT_SANDBOX is off")
    return BotSettings(
        token=api.token,
        base_url=api.base_url,
        base_file_url=api.base_file_url,
        backend_url=settings.DOCBOT_BACKEND_URL,
        service_token=service_token,
        mode=mode or settings.DOCBOT_MODE,
        flood_max_per_second=settings.DOCBOT_FLOOD_MAX_PER_SECOND,
        max_file_bytes=settings.DOCBOT_MAX_FILE_BYTES,
        state_ttl_seconds=settings.DOCBOT_STATE_TTL_SECONDS,
        rate_limit_per_second=settings.DOCBOT_RATE_LIMIT_PER_SECOND,
    )


class PerUserOrder(BaseUpdateProcessor):
    """Up to `max_concurrent_updates` updates at a time, but one user's one after the other in
    arrival order (asyncio locks are FIFO): a file sent right after its name is handled after
    the name, never beside it. Per process; updates without a user run freely."""

    def __init__(self, max_concurrent_updates: int) -> None:
        super().__init__(max_concurrent_updates)
        self._locks: dict[int, tuple[asyncio.Lock, int]] = {}

    async def do_process_update(self, update: object, coroutine: Awaitable[Any]) -> None:
        user = update.effective_user if isinstance(update, Update) else None
        if user is None:
            await coroutine
            return
        lock, holders = self._locks.get(user.id, (asyncio.Lock(), 0))
        self._locks[user.id] = (lock, holders + 1)
        try:
            async with lock:
                await coroutine
        finally:
            lock, holders = self._locks[user.id]
            if holders == 1:
                del self._locks[user.id]
            else:
                self._locks[user.id] = (lock, holders - 1)

    async def initialize(self) -> None:
        return None

    async def shutdown(self) -> None:
        return None


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
        .concurrent_updates(PerUserOrder(256))
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
    await application.bot_data["store"].aclose()


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
        await application.update_processor.process_update(
            update, application.process_update(update)
        )
    finally:
        structlog.contextvars.unbind_contextvars("request_id")


async def _initialize(
    application: DocbotApplication, config: BotSettings, stop: asyncio.Event
) -> bool:
    """Initialize (getMe), retrying while the Bot API cannot be reached (the sandbox's web
    server may still be starting), with the poller's backoff. False when `stop` came first;
    raises `InvalidToken` at once."""
    backoff = Backoff(config.poll_retry_first, config.poll_retry_max)
    while not stop.is_set():
        try:
            await application.initialize()
            return True
        except InvalidToken:
            raise
        except NetworkError as exc:
            delay = backoff.take()
            logger.warning("docbot_bot_api_unreachable", error=repr(exc)[:500], retry_in=delay)
            await pause(stop, delay)
    return False


async def run_polling(
    config: BotSettings, stop: asyncio.Event, *, poll_timeout: int = 10, poll_interval: float = 0
) -> None:
    """Long-poll getUpdates until `stop` is set, then finish in-flight updates and return."""
    application = build_application(config)
    try:
        if not await _initialize(application, config, stop):
            return
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
