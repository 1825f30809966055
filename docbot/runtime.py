"""Per-process state of docbot: whether the bot is on (Telegram with a token, or the built-in
sandbox), the service token it calls the backend with (checked once per process), the webhook
bot of each event loop, this process's claim on the polling lease (`poll_lease`), and runall's
embedded polling process (which also makes this process the one that serves the sandbox).

The bot package (`docbot/bot/`) is an inbound edge, a floor above this module, so it is not
imported here: `DocbotConfig.ready` hands its two entry points down once (`bot_install`)."""

import asyncio
import os
import socket
import threading
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog
from django.conf import settings

from common.db import orm_async
from docbot import services, telegram, texts

logger = structlog.get_logger(__name__)

#: Hands one webhook body to an initialized bot: True when the update is finished, False when it
#: is being handled elsewhere (deliver it again later); raises `InvalidValue` for a body that
#: is not an Update.
WebhookDeliver = Callable[[bytes], Awaitable[bool]]


@dataclass(frozen=True)
class ServiceLease:
    """This process's claim on one bot's polling lease (`docbot.bot.polling.PollLease`),
    through `services.poll_lease_claim` / `poll_lease_release` (Redis with REDIS_URL, else the
    database), each in a worker thread."""

    bot: str
    holder: str
    ttl: float

    async def claim(self) -> bool:
        return await orm_async(services.poll_lease_claim)(
            bot=self.bot, holder=self.holder, ttl_seconds=self.ttl
        )

    async def release(self) -> None:
        await orm_async(services.poll_lease_release)(bot=self.bot, holder=self.holder)


def poll_lease(bot_token: str) -> ServiceLease:
    """A fresh claimant of the polling lease of the bot `bot_token` names (its numeric id, the
    part before ':'), lasting DOCBOT_POLL_LEASE_SECONDS per claim; the holder names this host,
    process and claimant."""
    holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    ttl = settings.DOCBOT_POLL_LEASE_SECONDS
    return ServiceLease(bot=bot_token.partition(":")[0], holder=holder, ttl=ttl)


@dataclass(frozen=True)
class BotEntry:
    """How this process starts the bot, given the service token (`docbot.bot.application`)."""

    webhook_start: Callable[[str], Awaitable[WebhookDeliver]]
    polling_run: Callable[[str, asyncio.Event, ServiceLease | None], Awaitable[None]]


_lock = threading.Lock()
_bot: BotEntry | None = None
_issued_token: str | None = None
_webhook_bots: dict[asyncio.AbstractEventLoop, asyncio.Task[WebhookDeliver]] = {}
_off_said = False
_sandbox_here = False


def bot_install(entry: BotEntry) -> None:
    """Called once by `DocbotConfig.ready`, the wiring that may import the bot package."""
    global _bot
    _bot = entry


def _bot_entry() -> BotEntry:
    if _bot is None:
        raise RuntimeError("docbot's bot is installed by DocbotConfig.ready (bot_install)")
    return _bot


def bot_enabled() -> bool:
    """A real Telegram bot: TELEGRAM_BOT_TOKEN is set (webhooks and run_docbot need one)."""
    return bool(settings.TELEGRAM_BOT_TOKEN)


def sandbox_served_here() -> bool:
    """True while this process's embedded bot polls the sandbox: only then does this process
    serve the sandbox (its chats live in this process's memory)."""
    return _sandbox_here


def sandbox_url() -> str:
    """The operator's chat page of the sandbox."""
    return settings.DOCBOT_PUBLIC_BASE_URL.rstrip("/") + telegram.SANDBOX_PATH


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


async def service_token() -> str:
    """`service_token_sync` for event-loop callers: in a worker thread, through `orm_call`."""
    return await orm_async(service_token_sync)()


def reset_for_tests() -> None:
    global _issued_token
    with _lock:
        _issued_token = None
    _webhook_bots.clear()


async def _webhook_bot() -> WebhookDeliver:
    """The bot serving webhook updates on the running event loop (one per loop), started on
    first use. Concurrent first requests all await the same start, so none sees a bot that is
    not initialized yet; a failed start is forgotten, so the next request tries again."""
    loop = asyncio.get_running_loop()
    creation = _webhook_bots.get(loop)
    if creation is None:
        creation = loop.create_task(_webhook_bot_start())
        _webhook_bots[loop] = creation
    try:
        return await asyncio.shield(creation)
    except Exception:
        _webhook_bots.pop(loop, None)
        raise


async def _webhook_bot_start() -> WebhookDeliver:
    return await _bot_entry().webhook_start(await service_token())


async def webhook_deliver(body: bytes) -> bool:
    """Hand one webhook body to this event loop's bot (dedupe, the update policy and flood
    control happen inside): True when the update is finished (handled, dropped on purpose, or
    done before), False when another delivery is handling it right now (Telegram must deliver
    it again later). Raises `services.ServiceAccountRefused` when the bot may not start (the
    service token is refused) and `InvalidValue` when the body is not clean JSON or not an
    Update; handler failures never leave the bot (its catch-all answers them)."""
    deliver = await _webhook_bot()
    return await deliver(body)


async def run_embedded(stop: asyncio.Event) -> None:
    """runall's docbot process: polling Telegram when a token is set and DOCBOT_MODE is
    polling; without a token, polling the sandbox this process then serves (DOCBOT_SANDBOX);
    otherwise off."""
    global _sandbox_here
    sandbox = not bot_enabled() and telegram.sandbox_enabled()
    if not bot_enabled() and not sandbox:
        say_off_once()
        await stop.wait()
        return
    if not sandbox and settings.DOCBOT_MODE != "polling":
        await stop.wait()
        return
    # Serving from the start, so the page and the Bot API answer as soon as the server does.
    _sandbox_here = sandbox
    try:
        try:
            token = await service_token()
        except services.ServiceAccountRefused as exc:
            # The bot stays off; the rest of the system keeps running.
            logger.error("docbot_refused_to_start", code=exc.code, reason=exc.message)
            await stop.wait()
            return
        if sandbox:
            logger.info("docbot_sandbox", chat_page=sandbox_url())
        # The sandbox's Bot API is this process's own: no other poller can reach it.
        lease = None if sandbox else poll_lease(settings.TELEGRAM_BOT_TOKEN)
        await _bot_entry().polling_run(token, stop, lease)
    finally:
        _sandbox_here = False


def describe() -> str:
    if not bot_enabled():
        if telegram.sandbox_enabled():
            return (
                f"{'Docbot':<12} sandbox chat {sandbox_url()} "
                "(no TELEGRAM_BOT_TOKEN: a local Bot API stand-in; staff login)"
            )
        return f"{'Docbot':<12} off (TELEGRAM_BOT_TOKEN not set, DOCBOT_SANDBOX off)"
    if settings.DOCBOT_MODE == "webhook":
        return f"{'Docbot':<12} webhook at /docbot/webhook"
    return f"{'Docbot':<12} polling {settings.TELEGRAM_API_BASE_URL}"
