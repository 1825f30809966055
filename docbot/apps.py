from django.apps import AppConfig


class DocbotConfig(AppConfig):
    name = "docbot"
    verbose_name = "Docbot: Telegram document vault"
