"""The bot as its own process: long polling, or webhook registration."""

import asyncio
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from telegram import Bot

from common.heartbeat import process_heartbeat_start
from common.metrics import metrics_server_start
from common.signals import run_until_signal
from docbot import runtime, services, telegram, texts
from docbot.bot.application import run_polling, settings_from_django
from docbot.bot.updates import ALLOWED_UPDATES


class Command(BaseCommand):
    help = "Run the docbot Telegram bot (polling), or register its webhook (--set-webhook URL)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--mode", choices=["polling", "webhook"], default=None)
        parser.add_argument("--set-webhook", metavar="URL", default=None)
        parser.add_argument("--poll-timeout", type=int, default=10)

    def handle(self, *args: Any, **options: Any) -> None:
        process_heartbeat_start("bot")
        if not runtime.bot_enabled():
            if telegram.sandbox_enabled():
                self.stdout.write(
                    "No TELEGRAM_BOT_TOKEN: the bot serves the sandbox, which runs inside "
                    f"`make run` (manage.py runall) at {runtime.sandbox_url()}. Nothing to do "
                    "in this process."
                )
            else:
                self.stdout.write(texts.BOT_OFF)
            # Idle instead of exiting: a process manager (honcho, compose) would otherwise
            # stop or restart its siblings.
            run_until_signal(self._idle)
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
            run_until_signal(self._idle)
            return
        try:
            token = runtime.service_token_sync()
        except services.ServiceAccountRefused as exc:
            raise CommandError(f"docbot refuses to start: {exc.message}") from exc
        metrics_server_start(settings.METRICS_PORT, settings.BIND_HOST)
        config = settings_from_django(service_token=token, mode="polling")
        poll_timeout = options["poll_timeout"]

        async def poll(stop: asyncio.Event) -> None:
            self.stdout.write("docbot polling; Ctrl-C stops.")
            # Single-active: a second copy stands by until this one's lease expires.
            lease = runtime.poll_lease(config.token)
            await run_polling(config, stop, lease=lease, poll_timeout=poll_timeout)

        run_until_signal(poll)

    @staticmethod
    async def _idle(stop: asyncio.Event) -> None:
        await stop.wait()

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
