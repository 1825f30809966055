"""Building and running the python-telegram-bot Application: polling, and webhook updates
handed over by the ASGI view. Knows no models: data goes through `Backend`, state through
`DialogStore`. PTB's Updater is not used: updates are parsed by `update_parse` and fetched by
the tolerant `Poller` (docbot/bot/polling.py). Updates of different users run concurrently,
one user's in the order they arrived (`PerUserOrder`). Both modes hand each update to
`update_handle`, which makes handling at-least-once: an update is claimed when its handling
starts and marked done when it ends, so only a finished update is ever dropped as a duplicate
(the poller confirms it to Telegram only then; the webhook answers 2xx only then)."""

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
from docbot.bot.polling import Backoff, Poller, PollLease, PollPolicy, pause
from docbot.bot.state import CLAIM_SECONDS, DialogStore
from docbot.bot.turn import BotConfig, Turn, turn_start
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
    update_claim_seconds: float = CLAIM_SECONDS


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
        update_claim_seconds=settings.DOCBOT_UPDATE_CLAIM_SECONDS,
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
    application.bot_data["store"] = store or DialogStore(
        ttl_seconds=config.state_ttl_seconds, claim_seconds=config.update_claim_seconds
    )
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


async def webhook_start(service_token: str) -> Callable[[bytes], Awaitable[bool]]:
    """This deployment's webhook bot (Django settings, mode `webhook`), initialized. Returns
    the function that hands it one webhook body (`process_webhook_body`)."""
    application = build_application(
        settings_from_django(service_token=service_token, mode="webhook")
    )
    await application.initialize()
    return functools.partial(process_webhook_body, application)


async def polling_run(service_token: str, stop: asyncio.Event, lease: PollLease | None) -> None:
    """This deployment's bot long-polling (Django settings, mode `polling`) until `stop`, while
    it holds `lease` (`run_polling`)."""
    config = settings_from_django(service_token=service_token, mode="polling")
    await run_polling(config, stop, lease=lease)


async def process_webhook_body(application: DocbotApplication, body: bytes) -> bool:
    """Parse one webhook body and handle the update (`update_handle`): True when it is finished
    (the view's 2xx), False when it is being handled elsewhere and Telegram must deliver it again
    later. Raises `InvalidValue` (the view's 400) when the body is not clean JSON
    (`json_document`) or not an Update (`update_parse`)."""
    data = parsers.json_document(body, field="body", max_bytes=MAX_UPDATE_BYTES)
    update = update_parse(data, application.bot)
    return await update_handle(application, update)


async def update_handle(application: DocbotApplication, update: Update) -> bool:
    """Handle one update to the end, at least once across processes: dedupe, the update policy,
    flood control and the dialog run inside (`handlers.middleware` claims the update; handler
    failures are answered by the bot's catch-all). A claim is renewed every third of its TTL
    while the update is handled, marked done (`DialogStore.finish`) once it is, and released
    when the handling is cancelled (the webhook's client hung up), so a redelivery handles it
    at once. Returns True when the update is finished (handled, deliberately dropped, or done
    before), False when another delivery's claim on it is fresh (`busy`: deliver it again
    later). Raises CancelledError when cancelled."""
    store: DialogStore = application.bot_data["store"]
    current = turn_start(update.update_id)
    keeper = asyncio.ensure_future(_claim_keep(store, current, update.update_id))
    try:
        await application.update_processor.process_update(
            update, application.process_update(update)
        )
    except asyncio.CancelledError:
        if current.claimed:
            try:
                await store.claim_release(update.update_id)
            except Exception as exc:  # it expires after claim_seconds anyway
                logger.warning("docbot_claim_release_failed", error=repr(exc)[:300])
        raise
    finally:
        keeper.cancel()
        structlog.contextvars.unbind_contextvars("request_id")
    if current.claimed:
        await store.finish(update.update_id)
    return not current.busy


async def _claim_keep(store: DialogStore, current: Turn, update_id: int) -> None:
    """Renew the turn's claim every third of its TTL while the update is being handled (most
    updates finish before the first renewal)."""
    while True:
        await asyncio.sleep(store.claim_seconds / 3)
        if current.claimed:
            await store.claim_renew(update_id)


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
    config: BotSettings,
    stop: asyncio.Event,
    *,
    lease: PollLease | None,
    poll_timeout: int = 10,
    poll_interval: float = 0,
) -> None:
    """Long-poll getUpdates until `stop` is set, then finish in-flight updates, confirm them
    and return.
    With `lease`, getUpdates is called only while this process holds it (standby otherwise;
    `docbot.bot.polling`); None only where no other poller can exist (the in-process
    sandbox)."""
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
        poller = Poller(
            application.bot,
            functools.partial(update_handle, application),
            policy,
            mode=config.mode,
            lease=lease,
        )
        await poller.run(stop)
        await application.stop()
    finally:
        await application_close(application)
        logger.info("docbot_polling_stopped")
