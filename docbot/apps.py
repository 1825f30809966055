from django.apps import AppConfig


class DocbotConfig(AppConfig):
    name = "docbot"
    verbose_name = "Docbot: Telegram document vault"

    def ready(self) -> None:
        from common.console import console_gauge_register, console_panel_register
        from common.processes import EmbeddedProcess, embedded_process_register
        from docbot import console, metrics, runtime
        from docbot.bot import application

        # The wiring hands the bot down to the per-process state below it (runtime may not
        # import the bot package, an inbound edge).
        runtime.bot_install(
            runtime.BotEntry(
                webhook_start=application.webhook_start, polling_run=application.polling_run
            )
        )
        embedded_process_register(
            EmbeddedProcess(name="docbot", run=runtime.run_embedded, describe=runtime.describe)
        )
        console_panel_register(console.panel)
        console_gauge_register(console.DIALOGS, metrics.dialogs_active)
