"""The bot as its own process: long polling, or webhook registration."""

import asyncio
import signal
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from telegram import Bot

from common.metrics import metrics_server_start
from docbot import runtime, services
from docbot.bot import texts
from docbot.bot.application import run_polling, settings_from_django
from docbot.bot.updates import ALLOWED_UPDATES


class Command(BaseCommand):
    help = "Run the docbot Telegram bot (polling), or register its webhook (--set-webhook URL)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--mode", choices=["polling", "webhook"], default=None)
        parser.add_argument("--set-webhook", metavar="URL", default=None)
        parser.add_argument("--poll-timeout", type=int, default=10)

    def handle(self, *args: Any, **options: Any) -> None:
        if not runtime.bot_enabled():
            self.stdout.write(texts.BOT_OFF)
            # Idle instead of exiting: a process manager (honcho, compose) would otherwise
            # stop or restart its siblings.
            asyncio.run(self._idle())
            return
        if options["set_webhook"]:
            asyncio.run(self._set_webhook(options["set_webhook"]))
            return
        mode = options["mode"] or settings.DOCBOT_MODE
        if mode == "webhook":
            self.stdout.write(
                "Webhook mode: updates arrive at POST /docbot/webhook on the web process; "
                "register it with --set-webhook URL. Nothing to poll."
            )
            asyncio.run(self._idle())
            return
        try:
            runtime.service_token_sync()
        except services.ServiceAccountRefused as exc:
            raise CommandError(f"docbot refuses to start: {exc.message}") from exc
        metrics_server_start(settings.METRICS_PORT, settings.BIND_HOST)
        asyncio.run(self._poll(options["poll_timeout"]))

    @staticmethod
    def _stop_event() -> asyncio.Event:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        return stop

    async def _idle(self) -> None:
        await self._stop_event().wait()

    async def _poll(self, poll_timeout: int) -> None:
        stop = self._stop_event()
        from asgiref.sync import sync_to_async

        # Checked in handle() already; this only returns the cached token.
        token = await sync_to_async(runtime.service_token_sync, thread_sensitive=True)()
        self.stdout.write("docbot polling; Ctrl-C stops.")
        await run_polling(
            settings_from_django(service_token=token, mode="polling"),
            stop,
            poll_timeout=poll_timeout,
        )

    async def _set_webhook(self, url: str) -> None:
        bot = Bot(
            settings.TELEGRAM_BOT_TOKEN,
            base_url=settings.TELEGRAM_API_BASE_URL,
            base_file_url=settings.TELEGRAM_FILE_BASE_URL,
        )
        async with bot:
            await bot.set_webhook(
                url,
                secret_token=settings.TELEGRAM_WEBHOOK_SECRET or None,
                allowed_updates=list(ALLOWED_UPDATES),
            )
        self.stdout.write(f"Webhook set to {url}")
