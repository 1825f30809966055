from django.apps import AppConfig


class DocbotConfig(AppConfig):
    name = "docbot"
    verbose_name = "Docbot: Telegram document vault"

    def ready(self) -> None:
        from common.processes import EmbeddedProcess, embedded_process_register
        from docbot import runtime

        embedded_process_register(
            EmbeddedProcess(name="docbot", run=runtime.run_embedded, describe=runtime.describe)
        )
