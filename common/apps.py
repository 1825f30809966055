from django.apps import AppConfig
from django.urls import register_converter


class CommonConfig(AppConfig):
    name = "common"
    verbose_name = "Platform"

    def ready(self) -> None:
        from common.converters import IdConverter, IdentifierConverter

        register_converter(IdConverter, "id")
        register_converter(IdentifierConverter, "ident")
